//! The crate's error type. Every variant that concerns a file names it: a failed run is
//! diagnosed from its message alone, often long after the fact.
//!
//! As elsewhere in the workspace, messages include their source's text, so a plain `{}` (a log
//! line, a test's assertion) tells the whole story.

use std::path::PathBuf;

use apprentice_model::chat_template::ChatTemplateError;
use apprentice_model::llama::LlamaError;
use apprentice_model::load::LoadError;
use apprentice_model::save::SaveError;

use crate::objective::ObjectiveError;

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file-system operation; `action` is what was being done ("reading", "creating", ...).
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    /// A line of a JSONL file (dataset or metrics) that does not parse.
    #[error("{} line {line}: not JSON: {source}", path.display())]
    Json { path: PathBuf, line: usize, source: serde_json::Error },
    /// A whole-file JSON document (checkpoint state, reference cache) that does not parse.
    #[error("{} is not valid JSON: {source}", path.display())]
    JsonFile { path: PathBuf, source: serde_json::Error },
    /// Serializing what is about to be written to `path`.
    #[error("encoding {}: {source}", path.display())]
    Encode { path: PathBuf, source: serde_json::Error },
    /// A dataset line the student's chat template cannot render.
    #[error("{} line {line}: cannot render: {source}", path.display())]
    Render { path: PathBuf, line: usize, source: ChatTemplateError },
    /// Reading or writing a safetensors file.
    #[error("{action} {}: {source}", path.display())]
    Tensors { action: &'static str, path: PathBuf, source: candle_core::Error },
    #[error(transparent)]
    Model(#[from] LlamaError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Save(#[from] SaveError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Objective(#[from] ObjectiveError),
    /// Training data unusable as given (no examples, an empty batch).
    #[error("{0}")]
    Data(String),
    /// Settings that cannot run.
    #[error("{0}")]
    Config(String),
    #[error("no checkpoint to resume in {}: {source}", dir.display())]
    NoCheckpoint { dir: PathBuf, source: std::io::Error },
    /// A checkpoint that exists but cannot continue this run.
    #[error("{0}")]
    Checkpoint(String),
    #[error("{0}")]
    Plot(String),
}

impl TrainError {
    /// For `map_err`: an I/O error while doing `action` on `path`.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| TrainError::Io { action, path, source }
    }
}
