//! Faults in the artifact store: a damaged artifact is detected by digest
//! when a stage is about to read it, never used, set aside, and made again
//! by the next run; a deleted artifact folder simply re-runs its stage; a
//! full disk fails the stage that writes, leaves nothing half-written, and
//! a resume after freeing space finishes. A garbage manifest is set aside
//! like damaged data; a damaged registry is named as such, with what to
//! do, and an emptied or replaced one is refused (the workspace's id).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Project, assert_error, bin, repo, stderr};

const PIPELINE: &str = "stages:
  a:
    kind: command
    cmd: \"seq 1 1000 > a.txt\"
    outs: [a.txt]
  b:
    kind: command
    cmd: \"wc -l < $HAIC_INPUT_SRC/a.txt > b.txt; echo ${n} >> b.txt\"
    inputs: {src: a}
    params: {n: 1}
    outs: [b.txt]
";

/// The published copy of `a.txt` (read-only in the store).
fn stored_a(p: &Project) -> PathBuf {
    p.artifact_data("stage", "a").join("a.txt")
}

fn writable(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Runs the pipeline, damages `a`'s artifact with `damage`, changes `b`'s
/// param so that `b` must read it again, and checks what happens.
fn damaged_input_is_never_used(damage: impl Fn(&Path)) {
    let p = Project::new(PIPELINE);
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = p.query("SELECT digest FROM artifacts WHERE stage = 'a'")[0]["digest"].clone();
    let file = stored_a(&p);
    writable(&file);
    damage(&file);

    std::fs::write(p.pipeline(), PIPELINE.replace("{n: 1}", "{n: 2}")).unwrap();
    let out = p.run(&[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("input `src` (the artifact of stage `a`) is damaged")
            && err.contains("does not match its recorded digest")
            && err.contains(".damaged/"),
        "{err}"
    );
    assert_eq!(
        p.read("b.txt"),
        "1000\n1\n",
        "b's output is the old one, not made from damage"
    );
    assert!(!file.exists(), "the damaged artifact left the store");

    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("b.txt"), "1000\n2\n");
    let rows = p.query("SELECT digest FROM artifacts WHERE stage = 'a' ORDER BY rowid DESC");
    assert_eq!(
        rows[0]["digest"], digest,
        "a was made again, to the same bytes"
    );
}

#[test]
fn a_bit_flipped_input_artifact_is_set_aside_and_made_again() {
    damaged_input_is_never_used(|file| {
        let mut bytes = std::fs::read(file).unwrap();
        bytes[100] ^= 0x04;
        std::fs::write(file, bytes).unwrap();
    });
}

#[test]
fn a_truncated_input_artifact_is_set_aside_and_made_again() {
    damaged_input_is_never_used(|file| {
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.set_len(10).unwrap();
    });
}

#[test]
fn a_deleted_artifact_folder_reruns_its_stage() {
    let p = Project::new(PIPELINE);
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = stored_a(&p)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    for entry in walk(&dir) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let out = p.run(&[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("a: succeeded") && err.contains("b: cached"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            all.extend(walk(&e.path()));
        } else {
            all.push(e.path());
        }
    }
    all
}

/// Every shipped training image through `preprocess`: 4.4 MB of Parquet,
/// more than the 3 MiB workspace below holds.
fn all_images() -> String {
    format!(
        "root: {}\nstages:\n  prep:\n    kind: preprocess\n    params:\n      source:\n        format: idx\n        train:\n          images: data/fashion-mnist/train-images-idx3-ubyte.gz\n          labels: data/fashion-mnist/train-labels-idx1-ubyte.gz\n",
        repo().display()
    )
}

/// In the project folder, inside a user and mount namespace of its own
/// where `ws` is a tmpfs of `size`: runs the pipeline (stderr and exit
/// status to `out/first.err` and `out/first.code`), then `free_space` (sh;
/// `$BIN` is haic-pipe), then `run --resume` (`out/second.*`), and copies
/// the workspace to `out/ws` before the mount goes. False, after a note,
/// where namespaces are unavailable (see [`unshare_works`]).
fn run_then_resume_in_small_workspace(p: &Project, size: &str, free_space: &str) -> bool {
    if !unshare_works() {
        eprintln!("skipped: `unshare -rm` (user and mount namespaces) is unavailable here");
        return false;
    }
    for d in ["ws", "out"] {
        std::fs::create_dir(p.path(d)).unwrap();
    }
    let script = format!(
        r#"set -u
mount -t tmpfs -o size={size} tmpfs ws || exit 99
"$BIN" run pipeline.yaml --workspace ws 2> out/first.err
echo $? > out/first.code
{free_space}
"$BIN" run pipeline.yaml --workspace ws --resume 2> out/second.err
echo $? > out/second.code
cp -a ws out/ws
"#
    );
    let status = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .current_dir(p.path(""))
        .env("BIN", bin())
        .env_remove("HAIC_WORKSPACE")
        .status()
        .unwrap();
    assert!(status.success(), "the namespace script failed: {status}");
    true
}

/// A registry query (CSV) on the workspace copied to `out/ws`.
fn query(p: &Project, sql: &str) -> String {
    let out = p.haic(&[
        "registry",
        "--workspace",
        "out/ws",
        "query",
        sql,
        "--format",
        "csv",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Whether this process may make a user and mount namespace (to mount a
/// small tmpfs without being root). `.ci/run` requires it
/// (`HAIC_REQUIRE_UNSHARE=1`); elsewhere the test is skipped with a note.
fn unshare_works() -> bool {
    let ok = std::process::Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var("HAIC_REQUIRE_UNSHARE").as_deref() == Ok("1") {
        panic!("`unshare -rm` is unavailable and HAIC_REQUIRE_UNSHARE=1");
    }
    ok
}

/// The first run's stderr from [`run_then_resume_in_small_workspace`],
/// after checking that it did not panic and that the resume succeeded.
fn first_error_and_a_good_resume(p: &Project) -> String {
    let err = p.read("out/first.err");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        p.read("out/second.code").trim(),
        "0",
        "{}",
        p.read("out/second.err")
    );
    err
}

#[test]
fn a_full_disk_fails_the_writing_stage_cleanly_and_resume_finishes() {
    // A 3 MiB workspace; what the first run left is listed before the
    // tmpfs grows (space freed) for the resume.
    let p = Project::new(&all_images());
    let ran = run_then_resume_in_small_workspace(
        &p,
        "3m",
        "ls -A ws/artifacts > out/first.artifacts
ls -A ws/artifacts/.staging > out/first.staging
mount -o remount,size=64m ws || exit 99",
    );
    if !ran {
        return;
    }
    let reference = Project::new(&all_images());
    assert!(reference.run(&[]).status.success());
    let want = reference.digests();

    let err = first_error_and_a_good_resume(&p);
    assert_eq!(p.read("out/first.code").trim(), "1", "{err}");
    assert!(
        err.contains("prep: failed")
            && err.contains("No space left on device")
            && err.contains("hint: the disk holding the workspace is full; free space"),
        "{err}"
    );
    assert_eq!(p.read("out/first.staging"), "", "nothing left half-written");
    assert_eq!(
        p.read("out/first.artifacts"),
        ".staging\n",
        "nothing published"
    );
    assert_eq!(
        query(&p, "SELECT attempt, status FROM stage_runs ORDER BY id"),
        "attempt,status\n1,failed\n2,succeeded\n"
    );
    let digest = query(&p, "SELECT digest FROM artifacts WHERE stage = 'prep'");
    assert_eq!(
        digest.lines().nth(1),
        want.get("prep").map(String::as_str),
        "the same table as on a roomy disk"
    );
}

#[test]
fn a_full_disk_under_the_registry_stops_the_run_and_resume_finishes() {
    // The first attempt of `fill` fills the disk and keeps the file in its
    // scratch; the driver's next registry write finds no room.
    let p = Project::new(
        "stages:\n  fill:\n    kind: command\n    cmd: \"[ -e $HAIC_SCRATCH/filled ] || { touch $HAIC_SCRATCH/filled; head -c 50000000 /dev/zero > $HAIC_SCRATCH/fill; }; echo x > x.txt\"\n    outs: [x.txt]\n",
    );
    if !run_then_resume_in_small_workspace(&p, "2m", "find ws -name fill -delete") {
        return;
    }
    let err = first_error_and_a_good_resume(&p);
    assert_ne!(p.read("out/first.code").trim(), "0", "{err}");
    assert!(
        err.contains(
            "database or disk is full; the disk holding the workspace is full; free space"
        ),
        "{err}"
    );
    assert_eq!(
        query(&p, "SELECT * FROM pragma_integrity_check").trim(),
        "integrity_check\nok"
    );
    assert_eq!(query(&p, "SELECT status FROM runs"), "status\nsucceeded\n");
    assert!(
        query(&p, "SELECT attempt, status FROM stage_runs ORDER BY id").ends_with("2,succeeded\n"),
        "the resume ran fill again"
    );
}

#[test]
fn a_damaged_registry_is_named_as_damaged_not_as_a_refused_query() {
    let p = Project::new(PIPELINE);
    assert!(p.run(&[]).status.success());
    // Garbage over every page but the first (the schema stays readable).
    let db = p.path(".haic/registry.db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    let mut bytes = std::fs::read(&db).unwrap();
    for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
        *b = (i % 251) as u8;
    }
    assert_eq!(bytes.len(), len);
    std::fs::write(&db, &bytes).unwrap();
    for args in [
        vec![
            "registry",
            "-p",
            "pipeline.yaml",
            "query",
            "SELECT * FROM stage_runs",
        ],
        vec!["status", "pipeline.yaml"],
    ] {
        let out = p.haic(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("the registry file is damaged"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("move registry.db, its -wal and -shm files and registry-id aside"),
            "{err}"
        );
        assert!(!err.contains("refused"), "{err}");
    }
}

#[test]
fn a_garbage_manifest_is_set_aside_and_its_artifact_made_again() {
    let p = Project::new(PIPELINE);
    assert!(p.run(&[]).status.success());
    let key = p.query("SELECT key FROM artifacts WHERE stage = 'a'")[0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = p.path(&format!(".haic/artifacts/{key}"));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    writable(&dir.join("manifest.json"));
    std::fs::write(dir.join("manifest.json"), "garbage").unwrap();
    // status says what it found and what a run does, and writes nothing.
    let out = p.haic(&["status", "pipeline.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("manifest.json is damaged") && text.contains("the next run sets it aside"),
        "{text}"
    );
    assert!(dir.exists());
    // The run sets it aside, makes it again; the run after finds it cached.
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("set aside as"), "{}", stderr(&out));
    assert!(
        p.path(&format!(".haic/artifacts/.damaged/{key}-0/manifest.json"))
            .exists()
    );
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("2 cached"), "{}", stderr(&out));
}

#[test]
fn an_emptied_registry_is_refused_not_silently_started_over() {
    let p = Project::new(PIPELINE);
    assert!(p.run(&[]).status.success());
    let db = p.path(".haic/registry.db");
    let copy = std::fs::read(&db).unwrap();
    assert!(p.path(".haic/registry-id").is_file());
    std::fs::write(&db, b"").unwrap();
    for args in [
        vec!["status", "pipeline.yaml"],
        vec!["run", "pipeline.yaml", "--resume"],
    ] {
        let out = p.haic(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("this registry is empty, but the workspace had one"),
            "{err}"
        );
        assert!(err.contains("Restore registry.db"), "{err}");
    }
    // Put back, it is the workspace's again; the history is all there.
    std::fs::write(&db, &copy).unwrap();
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("run 2 succeeded"), "{}", stderr(&out));
    // Another workspace's registry is named as not this one's.
    let other = Project::new(PIPELINE);
    assert!(other.run(&[]).status.success());
    std::fs::copy(other.path(".haic/registry.db"), &db).unwrap();
    let _ = std::fs::remove_file(p.path(".haic/registry.db-wal"));
    let _ = std::fs::remove_file(p.path(".haic/registry.db-shm"));
    assert_error(
        &p.haic(&["status", "pipeline.yaml"]),
        2,
        "is not the one this workspace recorded",
    );
    // Deleting the recorded id adopts the registry there, on purpose.
    std::fs::remove_file(p.path(".haic/registry-id")).unwrap();
    let out = p.haic(&["status", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Two stages that report metrics, so that a recovered registry has
/// params, lineage and curves to compare with the original.
const MEASURED: &str = "stages:
  a:
    kind: command
    cmd: \"seq 1 ${n} > a.txt; echo 'loss 1 0.5' >> $HAIC_METRICS; echo 'loss 2 0.25' >> $HAIC_METRICS\"
    params: {n: 100}
    outs: [a.txt]
  b:
    kind: command
    cmd: \"wc -l < $HAIC_INPUT_SRC/a.txt > b.txt; echo 'lines 0 100' >> $HAIC_METRICS\"
    inputs: {src: a}
    outs: [b.txt]
";

/// What a registry records of the artifacts: rows, lineage, params and
/// metric points, by stage (ids and times differ between registries).
fn record_of_artifacts(p: &Project) -> Vec<Vec<serde_json::Value>> {
    [
        "SELECT key, stage, kind, digest, bytes, path FROM artifacts ORDER BY key",
        "SELECT s.stage, l.input, l.artifact_key FROM lineage l JOIN stage_runs s ON s.id = l.stage_run_id ORDER BY 1, 2",
        "SELECT s.stage, p.name, p.value FROM params p JOIN artifacts a ON a.stage_run_id = p.stage_run_id JOIN stage_runs s ON s.id = a.stage_run_id ORDER BY 1, 2",
        "SELECT s.stage, m.name, m.step, m.value FROM metrics m JOIN artifacts a ON a.stage_run_id = m.stage_run_id JOIN stage_runs s ON s.id = a.stage_run_id ORDER BY 1, 2, 3",
    ]
    .iter()
    .map(|sql| p.query(sql))
    .collect()
}

fn recover(p: &Project, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["registry", "-p", "pipeline.yaml", "recover"];
    args.extend_from_slice(extra);
    p.haic(&args)
}

fn set_aside_files(p: &Project) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(p.path(".haic"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".before-recover-"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_lost_registry_is_rebuilt_from_the_artifact_store() {
    let p = Project::new(MEASURED);
    assert!(p.run(&[]).status.success());
    let before = record_of_artifacts(&p);
    assert_eq!(before[0].len(), 2, "{before:?}");
    assert_eq!(before[1].len(), 1, "{before:?}");
    assert_eq!(before[3].len(), 3, "{before:?}");
    // A healthy registry is not replaced unless asked.
    assert_error(&recover(&p, &[]), 2, "nothing to recover");
    assert!(set_aside_files(&p).is_empty());

    std::fs::write(p.path(".haic/registry.db"), b"").unwrap();
    let out = recover(&p, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("recovered 2 artifact(s) into run 1")
            && text.contains("1 lineage link(s), 3 metric point(s)"),
        "{text}"
    );
    assert_eq!(set_aside_files(&p).len(), 1, "{:?}", set_aside_files(&p));
    assert_eq!(record_of_artifacts(&p), before);
    let run = p.query("SELECT name, status, note FROM runs");
    assert_eq!(run[0]["name"], "recovered", "{run:?}");
    assert_eq!(run[0]["status"], "succeeded", "{run:?}");
    // The workspace is the same one: status and run find everything cached.
    let out = p.haic(&["status", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("cached")
            .count(),
        2,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = p.run(&[]);
    assert!(
        stderr(&out).contains("run 2 succeeded in"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("2 cached"), "{}", stderr(&out));
    // --force rebuilds a healthy one, keeping it beside.
    let out = recover(&p, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(set_aside_files(&p).len(), 2, "{:?}", set_aside_files(&p));
    assert_eq!(record_of_artifacts(&p), before);
    // A deleted registry, recovered without -p from the pipeline's folder:
    // the workspace is found by the id left beside it.
    std::fs::remove_file(p.path(".haic/registry.db")).unwrap();
    let out = p.haic(&["registry", "recover"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(record_of_artifacts(&p), before);
}

#[test]
fn garbage_inside_the_registry_stops_status_and_run_until_recovered() {
    let p = Project::new(MEASURED);
    assert!(p.run(&[]).status.success());
    // Garbage over the page of a table neither status nor a no-op run reads.
    let root =
        p.query("SELECT rootpage FROM sqlite_master WHERE name = 'metric_summaries'")[0]["rootpage"]
            .as_i64()
            .unwrap() as usize;
    let page = p.query("SELECT page_size FROM pragma_page_size()")[0]["page_size"]
        .as_i64()
        .unwrap() as usize;
    let db = p.path(".haic/registry.db");
    let mut bytes = std::fs::read(&db).unwrap();
    for (i, b) in bytes[(root - 1) * page..root * page].iter_mut().enumerate() {
        *b = (i % 7) as u8 + 200;
    }
    std::fs::write(&db, &bytes).unwrap();
    for args in [
        vec!["status", "pipeline.yaml"],
        vec!["run", "pipeline.yaml"],
    ] {
        let out = p.haic(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("the registry file is damaged: SQLite's integrity check says"),
            "{args:?}: {err}"
        );
        assert!(err.contains("haic-pipe registry recover"), "{err}");
    }
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "nothing was written");
    let out = recover(&p, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.run(&[]);
    assert!(stderr(&out).contains("2 cached"), "{}", stderr(&out));
}
