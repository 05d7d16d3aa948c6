//! Metric points from workers, written in batches with their summaries.

use std::collections::HashMap;

use sqlx::{Connection, QueryBuilder, Row};

use super::{MetricPoint, Registry, db_err};
use crate::error::Result;

/// Rows bound per INSERT statement (5 values each, under SQLite's 32766 limit).
pub(super) const METRIC_ROWS_PER_STATEMENT: usize = 4000;

/// One metric's points within one batch, merged into `metric_summaries`.
struct BatchSummary {
    last_step: i64,
    last: f64,
    min: f64,
    max: f64,
    points: i64,
}

impl Registry {
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
        // A point at a step already given replaces it (a resumed stage logs
        // again the steps after its checkpoint): within the batch the later
        // one is kept, and a metric whose batch reaches back to a stored
        // step has its summary recomputed from the table below, so the
        // points and their summary never disagree.
        let mut at: HashMap<(i64, &str, i64), usize> = HashMap::with_capacity(finite.len());
        for (i, p) in finite.iter().enumerate() {
            at.insert((p.stage_run_id, p.name.as_str(), p.step), i);
        }
        let points: Vec<&MetricPoint> = match at.len() == finite.len() {
            true => finite,
            false => {
                let mut keep: Vec<usize> = at.into_values().collect();
                keep.sort_unstable();
                keep.into_iter().map(|i| finite[i]).collect()
            }
        };
        if points.is_empty() {
            return Ok(());
        }
        // Summaries of this batch, merged into the stored ones below.
        let mut summary: HashMap<(i64, &str), BatchSummary> = HashMap::new();
        let mut first_step: HashMap<(i64, &str), i64> = HashMap::new();
        for p in &points {
            let f = first_step
                .entry((p.stage_run_id, p.name.as_str()))
                .or_insert(p.step);
            *f = (*f).min(p.step);
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
        // The metrics whose batch starts at or before their stored last step.
        let keys: Vec<(i64, &str)> = first_step.keys().copied().collect();
        let mut stored: HashMap<(i64, String), i64> = HashMap::new();
        for chunk in keys.chunks(METRIC_ROWS_PER_STATEMENT / 2) {
            let mut qb = QueryBuilder::new(
                "SELECT stage_run_id, name, last_step FROM metric_summaries WHERE (stage_run_id, name) IN (VALUES ",
            );
            let mut list = qb.separated(", ");
            for (id, name) in chunk {
                list.push("(");
                list.push_bind_unseparated(*id);
                list.push_unseparated(", ");
                list.push_bind_unseparated(*name);
                list.push_unseparated(")");
            }
            qb.push(")");
            let rows = qb
                .build()
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err(&self.path))?;
            for r in rows {
                stored.insert((r.get(0), r.get(1)), r.get(2));
            }
        }
        let revisited: Vec<(i64, &str)> = first_step
            .iter()
            .filter(|((id, name), first)| {
                stored
                    .get(&(*id, name.to_string()))
                    .is_some_and(|last| *first <= last)
            })
            .map(|(k, _)| *k)
            .collect();
        for chunk in points.chunks(METRIC_ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::new(
                "INSERT OR REPLACE INTO metrics (stage_run_id, name, step, value, at) ",
            );
            qb.push_values(chunk, |mut b, p| {
                b.push_bind(p.stage_run_id)
                    .push_bind(p.name.as_str())
                    .push_bind(p.step)
                    .push_bind(p.value)
                    .push_bind(p.at);
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
        for (id, name) in revisited {
            sqlx::query(
                "INSERT OR REPLACE INTO metric_summaries (stage_run_id, name, last_step, last_value, min_value, max_value, points)
                 SELECT stage_run_id, name, max(step),
                        (SELECT value FROM metrics l WHERE l.stage_run_id = m.stage_run_id AND l.name = m.name ORDER BY step DESC LIMIT 1),
                        min(value), max(value), count(*)
                 FROM metrics m WHERE stage_run_id = ? AND name = ? GROUP BY stage_run_id, name",
            )
            .bind(id)
            .bind(name)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{NewStageRun, StageStatus, query_read_only};
    use serde_json::Value;

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
                at: None,
            })
            .collect();
        reg.insert_metrics(&pts[..5]).await.unwrap();
        reg.insert_metrics(&pts[5..]).await.unwrap();
        let q = query_read_only(
            &path,
            "SELECT last_step, last_value, min_value, points FROM metric_summaries",
            &Default::default(),
        )
        .await
        .unwrap()
        .result;
        assert_eq!(
            q.rows[0],
            vec![
                Value::from(9),
                Value::from(1.0),
                Value::from(1.0),
                Value::from(10)
            ]
        );
        // Steps given again (a resumed stage) replace theirs, in the table
        // and its summary alike; so does a step twice in one batch.
        let again = |step: i64, value: f64| MetricPoint {
            stage_run_id: id,
            name: "val_bpd".into(),
            step,
            value,
            at: None,
        };
        reg.insert_metrics(&[again(8, 50.0), again(9, 0.5), again(9, 0.25)])
            .await
            .unwrap();
        let q = query_read_only(
            &path,
            "SELECT s.last_step, s.last_value, s.min_value, s.max_value, s.points, (SELECT count(*) FROM metrics), (SELECT max(value) FROM metrics)
             FROM metric_summaries s",
            &Default::default(),
        )
        .await
        .unwrap()
        .result;
        assert_eq!(
            q.rows[0],
            vec![
                Value::from(9),
                Value::from(0.25),
                Value::from(0.25),
                Value::from(50.0),
                Value::from(10),
                Value::from(10),
                Value::from(50.0)
            ]
        );
        let q = query_read_only(
            &path,
            "select value from params where name = 'opt.lr'",
            &Default::default(),
        )
        .await
        .unwrap()
        .result;
        assert_eq!(q.rows[0][0], Value::from("0.1"));
        let e = query_read_only(&path, "DELETE FROM metrics", &Default::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("only SELECT"), "{e}");
        let e = query_read_only(&path, "select 1; drop table runs", &Default::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("one statement"), "{e}");
        // A write hidden in a CTE is refused by SQLite itself.
        let e = query_read_only(
            &path,
            "WITH x AS (SELECT 1) DELETE FROM runs",
            &Default::default(),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
