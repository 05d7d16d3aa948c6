//! Read-only access to the registry: `haic-pipe registry query`.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};

use super::db_err;
use crate::error::{Error, Result};

/// Rows of a query as JSON values, with column names.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl QueryResult {
    pub(crate) fn from_rows(rows: &[SqliteRow]) -> QueryResult {
        let columns = rows
            .first()
            .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
            .unwrap_or_default();
        let rows = rows
            .iter()
            .map(|r| (0..r.len()).map(|i| cell(r, i)).collect())
            .collect();
        QueryResult { columns, rows }
    }
}

fn cell(r: &SqliteRow, i: usize) -> Value {
    let Ok(raw) = r.try_get_raw(i) else {
        return Value::Null;
    };
    if raw.is_null() {
        return Value::Null;
    }
    match raw.type_info().name() {
        "INTEGER" => r
            .try_get::<i64, _>(i)
            .map(Value::from)
            .unwrap_or(Value::Null),
        "REAL" => r
            .try_get::<f64, _>(i)
            .map(Value::from)
            .unwrap_or(Value::Null),
        "BLOB" => r
            .try_get::<Vec<u8>, _>(i)
            .map(|b| Value::String(format!("<{} bytes>", b.len())))
            .unwrap_or(Value::Null),
        _ => r
            .try_get::<String, _>(i)
            .map(Value::from)
            .unwrap_or(Value::Null),
    }
}

/// Statements a read-only query may start with.
const READ_ONLY_STARTS: [&str; 4] = ["select", "with", "explain", "values"];

/// How long a query may run and how many rows it may return: a runaway
/// recursive query must end with a message, not fill memory or spin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    pub timeout: Duration,
    pub max_rows: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: Duration::from_secs(30),
            max_rows: 10_000,
        }
    }
}

/// A query's rows, and whether there were more than `max_rows`.
#[derive(Debug, Clone)]
pub struct Queried {
    pub result: QueryResult,
    pub truncated: bool,
}

/// Runs one read-only SQL statement on the registry at `path`.
///
/// The connection is opened read-only (SQLite refuses any write), and the
/// statement must be a single SELECT/WITH/EXPLAIN/VALUES without ATTACH or
/// extension loading, so the error says what is allowed instead of a bare
/// "readonly database". SQLite interrupts the statement once it has run
/// for `limits.timeout` (a progress handler), and rows stop at
/// `limits.max_rows` (the rest are never read).
pub async fn query_read_only(path: &Path, sql: &str, limits: &QueryLimits) -> Result<Queried> {
    let trimmed = sql.trim().trim_end_matches(';').trim();
    // Checked on the statement's code alone: comments, string literals and
    // quoted names blanked, so that `-- note` before a SELECT, a `;` inside
    // a string or a column named `attachment` are no reason to refuse.
    let code = code_only(trimmed).to_ascii_lowercase();
    let first = code
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find(|w| !w.is_empty())
        .unwrap_or("");
    if !READ_ONLY_STARTS.contains(&first) {
        return Err(Error::QueryRefused(format!(
            "`{}` would change the registry or is not a query; only SELECT, WITH, EXPLAIN and VALUES are allowed",
            trimmed.chars().take(60).collect::<String>()
        )));
    }
    if code.contains(';') {
        return Err(Error::QueryRefused(
            "one statement at a time: remove the `;` inside the query".into(),
        ));
    }
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    for word in ["attach", "load_extension", "writefile", "readfile"] {
        if words.contains(&word) {
            return Err(Error::QueryRefused(format!(
                "`{word}` is not allowed in registry queries"
            )));
        }
    }
    let mut conn = super::views::connect_read_only(path).await?;
    let deadline = Instant::now() + limits.timeout;
    conn.lock_handle()
        .await
        .map_err(db_err(path))?
        .set_progress_handler(10_000, move || Instant::now() < deadline);
    let timeout = limits.timeout;
    let refused = |e: sqlx::Error| match e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("9") => {
            Error::QueryRefused(format!(
                "the query ran for its whole time limit ({} s) and was stopped; narrow it, or give `--timeout SECONDS`",
                timeout.as_secs_f64()
            ))
        }
        sqlx::Error::Database(d) if d.message().starts_with("no such table") => {
            Error::QueryRefused(format!(
                "{}; `haic-pipe registry schema` lists the tables and their columns",
                d.message()
            ))
        }
        e if super::is_damaged(&e) => db_err(path)(e),
        sqlx::Error::Database(d) => Error::QueryRefused(d.message().to_string()),
        other => db_err(path)(other),
    };
    let mut rows = Vec::new();
    let mut truncated = false;
    {
        let mut stream = sqlx::query(AssertSqlSafe(trimmed.to_string())).fetch(&mut conn);
        while let Some(row) = stream.try_next().await.map_err(refused)? {
            if rows.len() == limits.max_rows {
                truncated = true;
                break;
            }
            rows.push(row);
        }
    }
    Ok(Queried {
        result: QueryResult::from_rows(&rows),
        truncated,
    })
}

/// `sql` with its comments, string literals and quoted identifiers
/// replaced by spaces (same length in characters), for the checks above;
/// an unclosed quote or comment blanks the rest (SQLite then reports it).
fn code_only(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        let close = match c {
            '\'' => Some("'"),
            '"' => Some("\""),
            '`' => Some("`"),
            '[' => Some("]"),
            '-' if chars.peek() == Some(&'-') => Some("\n"),
            '/' if chars.peek() == Some(&'*') => Some("*/"),
            _ => None,
        };
        let Some(close) = close else {
            out.push(c);
            continue;
        };
        out.push(' ');
        let mut tail = String::new();
        for d in chars.by_ref() {
            out.push(' ');
            tail.push(d);
            // A doubled quote inside a literal closes and reopens: blanking
            // both halves gives the same spaces.
            if tail.ends_with(close) && !(close == "*/" && tail.len() < 3) {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::code_only;

    #[test]
    fn comments_literals_and_quoted_names_are_blanked() {
        let sql = "-- note; attach\nSELECT 'a;b' AS \"x;y\", [attach] /* ; */ FROM t";
        let code = code_only(sql);
        assert_eq!(code.chars().count(), sql.chars().count());
        assert!(!code.contains(';') && !code.contains("attach"), "{code}");
        assert!(code.contains("SELECT") && code.contains("FROM t"), "{code}");
    }
}
