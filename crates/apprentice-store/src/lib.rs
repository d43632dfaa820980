//! Where every inference, piece of feedback and episode is kept.
//!
//! [`Store`] is the storage interface; [`SqliteStore`] is the embedded default. Writes go through
//! a [`Recorder`], which batches records from many requests into one transaction (group commit),
//! so durability costs one sync per batch rather than one per request.

mod recorder;
mod scan;
mod sqlite;

use apprentice_core::{FeedbackRecord, FeedbackValue, InferenceRecord};
use async_trait::async_trait;
use uuid::Uuid;

pub use recorder::{Recorder, WriteObserver};
pub use scan::{CurationFeedback, InferenceBody, InferenceHead};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A bulk read (see `scan`) failed inside SQLite.
    #[error("database error: {0}")]
    Raw(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored {what} {id} cannot be decoded: {message}")]
    Corrupt { what: &'static str, id: String, message: String },
    #[error("{what} {id} cannot be stored: {message}")]
    Invalid { what: &'static str, id: String, message: String },
    /// A batch commit failed; every record of the batch gets this copy of the cause, because the
    /// original error cannot be cloned.
    #[error("the batch holding this record was not written: {0}")]
    Batch(String),
    /// A write that contradicts what is already stored.
    #[error("{what} {id}: {message}")]
    Conflict { what: &'static str, id: String, message: String },
    #[error("the recorder has shut down; the record was not written")]
    Closed,
}

/// What [`SqliteStore::record_dataset`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetWrite {
    Created,
    /// The same name, version, spec and content were already recorded (this record).
    Unchanged(Box<apprentice_core::DatasetRecord>),
}

/// Anything the store keeps.
#[derive(Debug, Clone)]
pub enum Record {
    Inference(Box<InferenceRecord>),
    Feedback(Box<FeedbackRecord>),
}

impl Record {
    pub fn id(&self) -> Uuid {
        match self {
            Record::Inference(inference) => inference.id,
            Record::Feedback(feedback) => feedback.id,
        }
    }

    /// Rejects what the store could not keep faithfully. Non-finite numbers are the case: SQLite
    /// stores NaN as NULL and JSON has no NaN, so they would come back as a different value or
    /// not at all. Checked before a record joins a batch, so one bad record cannot sink the others.
    pub fn validate(&self) -> Result<(), StoreError> {
        match self {
            Record::Inference(inference) => {
                let numbers = [
                    ("latency_ms", Some(inference.latency_ms)),
                    ("ttft_ms", inference.ttft_ms),
                    ("cost", inference.cost),
                ];
                for (field, value) in numbers {
                    if value.is_some_and(|v| !v.is_finite()) {
                        return Err(invalid("inference", inference.id, format!("{field} is not finite")));
                    }
                }
                Ok(())
            }
            Record::Feedback(feedback) => match feedback.value {
                FeedbackValue::Float(v) if !v.is_finite() => {
                    Err(invalid("feedback", feedback.id, "float value is not finite".into()))
                }
                _ => Ok(()),
            },
        }
    }
}

fn invalid(what: &'static str, id: Uuid, message: String) -> StoreError {
    StoreError::Invalid { what, id: id.to_string(), message }
}

/// Which inferences to read back; results are ordered by id (creation time).
#[derive(Debug, Clone, Default)]
pub struct InferenceQuery {
    pub function_name: Option<String>,
    pub variant_name: Option<String>,
    pub episode_id: Option<Uuid>,
    pub limit: Option<u64>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes all records in one transaction: all of them are durable when this returns, or none.
    /// Inferences also register their episode.
    async fn write_batch(&self, batch: &[Record]) -> Result<(), StoreError>;
    async fn inference(&self, id: Uuid) -> Result<Option<InferenceRecord>, StoreError>;
    async fn episode_exists(&self, id: Uuid) -> Result<bool, StoreError>;
    async fn inferences(&self, query: &InferenceQuery) -> Result<Vec<InferenceRecord>, StoreError>;
    /// Feedback whose target is `target_id` (an inference or an episode), oldest first.
    async fn feedback_for(&self, target_id: Uuid) -> Result<Vec<FeedbackRecord>, StoreError>;
    async fn count_inferences(&self) -> Result<u64, StoreError>;
}
