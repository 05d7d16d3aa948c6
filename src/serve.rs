//! What the two local web pages (`eval serve`, `ui`) share: listening, and
//! the `Host` check that keeps a page on loopback from being read by
//! another site through DNS rebinding (a name that resolves to 127.0.0.1
//! after the browser let that site's script talk to it).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Serves `router` on `host:port` (0: any free port) until Ctrl-C, with
/// the Host check. `banner` gets the address (`http://IP:PORT/`) and
/// gives the lines written first; written, not printed: a caller that read
/// them and closed stdout must not stop the server.
pub async fn run(
    host: &str,
    port: u16,
    router: axum::Router,
    banner: impl FnOnce(&str) -> String,
) -> Result<()> {
    let (listener, local) = listen(host, port).await?;
    let router = router.layer(axum::middleware::from_fn_with_state(
        allowed_hosts(local),
        host_guard,
    ));
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", banner(&format!("http://{local}/")));
    let _ = out.flush();
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Binds `host:port`; the address it got (port 0 picks a free one).
async fn listen(host: &str, port: u16) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .or_else(|_| format!("[{host}]:{port}").parse())
        .with_context(|| format!("`{host}:{port}` is not an address to listen on"))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("listening on {addr} (another port: --port N; 0 picks a free one)")
    })?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// The `Host` values a page listening on `local` answers: on loopback,
/// only the loopback names with its port; elsewhere (`--host 0.0.0.0`, the
/// user's choice to expose it) any.
fn allowed_hosts(local: SocketAddr) -> Option<Arc<Vec<String>>> {
    if !local.ip().is_loopback() {
        return None;
    }
    let port = local.port();
    Some(Arc::new(vec![
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ]))
}

/// Middleware: a request whose `Host` is not one of `allowed` gets 421.
async fn host_guard(
    State(allowed): State<Option<Arc<Vec<String>>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(allowed) = allowed {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !allowed.contains(&host) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this page answers only as {} (Host `{host}` refused)",
                    allowed.join(" or ")
                ),
            )
                .into_response();
        }
    }
    next.run(request).await
}
