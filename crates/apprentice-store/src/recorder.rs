//! The write path: a bounded queue in front of one writer task that commits in batches.
//!
//! Callers never touch the database. The writer takes one job, then whatever else is already
//! queued, and commits it all in one transaction (group commit): under load the cost of a sync is
//! shared by many requests, and with no load a lone record is committed at once, without waiting
//! for company.
//!
//! Records are checked with [`Record::validate`] before they are queued, and a batch that fails
//! on a constraint (a duplicate id, say) is retried record by record, so one bad record cannot
//! fail the others that happened to share its transaction.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apprentice_core::config::WriteMode;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use crate::{Record, Store, StoreError};

/// Told the commit latency and the number of records after every committed batch.
pub type WriteObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// Bounds one transaction, so a long backlog is committed in steps and early waiters are
/// answered before the whole backlog is written.
const MAX_BATCH_RECORDS: usize = 512;

/// Waits between attempts at an async batch; a batch that fails them all is logged as lost.
const ASYNC_RETRY_BACKOFF: [Duration; 3] =
    [Duration::from_millis(50), Duration::from_millis(250), Duration::from_millis(1000)];

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum Job {
    /// `ack` is present in durable mode: the caller waits for the commit.
    Write { record: Record, ack: Option<Ack> },
    /// Answered once every job queued before it is committed.
    Flush(Ack),
    /// Stops intake; everything already queued is still written.
    Shutdown,
}

/// Queues records for the writer task. Share it with `Arc<Recorder>`.
pub struct Recorder {
    tx: mpsc::Sender<Job>,
    mode: WriteMode,
    closed: AtomicBool,
    /// Taken by the first `shutdown`; held while it waits, so a concurrent `shutdown` waits too.
    writer: Mutex<Option<JoinHandle<Result<(), StoreError>>>>,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("mode", &self.mode)
            .field("closed", &self.closed.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Starts the writer task; must be called inside a tokio runtime. `capacity` bounds the queue
    /// (in records); a full queue makes callers wait rather than dropping anything.
    ///
    /// Records still queued when the runtime stops are lost: call [`Recorder::shutdown`] first.
    pub fn spawn(store: Arc<dyn Store>, mode: WriteMode, capacity: usize, observer: Option<WriteObserver>) -> Self {
        // tokio panics on a zero-capacity channel; a queue of one still works, just without slack.
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let writer = Writer { store, mode, observer, lost_since_flush: 0 };
        let handle = tokio::spawn(writer.run(rx));
        Self { tx, mode, closed: AtomicBool::new(false), writer: Mutex::new(Some(handle)) }
    }

    pub fn mode(&self) -> WriteMode {
        self.mode
    }

    /// Durable: returns after the batch holding `record` committed. Async: returns once the record
    /// is in the bounded queue (waits for space when full; never drops).
    ///
    /// A record the store could not keep (see [`Record::validate`]) is refused here, in both modes.
    pub async fn record(&self, record: Record) -> Result<(), StoreError> {
        record.validate()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        match self.mode {
            WriteMode::Async => self.send(Job::Write { record, ack: None }).await,
            WriteMode::Durable => {
                let (ack, done) = oneshot::channel();
                self.send(Job::Write { record, ack: Some(ack) }).await?;
                // A dropped ack means the writer died before answering.
                done.await.map_err(|_| StoreError::Closed)?
            }
        }
    }

    /// Returns once every record queued before the call is committed (both modes). In async mode
    /// it fails if any record queued since the previous flush could not be written (they are
    /// logged one by one). After `shutdown` it fails with [`StoreError::Closed`].
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.send(Job::Flush(ack)).await?;
        done.await.map_err(|_| StoreError::Closed)?
    }

    /// Flushes and stops the writer task; later `record` calls fail with [`StoreError::Closed`].
    /// Calling it again is harmless and returns once the first call has finished.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.closed.store(true, Ordering::Release);
        let mut writer = self.writer.lock().await;
        let Some(handle) = writer.take() else {
            return Ok(());
        };
        // Fails only if the writer is already gone, which joining below reports.
        let _ = self.tx.send(Job::Shutdown).await;
        handle.await.map_err(|e| StoreError::Batch(format!("the writer task failed: {e}")))?
    }

    async fn send(&self, job: Job) -> Result<(), StoreError> {
        self.tx.send(job).await.map_err(|_| StoreError::Closed)
    }
}

struct Writer {
    store: Arc<dyn Store>,
    mode: WriteMode,
    observer: Option<WriteObserver>,
    /// Async records given up on since the last flush; the next flush reports them.
    lost_since_flush: usize,
}

/// One batch, split by what each job needs back.
#[derive(Default)]
struct Batch {
    records: Vec<Record>,
    acks: Vec<Option<Ack>>,
    flushes: Vec<Ack>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) -> Result<(), StoreError> {
        while let Some(first) = rx.recv().await {
            let (batch, shutdown) = collect(first, &mut rx);
            if shutdown {
                // Refuses new jobs but keeps the queued ones receivable, so the loop goes on until
                // every job accepted before the shutdown is written, then ends.
                rx.close();
            }
            self.process(batch).await;
        }
        lost_result(self.lost_since_flush)
    }

    async fn process(&mut self, batch: Batch) {
        if !batch.records.is_empty() {
            match self.mode {
                WriteMode::Durable => self.write_durable(batch.records, batch.acks).await,
                WriteMode::Async => self.write_async(batch.records).await,
            }
        }
        if !batch.flushes.is_empty() {
            let lost = std::mem::take(&mut self.lost_since_flush);
            for flush in batch.flushes {
                let _ = flush.send(lost_result(lost));
            }
        }
    }

    /// One attempt; the waiters learn the outcome and decide for themselves whether to retry.
    async fn write_durable(&mut self, records: Vec<Record>, acks: Vec<Option<Ack>>) {
        match self.commit(&records).await {
            Ok(()) => acks.into_iter().for_each(|ack| answer(ack, Ok(()))),
            Err(e) if records.len() > 1 && is_record_specific(&e) => {
                tracing::warn!(error = %e, records = records.len(), "batch refused; writing its records one by one");
                for (record, ack) in records.into_iter().zip(acks) {
                    let result = self.commit(std::slice::from_ref(&record)).await;
                    answer(ack, result);
                }
            }
            // A lone waiter gets the original error, with its kind intact.
            Err(e) if records.len() == 1 => {
                if let Some(ack) = acks.into_iter().next() {
                    answer(ack, Err(e));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = records.len(), "batch commit failed");
                let message = e.to_string();
                acks.into_iter().for_each(|ack| answer(ack, Err(StoreError::Batch(message.clone()))));
            }
        }
    }

    /// Nobody is waiting, so transient failures (a locked or full disk) are retried with backoff,
    /// and whatever still cannot be written is logged record by record and counted for the next
    /// flush.
    async fn write_async(&mut self, records: Vec<Record>) {
        let mut result = self.commit(&records).await;
        for delay in ASYNC_RETRY_BACKOFF {
            match &result {
                Ok(()) => return,
                Err(e) if is_record_specific(e) => break,
                Err(e) => {
                    tracing::warn!(error = %e, records = records.len(), retry_in = ?delay, "async batch failed");
                    tokio::time::sleep(delay).await;
                    result = self.commit(&records).await;
                }
            }
        }
        let Err(e) = result else { return };
        if records.len() > 1 && is_record_specific(&e) {
            for record in &records {
                if let Err(e) = self.commit(std::slice::from_ref(record)).await {
                    self.lose(record, &e);
                }
            }
        } else {
            records.iter().for_each(|record| self.lose(record, &e));
        }
    }

    fn lose(&mut self, record: &Record, error: &StoreError) {
        tracing::error!(id = %record.id(), error = %error, "queued record could not be written and is lost");
        self.lost_since_flush += 1;
    }

    async fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        let started = Instant::now();
        self.store.write_batch(records).await?;
        if let Some(observer) = &self.observer {
            observer(started.elapsed(), records.len());
        }
        Ok(())
    }
}

fn lost_result(lost: usize) -> Result<(), StoreError> {
    match lost {
        0 => Ok(()),
        lost => Err(StoreError::Batch(format!("{lost} queued records could not be written; see the error log"))),
    }
}

/// Takes `first` and whatever is already queued behind it, without waiting for more. Also says
/// whether a shutdown was among them.
fn collect(first: Job, rx: &mut mpsc::Receiver<Job>) -> (Batch, bool) {
    let mut batch = Batch::default();
    let mut shutdown = false;
    let mut next = Some(first);
    while let Some(job) = next {
        match job {
            Job::Write { record, ack } => {
                batch.records.push(record);
                batch.acks.push(ack);
            }
            Job::Flush(ack) => batch.flushes.push(ack),
            Job::Shutdown => shutdown = true,
        }
        next = if batch.records.len() < MAX_BATCH_RECORDS { rx.try_recv().ok() } else { None };
    }
    (batch, shutdown)
}

/// A caller that stopped waiting (its request was cancelled) simply does not hear back; its
/// record is written all the same.
fn answer(ack: Option<Ack>, result: Result<(), StoreError>) {
    if let Some(ack) = ack {
        let _ = ack.send(result);
    } else if let Err(e) = result {
        // Only reachable if a job without an ack is ever mixed into a durable batch.
        tracing::error!(error = %e, "record could not be written and nobody was waiting for it");
    }
}

/// Errors caused by a particular record rather than by the database: retrying the batch without
/// the culprit can succeed, retrying it whole cannot.
fn is_record_specific(error: &StoreError) -> bool {
    match error {
        StoreError::Invalid { .. } => true,
        StoreError::Database(sqlx::Error::Database(db)) => !matches!(db.kind(), sqlx::error::ErrorKind::Other),
        _ => false,
    }
}
