//! The SQLite backend on its own: what goes in comes back, queries, schema, pragmas, bad rows.

mod common;

use apprentice_core::config::WriteMode;
use apprentice_core::{new_id, ContentBlock, FeedbackValue, InferenceOutput, JsonOutput, MetricLevel};
use apprentice_store::{InferenceQuery, SqliteStore, Store, StoreError};
use common::*;
use serde_json::json;

#[tokio::test]
async fn inference_roundtrip_keeps_every_field() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let chat = rich_inference();
    let json_output = json_inference();
    let plain = inference("babyai::act", "student", new_id());
    assert!(chat.cost.is_some() && json_output.cost.is_none());
    store.write_batch(&[rec(chat.clone()), rec(json_output.clone()), rec(plain.clone())]).await.unwrap();

    assert_eq!(store.inference(chat.id).await.unwrap(), Some(chat));
    assert_eq!(store.inference(json_output.id).await.unwrap(), Some(json_output));
    assert_eq!(store.inference(plain.id).await.unwrap(), Some(plain));
    assert_eq!(store.inference(new_id()).await.unwrap(), None);
    assert_eq!(store.count_inferences().await.unwrap(), 3);
}

#[tokio::test]
async fn every_feedback_kind_roundtrips_oldest_first() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let target = inference("f", "v", new_id());
    let demonstration = InferenceOutput::Json(JsonOutput { raw: "{\"a\":1}".into(), parsed: Some(json!({"a": 1})) });
    let values = [
        FeedbackValue::Boolean(true),
        FeedbackValue::Boolean(false),
        FeedbackValue::Float(-0.125),
        FeedbackValue::Float(1e300),
        // Needs serde_json's exact float parsing: the default parser reads this back as 0.2125.
        FeedbackValue::Float(0.21250000000000002),
        FeedbackValue::Demonstration(demonstration),
        FeedbackValue::Demonstration(InferenceOutput::Chat {
            content: vec![ContentBlock::Text { text: "better answer".into() }],
        }),
        FeedbackValue::Comment("too verbose, \"really\"".into()),
    ];
    let on_inference: Vec<_> =
        values.into_iter().map(|v| feedback(MetricLevel::Inference, target.id, "quality", v)).collect();
    let on_episode = feedback(MetricLevel::Episode, target.episode_id, "success", FeedbackValue::Boolean(true));

    let mut batch = vec![rec(target.clone()), fb(on_episode.clone())];
    // Written newest first: reading back must still be oldest first.
    batch.extend(on_inference.iter().rev().cloned().map(fb));
    store.write_batch(&batch).await.unwrap();

    assert_eq!(store.feedback_for(target.id).await.unwrap(), on_inference);
    assert_eq!(store.feedback_for(target.episode_id).await.unwrap(), vec![on_episode]);
    assert!(store.feedback_for(new_id()).await.unwrap().is_empty());
}

#[tokio::test]
async fn feedback_kind_and_scalar_value_are_queryable_in_sql() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let episode = new_id();
    let batch = [
        fb(feedback(MetricLevel::Episode, episode, "success", FeedbackValue::Boolean(true))),
        fb(feedback(MetricLevel::Episode, new_id(), "success", FeedbackValue::Boolean(false))),
        fb(feedback(MetricLevel::Episode, episode, "reward", FeedbackValue::Float(0.75))),
        fb(feedback(MetricLevel::Episode, episode, "note", FeedbackValue::Comment("ok".into()))),
    ];
    store.write_batch(&batch).await.unwrap();

    let successes: Vec<String> = sqlx::query_scalar(
        "SELECT target_id FROM feedback WHERE metric_name = 'success' AND kind = 'boolean' AND value_num = 1",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(successes, vec![episode.to_string()]);
    let (value, value_num): (String, f64) =
        sqlx::query_as("SELECT value, value_num FROM feedback WHERE kind = 'float'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!((value.as_str(), value_num), ("0.75", 0.75));
    let comment_num: Option<f64> = sqlx::query_scalar("SELECT value_num FROM feedback WHERE kind = 'comment'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(comment_num, None);
}

#[tokio::test]
async fn an_inference_registers_its_episode_once() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let episode = new_id();
    let first = inference("babyai::act", "teacher", episode);
    let second = inference("babyai::act", "teacher", episode);
    assert!(!store.episode_exists(episode).await.unwrap());
    store.write_batch(&[rec(first.clone())]).await.unwrap();
    store.write_batch(&[rec(second)]).await.unwrap();

    assert!(store.episode_exists(episode).await.unwrap());
    assert!(!store.episode_exists(first.id).await.unwrap(), "an inference id is not an episode");
    let (function_name, created_at): (String, String) =
        sqlx::query_as("SELECT function_name, created_at FROM episodes WHERE id = ?")
            .bind(episode.to_string())
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(function_name, "babyai::act");
    assert_eq!(created_at, first.created_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true));
}

#[tokio::test]
async fn queries_filter_and_order_by_id() {
    let (_dir, store) = temp_store(WriteMode::Async).await;
    let (e1, e2) = (new_id(), new_id());
    let records = [
        inference("act", "teacher", e1),
        inference("act", "student", e1),
        inference("judge", "teacher", e2),
        inference("act", "teacher", e2),
        inference("act", "teacher", e1),
    ];
    // Stored out of order, so ordering comes from the query rather than insertion.
    let shuffled = [3, 0, 4, 2, 1].map(|i| rec(records[i].clone()));
    store.write_batch(&shuffled).await.unwrap();
    let ids = |found: Vec<apprentice_core::InferenceRecord>| found.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let expect = |indexes: &[usize]| indexes.iter().map(|&i| records[i].id).collect::<Vec<_>>();

    let all = store.inferences(&InferenceQuery::default()).await.unwrap();
    assert_eq!(ids(all), expect(&[0, 1, 2, 3, 4]));
    let act = InferenceQuery { function_name: Some("act".into()), ..Default::default() };
    assert_eq!(ids(store.inferences(&act).await.unwrap()), expect(&[0, 1, 3, 4]));
    let teacher_act = InferenceQuery { variant_name: Some("teacher".into()), ..act.clone() };
    assert_eq!(ids(store.inferences(&teacher_act).await.unwrap()), expect(&[0, 3, 4]));
    let in_e1 = InferenceQuery { episode_id: Some(e1), ..teacher_act.clone() };
    assert_eq!(ids(store.inferences(&in_e1).await.unwrap()), expect(&[0, 4]));
    let first_two = InferenceQuery { limit: Some(2), ..act.clone() };
    assert_eq!(ids(store.inferences(&first_two).await.unwrap()), expect(&[0, 1]));
    let huge_limit = InferenceQuery { limit: Some(u64::MAX), ..Default::default() };
    assert_eq!(store.inferences(&huge_limit).await.unwrap().len(), 5);
    let none = InferenceQuery { function_name: Some("unknown".into()), ..Default::default() };
    assert!(store.inferences(&none).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_failing_batch_writes_nothing() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let kept = inference("f", "v", new_id());
    store.write_batch(&[rec(kept.clone())]).await.unwrap();
    let fresh = inference("f", "v", new_id());
    let err = store.write_batch(&[rec(fresh.clone()), rec(kept)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err}");
    assert_eq!(store.inference(fresh.id).await.unwrap(), None);
    assert!(!store.episode_exists(fresh.episode_id).await.unwrap(), "the episode insert was rolled back too");
}

#[tokio::test]
async fn non_finite_numbers_are_refused_before_writing() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let bad = apprentice_core::InferenceRecord { ttft_ms: Some(f64::NAN), ..inference("f", "v", new_id()) };
    let err = store.write_batch(&[rec(bad.clone())]).await.unwrap_err();
    assert!(matches!(&err, StoreError::Invalid { id, .. } if *id == bad.id.to_string()), "{err}");
    let bad = feedback(MetricLevel::Episode, new_id(), "reward", FeedbackValue::Float(f64::INFINITY));
    assert!(matches!(store.write_batch(&[fb(bad)]).await, Err(StoreError::Invalid { .. })));
    assert_eq!(store.count_inferences().await.unwrap(), 0);
}

#[tokio::test]
async fn reopening_runs_migrations_idempotently_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.db");
    let record = rich_inference();
    {
        let store = SqliteStore::open(&path, WriteMode::Durable).await.unwrap();
        store.write_batch(&[rec(record.clone())]).await.unwrap();
        store.close().await;
    }
    for mode in [WriteMode::Async, WriteMode::Durable] {
        let store = SqliteStore::open(&path, mode).await.unwrap();
        assert_eq!(store.inference(record.id).await.unwrap(), Some(record.clone()));
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(store.pool())
            .await
            .unwrap();
        let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count();
        assert_eq!(applied as usize, migrations);
        store.close().await;
    }
}

#[tokio::test]
async fn open_creates_the_file_and_sets_durability_pragmas() {
    for (mode, synchronous) in [(WriteMode::Durable, 2_i64), (WriteMode::Async, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.db");
        let store = SqliteStore::open(&path, mode).await.unwrap();
        assert!(path.exists());
        // Every pooled connection must carry the settings, not only the first one opened.
        let mut connections = Vec::new();
        for _ in 0..3 {
            connections.push(store.pool().acquire().await.unwrap());
        }
        for conn in &mut connections {
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut **conn).await.unwrap();
            assert_eq!(journal, "wal");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut **conn).await.unwrap();
            assert_eq!(sync, synchronous, "{mode:?}: 2 is FULL, 1 is NORMAL");
            let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(&mut **conn).await.unwrap();
            assert_eq!(fk, 1);
            let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(&mut **conn).await.unwrap();
            assert_eq!(busy, 5000);
        }
    }
}

#[tokio::test]
async fn corrupt_rows_are_reported_with_their_id() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let good = inference("f", "v", new_id());
    let bad = inference("f", "v", new_id());
    let target = new_id();
    let bad_feedback = feedback(MetricLevel::Episode, target, "m", FeedbackValue::Boolean(true));
    store.write_batch(&[rec(good.clone()), rec(bad.clone()), fb(bad_feedback.clone())]).await.unwrap();
    sqlx::query("UPDATE inferences SET output = '{\"type\": \"chat\", \"content\": [' WHERE id = ?")
        .bind(bad.id.to_string())
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE feedback SET value = '\"yes\"' WHERE id = ?")
        .bind(bad_feedback.id.to_string())
        .execute(store.pool())
        .await
        .unwrap();

    let is_about = |err: &StoreError, expected_what: &str, expected_id: uuid::Uuid, column: &str| match err {
        StoreError::Corrupt { what, id, message } => {
            *what == expected_what && *id == expected_id.to_string() && message.starts_with(column)
        }
        _ => false,
    };
    let err = store.inference(bad.id).await.unwrap_err();
    assert!(is_about(&err, "inference", bad.id, "output"), "{err}");
    let err = store.inferences(&InferenceQuery::default()).await.unwrap_err();
    assert!(is_about(&err, "inference", bad.id, "output"), "{err}");
    assert!(err.to_string().contains(&bad.id.to_string()), "the message names the row: {err}");
    let err = store.feedback_for(target).await.unwrap_err();
    assert!(is_about(&err, "feedback", bad_feedback.id, "value"), "{err}");
    assert_eq!(store.inference(good.id).await.unwrap(), Some(good), "other rows still read");
}

#[tokio::test]
async fn rows_with_wrong_column_types_are_corrupt_not_panics() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let record = inference("f", "v", new_id());
    store.write_batch(&[rec(record.clone())]).await.unwrap();
    for (column, value) in [
        ("input_tokens", "'many'"),
        ("input_tokens", "-1"),
        ("created_at", "'yesterday'"),
        ("episode_id", "'not-a-uuid'"),
    ] {
        let fresh = inference("f", "v", record.episode_id);
        store.write_batch(&[rec(fresh.clone())]).await.unwrap();
        // Foreign keys would refuse a bad episode id, as they should; this simulates damage. The
        // pragma is per connection, so the update must run on the same one.
        let mut conn = store.pool().acquire().await.unwrap();
        sqlx::query("PRAGMA foreign_keys = OFF").execute(&mut *conn).await.unwrap();
        sqlx::query(&format!("UPDATE inferences SET {column} = {value} WHERE id = ?"))
            .bind(fresh.id.to_string())
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await.unwrap();
        drop(conn);
        let err = store.inference(fresh.id).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { id, message, .. } if *id == fresh.id.to_string() && message.starts_with(column)),
            "{column} = {value}: {err}"
        );
    }
}

#[tokio::test]
async fn in_memory_store_works() {
    let store = SqliteStore::open_in_memory().await.unwrap();
    let record = rich_inference();
    store.write_batch(&[rec(record.clone())]).await.unwrap();
    assert_eq!(store.inference(record.id).await.unwrap(), Some(record));
}

#[tokio::test]
async fn feedback_for_function_covers_its_inferences_and_episodes_only() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let episode = new_id();
    let a = inference("f", "v", episode);
    let b = inference("f", "v", episode);
    let other = inference("g", "v", new_id());
    let on_a = feedback(MetricLevel::Inference, a.id, "reward", FeedbackValue::Float(0.5));
    let on_b = feedback(MetricLevel::Inference, b.id, "progress", FeedbackValue::Boolean(true));
    let on_episode = feedback(MetricLevel::Episode, episode, "success", FeedbackValue::Boolean(true));
    let on_other = feedback(MetricLevel::Inference, other.id, "reward", FeedbackValue::Float(1.0));
    let on_other_episode = feedback(MetricLevel::Episode, other.episode_id, "success", FeedbackValue::Boolean(false));
    let batch = vec![
        rec(a),
        rec(b),
        rec(other),
        fb(on_a.clone()),
        fb(on_b.clone()),
        fb(on_episode.clone()),
        fb(on_other),
        fb(on_other_episode),
    ];
    store.write_batch(&batch).await.unwrap();

    assert_eq!(store.feedback_for_function("f").await.unwrap(), vec![on_a, on_b, on_episode]);
    assert!(store.feedback_for_function("missing").await.unwrap().is_empty());
}

fn dataset_record(hash: &str) -> apprentice_core::DatasetRecord {
    apprentice_core::DatasetRecord {
        name: "babyai-success".into(),
        version: 1,
        function_name: "babyai::act".into(),
        query: serde_json::json!({"selection": {"type": "boolean_metric", "metric": "success", "value": true}}),
        content_hash: hash.into(),
        train_examples: 10,
        validation_examples: 2,
        files: serde_json::json!([{"file": "train.jsonl", "hash": hash}]),
        created_at: chrono::Utc::now(),
    }
}

#[tokio::test]
async fn datasets_are_recorded_once_per_name_and_version() {
    use apprentice_store::{DatasetWrite, StoreError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datasets.db");
    let store = SqliteStore::open(&path, WriteMode::Durable).await.unwrap();
    let first = dataset_record("sha256:aa");
    assert_eq!(store.record_dataset(&first).await.unwrap(), DatasetWrite::Created);
    // Same spec, same content: a reproduction, reported with the original record.
    let mut again = first.clone();
    again.created_at = chrono::Utc::now();
    match store.record_dataset(&again).await.unwrap() {
        DatasetWrite::Unchanged(existing) => assert_eq!(*existing, first),
        other => panic!("expected unchanged, got {other:?}"),
    }
    // Different content under the same name and version is refused and changes nothing.
    let error = store.record_dataset(&dataset_record("sha256:bb")).await.unwrap_err();
    assert!(matches!(error, StoreError::Conflict { .. }), "{error}");
    assert!(error.to_string().contains("new version"), "{error}");
    let mut other_spec = first.clone();
    other_spec.query = serde_json::json!({"selection": null});
    let error = store.record_dataset(&other_spec).await.unwrap_err();
    assert!(error.to_string().contains("different spec"), "{error}");
    // A new version is a new dataset; both survive reopening.
    let mut second = dataset_record("sha256:bb");
    second.version = 2;
    assert_eq!(store.record_dataset(&second).await.unwrap(), DatasetWrite::Created);
    store.close().await;
    let store = SqliteStore::open(&path, WriteMode::Durable).await.unwrap();
    let all = store.datasets().await.unwrap();
    assert_eq!(all, vec![first.clone(), second]);
    assert_eq!(store.dataset("babyai-success", 1).await.unwrap(), Some(first));
    assert_eq!(store.dataset("babyai-success", 3).await.unwrap(), None);
}

#[tokio::test]
async fn bulk_reads_for_curation_match_the_full_records() {
    let (_dir, store) = temp_store(WriteMode::Async).await;
    let (e1, e2) = (new_id(), new_id());
    let records: Vec<_> = [("act", e1), ("act", e2), ("judge", e1), ("act", e1)]
        .into_iter()
        .map(|(function, episode)| inference(function, "teacher", episode))
        .collect();
    let scored = feedback(MetricLevel::Episode, e1, "success", FeedbackValue::Boolean(true));
    let ignored = feedback(MetricLevel::Episode, e2, "other", FeedbackValue::Float(0.5));
    let mut batch: Vec<_> = records.iter().cloned().map(rec).collect();
    batch.extend([fb(scored.clone()), fb(ignored)]);
    store.write_batch(&batch).await.unwrap();

    let act = InferenceQuery { function_name: Some("act".into()), ..Default::default() };
    let full = store.inferences(&act).await.unwrap();
    let heads = store.inference_heads("act").await.unwrap();
    assert_eq!(heads.len(), 3);
    for (head, record) in heads.iter().zip(&full) {
        assert_eq!(
            (head.id, head.episode_id, &head.tags, head.created_at),
            (record.id, record.episode_id, &record.tags, record.created_at)
        );
        assert_eq!(head.variant_name, record.variant_name);
    }
    // Only the wanted ids, in order; an id that is not there is skipped.
    let wanted = vec![full[0].id, new_id(), full[2].id];
    let mut wanted_sorted = wanted.clone();
    wanted_sorted.sort();
    let bodies = store.inference_bodies("act", &wanted_sorted, true).await.unwrap();
    assert_eq!(bodies.iter().map(|b| b.id).collect::<Vec<_>>(), vec![full[0].id, full[2].id]);
    for (body, record) in bodies.iter().zip([&full[0], &full[2]]) {
        assert_eq!(
            (&body.rendered, &body.output, body.input.as_ref()),
            (&record.rendered, &record.output, Some(&record.input))
        );
    }
    assert!(store.inference_bodies("act", &wanted_sorted, false).await.unwrap().iter().all(|b| b.input.is_none()));
    let feedback = store.curation_feedback(&["success".into()]).await.unwrap();
    assert_eq!(feedback.len(), 1);
    assert_eq!((feedback[0].target_id, &feedback[0].value), (e1, &FeedbackValue::Boolean(true)));

    // A corrupt row is named, with its column, by the bulk reads too.
    sqlx::query("UPDATE inferences SET tags = '[' WHERE id = ?")
        .bind(full[1].id.to_string())
        .execute(store.pool())
        .await
        .unwrap();
    let err = store.inference_heads("act").await.unwrap_err();
    assert!(err.to_string().contains(&full[1].id.to_string()) && err.to_string().contains("tags"), "{err}");
}
