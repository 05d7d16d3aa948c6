//! Slurm's client commands (`squeue`, `sacct`, `scancel`, `scontrol`),
//! each with a timeout and retries, and the poller that lists a run's jobs
//! in one call.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;

/// How long one client call (`sbatch`, `squeue`, ...) may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of a client call before its error is final.
pub(super) const CLIENT_TRIES: u32 = 5;

/// One job as `squeue` or `sacct` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub id: u64,
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, ...
    pub state: String,
    /// The batch script's exit code, once it has one.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub reason: String,
    /// `haic:STAGE:KEY:ATTEMPT` for jobs this back-end submitted.
    pub comment: String,
}

impl JobState {
    /// Whether the job will not run again (a requeued job is not finished).
    pub fn finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "OUT_OF_MEMORY"
                | "NODE_FAIL"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "PREEMPTED"
                | "REVOKED"
                | "SPECIAL_EXIT"
        )
    }

    /// The stage key in the job's comment, if this back-end submitted it.
    pub fn key(&self) -> Option<&str> {
        let mut parts = self.comment.strip_prefix("haic:")?.split(':');
        let _stage = parts.next()?;
        parts.next()
    }
}

/// What the last poll saw.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub(super) jobs: HashMap<u64, JobState>,
    /// Counts polls, so that waiters can tell a new poll from an old one.
    pub(super) polls: u64,
}

pub(super) fn backoff(t: u32) -> Duration {
    Duration::from_millis(500u64 << (t - 1).min(4))
}

/// Runs a Slurm client command with a timeout; its stdout, or what failed.
pub(super) async fn client(program: &str, args: &[String]) -> std::result::Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("`{program}` is not installed or not on PATH (the Slurm executor needs Slurm's client commands)")
        } else {
            format!("starting `{program}`: {e}")
        }
    })?;
    match tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "`{program}` did not answer within {} s",
            CLIENT_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("waiting for `{program}`: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "`{program}` exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A client call with retries and backoff; each failure is a notice.
pub(super) async fn retried<T, F, Fut>(
    what: &str,
    notice: &(dyn Fn(String) + Send + Sync),
    mut call: F,
) -> std::result::Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let mut last = String::new();
    for t in 0..CLIENT_TRIES {
        if t > 0 {
            tokio::time::sleep(backoff(t)).await;
        }
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                notice(format!(
                    "{what} failed (try {} of {CLIENT_TRIES}): {e}",
                    t + 1
                ));
                last = e;
            }
        }
    }
    Err(last)
}

/// All jobs (any state Slurm still lists) named `name`.
pub(super) async fn squeue(name: &str) -> std::result::Result<Vec<JobState>, String> {
    let args = vec![
        format!("--name={name}"),
        "--states=all".into(),
        "--noheader".into(),
        // `:|` is a field suffix: `|`-separated, unpadded; the comment last,
        // as only it could hold a `|`.
        "--Format=JobID:|,State:|,exit_code:|,Reason:|,Comment:".into(),
    ];
    let out = client("squeue", &args).await?;
    Ok(out.lines().filter_map(parse_squeue_line).collect())
}

fn parse_squeue_line(line: &str) -> Option<JobState> {
    let mut f = line.splitn(5, '|');
    let id = f.next()?.trim().parse().ok()?;
    let state = f.next()?.trim().to_string();
    // A wait status: exit code in the high byte, signal in the low bits.
    let status: Option<i32> = f.next()?.trim().parse().ok();
    let reason = f.next().unwrap_or("").trim().to_string();
    let comment = f.next().unwrap_or("").trim().to_string();
    Some(JobState {
        id,
        state,
        exit_code: status.map(|s| (s >> 8) & 0xff),
        signal: status.map(|s| s & 0x7f),
        reason,
        comment,
    })
}

/// Jobs `ids` from accounting (`sacct`), or from the job-completion log
/// (`sacct -c`) where accounting is off.
async fn sacct(ids: &[u64]) -> std::result::Result<Vec<JobState>, String> {
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![
        format!("--jobs={list}"),
        "-X".into(),
        "--noheader".into(),
        "--parsable2".into(),
        "--format=JobID,State,ExitCode".into(),
    ];
    let out = match client("sacct", &args).await {
        Ok(out) => out,
        Err(_) => {
            args.insert(0, "-c".into());
            client("sacct", &args).await?
        }
    };
    let wanted: HashSet<u64> = ids.iter().copied().collect();
    Ok(out
        .lines()
        .filter_map(parse_sacct_line)
        .filter(|j| wanted.contains(&j.id))
        .collect())
}

fn parse_sacct_line(line: &str) -> Option<JobState> {
    let mut f = line.split('|');
    let id = f.next()?.trim().parse().ok()?;
    // `CANCELLED by 0` -> `CANCELLED`
    let state = f.next()?.split_whitespace().next()?.to_string();
    let (code, signal) = f.next()?.trim().split_once(':')?;
    Some(JobState {
        id,
        state,
        exit_code: code.parse().ok(),
        signal: signal.parse().ok(),
        reason: String::new(),
        comment: String::new(),
    })
}

/// Polls the run's jobs while any is watched and publishes what it saw.
pub(super) async fn poll_loop(
    name: String,
    interval: Duration,
    watched: Arc<Mutex<HashSet<u64>>>,
    tx: watch::Sender<Arc<Snapshot>>,
    notice: Arc<dyn Fn(String) + Send + Sync>,
) {
    let mut polls = 0u64;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(interval).await;
        let wanted: Vec<u64> = watched
            .lock()
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        if wanted.is_empty() {
            continue;
        }
        let mut jobs: HashMap<u64, JobState> = match squeue(&name).await {
            Ok(list) => list.into_iter().map(|j| (j.id, j)).collect(),
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    notice(format!(
                        "polling Slurm failed ({failures} in a row; the jobs are not taken as failed, polling goes on): {e}"
                    ));
                }
                continue;
            }
        };
        failures = 0;
        let gone: Vec<u64> = wanted
            .into_iter()
            .filter(|id| !jobs.contains_key(id))
            .collect();
        if !gone.is_empty()
            && let Ok(found) = sacct(&gone).await
        {
            jobs.extend(found.into_iter().map(|j| (j.id, j)));
        }
        polls += 1;
        tx.send_replace(Arc::new(Snapshot { jobs, polls }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_give_state_exit_code_and_key() {
        let j = parse_squeue_line("12|FAILED|768|NonZeroExitCode|haic:vq1:abc:2").unwrap();
        assert_eq!(j.id, 12);
        assert_eq!(j.state, "FAILED");
        assert_eq!(j.exit_code, Some(3));
        assert_eq!(j.signal, Some(0));
        assert_eq!(j.key(), Some("abc"));
        assert!(j.finished());
        let j = parse_squeue_line("13|CANCELLED|15|None|").unwrap();
        assert_eq!((j.exit_code, j.signal), (Some(0), Some(15)));
        assert_eq!(j.key(), None);
        let j = parse_squeue_line("14|PENDING|0|Priority|haic:a:k:1").unwrap();
        assert!(!j.finished());
        assert!(parse_squeue_line("garbage").is_none());
    }

    #[test]
    fn sacct_lines_drop_the_cancelling_user() {
        let j = parse_sacct_line("7|CANCELLED by 0|0:15").unwrap();
        assert_eq!(j.state, "CANCELLED");
        assert_eq!((j.exit_code, j.signal), (Some(0), Some(15)));
        let j = parse_sacct_line("8|FAILED|3:0").unwrap();
        assert_eq!(j.exit_code, Some(3));
    }
}
