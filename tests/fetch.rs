//! `haic-pipe data fetch` against a loopback HTTP server serving the shipped
//! files: checksums, resume after a dropped connection, atomic placement.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Project, assert_error, repo, stderr};
use md5::{Digest, Md5};

fn shipped(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("data/fashion-mnist").join(name)).unwrap()
}

fn md5_hex(b: &[u8]) -> String {
    format!("{:x}", Md5::digest(b))
}

/// Serves `files` on 127.0.0.1; paths in `flaky` drop the connection halfway
/// through their first full response. Handles at most `max_requests`, and
/// stops by itself after 60 s.
fn serve(
    files: HashMap<String, Vec<u8>>,
    flaky: Vec<String>,
    max_requests: usize,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut served = 0;
        let mut dropped: Vec<String> = Vec::new();
        while served < max_requests && start.elapsed() < Duration::from_secs(60) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            served += 1;
            stream.set_nonblocking(false).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let path = request
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/')
                .to_string();
            let mut range_start = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_start = v.trim().trim_end_matches('-').parse::<usize>().ok();
                }
            }
            seen.lock().unwrap().push(format!("{path} {range_start:?}"));
            let mut out = stream;
            let Some(body) = files.get(&path) else {
                let _ = out.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let (status, slice) = match range_start {
                Some(s) if s < body.len() => ("206 Partial Content", &body[s..]),
                _ => ("200 OK", &body[..]),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                slice.len()
            );
            let _ = out.write_all(head.as_bytes());
            if flaky.contains(&path) && !dropped.contains(&path) && range_start.is_none() {
                dropped.push(path.clone());
                let _ = out.write_all(&slice[..slice.len() / 2]);
                continue; // the connection closes early
            }
            let _ = out.write_all(slice);
        }
    });
    (base, log)
}

fn catalog(p: &Project, base: &str, files: &[(&str, String)]) -> PathBuf {
    let entries: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, md5)| serde_json::json!({"url": format!("{base}/{name}"), "name": name, "md5": md5}))
        .collect();
    let cat =
        serde_json::json!([{"name": "fm-small", "licence": "MIT, Zalando SE", "files": entries}]);
    let path = p.path("catalog.json");
    std::fs::write(&path, cat.to_string()).unwrap();
    path
}

/// `haic-pipe data fetch fm-small --catalog CAT --dest got`.
fn fetch_into_got(p: &Project, cat: &Path) -> std::process::Output {
    let cat = cat.to_str().unwrap();
    p.haic(&[
        "data",
        "fetch",
        "fm-small",
        "--catalog",
        cat,
        "--dest",
        "got",
    ])
}

#[test]
fn a_broken_download_resumes_and_lands_only_when_its_checksum_matches() {
    let p = Project::new("stages: {}\n");
    let images = shipped("t10k-images-idx3-ubyte.gz");
    let labels = shipped("t10k-labels-idx1-ubyte.gz");
    let mut files = HashMap::new();
    files.insert("t10k-images-idx3-ubyte.gz".to_string(), images.clone());
    files.insert("t10k-labels-idx1-ubyte.gz".to_string(), labels.clone());
    let (base, log) = serve(files, vec!["t10k-images-idx3-ubyte.gz".into()], 10);
    let cat = catalog(
        &p,
        &base,
        &[
            ("t10k-labels-idx1-ubyte.gz", md5_hex(&labels)),
            ("t10k-images-idx3-ubyte.gz", md5_hex(&images)),
        ],
    );
    let first = fetch_into_got(&p, &cat);
    assert_eq!(first.status.code(), Some(2), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("run the same command again to resume"),
        "{}",
        stderr(&first)
    );
    assert_eq!(
        std::fs::read(p.path("got/t10k-labels-idx1-ubyte.gz")).unwrap(),
        labels
    );
    assert!(
        !p.path("got/t10k-images-idx3-ubyte.gz").exists(),
        "a partial file never takes the final name"
    );
    let part = std::fs::metadata(p.path("got/.t10k-images-idx3-ubyte.gz.part"))
        .unwrap()
        .len();
    assert_eq!(part, images.len() as u64 / 2);

    let second = fetch_into_got(&p, &cat);
    assert!(second.status.success(), "{}", stderr(&second));
    let err = stderr(&second);
    assert!(
        err.contains("t10k-labels-idx1-ubyte.gz: already there, checksum ok"),
        "{err}"
    );
    assert!(err.contains(&format!("(resumed at {part})")), "{err}");
    assert_eq!(
        std::fs::read(p.path("got/t10k-images-idx3-ubyte.gz")).unwrap(),
        images
    );
    assert!(!p.path("got/.t10k-images-idx3-ubyte.gz.part").exists());
    let requests = log.lock().unwrap().clone();
    assert!(
        requests.contains(&format!("t10k-images-idx3-ubyte.gz Some({part})")),
        "{requests:?}"
    );
}

#[test]
fn a_checksum_mismatch_discards_the_download() {
    let p = Project::new("stages: {}\n");
    let labels = shipped("t10k-labels-idx1-ubyte.gz");
    let mut files = HashMap::new();
    files.insert("t10k-labels-idx1-ubyte.gz".to_string(), labels);
    let (base, _) = serve(files, vec![], 5);
    let cat = catalog(
        &p,
        &base,
        &[
            ("t10k-labels-idx1-ubyte.gz", "0".repeat(32)),
            ("missing.gz", "0".repeat(32)),
        ],
    );
    let out = fetch_into_got(&p, &cat);
    assert_error(&out, 2, "checksum mismatch");
    assert!(!p.path("got/t10k-labels-idx1-ubyte.gz").exists());
    assert!(!p.path("got/.t10k-labels-idx1-ubyte.gz.part").exists());

    // A file the server does not have.
    let cat = catalog(&p, &base, &[("missing.gz", "0".repeat(32))]);
    let out = fetch_into_got(&p, &cat);
    assert_error(&out, 2, "the server answered HTTP 404");
}

#[test]
fn an_archive_is_unpacked_to_the_listed_members_only() {
    let p = Project::new("stages: {}\n");
    std::fs::create_dir_all(p.path("src/cifar-10-batches-bin")).unwrap();
    std::fs::write(
        p.path("src/cifar-10-batches-bin/data_batch_1.bin"),
        b"batch one",
    )
    .unwrap();
    std::fs::write(
        p.path("src/cifar-10-batches-bin/readme.html"),
        b"not listed",
    )
    .unwrap();
    let ok = std::process::Command::new("tar")
        .args(["-czf", "a.tar.gz", "-C", "src", "cifar-10-batches-bin"])
        .current_dir(p.dir.path())
        .status()
        .unwrap();
    assert!(ok.success());
    let archive = std::fs::read(p.path("a.tar.gz")).unwrap();
    let mut files = HashMap::new();
    files.insert("a.tar.gz".to_string(), archive.clone());
    let (base, _) = serve(files, vec![], 5);
    let cat = serde_json::json!([{"name": "arch", "licence": "test", "files": [{
        "url": format!("{base}/a.tar.gz"), "name": "a.tar.gz", "md5": md5_hex(&archive),
        "extract": [["cifar-10-batches-bin/data_batch_1.bin", "data_batch_1.bin"]]}]}]);
    std::fs::write(p.path("cat.json"), cat.to_string()).unwrap();
    let out = p.haic(&[
        "data",
        "fetch",
        "arch",
        "--catalog",
        "cat.json",
        "--dest",
        "got",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(p.path("got/data_batch_1.bin")).unwrap(),
        b"batch one"
    );
    assert!(!p.path("got/readme.html").exists());
}

#[test]
fn an_unknown_data_set_lists_the_known_ones() {
    let p = Project::new("stages: {}\n");
    let out = p.haic(&["data", "fetch", "imagenet"]);
    assert_error(
        &out,
        2,
        "no data set `imagenet`; known: mnist, fashion-mnist, cifar10",
    );
}
