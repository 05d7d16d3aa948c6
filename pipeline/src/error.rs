//! The engine's one error type. Messages say what was wrong, where, and what to do.

use std::path::PathBuf;

/// A place in a pipeline file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePos {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
}

impl std::fmt::Display for SourcePos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// An error in a pipeline file: where it is, which stage, what is wrong, what to do.
#[derive(Debug, Clone)]
pub struct SpecError {
    pub pos: SourcePos,
    pub stage: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl SpecError {
    /// `note` added to the hint (after what it says already).
    pub fn add_note(&mut self, note: String) {
        self.hint = Some(match self.hint.take() {
            Some(h) => format!("{h}; {note}"),
            None => note,
        });
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.pos)?;
        if let Some(stage) = &self.stage {
            write!(f, "stage `{stage}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// A stage's params or inputs refused by its kind at load time: the
/// stage's field that is wrong (`params.encoder`, `inputs.table`, `kind`)
/// and what is wrong with it. The loader turns it into a [`SpecError`] at
/// that field's line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub field: String,
    pub message: String,
}

impl ParamError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ParamError {
        ParamError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ParamError {}

/// What to do when the disk holding the workspace is full, said both by a
/// stage whose write failed and by the driver whose registry write did.
pub const DISK_FULL_ADVICE: &str = "the disk holding the workspace is full; free space (`haic-pipe gc` removes old artifacts), then `run --resume` continues";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Spec(Box<SpecError>),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("registry {path}: {message}")]
    Registry { path: PathBuf, message: String },

    #[error(
        "workspace {workspace} is in use by haic-pipe pid {pid}; wait for it to finish, or pass --wait to queue behind it"
    )]
    Locked { workspace: PathBuf, pid: String },

    #[error("registry query refused: {0}")]
    QueryRefused(String),

    #[error("artifact {key}: {message}")]
    Artifact { key: String, message: String },

    #[error("{0}")]
    Invalid(String),

    #[error("stage `{stage}` failed: {message}")]
    Stage { stage: String, message: String },

    #[error("slurm: {0}")]
    Slurm(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Self {
        Error::Spec(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the path being worked on to an `io::Error`.
pub trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
