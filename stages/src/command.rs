//! The `command` stage: a shell command with declared `deps` and `outs`,
//! cached like every other stage (DVC's `cmd`/`deps`/`outs`).
//!
//! The command runs under `sh -c` in a fresh sandbox folder, not in the
//! pipeline folder: each dep is linked in at its relative path and the
//! parent folders of the outs exist. After it exits 0, every declared out
//! must be there; they are moved into the artifact, and the driver copies
//! them into the pipeline folder. So a failed or interrupted command never
//! leaves half-written outs where the user looks, two stages never write
//! over each other, and an undeclared dep shows up as a missing file.
//!
//! The command sees these variables:
//!
//! | variable | value |
//! | --- | --- |
//! | `HAIC_STAGE` | the stage name |
//! | `HAIC_PIPELINE_DIR` | the folder of the pipeline file |
//! | `HAIC_SCRATCH` | a folder kept across interrupted attempts of this stage key (for the command's own checkpoints) |
//! | `HAIC_INPUT_<NAME>` | for each entry under `inputs:`, the folder of that upstream artifact (name upper-cased) |
//! | `HAIC_DEVICE` | `cpu` or the GPU device(s) the slot gave it |

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};

pub struct Command;

impl StageKind for Command {
    fn name(&self) -> &'static str {
        "command"
    }

    fn version(&self) -> u32 {
        1
    }

    fn check(&self, stage: &Stage) -> Result<(), (String, String)> {
        match stage.params.get("cmd") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(()),
            Some(serde_json::Value::String(_)) => Err(("cmd".into(), "`cmd` is empty".into())),
            _ => Err(("cmd".into(), "`cmd` must be a string".into())),
        }
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let job = &ctx.job;
        let cmd = job
            .params
            .get("cmd")
            .and_then(|v| v.as_str())
            .ok_or("the job has no `cmd`")?;
        let sandbox = ctx.scratch_dir().join("work");
        if sandbox.exists() {
            pipeline::cache::remove_tree(&sandbox)?;
        }
        std::fs::create_dir_all(&sandbox)?;
        for (rel, abs) in &job.deps {
            let link = sandbox.join(rel);
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(abs, &link)
                .map_err(|e| format!("linking dep `{rel}` into the sandbox: {e}"))?;
        }
        for out in &job.outs {
            if let Some(parent) = sandbox.join(out).parent() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let state = ctx.scratch_dir().join("state");
        std::fs::create_dir_all(&state)?;

        // The command's output goes to the stage log (our stderr); our stdout
        // carries events for the driver only.
        let log_out = dup_stderr()?;
        let log_err = dup_stderr()?;
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(cmd)
            .current_dir(&sandbox)
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log_err)
            .env("HAIC_STAGE", &job.stage)
            .env("HAIC_PIPELINE_DIR", &job.pipeline_dir)
            .env("HAIC_SCRATCH", &state)
            .env("HAIC_DEVICE", &job.device);
        for (name, dir) in &job.inputs {
            let var: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            command.env(format!("HAIC_INPUT_{var}"), dir);
        }
        // SAFETY: prctl is async-signal-safe; the command dies with its worker.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        eprintln!("$ {cmd}");
        let status = command
            .status()
            .map_err(|e| format!("starting `sh -c {cmd:?}`: {e}"))?;
        if !status.success() {
            let how = match status.code() {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".to_string(),
            };
            return Err(format!("command {how}: `{cmd}` (its output is in the stage log)").into());
        }
        for out in &job.outs {
            let from = sandbox.join(out);
            if std::fs::symlink_metadata(&from).is_err() {
                return Err(format!(
                    "the command succeeded but did not write its out `{out}`; write it relative to the working folder, or fix `outs`"
                )
                .into());
            }
            let to = ctx.out_dir().join(out);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            move_path(&from, &to)?;
        }
        pipeline::cache::remove_tree(&sandbox)?;
        Ok(())
    }
}

fn dup_stderr() -> Result<Stdio, StageError> {
    use std::os::fd::AsFd;
    Ok(Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?))
}

/// Moves a file or folder; an out that is a link to a dep is copied instead.
fn move_path(from: &Path, to: &Path) -> Result<(), StageError> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::fs::copy(from, to)?;
        return Ok(());
    }
    std::fs::rename(from, to).map_err(|e| format!("moving {}: {e}", from.display()).into())
}
