//! The stages crate's one error type. Data errors name the file and, where
//! there is one, the record, and say what to do.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input data: the file, the record (0-based) if known, what is wrong.
    #[error("{}{}: {message}", .file.display(), record.map(|r| format!(", record {r}")).unwrap_or_default())]
    Data {
        file: PathBuf,
        record: Option<u64>,
        message: String,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Parquet {
        context: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow_schema::ArrowError,
    },

    /// A tensor computation failed (shapes, devices, a file candle could not read).
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    #[error("{context}: {source}")]
    Image {
        context: String,
        #[source]
        source: image::ImageError,
    },

    /// A param that is valid YAML but not a valid setting.
    #[error("{0}")]
    Params(String),

    /// The stage checkpointed at this step on request (SIGUSR1) and stopped.
    #[error("checkpointed at step {0} on request; run again to continue")]
    Stopped(u64),
}

impl Error {
    pub fn data(file: impl Into<PathBuf>, record: Option<u64>, message: impl Into<String>) -> Self {
        Error::Data {
            file: file.into(),
            record,
            message: message.into(),
        }
    }

    /// Wraps a candle error with what was being done.
    pub fn candle(context: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
        move |source| Error::Candle {
            context: context.to_string(),
            source,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The bytes of the index file `name` (`table.json`, `level.json`, ...) of
/// an input artifact's folder, and its path. A folder without one is the
/// output of another kind of stage than the input needs: `what` names the
/// kind it should be.
pub fn read_index(dir: &Path, name: &str, what: &str) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::data(
            dir,
            None,
            format!("has no {name}, so it is not {what}; check the stage this input names"),
        )),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}
