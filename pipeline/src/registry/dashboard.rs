//! What `haic-pipe ui` reads: a page of runs under filters, one run whole
//! (stages with their progress, params, metric summaries, artifacts,
//! lineage; `report` reads its stages too), a metric's points, and a cheap
//! "has anything changed" probe.
//! Read-only, like the other views; the server decides what to draw.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::Row;

use super::{Reader, RunStatus, db_err};
use crate::error::Result;

/// Which runs the runs page lists.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Runs with this tag.
    pub tag: Option<String>,
    pub status: Option<RunStatus>,
    /// Runs whose stage (the stage run behind its artifact, cached or not)
    /// has this param value: (stage, param name as stored, value).
    pub param: Option<(String, String, String)>,
}

/// One row of the runs page.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub name: Option<String>,
    pub status: String,
    pub pipeline: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Seconds from start to finish (to now, while it runs).
    pub seconds: Option<f64>,
    pub tags: Vec<String>,
    pub note: Option<String>,
    /// The swept vars, for a sweep's run.
    pub swept: Vec<String>,
    pub overrides: Vec<String>,
    /// How many of its stages are in each state (their last attempt).
    pub stages: BTreeMap<String, i64>,
}

/// A page of runs, newest first, and how many match in all.
#[derive(Debug, Clone, Serialize)]
pub struct RunsPage {
    pub total: i64,
    pub rows: Vec<RunRow>,
}

/// An artifact as the registry knows it.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactRow {
    pub key: String,
    pub path: String,
    pub digest: String,
    pub bytes: i64,
    /// The run whose stage run made it.
    pub made_in_run: Option<i64>,
}

/// One stage of a run: its last attempt there.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub id: i64,
    pub stage: String,
    pub kind: String,
    pub status: String,
    pub attempt: i64,
    pub worker: Option<String>,
    pub device: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub seconds: Option<f64>,
    pub error: Option<String>,
    pub has_log: bool,
    /// The stage run whose params and metrics describe the artifact (the
    /// one that made it, for a cached stage; itself otherwise).
    pub producer: i64,
    /// Its stage key, once its inputs were known (where its scratch
    /// folder is), and the digests of the artifacts it reads (from its key
    /// material, so known from its start): the stage graph's edges.
    pub key: Option<String>,
    pub inputs: Vec<String>,
    pub artifact: Option<ArtifactRow>,
    /// The last step any of its metrics reached, and the `steps` param,
    /// from which a running stage's ETA follows.
    pub step: Option<i64>,
    pub steps: Option<i64>,
}

/// A metric's summary on a stage.
#[derive(Debug, Clone, Serialize)]
pub struct MetricRow {
    pub stage: String,
    pub name: String,
    pub last_step: i64,
    pub last: f64,
    pub min: f64,
    pub max: f64,
    pub points: i64,
}

/// What one of the run's stages read: an input, its artifact, and the
/// stage and run that made it.
#[derive(Debug, Clone, Serialize)]
pub struct LineageRow {
    pub stage: String,
    pub input: String,
    pub artifact: String,
    pub from_stage: Option<String>,
    pub from_run: Option<i64>,
}

/// One run, whole.
#[derive(Debug, Clone, Serialize)]
pub struct RunDetail {
    pub run: RunRow,
    pub stages: Vec<StageRow>,
    /// (stage, param, value), nested names dotted.
    pub params: Vec<(String, String, String)>,
    pub metrics: Vec<MetricRow>,
    pub lineage: Vec<LineageRow>,
}

/// A metric's points: steps, values, and when each arrived (seconds since
/// 1970; `None` where not recorded).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    pub steps: Vec<i64>,
    pub values: Vec<f64>,
    pub at: Vec<Option<f64>>,
}

// Macros, not consts: `concat!` builds the statements as the `&'static
// str` sqlx asks for.
macro_rules! run_columns {
    () => {
        "r.id, r.name, r.status, r.pipeline, r.started_at, r.finished_at,
    (julianday(coalesce(r.finished_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) - julianday(r.started_at)) * 86400.0,
    (SELECT group_concat(t.tag, char(10)) FROM run_tags t WHERE t.run_id = r.id),
    r.note, r.swept, r.overrides,
    (SELECT group_concat(rs.status, ' ') FROM run_stages rs WHERE rs.run_id = r.id)"
    };
}

macro_rules! run_filter {
    () => {
        "(?1 IS NULL OR EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = r.id AND t.tag = ?1))
    AND (?2 IS NULL OR r.status = ?2)
    AND (?3 IS NULL OR EXISTS (SELECT 1 FROM run_stages rs JOIN params p ON p.stage_run_id = rs.producer
         WHERE rs.run_id = r.id AND rs.stage = ?3 AND p.name = ?4 AND p.value = ?5))"
    };
}

// The envelope of a series: bucket starts from ?3 to ?4 every ?5 steps,
// each bucket's steps of its largest and smallest value (SQLite's bare
// column beside max()/min() is the row that has it), those rows.
macro_rules! envelope {
    () => {
        "WITH RECURSIVE b(lo) AS (SELECT ?3 UNION ALL SELECT lo + ?5 FROM b WHERE lo + ?5 <= ?4),
         e(s) AS (
           SELECT (SELECT step FROM (SELECT step, max(value) FROM metrics
                    WHERE stage_run_id = ?1 AND name = ?2 AND step >= b.lo AND step < b.lo + ?5)) FROM b
           UNION
           SELECT (SELECT step FROM (SELECT step, min(value) FROM metrics
                    WHERE stage_run_id = ?1 AND name = ?2 AND step >= b.lo AND step < b.lo + ?5)) FROM b)
         "
    };
}
macro_rules! envelope_end {
    () => {
        " FROM e JOIN metrics m ON m.stage_run_id = ?1 AND m.name = ?2 AND m.step = e.s ORDER BY m.step"
    };
}

fn run_row(r: &sqlx::sqlite::SqliteRow) -> RunRow {
    let lines = |i: usize, sep: char| -> Vec<String> {
        r.try_get::<Option<String>, _>(i)
            .ok()
            .flatten()
            .map(|s| s.split(sep).map(str::to_string).collect())
            .unwrap_or_default()
    };
    let json_list = |i: usize| -> Vec<String> {
        r.try_get::<Option<String>, _>(i)
            .ok()
            .flatten()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    };
    let mut stages = BTreeMap::new();
    for s in lines(11, ' ') {
        *stages.entry(s).or_insert(0) += 1;
    }
    RunRow {
        id: r.get(0),
        name: r.get(1),
        status: r.get(2),
        pipeline: r.get(3),
        started_at: r.get(4),
        finished_at: r.get(5),
        seconds: r.try_get(6).ok(),
        tags: lines(7, '\n'),
        note: r.get(8),
        swept: json_list(9),
        overrides: json_list(10),
        stages,
    }
}

impl Reader {
    /// SQLite's `data_version` on this connection: it changes when any
    /// other connection (the driver) commits, so a page polls this one
    /// number and reloads only on a change.
    pub async fn data_version(&mut self) -> Result<i64> {
        let row = sqlx::query("PRAGMA data_version")
            .fetch_one(&mut self.conn)
            .await
            .map_err(db_err(&self.path))?;
        Ok(row.get(0))
    }

    /// The runs `filter` keeps, newest first: `limit` of them after the
    /// first `offset`, and how many there are.
    pub async fn runs_page(
        &mut self,
        filter: &RunFilter,
        limit: i64,
        offset: i64,
    ) -> Result<RunsPage> {
        let err = db_err(&self.path);
        let (stage, name, value) = match &filter.param {
            Some((s, n, v)) => (Some(s.as_str()), Some(n.as_str()), Some(v.as_str())),
            None => (None, None, None),
        };
        let status = filter.status.map(RunStatus::as_str);
        let rows = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs r WHERE ",
            run_filter!(),
            " ORDER BY r.id DESC LIMIT ?6 OFFSET ?7"
        ))
        .bind(filter.tag.as_deref())
        .bind(status)
        .bind(stage)
        .bind(name)
        .bind(value)
        .bind(limit.max(0))
        .bind(offset.max(0))
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        let total: i64 = sqlx::query(concat!("SELECT count(*) FROM runs r WHERE ", run_filter!()))
            .bind(filter.tag.as_deref())
            .bind(status)
            .bind(stage)
            .bind(name)
            .bind(value)
            .fetch_one(&mut self.conn)
            .await
            .map_err(&err)?
            .get(0);
        Ok(RunsPage {
            total,
            rows: rows.iter().map(run_row).collect(),
        })
    }

    /// Run `run` whole; `None` if there is no such run.
    pub async fn run_detail(&mut self, run: i64) -> Result<Option<RunDetail>> {
        let err = db_err(&self.path);
        let Some(head) = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM runs r WHERE r.id = ?"
        ))
        .bind(run)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(&err)?
        else {
            return Ok(None);
        };
        let stages = sqlx::query(
            "SELECT sr.id, sr.stage, sr.kind, sr.status, sr.attempt, sr.worker, sr.device,
               sr.started_at, sr.finished_at,
               (julianday(coalesce(sr.finished_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))) - julianday(sr.started_at)) * 86400.0,
               sr.error, sr.log_path IS NOT NULL, COALESCE(a.stage_run_id, sr.id),
               a.key, a.path, a.digest, a.bytes, (SELECT m.run_id FROM stage_runs m WHERE m.id = a.stage_run_id),
               (SELECT max(ms.last_step) FROM metric_summaries ms WHERE ms.stage_run_id = COALESCE(a.stage_run_id, sr.id)),
               (SELECT p.value FROM params p WHERE p.stage_run_id = COALESCE(a.stage_run_id, sr.id) AND p.name = 'steps'),
               sr.key_material, sr.key
             FROM stage_runs sr LEFT JOIN artifacts a ON a.key = sr.key
             WHERE sr.run_id = ?1 AND sr.id = (SELECT max(s2.id) FROM stage_runs s2
               WHERE s2.run_id = sr.run_id AND s2.stage = sr.stage)
             ORDER BY sr.started_at, sr.id",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        let stages: Vec<StageRow> = stages
            .iter()
            .map(|r| StageRow {
                id: r.get(0),
                stage: r.get(1),
                kind: r.get(2),
                status: r.get(3),
                attempt: r.get(4),
                worker: r.get(5),
                device: r.get(6),
                started_at: r.get(7),
                finished_at: r.get(8),
                seconds: r.try_get(9).ok(),
                error: r.get(10),
                has_log: r.get(11),
                producer: r.get(12),
                artifact: r.get::<Option<String>, _>(13).map(|key| ArtifactRow {
                    key,
                    path: r.get(14),
                    digest: r.get(15),
                    bytes: r.get(16),
                    made_in_run: r.get(17),
                }),
                step: r.get(18),
                steps: r.get::<Option<String>, _>(19).and_then(|s| s.parse().ok()),
                key: r.get(21),
                inputs: r
                    .get::<Option<String>, _>(20)
                    .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
                    .and_then(|m| {
                        Some(
                            m.get("inputs")?
                                .as_object()?
                                .values()
                                .filter_map(|k| Some(k.as_str()?.to_string()))
                                .collect(),
                        )
                    })
                    .unwrap_or_default(),
            })
            .collect();
        let params = sqlx::query(
            "SELECT rs.stage, p.name, p.value FROM run_stages rs
             JOIN params p ON p.stage_run_id = rs.producer
             WHERE rs.run_id = ? ORDER BY rs.stage, p.name",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        let metrics = sqlx::query(
            "SELECT rs.stage, m.name, m.last_step, m.last_value, m.min_value, m.max_value, m.points
             FROM run_stages rs JOIN metric_summaries m ON m.stage_run_id = rs.producer
             WHERE rs.run_id = ? ORDER BY rs.stage, m.name",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        let lineage = sqlx::query(
            "SELECT rs.stage, l.input, l.artifact_key, a.stage,
               (SELECT m.run_id FROM stage_runs m WHERE m.id = a.stage_run_id)
             FROM run_stages rs JOIN lineage l ON l.stage_run_id = rs.producer
             LEFT JOIN artifacts a ON a.key = l.artifact_key
             WHERE rs.run_id = ? ORDER BY rs.stage, l.input",
        )
        .bind(run)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        Ok(Some(RunDetail {
            run: run_row(&head),
            stages,
            params: params
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
            metrics: metrics
                .iter()
                .map(|r| MetricRow {
                    stage: r.get(0),
                    name: r.get(1),
                    last_step: r.get(2),
                    last: r.get(3),
                    min: r.get(4),
                    max: r.get(5),
                    points: r.get(6),
                })
                .collect(),
            lineage: lineage
                .iter()
                .map(|r| LineageRow {
                    stage: r.get(0),
                    input: r.get(1),
                    artifact: r.get(2),
                    from_stage: r.get(3),
                    from_run: r.get(4),
                })
                .collect(),
        }))
    }

    /// The stage run behind stage `stage`'s artifact in run `run` (the
    /// running attempt, while it runs); `None` if the run has no such stage.
    pub async fn producer_of(&mut self, run: i64, stage: &str) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT producer FROM run_stages WHERE run_id = ? AND stage = ?")
            .bind(run)
            .bind(stage)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err(&self.path))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Metric `name`'s points on stage run `stage_run_id`, by step. Rows
    /// are read as a stream: a million points cost their three columns,
    /// not a million row objects.
    pub async fn series(&mut self, stage_run_id: i64, name: &str) -> Result<Series> {
        use futures_util::TryStreamExt;
        let mut rows = sqlx::query(match self.metric_time {
            true => {
                "SELECT step, value, at FROM metrics WHERE stage_run_id = ? AND name = ? ORDER BY step"
            }
            false => {
                "SELECT step, value, NULL FROM metrics WHERE stage_run_id = ? AND name = ? ORDER BY step"
            }
        })
        .bind(stage_run_id)
        .bind(name)
        .fetch(&mut self.conn);
        let mut s = Series::default();
        while let Some(r) = rows.try_next().await.map_err(db_err(&self.path))? {
            let (Ok(step), Ok(value)) = (r.try_get::<i64, _>(0), r.try_get::<f64, _>(1)) else {
                continue;
            };
            s.steps.push(step);
            s.values.push(value);
            s.at.push(r.try_get(2).ok().flatten());
        }
        Ok(s)
    }

    /// Metric `name`'s points on `stage_run_id`, by step; when it has more
    /// than `2 * buckets`, only its envelope: per bucket of equal step
    /// width, the point with the largest value and the one with the
    /// smallest (a spike is never lost). SQLite reads the rows; only the
    /// envelope crosses over, a third of the time of reading them all.
    pub async fn series_envelope(
        &mut self,
        stage_run_id: i64,
        name: &str,
        buckets: usize,
    ) -> Result<Series> {
        let buckets = buckets.max(1) as i64;
        if self.point_count(stage_run_id, name).await? <= 2 * buckets {
            return self.series(stage_run_id, name).await;
        }
        let err = db_err(&self.path);
        // Each end through the primary key: no scan.
        let mut ends = Vec::with_capacity(2);
        for sql in [
            "SELECT step FROM metrics WHERE stage_run_id = ? AND name = ? ORDER BY step LIMIT 1",
            "SELECT step FROM metrics WHERE stage_run_id = ? AND name = ? ORDER BY step DESC LIMIT 1",
        ] {
            let step: Option<i64> = sqlx::query(sql)
                .bind(stage_run_id)
                .bind(name)
                .fetch_optional(&mut self.conn)
                .await
                .map_err(&err)?
                .map(|r| r.get(0));
            ends.extend(step);
        }
        let [first, last] = ends[..] else {
            return Ok(Series::default());
        };
        let width = ((last - first) / buckets + 1).max(1);
        let rows = sqlx::query(match self.metric_time {
            true => concat!(envelope!(), "SELECT m.step, m.value, m.at", envelope_end!()),
            false => concat!(envelope!(), "SELECT m.step, m.value, NULL", envelope_end!()),
        })
        .bind(stage_run_id)
        .bind(name)
        .bind(first)
        .bind(last)
        .bind(width)
        .fetch_all(&mut self.conn)
        .await
        .map_err(&err)?;
        let mut s = Series::default();
        for r in &rows {
            s.steps.push(r.get(0));
            s.values.push(r.get(1));
            s.at.push(r.try_get(2).ok().flatten());
        }
        Ok(s)
    }

    /// How many points metric `name` has on `stage_run_id`.
    pub async fn point_count(&mut self, stage_run_id: i64, name: &str) -> Result<i64> {
        let row =
            sqlx::query("SELECT points FROM metric_summaries WHERE stage_run_id = ? AND name = ?")
                .bind(stage_run_id)
                .bind(name)
                .fetch_optional(&mut self.conn)
                .await
                .map_err(db_err(&self.path))?;
        Ok(row.map_or(0, |r| r.get(0)))
    }

    /// The (stage, metric) pairs the runs' stages have, in order.
    pub async fn metric_names(&mut self, runs: &[i64]) -> Result<Vec<(String, String)>> {
        let mut out = std::collections::BTreeSet::new();
        for run in runs {
            let rows = sqlx::query(
                "SELECT rs.stage, m.name FROM run_stages rs
                 JOIN metric_summaries m ON m.stage_run_id = rs.producer WHERE rs.run_id = ?",
            )
            .bind(run)
            .fetch_all(&mut self.conn)
            .await
            .map_err(db_err(&self.path))?;
            out.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
        }
        Ok(out.into_iter().collect())
    }

    /// Run `run`'s name, if it has one.
    pub async fn run_name(&mut self, run: i64) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM runs WHERE id = ?")
            .bind(run)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err(&self.path))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Where stage `stage` of run `run` wrote its log (its last attempt).
    pub async fn log_path(&mut self, run: i64, stage: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT log_path FROM stage_runs WHERE run_id = ? AND stage = ? ORDER BY id DESC LIMIT 1",
        )
        .bind(run)
        .bind(stage)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(db_err(&self.path))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The folder of artifact `key` as the registry recorded it.
    pub async fn artifact_path(&mut self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT path FROM artifacts WHERE key = ?")
            .bind(key)
            .fetch_optional(&mut self.conn)
            .await
            .map_err(db_err(&self.path))?;
        Ok(row.map(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{MetricPoint, NewStageRun, Registry, StageStatus};

    #[tokio::test]
    async fn pages_filters_and_series_read_what_the_driver_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let reg = Registry::open(&path).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let run = reg.begin_run("/p.yaml", "d", "").await.unwrap();
            let id = reg
                .start_stage_run(
                    &NewStageRun::new(run, "vq1", "train_vq", StageStatus::Running),
                    &serde_json::json!({"aux": if i % 2 == 0 { "msp" } else { "ff" }, "steps": 10}),
                )
                .await
                .unwrap();
            let points: Vec<MetricPoint> = (0..4)
                .map(|s| MetricPoint {
                    stage_run_id: id,
                    name: "train.loss".into(),
                    step: s,
                    value: 1.0 / (1 + s) as f64,
                    at: Some(100.0 + s as f64),
                })
                .collect();
            reg.insert_metrics(&points).await.unwrap();
            ids.push((run, id));
        }
        let mut reader = Reader::open(&path).await.unwrap();
        let v0 = reader.data_version().await.unwrap();
        let all = reader.runs_page(&RunFilter::default(), 2, 1).await.unwrap();
        assert_eq!(all.total, 5);
        assert_eq!(
            all.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ids[3].0, ids[2].0]
        );
        assert_eq!(all.rows[0].stages.get("running"), Some(&1));
        let msp = RunFilter {
            param: Some(("vq1".into(), "aux".into(), "msp".into())),
            ..Default::default()
        };
        let page = reader.runs_page(&msp, 10, 0).await.unwrap();
        assert_eq!(page.total, 3);
        let detail = reader.run_detail(ids[0].0).await.unwrap().unwrap();
        assert_eq!(detail.stages[0].step, Some(3));
        assert_eq!(detail.stages[0].steps, Some(10));
        assert_eq!(detail.metrics[0].points, 4);
        assert!(reader.run_detail(999).await.unwrap().is_none());
        let s = reader.series(ids[0].1, "train.loss").await.unwrap();
        assert_eq!(s.steps, vec![0, 1, 2, 3]);
        assert_eq!(s.at[3], Some(103.0));
        // Fewer points than the buckets hold: all of them.
        let e = reader
            .series_envelope(ids[0].1, "train.loss", 2)
            .await
            .unwrap();
        assert_eq!(e.steps, s.steps);
        // More: each bucket's largest and smallest, a spike among them.
        let long: Vec<MetricPoint> = (0..1000)
            .map(|step| MetricPoint {
                stage_run_id: ids[1].1,
                name: "long".into(),
                step,
                value: if step == 537 { 9.0 } else { (step % 7) as f64 },
                at: None,
            })
            .collect();
        reg.insert_metrics(&long).await.unwrap();
        let e = reader.series_envelope(ids[1].1, "long", 10).await.unwrap();
        assert!(e.steps.len() <= 20 && e.steps.len() >= 10, "{:?}", e.steps);
        assert!(e.steps.windows(2).all(|w| w[0] < w[1]), "{:?}", e.steps);
        assert!(e.steps.contains(&537), "the spike was lost: {:?}", e.steps);
        assert_eq!(
            e.values[e.steps.iter().position(|&s| s == 537).unwrap()],
            9.0
        );
        // Another connection's commit moves the version; reading does not.
        assert_ne!(reader.data_version().await.unwrap(), v0);
        let v0 = reader.data_version().await.unwrap();
        reader.run_detail(ids[0].0).await.unwrap();
        assert_eq!(reader.data_version().await.unwrap(), v0);
        reg.finish_run(ids[0].0, RunStatus::Succeeded)
            .await
            .unwrap();
        assert_ne!(reader.data_version().await.unwrap(), v0);
    }
}
