//! The embedded SQLite backend.
//!
//! Ids are stored as lowercase hyphenated text (UUIDv7 text sorts by time), timestamps as RFC3339
//! UTC text with a fixed nanosecond width (sorts as text, round-trips exactly), structured fields
//! as serde_json text of the apprentice-core types. Everything read back is decoded without
//! panicking: a row that does not decode is reported as [`StoreError::Corrupt`] with its id.

use std::path::Path;
use std::time::Duration;

use apprentice_core::config::WriteMode;
use apprentice_core::{DatasetRecord, FeedbackRecord, FeedbackValue, InferenceRecord, MetricLevel, Usage};
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use crate::{DatasetWrite, InferenceQuery, Record, Store, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Readers run beside the single writer thanks to WAL; a few connections are enough for that.
const POOL_SIZE: u32 = 4;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const INFERENCE_COLUMNS: &str = "id, function_name, variant_name, episode_id, input, rendered, output, \
     model_name, provider_name, input_tokens, output_tokens, latency_ms, ttft_ms, cost, tags, params, \
     finish_reason, created_at";

const FEEDBACK_COLUMNS: &str = "id, metric_name, kind, target_level, target_id, value, tags, created_at";

/// A store in one SQLite file. Cloning is cheap and shares the connection pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and brings its schema up to date.
    ///
    /// `Durable` syncs the WAL on every commit (`synchronous = FULL`), so an acknowledged write
    /// survives a power loss; `Async` only guarantees survival of a process crash (`NORMAL`),
    /// which matches what that mode promises anyway.
    pub async fn open(path: &Path, mode: WriteMode) -> Result<Self, StoreError> {
        let synchronous = match mode {
            WriteMode::Durable => SqliteSynchronous::Full,
            WriteMode::Async => SqliteSynchronous::Normal,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(POOL_SIZE).connect_with(options).await?;
        Self::migrated(pool).await
    }

    /// A private in-memory database, for tests. One connection that never expires, because an
    /// in-memory database lives exactly as long as its connection.
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new().in_memory(true).foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Self::migrated(pool).await
    }

    async fn migrated(pool: SqlitePool) -> Result<Self, StoreError> {
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The underlying pool, for queries the [`Store`] trait does not cover (curation, tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// All feedback on a function's inferences and on the episodes they belong to, oldest first, in
    /// one query: curation loads it once per function instead of one query per target.
    pub async fn feedback_for_function(&self, function_name: &str) -> Result<Vec<FeedbackRecord>, StoreError> {
        let sql = format!(
            "SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE target_id IN \
             (SELECT id FROM inferences WHERE function_name = ?1 \
              UNION SELECT episode_id FROM inferences WHERE function_name = ?1) \
             ORDER BY created_at, id"
        );
        let rows = sqlx::query(&sql).bind(function_name).fetch_all(&self.pool).await?;
        rows.iter().map(decode_feedback).collect()
    }

    /// Keeps a curated dataset's record. A name and version name one content for good: writing the
    /// same record again is a no-op, writing a different content under them is refused.
    pub async fn record_dataset(&self, dataset: &DatasetRecord) -> Result<DatasetWrite, StoreError> {
        let id = format!("{} v{}", dataset.name, dataset.version);
        let invalid = |message: String| StoreError::Invalid { what: "dataset", id: id.clone(), message };
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let existing = fetch_dataset(&mut tx, &dataset.name, dataset.version).await?;
        if let Some(existing) = existing {
            if existing.content_hash == dataset.content_hash && existing.query == dataset.query {
                return Ok(DatasetWrite::Unchanged(Box::new(existing)));
            }
            let what = if existing.query != dataset.query { "spec" } else { "content" };
            return Err(StoreError::Conflict {
                what: "dataset",
                id,
                message: format!(
                    "it was already made on {} with a different {what} ({} -> {}); a name and version \
                     name one content for good, so give this one a new version",
                    existing.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    existing.content_hash,
                    dataset.content_hash
                ),
            });
        }
        let version = i64::from(dataset.version);
        let count = |n: u64| i64::try_from(n).map_err(|e| invalid(format!("example count: {e}")));
        sqlx::query(
            "INSERT INTO datasets (name, version, function_name, query, content_hash, train_examples, \
             validation_examples, files, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&dataset.name)
        .bind(version)
        .bind(&dataset.function_name)
        .bind(dataset.query.to_string())
        .bind(&dataset.content_hash)
        .bind(count(dataset.train_examples)?)
        .bind(count(dataset.validation_examples)?)
        .bind(dataset.files.to_string())
        .bind(time_text(dataset.created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(DatasetWrite::Created)
    }

    pub async fn dataset(&self, name: &str, version: u32) -> Result<Option<DatasetRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        fetch_dataset(&mut conn, name, version).await
    }

    /// Every dataset, by name then version.
    pub async fn datasets(&self) -> Result<Vec<DatasetRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM datasets ORDER BY name, version").fetch_all(&self.pool).await?;
        rows.iter().map(decode_dataset).collect()
    }

    /// Copies the WAL into the database file and truncates it, as SQLite's automatic checkpoints do
    /// over time; after a bulk load, reads then find pages in the database file, not the WAL.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.pool).await?;
        Ok(())
    }

    /// Waits for open connections to finish and closes them, so the WAL is checkpointed.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn write_batch(&self, batch: &[Record]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        for record in batch {
            record.validate()?;
        }
        // IMMEDIATE takes the write lock up front, so a busy database is waited on (busy_timeout)
        // instead of failing midway when a deferred transaction tries to upgrade.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for record in batch {
            match record {
                Record::Inference(inference) => insert_inference(&mut tx, inference).await?,
                Record::Feedback(feedback) => insert_feedback(&mut tx, feedback).await?,
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn inference(&self, id: Uuid) -> Result<Option<InferenceRecord>, StoreError> {
        let sql = format!("SELECT {INFERENCE_COLUMNS} FROM inferences WHERE id = ?");
        let row = sqlx::query(&sql).bind(id_text(id)).fetch_optional(&self.pool).await?;
        row.as_ref().map(decode_inference).transpose()
    }

    async fn episode_exists(&self, id: Uuid) -> Result<bool, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM episodes WHERE id = ?)")
            .bind(id_text(id))
            .fetch_one(&self.pool)
            .await?;
        Ok(exists)
    }

    async fn inferences(&self, query: &InferenceQuery) -> Result<Vec<InferenceRecord>, StoreError> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!("SELECT {INFERENCE_COLUMNS} FROM inferences WHERE 1 = 1"));
        if let Some(function_name) = &query.function_name {
            sql.push(" AND function_name = ").push_bind(function_name);
        }
        if let Some(variant_name) = &query.variant_name {
            sql.push(" AND variant_name = ").push_bind(variant_name);
        }
        if let Some(episode_id) = query.episode_id {
            sql.push(" AND episode_id = ").push_bind(id_text(episode_id));
        }
        sql.push(" ORDER BY id");
        if let Some(limit) = query.limit {
            // SQLite limits are signed; anything beyond i64 means "no limit" in practice.
            sql.push(" LIMIT ").push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let rows = sql.build().fetch_all(&self.pool).await?;
        rows.iter().map(decode_inference).collect()
    }

    async fn feedback_for(&self, target_id: Uuid) -> Result<Vec<FeedbackRecord>, StoreError> {
        let sql = format!("SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE target_id = ? ORDER BY created_at, id");
        let rows = sqlx::query(&sql).bind(id_text(target_id)).fetch_all(&self.pool).await?;
        rows.iter().map(decode_feedback).collect()
    }

    async fn count_inferences(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inferences").fetch_one(&self.pool).await?;
        // COUNT(*) is never negative.
        Ok(count.unsigned_abs())
    }
}

async fn insert_inference(conn: &mut SqliteConnection, r: &InferenceRecord) -> Result<(), StoreError> {
    let input = encode_json("inference", r.id, "input", &r.input)?;
    let rendered = encode_json("inference", r.id, "rendered", &r.rendered)?;
    let output = encode_json("inference", r.id, "output", &r.output)?;
    let tags = encode_json("inference", r.id, "tags", &r.tags)?;
    let params = encode_json("inference", r.id, "params", &r.params)?;
    let created_at = time_text(r.created_at);

    // The first inference of an episode registers it; later ones find it already there.
    sqlx::query("INSERT OR IGNORE INTO episodes (id, function_name, created_at) VALUES (?, ?, ?)")
        .bind(id_text(r.episode_id))
        .bind(&r.function_name)
        .bind(&created_at)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO inferences (id, function_name, variant_name, episode_id, input, rendered, output, \
         model_name, provider_name, input_tokens, output_tokens, latency_ms, ttft_ms, cost, tags, params, \
         finish_reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(id_text(r.id))
    .bind(&r.function_name)
    .bind(&r.variant_name)
    .bind(id_text(r.episode_id))
    .bind(input)
    .bind(rendered)
    .bind(output)
    .bind(&r.model_name)
    .bind(&r.provider_name)
    .bind(i64::from(r.usage.input_tokens))
    .bind(i64::from(r.usage.output_tokens))
    .bind(r.latency_ms)
    .bind(r.ttft_ms)
    .bind(r.cost)
    .bind(tags)
    .bind(params)
    .bind(&r.finish_reason)
    .bind(created_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_feedback(conn: &mut SqliteConnection, f: &FeedbackRecord) -> Result<(), StoreError> {
    let (value, value_num) = match &f.value {
        FeedbackValue::Boolean(b) => (encode_json("feedback", f.id, "value", b)?, Some(if *b { 1.0 } else { 0.0 })),
        FeedbackValue::Float(x) => (encode_json("feedback", f.id, "value", x)?, Some(*x)),
        FeedbackValue::Demonstration(output) => (encode_json("feedback", f.id, "value", output)?, None),
        FeedbackValue::Comment(text) => (encode_json("feedback", f.id, "value", text)?, None),
    };
    let tags = encode_json("feedback", f.id, "tags", &f.tags)?;
    sqlx::query(
        "INSERT INTO feedback (id, metric_name, kind, target_level, target_id, value, value_num, tags, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(id_text(f.id))
    .bind(&f.metric_name)
    .bind(f.value.kind())
    .bind(f.target_level.as_str())
    .bind(id_text(f.target_id))
    .bind(value)
    .bind(value_num)
    .bind(tags)
    .bind(time_text(f.created_at))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn encode_json<T: Serialize + ?Sized>(
    what: &'static str,
    id: Uuid,
    field: &str,
    value: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid {
        what,
        id: id.to_string(),
        message: format!("{field}: {e}"),
    })
}

fn id_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// Fixed width (nanoseconds, `Z`) so text order is time order and the value round-trips exactly.
fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn decode_inference(row: &SqliteRow) -> Result<InferenceRecord, StoreError> {
    let r = Fields::new(row, "inference");
    Ok(InferenceRecord {
        id: r.uuid("id")?,
        function_name: r.get("function_name")?,
        variant_name: r.get("variant_name")?,
        episode_id: r.uuid("episode_id")?,
        input: r.json("input")?,
        rendered: r.json("rendered")?,
        output: r.json("output")?,
        model_name: r.get("model_name")?,
        provider_name: r.get("provider_name")?,
        usage: Usage { input_tokens: r.count("input_tokens")?, output_tokens: r.count("output_tokens")? },
        latency_ms: r.get("latency_ms")?,
        ttft_ms: r.get("ttft_ms")?,
        cost: r.get("cost")?,
        tags: r.json("tags")?,
        params: r.json("params")?,
        finish_reason: r.get("finish_reason")?,
        created_at: r.time("created_at")?,
    })
}

async fn fetch_dataset(
    conn: &mut SqliteConnection,
    name: &str,
    version: u32,
) -> Result<Option<DatasetRecord>, StoreError> {
    let row = sqlx::query("SELECT * FROM datasets WHERE name = ? AND version = ?")
        .bind(name)
        .bind(i64::from(version))
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(decode_dataset).transpose()
}

fn decode_dataset(row: &SqliteRow) -> Result<DatasetRecord, StoreError> {
    let name: String = row.try_get("name").unwrap_or_else(|_| "<unreadable name>".to_owned());
    let r = Fields { row, what: "dataset", id: name };
    let count = |column: &str| -> Result<u64, StoreError> {
        let n: i64 = r.get(column)?;
        u64::try_from(n).map_err(|e| r.corrupt(column, e))
    };
    Ok(DatasetRecord {
        name: r.get("name")?,
        version: r.count("version")?,
        function_name: r.get("function_name")?,
        query: r.json("query")?,
        content_hash: r.get("content_hash")?,
        train_examples: count("train_examples")?,
        validation_examples: count("validation_examples")?,
        files: r.json("files")?,
        created_at: r.time("created_at")?,
    })
}

fn decode_feedback(row: &SqliteRow) -> Result<FeedbackRecord, StoreError> {
    let r = Fields::new(row, "feedback");
    let kind: String = r.get("kind")?;
    let value = match kind.as_str() {
        "boolean" => FeedbackValue::Boolean(r.json("value")?),
        "float" => FeedbackValue::Float(r.json("value")?),
        "demonstration" => FeedbackValue::Demonstration(r.json("value")?),
        "comment" => FeedbackValue::Comment(r.json("value")?),
        other => return Err(r.corrupt("kind", format!("unknown feedback kind {other:?}"))),
    };
    let level: String = r.get("target_level")?;
    let target_level = match level.as_str() {
        "inference" => MetricLevel::Inference,
        "episode" => MetricLevel::Episode,
        other => return Err(r.corrupt("target_level", format!("unknown level {other:?}"))),
    };
    Ok(FeedbackRecord {
        id: r.uuid("id")?,
        metric_name: r.get("metric_name")?,
        target_level,
        target_id: r.uuid("target_id")?,
        value,
        tags: r.json("tags")?,
        created_at: r.time("created_at")?,
    })
}

/// Reads the columns of one row, turning every decoding failure into a `Corrupt` error that names
/// the row's id and the column.
struct Fields<'r> {
    row: &'r SqliteRow,
    what: &'static str,
    id: String,
}

impl<'r> Fields<'r> {
    fn new(row: &'r SqliteRow, what: &'static str) -> Self {
        let id = row.try_get::<String, _>("id").unwrap_or_else(|_| "<unreadable id>".to_owned());
        Self { row, what, id }
    }

    fn corrupt(&self, column: &str, message: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt { what: self.what, id: self.id.clone(), message: format!("{column}: {message}") }
    }

    fn get<T>(&self, column: &str) -> Result<T, StoreError>
    where
        T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
    {
        self.row.try_get(column).map_err(|e| self.corrupt(column, e))
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T, StoreError> {
        let text: &str = self.get(column)?;
        serde_json::from_str(text).map_err(|e| self.corrupt(column, e))
    }

    fn uuid(&self, column: &str) -> Result<Uuid, StoreError> {
        let text: &str = self.get(column)?;
        Uuid::parse_str(text).map_err(|e| self.corrupt(column, e))
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>, StoreError> {
        let text: &str = self.get(column)?;
        DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)).map_err(|e| self.corrupt(column, e))
    }

    fn count(&self, column: &str) -> Result<u32, StoreError> {
        let n: i64 = self.get(column)?;
        u32::try_from(n).map_err(|e| self.corrupt(column, e))
    }
}
