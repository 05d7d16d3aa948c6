//! The batch script each stage's job runs.

use std::path::Path;

use crate::stage::EXIT_CHECKPOINTED;

/// The batch script: runs the worker, passes SIGUSR1/SIGTERM on to it, and
/// requeues the job when it checkpointed on request.
pub(super) fn batch_script(exe: &Path, job_file: &Path, gpus: u32) -> String {
    let device = if gpus > 0 {
        // The devices Slurm granted, in the local back-end's spelling.
        r#"HAIC_DEVICE="cuda:${CUDA_VISIBLE_DEVICES//,/,cuda:}""#
    } else {
        // No GPU for a stage that needs none, whatever the submitting
        // shell's CUDA_VISIBLE_DEVICES was (sbatch exports it).
        "HAIC_DEVICE=cpu CUDA_VISIBLE_DEVICES="
    };
    format!(
        r#"#!/bin/bash
# Written by haic-pipe: one stage's worker as a Slurm job.
export {device}
export RAYON_NUM_THREADS="${{RAYON_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}"
{exe} worker --job {job} &
pid=$!
trap 'kill -USR1 $pid 2>/dev/null' USR1
trap 'kill -TERM $pid 2>/dev/null' TERM
# A trapped signal ends `wait` early; wait again until the worker is gone.
while :; do
  wait $pid
  kill -0 $pid 2>/dev/null || break
done
wait $pid
rc=$?
if [ "$rc" = {EXIT_CHECKPOINTED} ]; then
  echo "haic-pipe: the worker checkpointed on request; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit $rc
"#,
        exe = shell_quote(&exe.display().to_string()),
        job = shell_quote(&job_file.display().to_string()),
    )
}

/// Single-quotes a string for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_script_quotes_paths_and_names_the_granted_gpus() {
        let s = batch_script(
            Path::new("/opt/it's/haic-pipe"),
            Path::new("/w/job.json"),
            1,
        );
        assert!(s.contains(r"'/opt/it'\''s/haic-pipe' worker --job '/w/job.json' &"));
        assert!(s.contains("cuda:${CUDA_VISIBLE_DEVICES//,/,cuda:}"));
        assert!(
            batch_script(Path::new("/x"), Path::new("/j"), 0)
                .contains("export HAIC_DEVICE=cpu CUDA_VISIBLE_DEVICES=\n")
        );
    }
}
