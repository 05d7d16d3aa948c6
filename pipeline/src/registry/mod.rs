//! The experiment registry: one SQLite file per workspace, written by the
//! driver process (workers report to the driver; they never open it), and
//! by `haic-pipe eval` for human-evaluation answers (`ratings`), which no
//! run touches.
//!
//! The schema is in `migrations/` and is applied on open. The file runs in WAL
//! mode, so readers (`haic-pipe registry query`, a notebook) never block the
//! driver and never see half a transaction. Metrics arrive in batches and are
//! written one transaction per batch, with `metric_summaries` kept up to date
//! in the same transaction so that "best runs by X" reads an index, not the
//! metric history.
//!
//! All of the project's SQL lives in this module, behind typed functions:
//!
//! | module | owns |
//! | --- | --- |
//! | `mod.rs` | opening (migrations, WAL), the row types, statuses |
//! | [`runs`] | runs and stage runs: what the driver records, what `status` reads |
//! | [`artifacts`] | artifacts, lineage, what `gc` may remove |
//! | [`metrics`] | metric points and their summaries |
//! | [`files`] | the dependency-file digest cache |
//! | [`ratings`] | human-evaluation packages and answers |
//! | [`views`] | read-only views the CLI renders (`registry runs`, `show`, `report`) |
//! | [`query`] | `haic-pipe registry query`: one read-only statement from a person |

mod artifacts;
mod dashboard;
mod files;
mod metrics;
mod query;
mod ratings;
mod runs;
mod views;

pub use dashboard::{
    ArtifactRow, LineageRow, MetricRow, RunDetail, RunFilter, RunRow, RunsPage, Series, StageRow,
};
pub use query::{Queried, QueryLimits, QueryResult, query_read_only};
pub use ratings::{Rating, RatingPackage};
pub use runs::flatten_params;
pub use views::{Reader, RunFacts};

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteQueryResult, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::Mutex;

use crate::error::{Error, Result};

/// What a person calls a run (`run --name`, `--tag`, `--note`) and the
/// `-S PATH=VALUE` overrides it ran with, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunLabel {
    pub name: Option<String>,
    pub tags: Vec<String>,
    pub note: Option<String>,
    pub overrides: Vec<String>,
}

impl RunLabel {
    /// Checks the name and tags: a name is 1-100 characters, not a number
    /// (it stands where a run id can), without whitespace; so is a tag.
    pub fn check(&self) -> std::result::Result<(), String> {
        let ok = |what: &str, s: &str| -> std::result::Result<(), String> {
            if s.is_empty() || s.chars().count() > 100 || s.chars().any(char::is_whitespace) {
                return Err(format!(
                    "{what} `{s}`: give 1 to 100 characters without spaces"
                ));
            }
            Ok(())
        };
        if let Some(name) = &self.name {
            ok("--name", name)?;
            if name.parse::<i64>().is_ok() {
                return Err(format!(
                    "--name `{name}`: a number would read as a run id; add a letter"
                ));
            }
        }
        for t in &self.tags {
            ok("--tag", t)?;
        }
        Ok(())
    }
}

/// Status of a stage run, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Interrupted,
    Cached,
}

impl StageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Running => "running",
            StageStatus::Succeeded => "succeeded",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
            StageStatus::Interrupted => "interrupted",
            StageStatus::Cached => "cached",
        }
    }
}

impl std::str::FromStr for StageStatus {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        STAGE_STATUSES
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown stage status `{s}`"))
    }
}

impl std::fmt::Display for StageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// By name, so that counts list in the same order everywhere.
impl Ord for StageStatus {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for StageStatus {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

const STAGE_STATUSES: [StageStatus; 7] = [
    StageStatus::Pending,
    StageStatus::Running,
    StageStatus::Succeeded,
    StageStatus::Failed,
    StageStatus::Skipped,
    StageStatus::Interrupted,
    StageStatus::Cached,
];

/// Status of a run, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

impl std::str::FromStr for RunStatus {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [
            RunStatus::Running,
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::Interrupted,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| format!("unknown run status `{s}`"))
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// The newest stage run of a stage with a given key (see
/// [`Registry::last_for_key`]).
#[derive(Debug, Clone)]
pub struct KeyedRun {
    /// The stage run's row.
    pub id: i64,
    pub status: StageStatus,
    pub error: Option<String>,
    pub run_id: i64,
    /// The pid of that run's driver.
    pub driver_pid: Option<i64>,
}

/// One metric point from a worker.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricPoint {
    pub stage_run_id: i64,
    pub name: String,
    pub step: i64,
    pub value: f64,
    /// When the driver received it, in seconds since 1970 (UTC); `None`
    /// where that is not known (a point rebuilt by `registry recover`).
    #[serde(default)]
    pub at: Option<f64>,
}

/// Seconds since 1970 now, as [`MetricPoint::at`] records them.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A cached file digest (see `file_hashes` in the schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub size: i64,
    pub mtime_ns: i64,
    pub inode: i64,
    pub digest: String,
}

/// A stage run as the driver starts it.
#[derive(Debug, Clone)]
pub struct NewStageRun<'a> {
    pub run_id: i64,
    pub stage: &'a str,
    pub kind: &'a str,
    pub key: Option<&'a str>,
    pub key_material: Option<&'a str>,
    pub status: StageStatus,
    pub attempt: i64,
    pub worker: Option<&'a str>,
    pub device: Option<&'a str>,
    pub log_path: Option<&'a str>,
    pub error: Option<&'a str>,
}

impl<'a> NewStageRun<'a> {
    /// A row with only the required fields; set the others with `..`.
    pub fn new(run_id: i64, stage: &'a str, kind: &'a str, status: StageStatus) -> Self {
        NewStageRun {
            run_id,
            stage,
            kind,
            key: None,
            key_material: None,
            status,
            attempt: 1,
            worker: None,
            device: None,
            log_path: None,
            error: None,
        }
    }
}

/// A stage run left `running` (see [`Registry::running_stage_runs`]).
#[derive(Debug, Clone)]
pub struct RunningStage {
    pub id: i64,
    pub stage: String,
    pub key: String,
    pub attempt: i64,
    pub worker: String,
    pub job_id: Option<String>,
    pub log_path: String,
}

/// The writer's handle. Cheap to share behind an `Arc`; writes are serialised.
pub struct Registry {
    path: PathBuf,
    conn: Mutex<SqliteConnection>,
}

/// SQLITE_CORRUPT (11) or SQLITE_NOTADB (26), extended codes included.
pub(crate) fn is_damaged(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(d) = e else {
        return false;
    };
    d.code()
        .and_then(|c| c.parse::<i64>().ok())
        .is_some_and(|c| matches!(c & 0xff, 11 | 26))
}

fn db_err(path: &Path) -> impl Fn(sqlx::Error) -> Error + '_ {
    move |e| {
        // SQLITE_FULL (13): what to do, as the stages say for their writes.
        let full = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("13"));
        let message = if full {
            format!("{e}; {}", crate::error::DISK_FULL_ADVICE)
        } else if is_damaged(&e) {
            format!(
                "the registry file is damaged ({e}). {DAMAGED_ADVICE}; or move registry.db, its -wal and -shm files and registry-id aside: the next run starts a new registry, and the artifact store keeps every artifact"
            )
        } else {
            e.to_string()
        };
        Error::Registry {
            path: path.to_path_buf(),
            message,
        }
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// The file beside the registry that holds its identity.
pub fn identity_file(registry: &Path) -> PathBuf {
    registry.with_file_name("registry-id")
}

fn emptied(path: &Path, id: &str, beside: &Path) -> Error {
    Error::Registry {
        path: path.to_path_buf(),
        message: format!(
            "this registry is empty, but the workspace had one (id {id}, in {}): it was emptied or replaced, and its history of runs is gone from this file. Restore registry.db from a copy, or rebuild the record of every artifact from the store with `haic-pipe registry recover -p PIPELINE`; to start a new history here on purpose, delete {} (the artifact store keeps every artifact)",
            beside.display(),
            beside.display()
        ),
    }
}

/// A new random workspace identity (32 hex digits).
pub fn fresh_identity(path: &Path) -> String {
    let seed = format!(
        "{}:{}:{:?}",
        std::process::id(),
        path.display(),
        std::time::SystemTime::now()
    );
    blake3::hash(seed.as_bytes()).to_hex()[..32].to_string()
}

/// The registry's identity against the one written beside it. A new
/// registry gets one (the first writer's, decided by SQLite), written
/// beside it; a registry without one where the file has one was emptied
/// or replaced: an error with what to do, before anything is written.
async fn check_identity(path: &Path, conn: &mut SqliteConnection) -> Result<()> {
    let err = db_err(path);
    let beside = identity_file(path);
    let written = std::fs::read_to_string(&beside)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let stored: Option<String> = sqlx::query_scalar("SELECT id FROM workspace_identity LIMIT 1")
        .fetch_optional(&mut *conn)
        .await
        .map_err(&err)?;
    let id = match (stored, written) {
        (Some(a), Some(b)) if a == b => return Ok(()),
        (Some(a), Some(b)) => {
            return Err(Error::Registry {
                path: path.to_path_buf(),
                message: format!(
                    "this registry (id {a}) is not the one this workspace recorded (id {b} in {}): it was replaced. Put the workspace's own registry back, or, to adopt this one, delete {}",
                    beside.display(),
                    beside.display()
                ),
            });
        }
        (None, Some(b)) => return Err(emptied(path, &b, &beside)),
        (Some(a), None) => a,
        (None, None) => {
            let mine = fresh_identity(path);
            // Two first openers race here: SQLite keeps one id, both read it.
            sqlx::query(
                "INSERT INTO workspace_identity (id) SELECT ? WHERE NOT EXISTS (SELECT 1 FROM workspace_identity)",
            )
            .bind(&mine)
            .execute(&mut *conn)
            .await
            .map_err(&err)?;
            sqlx::query_scalar("SELECT id FROM workspace_identity LIMIT 1")
                .fetch_one(&mut *conn)
                .await
                .map_err(&err)?
        }
    };
    // Written whole by a rename: a reader never sees half an id.
    let tmp = beside.with_file_name(format!("registry-id.tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|_| std::fs::rename(&tmp, &beside))
        .map_err(|e| Error::io(format!("writing {}", beside.display()), e))?;
    Ok(())
}

/// The file beside the registry that says which state of `registry.db`
/// was last closed cleanly or checked (its size and mtime): a file that
/// differs was written by something else (a crash, a copy, damage) and is
/// checked before use.
pub fn clean_stamp_file(registry: &Path) -> PathBuf {
    registry.with_file_name("registry-clean")
}

/// `registry.db`'s size and modification time, as the stamp holds them.
fn file_stamp(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!("{} {}", meta.len(), mtime.as_nanos()))
}

/// Records the registry file's present state as known good. Best effort:
/// without the stamp the next open only checks again.
fn write_clean_stamp(path: &Path) {
    let Some(stamp) = file_stamp(path) else {
        return;
    };
    let beside = clean_stamp_file(path);
    let tmp = beside.with_file_name(format!("registry-clean.tmp{}", std::process::id()));
    if std::fs::write(&tmp, format!("{stamp}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, &beside);
    }
}

/// Whether the file is as it was last closed cleanly or checked.
fn matches_clean_stamp(path: &Path) -> bool {
    let recorded = std::fs::read_to_string(clean_stamp_file(path)).ok();
    recorded.is_some_and(|r| Some(r.trim().to_string()) == file_stamp(path))
}

/// What to do about a damaged registry, said wherever one is found.
pub const DAMAGED_ADVICE: &str = "Rebuild the history from the artifact store with `haic-pipe registry recover -p PIPELINE` (the damaged file is kept beside it), or restore registry.db from a copy";

/// SQLite's page-by-page check (`PRAGMA quick_check`): every page and
/// record well-formed; it does not compare indexes with their tables.
async fn quick_check(path: &Path, conn: &mut SqliteConnection) -> Result<()> {
    let damaged = |said: String| Error::Registry {
        path: path.to_path_buf(),
        message: format!(
            "the registry file is damaged: SQLite's integrity check says {said}. {DAMAGED_ADVICE}"
        ),
    };
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA quick_check(5)")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| {
            if is_damaged(&e) {
                damaged(e.to_string())
            } else {
                db_err(path)(e)
            }
        })?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    Err(damaged(rows.join("; ")))
}

async fn connect(path: &Path) -> Result<SqliteConnection> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(false)
        // 32 MiB of page cache: a 10,000-stage run inserts 10,000 rows at once.
        .pragma("cache_size", "-32768")
        .disable_statement_logging();
    opts.connect().await.map_err(db_err(path))
}

async fn migrate(path: &Path, conn: &mut SqliteConnection) -> Result<()> {
    sqlx::migrate!("../migrations")
        .run(&mut *conn)
        .await
        .map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) if is_damaged(&e) => db_err(path)(e),
            e => Error::Registry {
                path: path.to_path_buf(),
                message: format!(
                    "applying the schema failed: {e}; if this registry was written by a newer haic-pipe, use that version"
                ),
            },
        })
}

impl Registry {
    /// Opens (creating if needed) the registry and applies pending migrations.
    /// A file that changed since it was last closed cleanly (a crash, damage,
    /// a copy) is checked page by page first.
    pub async fn open(path: &Path) -> Result<Registry> {
        // Checked before SQLite touches the file: opening an emptied one
        // would write a fresh schema into it and its -wal.
        let beside = identity_file(path);
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if size == 0
            && let Ok(id) = std::fs::read_to_string(&beside)
            && !id.trim().is_empty()
        {
            return Err(emptied(path, id.trim(), &beside));
        }
        let mut conn = connect(path).await?;
        let checked = size > 0 && !matches_clean_stamp(path);
        if checked {
            quick_check(path, &mut conn).await?;
        }
        migrate(path, &mut conn).await?;
        check_identity(path, &mut conn).await?;
        if checked {
            write_clean_stamp(path);
        }
        Ok(Registry {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// A new, empty registry at `path` (which must not exist) with the
    /// workspace identity `id`: what `registry recover` fills in.
    pub async fn create_with_identity(path: &Path, id: &str) -> Result<Registry> {
        if path.exists() {
            return Err(Error::Invalid(format!(
                "{} exists; a new registry needs a fresh file",
                path.display()
            )));
        }
        let mut conn = connect(path).await?;
        migrate(path, &mut conn).await?;
        sqlx::query("INSERT INTO workspace_identity (id) VALUES (?)")
            .bind(id)
            .execute(&mut conn)
            .await
            .map_err(db_err(path))?;
        Ok(Registry {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// Folds the log into the file and closes the connection (SQLite then
    /// removes the -wal and -shm files).
    pub async fn close(self) -> Result<()> {
        self.checkpoint_wal().await?;
        let conn = self.conn.into_inner();
        conn.close().await.map_err(db_err(&self.path))?;
        write_clean_stamp(&self.path);
        Ok(())
    }

    /// Runs one statement on the writer connection.
    async fn execute(&self, q: Query<'_>) -> Result<SqliteQueryResult> {
        let mut c = self.conn.lock().await;
        q.execute(&mut *c).await.map_err(db_err(&self.path))
    }

    async fn fetch_all(&self, q: Query<'_>) -> Result<Vec<SqliteRow>> {
        let mut c = self.conn.lock().await;
        q.fetch_all(&mut *c).await.map_err(db_err(&self.path))
    }

    async fn fetch_optional(&self, q: Query<'_>) -> Result<Option<SqliteRow>> {
        let mut c = self.conn.lock().await;
        q.fetch_optional(&mut *c).await.map_err(db_err(&self.path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Folds the write-ahead log into the database file (`PRAGMA
    /// wal_checkpoint(TRUNCATE)`), e.g. before measuring its size.
    /// The file is then as a clean close leaves it: recorded as such, so
    /// that the next open need not check it.
    pub async fn checkpoint_wal(&self) -> Result<()> {
        self.execute(sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)"))
            .await?;
        write_clean_stamp(&self.path);
        Ok(())
    }

    /// A status as stored, or an error naming the registry.
    fn parse<T: std::str::FromStr<Err = String>>(&self, text: &str) -> Result<T> {
        text.parse().map_err(|message| Error::Registry {
            path: self.path.clone(),
            message,
        })
    }
}
