//! Human-evaluation packages and raters' answers, written by `haic-pipe
//! eval` (no run touches them).

use sqlx::{Connection, Row};

use super::{Registry, db_err};
use crate::error::Result;

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

impl Registry {
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
}
