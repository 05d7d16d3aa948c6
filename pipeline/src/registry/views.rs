//! Read-only views the CLI renders: the runs overview (`registry runs`), a
//! stage's recent runs (`show`), a stage run's metric points (`report`),
//! and what runs ran with and gave (`compare`); a run whole and the
//! dashboard's pages are in dashboard.rs. They open the registry
//! read-only, like `registry query`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Row};

use super::{MetricPoint, QueryResult, db_err};
use crate::error::{Error, Result};

/// What each table and view holds, for `registry schema`.
const TABLES: &[(&str, &str)] = &[
    (
        "runs",
        "one row per `run`: pipeline, status, times, name, note, -S overrides, swept vars",
    ),
    ("run_tags", "the tags of a run (`run --tag`)"),
    (
        "sweep_members",
        "per sweep run, each member's values of the swept vars (JSON)",
    ),
    (
        "sweep_member_stages",
        "per sweep member and stage of the file, the stage copy in the run it is",
    ),
    (
        "member_stages",
        "per sweep member and stage, the copy's status and the stage run behind its artifact",
    ),
    (
        "stage_runs",
        "one row per stage per run and attempt: status, key, key material, worker, log, error",
    ),
    (
        "run_stages",
        "per run and stage, the stage run behind its artifact (`producer`), cached or not",
    ),
    (
        "params",
        "a stage run's resolved params, nested names dotted",
    ),
    (
        "metrics",
        "every metric point: stage run, name, step, value",
    ),
    (
        "metric_summaries",
        "per stage run and metric: last, min, max, points",
    ),
    (
        "artifacts",
        "the artifact store's contents: key, stage, digest, size, the stage run that made it",
    ),
    ("lineage", "which artifact a stage run read, per input"),
    (
        "workspace_identity",
        "the workspace's id, also in registry-id beside the file: an emptied or replaced registry is refused",
    ),
    ("file_hashes", "the dependency files' digest cache"),
    (
        "rating_packages",
        "human-evaluation packages raters answered",
    ),
    ("ratings", "human-evaluation answers"),
];

/// A read-only connection to a registry.
pub struct Reader {
    pub(super) path: PathBuf,
    pub(super) conn: SqliteConnection,
    /// Whether `metrics` has its `at` column: a registry no `run` has
    /// opened since it was added lacks it (and a reader cannot add it).
    pub(super) metric_time: bool,
}

/// What a run ran with and gave, for `compare`: every stage's params and
/// last metric values, read from the stage run behind each stage's artifact
/// (cached stages included, through the `run_stages` view).
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    pub id: i64,
    pub name: Option<String>,
    pub tags: Vec<String>,
    pub overrides: Vec<String>,
    /// blake3 of the pipeline file's text when the run started.
    pub pipeline_digest: String,
    /// (stage, kind, param name as stored, e.g. `quantiser.decay`, value).
    pub params: Vec<(String, String, String, String)>,
    /// (stage, kind, metric name, last value).
    pub metrics: Vec<(String, String, String, f64)>,
    /// (stage, the stage run behind its artifact): where its metric
    /// points are ([`Reader::metric_points`]); filled by
    /// [`Reader::load_producers`], which `compare` does not need.
    pub producers: Vec<(String, i64)>,
    /// The member, for a sweep's member.
    pub member: Option<i64>,
}

/// A read-only connection to the registry at `path` (SQLite refuses any
/// write on it); an error that says so when there is no registry yet.
pub(super) async fn connect_read_only(path: &Path) -> Result<SqliteConnection> {
    if !path.exists() {
        return Err(Error::Registry {
            path: path.to_path_buf(),
            message: "no registry here yet; run a pipeline first, or pass --workspace".into(),
        });
    }
    let opts = SqliteConnectOptions::from_str("sqlite://")
        .map_err(db_err(path))?
        .filename(path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(10))
        .disable_statement_logging();
    opts.connect().await.map_err(db_err(path))
}

impl Reader {
    /// Opens the registry at `path` read-only; an error when there is none.
    pub async fn open(path: &Path) -> Result<Reader> {
        let mut conn = connect_read_only(path).await?;
        let metric_time =
            sqlx::query("SELECT 1 FROM pragma_table_info('metrics') WHERE name = 'at'")
                .fetch_optional(&mut conn)
                .await
                .map_err(db_err(path))?
                .is_some();
        Ok(Reader {
            path: path.to_path_buf(),
            conn,
            metric_time,
        })
    }

    /// Every table and view with its columns and what it holds, as a
    /// table (`registry schema`).
    pub async fn schema(&mut self) -> Result<QueryResult> {
        let rows = sqlx::query(
            "SELECT m.name AS \"table\", m.type AS kind, p.name AS \"column\", p.type AS type
             FROM sqlite_master m JOIN pragma_table_info(m.name) p
             WHERE m.type IN ('table', 'view') AND m.name NOT LIKE 'sqlite_%'
               AND m.name NOT LIKE '_sqlx%'
             ORDER BY m.name, p.cid",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err(&self.path))?;
        let mut r = QueryResult::from_rows(&rows);
        r.columns.push("holds".into());
        let mut previous = String::new();
        for row in &mut r.rows {
            let table = row[0].as_str().unwrap_or_default().to_string();
            let holds = match table == previous {
                true => "",
                false => TABLES
                    .iter()
                    .find(|(t, _)| *t == table)
                    .map_or("", |(_, h)| *h),
            };
            row.push(serde_json::Value::from(holds));
            previous = table;
        }
        Ok(r)
    }

    /// The newest `limit` runs with their stage counts, as a table.
    pub async fn runs_overview(&mut self, limit: i64) -> Result<QueryResult> {
        let rows = sqlx::query(
            "SELECT r.id AS run, r.name, r.status, r.started_at, r.finished_at,
               sum(s.status = 'succeeded') AS succeeded, sum(s.status = 'cached') AS cached,
               sum(s.status = 'failed') AS failed, sum(s.status = 'skipped') AS skipped,
               sum(s.status = 'interrupted') AS interrupted,
               (SELECT group_concat(t.tag, ' ') FROM run_tags t WHERE t.run_id = r.id) AS tags,
               (SELECT group_concat(o.value, ' ') FROM json_each(r.overrides) o) AS overrides,
               r.note, r.pipeline
             FROM runs r LEFT JOIN stage_runs s ON s.run_id = r.id
             GROUP BY r.id ORDER BY r.id DESC LIMIT ?",
        )
        .bind(limit.max(0))
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err(&self.path))?;
        Ok(QueryResult::from_rows(&rows))
    }

    /// The newest `limit` stage runs of a stage (any run), as a table.
    pub async fn recent_stage_runs(&mut self, stage: &str, limit: i64) -> Result<QueryResult> {
        let rows = sqlx::query(
            "SELECT run_id AS run, attempt, status, started_at, finished_at, worker, log_path, error
             FROM stage_runs WHERE stage = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(stage)
        .bind(limit.max(0))
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err(&self.path))?;
        Ok(QueryResult::from_rows(&rows))
    }

    /// The last value of each metric of the stage run that produced the
    /// artifact `key`, as a table (`show`).
    pub async fn artifact_metrics(&mut self, key: &str) -> Result<QueryResult> {
        let rows = sqlx::query(
            "SELECT m.name AS metric, m.last_value AS last, m.min_value AS min, m.max_value AS max, m.points
             FROM artifacts a JOIN metric_summaries m ON m.stage_run_id = a.stage_run_id
             WHERE a.key = ? ORDER BY m.name",
        )
        .bind(key)
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err(&self.path))?;
        Ok(QueryResult::from_rows(&rows))
    }

    /// The run a person means by `which`: a run id, else a run name.
    pub async fn find_run(&mut self, which: &str) -> Result<Option<i64>> {
        let row = match which.parse::<i64>() {
            Ok(id) => sqlx::query("SELECT id FROM runs WHERE id = ?").bind(id),
            Err(_) => sqlx::query("SELECT id FROM runs WHERE name = ?").bind(which),
        }
        .fetch_optional(&mut self.conn)
        .await
        .map_err(db_err(&self.path))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// What run `run` ran with and gave (see [`RunFacts`]); `None` if there
    /// is no such run.
    pub async fn run_facts(&mut self, run: i64) -> Result<Option<RunFacts>> {
        let Some(mut facts) = self.run_facts_head(run).await? else {
            return Ok(None);
        };
        let err = db_err(&self.path);
        let params = sqlx::query(
            "SELECT rs.stage, rs.kind, p.name, p.value FROM run_stages rs
             JOIN params p ON p.stage_run_id = rs.producer
             WHERE rs.run_id = ? ORDER BY rs.stage, p.name",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        let metrics = sqlx::query(
            "SELECT rs.stage, rs.kind, m.name, m.last_value FROM run_stages rs
             JOIN metric_summaries m ON m.stage_run_id = rs.producer
             WHERE rs.run_id = ? ORDER BY rs.stage, m.name",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        facts.params = params
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        facts.metrics = metrics
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        Ok(Some(facts))
    }

    /// What each member of sweep run `run` ran with and gave, as one
    /// [`RunFacts`] per member in sweep order (named by its values, its
    /// values as `vars.NAME=VALUE` overrides, stages named as in the file);
    /// `None` if `run` is not a sweep.
    pub async fn sweep_facts(&mut self, run: i64) -> Result<Option<Vec<RunFacts>>> {
        let Some(head) = self.run_facts_head(run).await? else {
            return Ok(None);
        };
        let err = db_err(&self.path);
        let members =
            sqlx::query("SELECT member, vars FROM sweep_members WHERE run_id = ? ORDER BY member")
                .bind(run)
                .fetch_all(&mut self.conn)
                .await
                .map_err(&err)?;
        if members.is_empty() {
            return Ok(None);
        }
        let mut facts: Vec<RunFacts> = Vec::with_capacity(members.len());
        let mut slot: HashMap<i64, usize> = HashMap::new();
        for r in &members {
            let member: i64 = r.get(0);
            let vars: String = r.get(1);
            let vars: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&vars).unwrap_or_default();
            let mut f = head.clone();
            f.name = Some(crate::spec::sweep::label_of(&vars));
            f.overrides.extend(
                vars.iter()
                    .map(|(k, v)| crate::spec::sweep::override_text(k, v)),
            );
            f.member = Some(member);
            slot.insert(member, facts.len());
            facts.push(f);
        }
        let params = sqlx::query(
            "SELECT ms.member, ms.stage, ms.kind, p.name, p.value FROM member_stages ms
             JOIN params p ON p.stage_run_id = ms.producer
             WHERE ms.run_id = ? ORDER BY ms.member, ms.stage, p.name",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        for r in &params {
            if let Some(&i) = slot.get(&r.get::<i64, _>(0)) {
                facts[i]
                    .params
                    .push((r.get(1), r.get(2), r.get(3), r.get(4)));
            }
        }
        let metrics = sqlx::query(
            "SELECT ms.member, ms.stage, ms.kind, m.name, m.last_value FROM member_stages ms
             JOIN metric_summaries m ON m.stage_run_id = ms.producer
             WHERE ms.run_id = ? ORDER BY ms.member, ms.stage, m.name",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        for r in &metrics {
            if let Some(&i) = slot.get(&r.get::<i64, _>(0)) {
                facts[i]
                    .metrics
                    .push((r.get(1), r.get(2), r.get(3), r.get(4)));
            }
        }
        Ok(Some(facts))
    }

    /// Fills each run's (or sweep member's) `producers`: per stage, the
    /// stage run behind its artifact.
    pub async fn load_producers(&mut self, facts: &mut [RunFacts]) -> Result<()> {
        let err = db_err(&self.path);
        for f in facts.iter_mut() {
            let rows = match f.member {
                Some(m) => sqlx::query(
                    "SELECT stage, producer FROM member_stages WHERE run_id = ? AND member = ? ORDER BY stage",
                )
                .bind(f.id)
                .bind(m),
                None => sqlx::query(
                    "SELECT stage, producer FROM run_stages WHERE run_id = ? ORDER BY stage",
                )
                .bind(f.id),
            }
            .fetch_all(&mut self.conn)
            .await
            .map_err(&err)?;
            f.producers = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        }
        Ok(())
    }

    /// A run's name, tags, overrides and digest, without stages.
    async fn run_facts_head(&mut self, run: i64) -> Result<Option<RunFacts>> {
        let err = db_err(&self.path);
        let Some(head) =
            sqlx::query("SELECT name, overrides, pipeline_digest FROM runs WHERE id = ?")
                .bind(run)
                .fetch_optional(&mut self.conn)
                .await
                .map_err(&err)?
        else {
            return Ok(None);
        };
        let overrides: String = head.get(1);
        let tags = sqlx::query("SELECT tag FROM run_tags WHERE run_id = ? ORDER BY tag")
            .bind(run)
            .fetch_all(&mut self.conn)
            .await
            .map_err(&err)?;
        Ok(Some(RunFacts {
            id: run,
            name: head.get(0),
            tags: tags.iter().map(|r| r.get(0)).collect(),
            overrides: serde_json::from_str(&overrides).unwrap_or_default(),
            pipeline_digest: head.get(2),
            params: Vec::new(),
            metrics: Vec::new(),
            producers: Vec::new(),
            member: None,
        }))
    }

    /// Every metric point of a stage run, by name then step.
    pub async fn metric_points(&mut self, stage_run_id: i64) -> Result<Vec<MetricPoint>> {
        let rows = sqlx::query(match self.metric_time {
            true => "SELECT name, step, value, at FROM metrics WHERE stage_run_id = ? ORDER BY name, step",
            false => "SELECT name, step, value, NULL FROM metrics WHERE stage_run_id = ? ORDER BY name, step",
        })
        .bind(stage_run_id)
        .fetch_all(&mut self.conn)
        .await
        .map_err(db_err(&self.path))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(MetricPoint {
                    stage_run_id,
                    name: r.try_get(0).ok()?,
                    step: r.try_get(1).ok()?,
                    value: r.try_get(2).ok()?,
                    at: r.try_get(3).ok()?,
                })
            })
            .collect())
    }
}
