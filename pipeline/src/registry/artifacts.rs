//! Artifacts and lineage: what a stage published, which inputs it read,
//! and what `gc` may remove.

use std::collections::HashSet;

use sqlx::{Connection, Row};

use super::{Registry, db_err};
use crate::error::Result;

impl Registry {
    /// The keys of every artifact the registry knows.
    pub async fn artifact_keys(&self) -> Result<HashSet<String>> {
        let rows = self
            .fetch_all(sqlx::query("SELECT key FROM artifacts"))
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
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
}
