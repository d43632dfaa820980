//! The group-commit write path in front of a real SQLite store.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apprentice_core::config::WriteMode;
use apprentice_core::{new_id, FeedbackRecord, FeedbackValue, InferenceRecord, MetricLevel};
use apprentice_store::{InferenceQuery, Record, Recorder, SqliteStore, Store, StoreError, WriteObserver};
use async_trait::async_trait;
use common::*;
use uuid::Uuid;

/// Batch sizes seen by the observer, one entry per committed batch.
#[derive(Clone, Default)]
struct Batches(Arc<Mutex<Vec<usize>>>);

impl Batches {
    fn observer(&self) -> WriteObserver {
        let sizes = self.0.clone();
        Arc::new(move |_latency, size| sizes.lock().unwrap().push(size))
    }
    fn sizes(&self) -> Vec<usize> {
        self.0.lock().unwrap().clone()
    }
}

/// A store that is slow and can be told to fail, to make batching and failures deterministic.
struct Faulty {
    inner: SqliteStore,
    delay: Duration,
    failures_left: AtomicUsize,
    attempts: AtomicUsize,
}

impl Faulty {
    fn new(inner: SqliteStore, delay: Duration, failures: usize) -> Arc<Self> {
        Arc::new(Self { inner, delay, failures_left: AtomicUsize::new(failures), attempts: AtomicUsize::new(0) })
    }
}

#[async_trait]
impl Store for Faulty {
    async fn write_batch(&self, batch: &[Record]) -> Result<(), StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let failing = self.failures_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if failing {
            return Err(StoreError::Batch("injected: disk unavailable".into()));
        }
        self.inner.write_batch(batch).await
    }
    async fn inference(&self, id: Uuid) -> Result<Option<InferenceRecord>, StoreError> {
        self.inner.inference(id).await
    }
    async fn episode_exists(&self, id: Uuid) -> Result<bool, StoreError> {
        self.inner.episode_exists(id).await
    }
    async fn inferences(&self, query: &InferenceQuery) -> Result<Vec<InferenceRecord>, StoreError> {
        self.inner.inferences(query).await
    }
    async fn feedback_for(&self, target_id: Uuid) -> Result<Vec<FeedbackRecord>, StoreError> {
        self.inner.feedback_for(target_id).await
    }
    async fn count_inferences(&self) -> Result<u64, StoreError> {
        self.inner.count_inferences().await
    }
}

fn some_inference() -> InferenceRecord {
    inference("babyai::act", "teacher", new_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_records_are_visible_on_return_and_group_committed() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let batches = Batches::default();
    let recorder =
        Arc::new(Recorder::spawn(Arc::new(store.clone()), WriteMode::Durable, 1024, Some(batches.observer())));
    assert_eq!(recorder.mode(), WriteMode::Durable);

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (recorder, store) = (recorder.clone(), store.clone());
            tokio::spawn(async move {
                let record = some_inference();
                recorder.record(rec(record.clone())).await.unwrap();
                // Durable means readable the moment `record` returns, before any flush.
                assert_eq!(store.inference(record.id).await.unwrap().as_ref(), Some(&record));
                record
            })
        })
        .collect();
    let mut written = Vec::new();
    for task in tasks {
        written.push(task.await.unwrap());
    }
    for record in &written {
        assert_eq!(store.inference(record.id).await.unwrap().as_ref(), Some(record));
    }
    let sizes = batches.sizes();
    assert_eq!(sizes.iter().sum::<usize>(), 200);
    eprintln!("batch sizes: {sizes:?}");
    assert!(sizes.len() < 50, "200 concurrent records took {} batches: {sizes:?}", sizes.len());
    recorder.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_record_is_readable_as_soon_as_it_returns() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let recorder = Recorder::spawn(Arc::new(store.clone()), WriteMode::Durable, 8, None);
    for _ in 0..20 {
        let record = some_inference();
        recorder.record(rec(record.clone())).await.unwrap();
        assert_eq!(store.inference(record.id).await.unwrap(), Some(record));
    }
    recorder.shutdown().await.unwrap();
}

#[tokio::test]
async fn async_records_queued_before_shutdown_are_all_written() {
    let (_dir, store) = temp_store(WriteMode::Async).await;
    // A slow store and a small queue: callers must wait for space, and nothing may be dropped.
    let faulty = Faulty::new(store.clone(), Duration::from_millis(5), 0);
    let batches = Batches::default();
    let recorder = Recorder::spawn(faulty, WriteMode::Async, 16, Some(batches.observer()));
    let mut ids = Vec::new();
    for i in 0..300 {
        let record = some_inference();
        ids.push(record.id);
        recorder.record(rec(record.clone())).await.unwrap();
        let rating = feedback(MetricLevel::Inference, record.id, "ok", FeedbackValue::Float(f64::from(i)));
        recorder.record(fb(rating)).await.unwrap();
    }
    recorder.shutdown().await.unwrap();

    assert_eq!(store.count_inferences().await.unwrap(), 300);
    for id in ids {
        assert_eq!(store.feedback_for(id).await.unwrap().len(), 1);
    }
    assert_eq!(batches.sizes().iter().sum::<usize>(), 600);
}

#[tokio::test]
async fn async_flush_waits_for_everything_queued_before_it() {
    let (_dir, store) = temp_store(WriteMode::Async).await;
    let recorder =
        Recorder::spawn(Faulty::new(store.clone(), Duration::from_millis(20), 0), WriteMode::Async, 1000, None);
    for _ in 0..50 {
        recorder.record(rec(some_inference())).await.unwrap();
    }
    assert!(store.count_inferences().await.unwrap() < 50, "the slow store cannot have caught up yet");
    recorder.flush().await.unwrap();
    assert_eq!(store.count_inferences().await.unwrap(), 50);
    recorder.shutdown().await.unwrap();
}

#[tokio::test]
async fn after_shutdown_record_and_flush_are_closed() {
    for mode in [WriteMode::Durable, WriteMode::Async] {
        let (_dir, store) = temp_store(mode).await;
        let recorder = Recorder::spawn(Arc::new(store.clone()), mode, 4, None);
        recorder.record(rec(some_inference())).await.unwrap();
        recorder.shutdown().await.unwrap();
        assert!(matches!(recorder.record(rec(some_inference())).await, Err(StoreError::Closed)), "{mode:?}");
        assert!(matches!(recorder.flush().await, Err(StoreError::Closed)), "{mode:?}");
        recorder.shutdown().await.unwrap();
        assert_eq!(store.count_inferences().await.unwrap(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_both_wait_for_the_queue() {
    let (_dir, store) = temp_store(WriteMode::Async).await;
    let recorder = Arc::new(Recorder::spawn(
        Faulty::new(store.clone(), Duration::from_millis(10), 0),
        WriteMode::Async,
        100,
        None,
    ));
    for _ in 0..40 {
        recorder.record(rec(some_inference())).await.unwrap();
    }
    let (a, b) = tokio::join!(recorder.shutdown(), recorder.shutdown());
    a.unwrap();
    b.unwrap();
    assert_eq!(store.count_inferences().await.unwrap(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_record_fails_alone_not_its_batch() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let existing = some_inference();
    store.write_batch(&[rec(existing.clone())]).await.unwrap();
    // The slow first commit lets everything else pile up into one batch with the duplicate.
    let faulty = Faulty::new(store.clone(), Duration::from_millis(30), 0);
    let recorder = Arc::new(Recorder::spawn(faulty.clone(), WriteMode::Durable, 100, None));
    let first = tokio::spawn({
        let recorder = recorder.clone();
        async move { recorder.record(rec(some_inference())).await }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut records: Vec<_> = (0..20).map(|_| some_inference()).collect();
    records.insert(10, existing.clone());
    let tasks: Vec<_> = records
        .iter()
        .cloned()
        .map(|record| {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.record(rec(record)).await })
        })
        .collect();
    first.await.unwrap().unwrap();
    for (record, task) in records.iter().zip(tasks) {
        let result = task.await.unwrap();
        if record.id == existing.id {
            assert!(matches!(result, Err(StoreError::Database(_))), "the duplicate keeps its own error: {result:?}");
        } else {
            result.unwrap();
        }
    }
    assert_eq!(store.count_inferences().await.unwrap(), 22);
    // The lone first record, the refused batch, then each of its 21 records alone.
    assert_eq!(faulty.attempts.load(Ordering::SeqCst), 23);
    recorder.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_batch_failure_reaches_every_waiter() {
    let (_dir, store) = temp_store(WriteMode::Durable).await;
    let faulty = Faulty::new(store.clone(), Duration::from_millis(20), 2);
    let recorder = Arc::new(Recorder::spawn(faulty, WriteMode::Durable, 100, None));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.record(rec(some_inference())).await })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => {}
            Err(StoreError::Batch(message)) => {
                assert!(message.contains("disk unavailable"), "{message}");
                failed += 1;
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    // Two failed commits, then the rest succeed; durable mode never retries on its own.
    assert_eq!(store.count_inferences().await.unwrap(), 10 - failed);
    assert!(failed >= 2, "{failed}");
    recorder.shutdown().await.unwrap();
}

#[tokio::test]
async fn async_transient_failures_are_retried() {
    let (_dir, store) = temp_store(WriteMode::Async).await;
    let faulty = Faulty::new(store.clone(), Duration::ZERO, 2);
    let recorder = Recorder::spawn(faulty.clone(), WriteMode::Async, 100, None);
    recorder.record(rec(some_inference())).await.unwrap();
    recorder.flush().await.unwrap();
    assert_eq!(store.count_inferences().await.unwrap(), 1);
    assert_eq!(faulty.attempts.load(Ordering::SeqCst), 3);
    recorder.shutdown().await.unwrap();
}

#[tokio::test]
async fn async_records_that_cannot_be_written_are_reported_by_flush() {
    let (_dir, store) = temp_store(WriteMode::Async).await;
    let faulty = Faulty::new(store.clone(), Duration::ZERO, usize::MAX);
    let recorder = Recorder::spawn(faulty.clone(), WriteMode::Async, 100, None);
    recorder.record(rec(some_inference())).await.unwrap();
    let err = recorder.flush().await.unwrap_err();
    assert!(matches!(&err, StoreError::Batch(message) if message.starts_with("1 queued record")), "{err}");
    assert_eq!(faulty.attempts.load(Ordering::SeqCst), 4, "one attempt and three retries");
    // Reported once: the next flush covers only what came after.
    recorder.flush().await.unwrap();
    recorder.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_records_are_refused_before_queueing() {
    for mode in [WriteMode::Durable, WriteMode::Async] {
        let (_dir, store) = temp_store(mode).await;
        let batches = Batches::default();
        let recorder = Recorder::spawn(Arc::new(store.clone()), mode, 4, Some(batches.observer()));
        let bad = InferenceRecord { latency_ms: f64::NAN, ..some_inference() };
        assert!(matches!(recorder.record(rec(bad)).await, Err(StoreError::Invalid { .. })), "{mode:?}");
        recorder.shutdown().await.unwrap();
        assert!(batches.sizes().is_empty(), "{mode:?}: nothing reached the store");
    }
}
