//! A job's worker events, read from the file Slurm writes its stdout to,
//! and how a finished job ended.

use std::path::{Path, PathBuf};

use super::client::JobState;
use crate::executor::{WorkerEnd, WorkerReport, log_tail};
use crate::stage::{EXIT_CHECKPOINTED, WorkerEvent};

/// The events file beside a stage log: `X.log` -> `X.events.jsonl`.
pub fn events_path(log: &Path) -> PathBuf {
    log.with_extension("events.jsonl")
}

/// How a finished job ended, from its state and the worker's own events.
pub(super) fn ending(job: &JobState, events: &EventTail, log: &Path) -> WorkerEnd {
    let id = job.id;
    if job.state == "COMPLETED"
        && let Some((digest, bytes)) = events.report.published.clone()
    {
        return WorkerEnd::Published { digest, bytes };
    }
    if job.state == "TIMEOUT" {
        return WorkerEnd::Failed(format!(
            "Slurm job {id} reached its time limit (executor.time) before the stage finished; raise the limit{}",
            log_tail(log)
        ));
    }
    let how = match (job.exit_code, job.signal) {
        (_, Some(s)) if s != 0 => format!("signal {s}"),
        (Some(c), _) if c == EXIT_CHECKPOINTED => {
            format!("exit code {c} (checkpointed, but the requeue failed)")
        }
        (Some(c), _) => format!("exit code {c}"),
        (None, _) => "no exit code".into(),
    };
    let reason = if job.reason.is_empty() || job.reason == "None" {
        String::new()
    } else {
        format!(", reason {}", job.reason)
    };
    let what = match &events.report.failure {
        Some(msg) => format!(": {msg}"),
        None if job.state == "COMPLETED" => {
            format!(": the worker reported no artifact{}", log_tail(log))
        }
        None => log_tail(log),
    };
    WorkerEnd::Failed(format!(
        "Slurm job {id} {} with {how}{reason}{what}",
        job.state
    ))
}

/// Reads a growing events file line by line from where it left off.
pub(super) struct EventTail {
    path: PathBuf,
    offset: u64,
    partial: String,
    pub(super) report: WorkerReport,
}

impl EventTail {
    pub(super) fn new(path: PathBuf) -> Self {
        EventTail {
            path,
            offset: 0,
            partial: String::new(),
            report: WorkerReport::default(),
        }
    }

    pub(super) fn read(&mut self, on_event: &mut dyn FnMut(WorkerEvent)) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return; // not created yet
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            self.report.line(&line, on_event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_file_is_read_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let path = events_path(&log);
        assert_eq!(path, dir.path().join("a.events.jsonl"));
        let mut tail = EventTail::new(path.clone());
        let mut seen = Vec::new();
        tail.read(&mut |e| seen.push(e)); // no file yet
        std::fs::write(
            &path,
            "{\"event\":\"progress\",\"done\":1,\"total\":2}\n{\"event\":\"fail",
        )
        .unwrap();
        tail.read(&mut |e| seen.push(e));
        assert_eq!(seen.len(), 1);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        write!(
            f,
            "ed\",\"message\":\"boom\"}}\n{{\"event\":\"stopped\",\"step\":5}}\n"
        )
        .unwrap();
        tail.read(&mut |e| seen.push(e));
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            tail.report.failure, None,
            "a stop clears the earlier failure"
        );
        assert!(tail.report.stopped);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(f, "{{\"event\":\"progress\",\"done\":6,\"total\":9}}").unwrap();
        tail.read(&mut |e| seen.push(e));
        assert!(!tail.report.stopped, "it ran again");
    }
}
