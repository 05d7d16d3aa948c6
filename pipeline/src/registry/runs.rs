//! Runs and stage runs: what the driver records as a run goes (begin,
//! resume, reconcile, start and finish each stage) and what `status` reads.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::{Connection, QueryBuilder, Row};

use super::{
    KeyedRun, NewStageRun, Registry, RunLabel, RunStatus, RunningStage, StageStatus, db_err,
};
use crate::error::Result;

/// Stage-run rows per INSERT statement (13 values each).
const STAGE_RUN_ROWS_PER_STATEMENT: usize = 2000;

/// Sweep rows per INSERT statement (at most 4 values each; SQLite allows
/// 32,766 variables per statement).
const SWEEP_ROWS_PER_STATEMENT: usize = 5000;

impl Registry {
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

    /// How many runs the registry holds.
    pub async fn run_count(&self) -> Result<i64> {
        let row = self
            .fetch_optional(sqlx::query("SELECT count(*) FROM runs"))
            .await?;
        Ok(row.map(|r| r.get(0)).unwrap_or(0))
    }

    /// The run named `name`, if there is one.
    pub async fn run_named(&self, name: &str) -> Result<Option<i64>> {
        let q = sqlx::query("SELECT id FROM runs WHERE name = ?").bind(name);
        Ok(self.fetch_optional(q).await?.map(|r| r.get(0)))
    }

    /// Records a run's name, note, tags and `-S` overrides (a name or note
    /// not given keeps the one the run has; tags add up).
    pub async fn label_run(&self, run_id: i64, label: &RunLabel) -> Result<()> {
        let overrides = serde_json::to_string(&label.overrides).unwrap_or_else(|_| "[]".into());
        let q = sqlx::query(
            "UPDATE runs SET name = COALESCE(?, name), note = COALESCE(?, note), overrides = ? WHERE id = ?",
        )
        .bind(label.name.as_deref())
        .bind(label.note.as_deref())
        .bind(overrides)
        .bind(run_id);
        self.execute(q).await?;
        for tag in &label.tags {
            let q = sqlx::query("INSERT OR IGNORE INTO run_tags (run_id, tag) VALUES (?, ?)")
                .bind(run_id)
                .bind(tag);
            self.execute(q).await?;
        }
        Ok(())
    }

    /// Records the members of the sweep `run_id` runs and which stage copy
    /// each member's stage is, replacing what a resumed run had.
    pub async fn record_sweep(&self, run_id: i64, sweep: &crate::spec::Sweep) -> Result<()> {
        let err = db_err(&self.path);
        let mut c = self.conn.lock().await;
        let mut tx = c.begin().await.map_err(&err)?;
        let swept = serde_json::to_string(&sweep.vars).unwrap_or_else(|_| "[]".into());
        sqlx::query("UPDATE runs SET swept = ? WHERE id = ?")
            .bind(swept)
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        for delete in [
            "DELETE FROM sweep_members WHERE run_id = ?",
            "DELETE FROM sweep_member_stages WHERE run_id = ?",
        ] {
            sqlx::query(delete)
                .bind(run_id)
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
        }
        let members: Vec<(i64, String)> = sweep
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let vars = serde_json::to_string(&m.vars).unwrap_or_else(|_| "{}".into());
                (i as i64, vars)
            })
            .collect();
        for chunk in members.chunks(SWEEP_ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::new("INSERT INTO sweep_members (run_id, member, vars) ");
            qb.push_values(chunk, |mut b, (i, vars)| {
                b.push_bind(run_id).push_bind(*i).push_bind(vars.as_str());
            });
            qb.build().execute(&mut *tx).await.map_err(&err)?;
        }
        let stages: Vec<(i64, &str, &str)> = sweep
            .members
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                m.stages
                    .iter()
                    .map(move |(file, copy)| (i as i64, file.as_str(), copy.as_str()))
            })
            .collect();
        for chunk in stages.chunks(SWEEP_ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::new(
                "INSERT INTO sweep_member_stages (run_id, member, stage, run_stage) ",
            );
            qb.push_values(chunk, |mut b, (i, file, copy)| {
                b.push_bind(run_id)
                    .push_bind(*i)
                    .push_bind(*file)
                    .push_bind(*copy);
            });
            qb.build().execute(&mut *tx).await.map_err(&err)?;
        }
        tx.commit().await.map_err(&err)?;
        Ok(())
    }

    /// The newest run of this pipeline: its id, status and targets.
    pub async fn newest_run(&self, pipeline: &str) -> Result<Option<(i64, RunStatus, String)>> {
        let q = sqlx::query(
            "SELECT id, status, targets FROM runs WHERE pipeline = ? ORDER BY id DESC LIMIT 1",
        )
        .bind(pipeline);
        let Some(r) = self.fetch_optional(q).await? else {
            return Ok(None);
        };
        let status: String = r.get(1);
        Ok(Some((r.get(0), self.parse(&status)?, r.get(2))))
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

    pub async fn finish_run(&self, run_id: i64, status: RunStatus) -> Result<()> {
        let q = sqlx::query(
            "UPDATE runs SET status = ?, finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
        )
        .bind(status.as_str())
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

    /// Newest stage run of this stage with this key, if any.
    pub async fn last_for_key(&self, stage: &str, key: &str) -> Result<Option<KeyedRun>> {
        let q = sqlx::query(
            "SELECT s.status, s.error, s.run_id, r.driver_pid, s.id FROM stage_runs s JOIN runs r ON r.id = s.run_id
             WHERE s.stage = ? AND s.key = ? ORDER BY s.id DESC LIMIT 1",
        )
        .bind(stage)
        .bind(key);
        let Some(r) = self.fetch_optional(q).await? else {
            return Ok(None);
        };
        let status: String = r.get(0);
        Ok(Some(KeyedRun {
            id: r.get(4),
            status: self.parse(&status)?,
            error: r.get(1),
            run_id: r.get(2),
            driver_pid: r.get(3),
        }))
    }

    /// The last step stage run `id` logged a metric at, if any.
    pub async fn last_metric_step(&self, id: i64) -> Result<Option<i64>> {
        let q = sqlx::query("SELECT max(last_step) FROM metric_summaries WHERE stage_run_id = ?")
            .bind(id);
        Ok(self.fetch_optional(q).await?.and_then(|r| r.get(0)))
    }
}

/// Nested params become dotted names: `{opt: {lr: 1}}` -> `opt.lr = 1`.
/// `(name, value)` pairs of a stage's params as the `params` table holds
/// them: nested names dotted (`quantiser.decay`), strings bare.
pub fn flatten_params(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
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
