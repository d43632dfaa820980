//! Bulk reads of a function's whole history, for curation.
//!
//! Curation reads every inference of a function once, often millions of rows. Through sqlx each
//! row and column value is copied into its own allocation and handed between threads, which costs
//! about 5 µs a row (1,000,000 two-column rows took 6.1 s; the sqlite3 shell prints them with
//! five columns in 1.7 s); the measured figures are in the README. These reads therefore borrow the raw handle of a
//! pooled sqlx connection and step through rows with rusqlite, which links the same SQLite
//! (libsqlite3-sys 0.30). The work runs on the calling thread while it holds the connection:
//! curation is a batch job, not a request path.
//!
//! Reads come in two passes: [`InferenceHead`]s (what selection looks at) for every inference,
//! then [`InferenceBody`]s only for the inferences selected.

use std::collections::BTreeMap;

use apprentice_core::{FeedbackValue, InferenceOutput, Input, RenderedRequest};
use chrono::{DateTime, Utc};
use rayon::prelude::*;
use uuid::Uuid;

use crate::sqlite::SqliteStore;
use crate::StoreError;

/// What selection needs of an inference: no content.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceHead {
    pub id: Uuid,
    pub episode_id: Uuid,
    pub variant_name: String,
    pub tags: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
}

/// What an example is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceBody {
    pub id: Uuid,
    /// Only when asked for (re-rendering needs the structured input, replay does not).
    pub input: Option<Input>,
    pub rendered: RenderedRequest,
    pub output: InferenceOutput,
}

/// Boolean, float or demonstration feedback, as curation reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct CurationFeedback {
    pub metric_name: String,
    pub target_id: Uuid,
    pub value: FeedbackValue,
}

impl SqliteStore {
    /// Every inference of `function_name`, ordered by id (creation time).
    pub async fn inference_heads(&self, function_name: &str) -> Result<Vec<InferenceHead>, StoreError> {
        let sql = "SELECT id, episode_id, variant_name, tags, created_at FROM inferences \
                   WHERE function_name = ?1 ORDER BY id";
        let raw: Vec<(Uuid, Uuid, String, String, String)> = self
            .with_raw_connection(|conn| {
                let mut statement = conn.prepare(sql)?;
                let mut rows = statement.query([function_name])?;
                let mut raw = Vec::new();
                while let Some(row) = rows.next()? {
                    let id = uuid_column(row, 0, "inference", "id")?;
                    let column = |index, name| text_column(row, index, "inference", id, name);
                    let episode_id = parse_uuid(column(1, "episode_id")?, "inference", id, "episode_id")?;
                    let [variant, tags, created_at] =
                        [(2, "variant_name"), (3, "tags"), (4, "created_at")].map(|(i, name)| column(i, name));
                    raw.push((id, episode_id, variant?.to_owned(), tags?.to_owned(), created_at?.to_owned()));
                }
                Ok(raw)
            })
            .await?;
        // Parsing tags and timestamps is most of the cost; it runs on every core.
        raw.into_par_iter()
            .map(|(id, episode_id, variant_name, tags, created_at)| {
                Ok(InferenceHead {
                    id,
                    episode_id,
                    variant_name,
                    tags: parse_json(&tags, "inference", id, "tags")?,
                    created_at: parse_time(&created_at, "inference", id, "created_at")?,
                })
            })
            .collect()
    }

    /// The bodies of the inferences of `function_name` whose ids are in `wanted` (ascending), in
    /// that order; ids not found are skipped.
    pub async fn inference_bodies(
        &self,
        function_name: &str,
        wanted: &[Uuid],
        with_input: bool,
    ) -> Result<Vec<InferenceBody>, StoreError> {
        let sql = if with_input {
            "SELECT id, rendered, output, input FROM inferences WHERE function_name = ?1 ORDER BY id"
        } else {
            "SELECT id, rendered, output FROM inferences WHERE function_name = ?1 ORDER BY id"
        };
        let raw: Vec<(Uuid, String, String, Option<String>)> = self
            .with_raw_connection(|conn| {
                let mut statement = conn.prepare(sql)?;
                let mut rows = statement.query([function_name])?;
                let mut raw = Vec::with_capacity(wanted.len());
                let mut wanted = wanted.iter().copied().peekable();
                // Rows and `wanted` are both in id order: one merge pass, no lookups.
                while let Some(row) = rows.next()? {
                    let Some(&target) = wanted.peek() else { break };
                    let id = uuid_column(row, 0, "inference", "id")?;
                    if id < target {
                        continue;
                    }
                    while wanted.peek().is_some_and(|&t| t < id) {
                        wanted.next();
                    }
                    if wanted.peek() != Some(&id) {
                        continue;
                    }
                    wanted.next();
                    let column = |index, name| text_column(row, index, "inference", id, name).map(str::to_owned);
                    let input = if with_input { Some(column(3, "input")?) } else { None };
                    raw.push((id, column(1, "rendered")?, column(2, "output")?, input));
                }
                Ok(raw)
            })
            .await?;
        // SQLite steps rows on one thread; decoding the JSON, most of the cost, uses every core.
        raw.into_par_iter()
            .map(|(id, rendered, output, input)| {
                Ok(InferenceBody {
                    id,
                    input: input.map(|text| parse_json(&text, "inference", id, "input")).transpose()?,
                    rendered: parse_json(&rendered, "inference", id, "rendered")?,
                    output: parse_json(&output, "inference", id, "output")?,
                })
            })
            .collect()
    }

    /// Boolean and float feedback on the named metrics, and every demonstration, oldest first,
    /// whatever it targets: the caller keeps what concerns its inferences and episodes.
    pub async fn curation_feedback(&self, metrics: &[String]) -> Result<Vec<CurationFeedback>, StoreError> {
        let placeholders = vec!["?"; metrics.len()].join(", ");
        let sql = format!(
            "SELECT id, metric_name, kind, target_id, value, value_num FROM feedback \
             WHERE (kind IN ('boolean', 'float') AND metric_name IN ({placeholders})) OR kind = 'demonstration' \
             ORDER BY created_at, id"
        );
        self.with_raw_connection(|conn| {
            let mut statement = conn.prepare(&sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(metrics))?;
            let mut feedback = Vec::new();
            while let Some(row) = rows.next()? {
                let id = uuid_column(row, 0, "feedback", "id")?;
                let column = |index, name| text_column(row, index, "feedback", id, name);
                let number = || -> Result<f64, StoreError> {
                    row.get::<_, Option<f64>>(5)
                        .ok()
                        .flatten()
                        .ok_or_else(|| corrupt("feedback", id, "value_num", "missing for a boolean or float"))
                };
                let value = match column(2, "kind")? {
                    "boolean" => FeedbackValue::Boolean(number()? != 0.0),
                    "float" => FeedbackValue::Float(number()?),
                    _ => FeedbackValue::Demonstration(parse_json(column(4, "value")?, "feedback", id, "value")?),
                };
                feedback.push(CurationFeedback {
                    metric_name: column(1, "metric_name")?.to_owned(),
                    target_id: parse_uuid(column(3, "target_id")?, "feedback", id, "target_id")?,
                    value,
                });
            }
            Ok(feedback)
        })
        .await
    }

    async fn with_raw_connection<T>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut pooled = self.pool().acquire().await?;
        let mut handle = pooled.lock_handle().await?;
        // SAFETY: the handle is a live connection that sqlx keeps locked for us until `handle` is
        // dropped, which happens after `conn`; `from_handle` does not close it on drop.
        let conn = unsafe { rusqlite::Connection::from_handle(handle.as_raw_handle().as_ptr()) }
            .map_err(|e| StoreError::Raw(e.to_string()))?;
        let result = read(&conn);
        drop(conn);
        result
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Raw(e.to_string())
    }
}

fn corrupt(what: &'static str, id: Uuid, column: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { what, id: id.to_string(), message: format!("{column}: {message}") }
}

fn uuid_column(row: &rusqlite::Row<'_>, index: usize, what: &'static str, column: &str) -> Result<Uuid, StoreError> {
    let text = row.get_ref(index)?.as_str().map_err(|e| StoreError::Corrupt {
        what,
        id: "<unreadable id>".into(),
        message: format!("{column}: {e}"),
    })?;
    Uuid::parse_str(text).map_err(|e| StoreError::Corrupt {
        what,
        id: text.to_owned(),
        message: format!("{column}: {e}"),
    })
}

fn text_column<'r>(
    row: &'r rusqlite::Row<'_>,
    index: usize,
    what: &'static str,
    id: Uuid,
    column: &str,
) -> Result<&'r str, StoreError> {
    row.get_ref(index)?.as_str().map_err(|e| corrupt(what, id, column, e))
}

fn parse_uuid(text: &str, what: &'static str, id: Uuid, column: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| corrupt(what, id, column, e))
}

fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &'static str,
    id: Uuid,
    column: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(what, id, column, e))
}

fn parse_time(text: &str, what: &'static str, id: Uuid, column: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)).map_err(|e| corrupt(what, id, column, e))
}
