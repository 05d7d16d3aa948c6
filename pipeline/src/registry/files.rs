//! The dependency-file digest cache (`file_hashes`): a file whose size,
//! mtime and inode are unchanged is not hashed again.

use std::collections::HashMap;

use sqlx::{Connection, QueryBuilder, Row};

use super::metrics::METRIC_ROWS_PER_STATEMENT;
use super::{FileStat, Registry, db_err};
use crate::error::Result;

impl Registry {
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
}
