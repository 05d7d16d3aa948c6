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
//! metric history. Read-only access for people and scripts is in [`query`].

mod query;

pub use query::{QueryResult, query_read_only};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteQueryResult, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, QueryBuilder, Row};
use tokio::sync::Mutex;

use crate::error::{Error, Result};

/// Status of a stage run, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// One metric point from a worker.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricPoint {
    pub stage_run_id: i64,
    pub name: String,
    pub step: i64,
    pub value: f64,
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

/// A human-eval package that raters answered.
#[derive(Debug, Clone, PartialEq)]
pub struct RatingPackage {
    pub digest: String,
    pub path: String,
    pub set_a: String,
    pub set_b: String,
    pub tasks: i64,
}

/// One rater's answer to one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    pub package: String,
    pub task_id: String,
    /// `pair` or `catch`.
    pub kind: String,
    pub rater: String,
    /// `left` or `right`.
    pub choice: String,
    /// The source of the chosen image.
    pub chosen: String,
    pub origin: String,
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

fn db_err(path: &Path) -> impl Fn(sqlx::Error) -> Error + '_ {
    move |e| {
        // SQLITE_FULL (13): what to do, as the stages say for their writes.
        let full = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("13"));
        let message = if full {
            format!("{e}; {}", crate::error::DISK_FULL_ADVICE)
        } else {
            e.to_string()
        };
        Error::Registry {
            path: path.to_path_buf(),
            message,
        }
    }
}

/// One metric's points within one batch, merged into `metric_summaries`.
struct BatchSummary {
    last_step: i64,
    last: f64,
    min: f64,
    max: f64,
    points: i64,
}

/// Stage-run rows per INSERT statement (13 values each).
const STAGE_RUN_ROWS_PER_STATEMENT: usize = 2000;

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Rows bound per INSERT statement (4 values each, under SQLite's 32766 limit).
const METRIC_ROWS_PER_STATEMENT: usize = 4000;

impl Registry {
    /// Opens (creating if needed) the registry and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Registry> {
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
        let mut conn = opts.connect().await.map_err(db_err(path))?;
        sqlx::migrate!("../migrations")
            .run(&mut conn)
            .await
            .map_err(|e| Error::Registry {
                path: path.to_path_buf(),
                message: format!(
                    "applying the schema failed: {e}; if this registry was written by a newer haic-pipe, use that version"
                ),
            })?;
        Ok(Registry {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
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

    pub async fn begin_run(&self, pipeline: &str, digest: &str, targets: &str) -> Result<i64> {
        let q = sqlx::query(
            "INSERT INTO runs (pipeline, pipeline_digest, targets, status, driver_pid) VALUES (?, ?, ?, 'running', ?)",
        )
        .bind(pipeline)
        .bind(digest)
        .bind(targets)
        .bind(std::process::id() as i64);
        let r = self.execute(q).await?;
        Ok(r.last_insert_rowid())
    }

    /// The newest run of this pipeline, with its status.
    pub async fn newest_run(&self, pipeline: &str) -> Result<Option<(i64, String, String)>> {
        let q = sqlx::query(
            "SELECT id, status, targets FROM runs WHERE pipeline = ? ORDER BY id DESC LIMIT 1",
        )
        .bind(pipeline);
        let row = self.fetch_optional(q).await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    /// Marks a run as running again (resume) under this driver.
    pub async fn reopen_run(&self, run_id: i64) -> Result<()> {
        let q = sqlx::query(
            "UPDATE runs SET status = 'running', finished_at = NULL, driver_pid = ? WHERE id = ?",
        )
        .bind(std::process::id() as i64)
        .bind(run_id);
        self.execute(q).await?;
        Ok(())
    }

    /// Stage runs of `run_id` left `running`/`pending` by a driver that died
    /// become `interrupted`, except those in `keep` (cluster jobs still
    /// running, which the new driver adopts). Returns their stage names.
    pub async fn reconcile(&self, run_id: i64, keep: &[i64]) -> Result<Vec<String>> {
        let mut qb = QueryBuilder::new(
            "UPDATE stage_runs SET status = 'interrupted',
                 finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 error = coalesce(error, 'the driver stopped while this stage ran; resumed later')
             WHERE status IN ('running', 'pending') AND run_id = ",
        );
        qb.push_bind(run_id);
        if !keep.is_empty() {
            qb.push(" AND id NOT IN (");
            let mut ids = qb.separated(", ");
            for id in keep {
                ids.push_bind(*id);
            }
            qb.push(")");
        }
        qb.push(" RETURNING stage");
        let mut c = self.conn.lock().await;
        let rows = qb
            .build()
            .fetch_all(&mut *c)
            .await
            .map_err(db_err(&self.path))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Stage runs of `run_id` still marked `running`, with what a resumed
    /// driver needs to find their cluster jobs.
    pub async fn running_stage_runs(&self, run_id: i64) -> Result<Vec<RunningStage>> {
        let q = sqlx::query(
            "SELECT id, stage, coalesce(key, ''), attempt, coalesce(worker, ''), job_id, coalesce(log_path, '')
             FROM stage_runs WHERE run_id = ? AND status = 'running' ORDER BY id",
        )
        .bind(run_id);
        let rows = self.fetch_all(q).await?;
        Ok(rows
            .iter()
            .map(|r| RunningStage {
                id: r.get(0),
                stage: r.get(1),
                key: r.get(2),
                attempt: r.get(3),
                worker: r.get(4),
                job_id: r.get(5),
                log_path: r.get(6),
            })
            .collect())
    }

    /// Records the cluster job a stage run was submitted as.
    pub async fn set_job_id(&self, id: i64, job_id: &str) -> Result<()> {
        self.execute(
            sqlx::query("UPDATE stage_runs SET job_id = ? WHERE id = ?")
                .bind(job_id)
                .bind(id),
        )
        .await?;
        Ok(())
    }

    /// Records the device a worker reported it computed on.
    pub async fn set_device(&self, id: i64, device: &str) -> Result<()> {
        self.execute(
            sqlx::query("UPDATE stage_runs SET device = ? WHERE id = ?")
                .bind(device)
                .bind(id),
        )
        .await?;
        Ok(())
    }

    pub async fn finish_run(&self, run_id: i64, status: &str) -> Result<()> {
        let q = sqlx::query(
            "UPDATE runs SET status = ?, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
        )
        .bind(status)
        .bind(run_id);
        self.execute(q).await?;
        Ok(())
    }

    /// Highest attempt number of a stage in a run (0 if none).
    pub async fn last_attempt(&self, run_id: i64, stage: &str) -> Result<i64> {
        let mut c = self.conn.lock().await;
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT max(attempt) FROM stage_runs WHERE run_id = ? AND stage = ?",
        )
        .bind(run_id)
        .bind(stage)
        .fetch_one(&mut *c)
        .await
        .map_err(db_err(&self.path))?;
        Ok(n.unwrap_or(0))
    }

    /// Stages already finished (succeeded or cached) in a run, with their keys.
    pub async fn finished_stages(&self, run_id: i64) -> Result<HashMap<String, String>> {
        let q = sqlx::query(
            "SELECT stage, key FROM stage_runs WHERE run_id = ? AND status IN ('succeeded', 'cached') AND key IS NOT NULL",
        )
        .bind(run_id);
        let rows = self.fetch_all(q).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The keys of every artifact the registry knows.
    pub async fn artifact_keys(&self) -> Result<HashSet<String>> {
        let rows = self
            .fetch_all(sqlx::query("SELECT key FROM artifacts"))
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Inserts stage runs in one transaction (the plan's cached and skipped
    /// stages), many rows per statement.
    pub async fn insert_stage_runs(&self, runs: &[NewStageRun<'_>]) -> Result<Vec<i64>> {
        let mut c = self.conn.lock().await;
        let mut tx = c.begin().await.map_err(db_err(&self.path))?;
        let now: String = sqlx::query_scalar("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')")
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err(&self.path))?;
        let mut ids = Vec::with_capacity(runs.len());
        for chunk in runs.chunks(STAGE_RUN_ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::new(
                "INSERT INTO stage_runs (run_id, stage, kind, key, key_material, status, attempt, worker, device, log_path, error, started_at, finished_at) ",
            );
            qb.push_values(chunk, |mut b, r| {
                let open = matches!(r.status, StageStatus::Pending | StageStatus::Running);
                b.push_bind(r.run_id)
                    .push_bind(r.stage)
                    .push_bind(r.kind)
                    .push_bind(r.key)
                    .push_bind(r.key_material)
                    .push_bind(r.status.as_str())
                    .push_bind(r.attempt)
                    .push_bind(r.worker)
                    .push_bind(r.device)
                    .push_bind(r.log_path)
                    .push_bind(r.error)
                    .push_bind(now.clone())
                    .push_bind((!open).then(|| now.clone()));
            });
            qb.push(" RETURNING id");
            let rows = qb
                .build()
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err(&self.path))?;
            ids.extend(rows.iter().map(|r| r.get::<i64, _>(0)));
        }
        tx.commit().await.map_err(db_err(&self.path))?;
        Ok(ids)
    }

    /// Records a stage run that starts now, with its flattened params.
    pub async fn start_stage_run(&self, r: &NewStageRun<'_>, params: &Value) -> Result<i64> {
        let id = self.insert_stage_runs(std::slice::from_ref(r)).await?[0];
        let mut flat = Vec::new();
        flatten_params("", params, &mut flat);
        if !flat.is_empty() {
            let mut c = self.conn.lock().await;
            let mut qb =
                QueryBuilder::new("INSERT OR REPLACE INTO params (stage_run_id, name, value) ");
            qb.push_values(flat, |mut b, (k, v)| {
                b.push_bind(id).push_bind(k).push_bind(v);
            });
            qb.build()
                .execute(&mut *c)
                .await
                .map_err(db_err(&self.path))?;
        }
        Ok(id)
    }

    pub async fn set_worker(&self, id: i64, worker: &str) -> Result<()> {
        self.execute(
            sqlx::query("UPDATE stage_runs SET worker = ? WHERE id = ?")
                .bind(worker)
                .bind(id),
        )
        .await?;
        Ok(())
    }

    pub async fn finish_stage_run(
        &self,
        id: i64,
        status: StageStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let q = sqlx::query(
            "UPDATE stage_runs SET status = ?, error = ?, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(id);
        self.execute(q).await?;
        Ok(())
    }

    /// Records a published artifact and the inputs its stage run read.
    pub async fn record_artifact(
        &self,
        stage_run_id: i64,
        m: &crate::cache::Manifest,
        path: &str,
        lineage: &[(String, String)],
    ) -> Result<()> {
        self.insert_artifact(true, stage_run_id, m, path, lineage)
            .await
            .map(|_| ())
    }

    /// Records an artifact found in the store that the registry does not
    /// know (its driver died between the worker's publish and the record),
    /// with the stage run that found it; a known one is left as it is.
    /// Whether a row was added.
    pub async fn record_found_artifact(
        &self,
        stage_run_id: i64,
        m: &crate::cache::Manifest,
        path: &str,
        lineage: &[(String, String)],
    ) -> Result<bool> {
        self.insert_artifact(false, stage_run_id, m, path, lineage)
            .await
    }

    /// Replaces a known artifact's row, or keeps it (then lineage is
    /// written only with a new artifact row).
    async fn insert_artifact(
        &self,
        replace: bool,
        stage_run_id: i64,
        m: &crate::cache::Manifest,
        path: &str,
        lineage: &[(String, String)],
    ) -> Result<bool> {
        let mut c = self.conn.lock().await;
        let mut tx = c.begin().await.map_err(db_err(&self.path))?;
        let sql = if replace {
            "INSERT OR REPLACE INTO artifacts (key, stage, kind, path, digest, bytes, stage_run_id) VALUES (?, ?, ?, ?, ?, ?, ?)"
        } else {
            "INSERT OR IGNORE INTO artifacts (key, stage, kind, path, digest, bytes, stage_run_id) VALUES (?, ?, ?, ?, ?, ?, ?)"
        };
        let added = sqlx::query(sql)
            .bind(&m.key)
            .bind(&m.stage)
            .bind(&m.kind)
            .bind(path)
            .bind(&m.digest)
            .bind(m.bytes as i64)
            .bind(stage_run_id)
            .execute(&mut *tx)
            .await
            .map_err(db_err(&self.path))?
            .rows_affected()
            > 0;
        if !added {
            return Ok(false);
        }
        for (input, key) in lineage {
            sqlx::query("INSERT OR REPLACE INTO lineage (stage_run_id, input, artifact_key) VALUES (?, ?, ?)")
                .bind(stage_run_id)
                .bind(input)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(db_err(&self.path))?;
        }
        tx.commit().await.map_err(db_err(&self.path))?;
        Ok(true)
    }

    /// Writes a batch of metric points and updates their summaries, in one transaction.
    /// Points whose value is NaN or infinite are not stored (SQLite would turn
    /// them into NULL); their count is reported on stderr.
    pub async fn insert_metrics(&self, points: &[MetricPoint]) -> Result<()> {
        let finite: Vec<&MetricPoint> = points.iter().filter(|p| p.value.is_finite()).collect();
        if finite.len() < points.len() {
            eprintln!(
                "haic-pipe: {} metric point(s) with a NaN or infinite value were not recorded",
                points.len() - finite.len()
            );
        }
        let points = finite;
        if points.is_empty() {
            return Ok(());
        }
        // Summaries of this batch, merged into the stored ones below.
        let mut summary: HashMap<(i64, &str), BatchSummary> = HashMap::new();
        for p in &points {
            let e = summary
                .entry((p.stage_run_id, p.name.as_str()))
                .or_insert(BatchSummary {
                    last_step: p.step,
                    last: p.value,
                    min: p.value,
                    max: p.value,
                    points: 0,
                });
            if p.step >= e.last_step {
                e.last_step = p.step;
                e.last = p.value;
            }
            e.min = e.min.min(p.value);
            e.max = e.max.max(p.value);
            e.points += 1;
        }
        let mut c = self.conn.lock().await;
        let mut tx = c.begin().await.map_err(db_err(&self.path))?;
        for chunk in points.chunks(METRIC_ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::new(
                "INSERT OR REPLACE INTO metrics (stage_run_id, name, step, value) ",
            );
            qb.push_values(chunk, |mut b, p| {
                b.push_bind(p.stage_run_id)
                    .push_bind(p.name.as_str())
                    .push_bind(p.step)
                    .push_bind(p.value);
            });
            qb.build()
                .execute(&mut *tx)
                .await
                .map_err(db_err(&self.path))?;
        }
        let rows: Vec<_> = summary.into_iter().collect();
        for chunk in rows.chunks(METRIC_ROWS_PER_STATEMENT / 2) {
            let mut qb = QueryBuilder::new(
                "INSERT INTO metric_summaries (stage_run_id, name, last_step, last_value, min_value, max_value, points) ",
            );
            qb.push_values(chunk, |mut b, ((id, name), s)| {
                b.push_bind(*id)
                    .push_bind(*name)
                    .push_bind(s.last_step)
                    .push_bind(s.last)
                    .push_bind(s.min)
                    .push_bind(s.max)
                    .push_bind(s.points);
            });
            qb.push(
                " ON CONFLICT (stage_run_id, name) DO UPDATE SET
                   last_value = CASE WHEN excluded.last_step >= last_step THEN excluded.last_value ELSE last_value END,
                   last_step = max(last_step, excluded.last_step),
                   min_value = min(min_value, excluded.min_value),
                   max_value = max(max_value, excluded.max_value),
                   points = points + excluded.points",
            );
            qb.build()
                .execute(&mut *tx)
                .await
                .map_err(db_err(&self.path))?;
        }
        tx.commit().await.map_err(db_err(&self.path))?;
        Ok(())
    }

    /// Drains metric points from workers until every sender is gone, writing
    /// whatever has queued up as one batch (one transaction) at a time.
    pub async fn write_metrics(
        self: std::sync::Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<MetricPoint>,
    ) {
        const BATCH: usize = 50_000;
        let mut batch = Vec::with_capacity(1024);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.insert_metrics(&batch).await {
                eprintln!(
                    "haic-pipe: could not record {} metric points: {e}",
                    batch.len()
                );
            }
            batch.clear();
        }
    }

    pub async fn load_file_stats(&self) -> Result<HashMap<String, FileStat>> {
        let rows = self
            .fetch_all(sqlx::query(
                "SELECT path, size, mtime_ns, inode, digest FROM file_hashes",
            ))
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    FileStat {
                        size: r.get(1),
                        mtime_ns: r.get(2),
                        inode: r.get(3),
                        digest: r.get(4),
                    },
                )
            })
            .collect())
    }

    pub async fn save_file_stats(&self, stats: &[(String, FileStat)]) -> Result<()> {
        if stats.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.lock().await;
        let mut tx = c.begin().await.map_err(db_err(&self.path))?;
        for chunk in stats.chunks(METRIC_ROWS_PER_STATEMENT / 2) {
            let mut qb = QueryBuilder::new(
                "INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, inode, digest) ",
            );
            qb.push_values(chunk, |mut b, (p, s)| {
                b.push_bind(p.as_str())
                    .push_bind(s.size)
                    .push_bind(s.mtime_ns)
                    .push_bind(s.inode)
                    .push_bind(s.digest.as_str());
            });
            qb.build()
                .execute(&mut *tx)
                .await
                .map_err(db_err(&self.path))?;
        }
        tx.commit().await.map_err(db_err(&self.path))?;
        Ok(())
    }

    /// Key material of the newest finished stage run of this stage (for `status`).
    pub async fn last_material(&self, stage: &str) -> Result<Option<String>> {
        let mut c = self.conn.lock().await;
        sqlx::query_scalar(
            "SELECT key_material FROM stage_runs WHERE stage = ? AND status IN ('succeeded', 'cached')
             AND key_material IS NOT NULL ORDER BY id DESC LIMIT 1",
        )
        .bind(stage)
        .fetch_optional(&mut *c)
        .await
        .map_err(db_err(&self.path))
    }

    /// Newest stage run of this stage with this key: (status, error, run
    /// id, the pid of that run's driver).
    pub async fn last_for_key(
        &self,
        stage: &str,
        key: &str,
    ) -> Result<Option<(String, Option<String>, i64, Option<i64>)>> {
        let q = sqlx::query(
            "SELECT s.status, s.error, s.run_id, r.driver_pid FROM stage_runs s JOIN runs r ON r.id = s.run_id
             WHERE s.stage = ? AND s.key = ? ORDER BY s.id DESC LIMIT 1",
        )
        .bind(stage)
        .bind(key);
        let row = self.fetch_optional(q).await?;
        Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
    }

    /// Artifact keys used by the newest `keep_runs` runs (outputs and lineage).
    pub async fn keys_in_recent_runs(&self, keep_runs: i64) -> Result<Vec<String>> {
        let rows = self
            .fetch_all(
                sqlx::query(
                    "WITH recent AS (SELECT id FROM runs ORDER BY id DESC LIMIT ?)
             SELECT key FROM stage_runs WHERE run_id IN recent AND key IS NOT NULL
             UNION
             SELECT l.artifact_key FROM lineage l JOIN stage_runs s ON s.id = l.stage_run_id
             WHERE s.run_id IN recent",
                )
                .bind(keep_runs),
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn forget_artifact(&self, key: &str) -> Result<()> {
        self.execute(sqlx::query("DELETE FROM artifacts WHERE key = ?").bind(key))
            .await?;
        Ok(())
    }

    /// Records a human-eval package (once; its digest is its identity).
    pub async fn register_rating_package(&self, p: &RatingPackage) -> Result<()> {
        let q = sqlx::query(
            "INSERT OR IGNORE INTO rating_packages (digest, path, set_a, set_b, tasks) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&p.digest)
        .bind(&p.path)
        .bind(&p.set_a)
        .bind(&p.set_b)
        .bind(p.tasks);
        self.execute(q).await?;
        Ok(())
    }

    /// Stores answers in one transaction; an answer a rater already gave
    /// to a task is kept as it was. Returns how many were new.
    pub async fn insert_ratings(&self, ratings: &[Rating]) -> Result<u64> {
        let mut c = self.conn.lock().await;
        let mut tx = c.begin().await.map_err(db_err(&self.path))?;
        let mut added = 0;
        for r in ratings {
            let q = sqlx::query(
                "INSERT OR IGNORE INTO ratings (package, task_id, kind, rater, choice, chosen, origin) VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&r.package)
            .bind(&r.task_id)
            .bind(&r.kind)
            .bind(&r.rater)
            .bind(&r.choice)
            .bind(&r.chosen)
            .bind(&r.origin);
            added += q
                .execute(&mut *tx)
                .await
                .map_err(db_err(&self.path))?
                .rows_affected();
        }
        tx.commit().await.map_err(db_err(&self.path))?;
        Ok(added)
    }

    /// The answers to a package (all packages when `None`), oldest first.
    pub async fn ratings(&self, package: Option<&str>) -> Result<Vec<Rating>> {
        let q = sqlx::query(
            "SELECT package, task_id, kind, rater, choice, chosen, origin FROM ratings WHERE ?1 IS NULL OR package = ?1 ORDER BY id",
        )
        .bind(package);
        let rows = self.fetch_all(q).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let get = |i: usize| row.try_get::<String, _>(i).map_err(db_err(&self.path));
            out.push(Rating {
                package: get(0)?,
                task_id: get(1)?,
                kind: get(2)?,
                rater: get(3)?,
                choice: get(4)?,
                chosen: get(5)?,
                origin: get(6)?,
            });
        }
        Ok(out)
    }

    /// Every rated package, oldest first.
    pub async fn rating_packages(&self) -> Result<Vec<RatingPackage>> {
        let rows = self
            .fetch_all(sqlx::query(
                "SELECT digest, path, set_a, set_b, tasks FROM rating_packages ORDER BY registered_at, digest",
            ))
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let get = |i: usize| row.try_get::<String, _>(i).map_err(db_err(&self.path));
            out.push(RatingPackage {
                digest: get(0)?,
                path: get(1)?,
                set_a: get(2)?,
                set_b: get(3)?,
                tasks: row.try_get(4).map_err(db_err(&self.path))?,
            });
        }
        Ok(out)
    }

    /// A plain SELECT on the writer connection (for the CLI's own views).
    pub async fn select(&self, sql: &'static str, binds: &[&str]) -> Result<QueryResult> {
        let mut c = self.conn.lock().await;
        let mut q = sqlx::query(sql);
        for b in binds {
            q = q.bind(*b);
        }
        let rows = q.fetch_all(&mut *c).await.map_err(db_err(&self.path))?;
        Ok(QueryResult::from_rows(&rows))
    }
}

/// Nested params become dotted names: `{opt: {lr: 1}}` -> `opt.lr = 1`.
fn flatten_params(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_params(&name, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_and_summaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let reg = Registry::open(&path).await.unwrap();
        let run = reg.begin_run("/p.yaml", "d", "").await.unwrap();
        let id = reg
            .start_stage_run(
                &NewStageRun {
                    key: Some("k"),
                    ..NewStageRun::new(run, "s", "command", StageStatus::Running)
                },
                &serde_json::json!({"aux": "msp", "opt": {"lr": 0.1}}),
            )
            .await
            .unwrap();
        let pts: Vec<_> = (0..10)
            .map(|s| MetricPoint {
                stage_run_id: id,
                name: "val_bpd".into(),
                step: s,
                value: 10.0 - s as f64,
            })
            .collect();
        reg.insert_metrics(&pts[..5]).await.unwrap();
        reg.insert_metrics(&pts[5..]).await.unwrap();
        let q = query_read_only(
            &path,
            "SELECT last_step, last_value, min_value, points FROM metric_summaries",
        )
        .await
        .unwrap();
        assert_eq!(
            q.rows[0],
            vec![
                Value::from(9),
                Value::from(1.0),
                Value::from(1.0),
                Value::from(10)
            ]
        );
        let q = query_read_only(&path, "select value from params where name = 'opt.lr'")
            .await
            .unwrap();
        assert_eq!(q.rows[0][0], Value::from("0.1"));
        let e = query_read_only(&path, "DELETE FROM metrics")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("only SELECT"), "{e}");
        let e = query_read_only(&path, "select 1; drop table runs")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("one statement"), "{e}");
        // A write hidden in a CTE is refused by SQLite itself.
        let e = query_read_only(&path, "WITH x AS (SELECT 1) DELETE FROM runs")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
