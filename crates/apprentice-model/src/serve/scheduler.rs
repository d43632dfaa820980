//! Continuous batching: one worker thread per loaded model decodes every running sequence in one
//! step, admits queued requests between steps and lets finished ones go.
//!
//! - **Admission.** Up to `max_batch` sequences run at once; the rest wait in arrival order.
//! - **Prefill does not stall decoding.** Every running sequence that is decoding gets its next
//!   token in every step. Prompts are fed in chunks: all sequences still prefilling share at most
//!   `prefill_chunk_tokens` prompt tokens a step, so a newcomer's long prompt costs the others a
//!   bounded delay per token instead of a whole prefill.
//! - **Prefix reuse per episode.** A finished sequence leaves its keys and values in a bounded
//!   store (least recently used first out, within `prefix_cache_bytes`), under its prefix key (an
//!   episode id). A new request continues the cached sequence of its own key if there is one, else
//!   the one sharing the longest token prefix with its prompt; only the rest of the prompt is
//!   prefilled, whatever other episodes ran in between.
//! - **Same tokens in any batch.** [`ServingModel::forward`] computes every sequence as if it
//!   were alone and each request samples from its own RNG, so what a request generates does not
//!   depend on what else runs (tests check it token for token).
//! - **Cancellation.** A request whose [`Ticket`] is cancelled (a client that hung up) or whose
//!   event callback breaks leaves the batch at the next step and frees its place.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::engine::{Chunk, SequenceCache, ServingModel};
use crate::generate::{
    sample, FinishReason, GenerateError, GenerateOptions, Generation, RowState, StreamEvent, TokenDecoder,
};

/// How a [`Scheduler`] batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most; further requests wait.
    pub max_batch: usize,
    /// Prompt tokens fed per step, shared by the sequences still prefilling.
    pub prefill_chunk_tokens: usize,
    /// Memory for keys and values of finished sequences kept for their episodes' next turns.
    pub prefix_cache_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        // A batch of 8 costs little more than one sequence on a 2-core CPU (README, `bench
        // serve`); 128 prompt tokens a step keep a newcomer's prefill to tens of milliseconds
        // of delay for the others; 256 MiB holds ~5,700 cached tokens of SmolLM2-135M.
        Self { max_batch: 8, prefill_chunk_tokens: 128, prefix_cache_bytes: 256 << 20 }
    }
}

/// One generation to run.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// Requests with the same key (an episode id) continue each other's cached sequence first.
    pub prefix_key: Option<String>,
}

/// Receives a request's tokens as they come (on the scheduler's thread: keep it short).
/// `ControlFlow::Break` stops the request.
pub type EventSink = Box<dyn FnMut(StreamEvent<'_>) -> ControlFlow<()> + Send>;
/// Receives the request's outcome once, on the scheduler's thread.
pub type OnDone = Box<dyn FnOnce(Result<Completion, GenerateError>) + Send>;

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub generation: Generation,
    /// Prompt tokens whose keys and values came from a cached prefix.
    pub reused_tokens: usize,
    /// Time spent waiting for a place in the batch.
    pub queued: Duration,
    /// The request's share of the machine: each step's time divided among the sequences in it.
    /// What a price per hour of compute applies to (its latency counts the other sequences too).
    pub compute: Duration,
}

/// Stops its request when cancelled (or dropped after [`Ticket::cancel_on_drop`]).
#[derive(Debug)]
pub struct Ticket {
    cancelled: Arc<AtomicBool>,
    on_drop: bool,
}

impl Ticket {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Cancels the request when the ticket is dropped: for callers whose future may be dropped
    /// by a client that hung up.
    pub fn cancel_on_drop(mut self) -> Self {
        self.on_drop = true;
        self
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.on_drop {
            self.cancel();
        }
    }
}

/// A point-in-time view of a scheduler, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SchedulerStats {
    /// Requests waiting for a place in the batch.
    pub queue_depth: usize,
    /// Sequences in the batch now.
    pub batch_size: usize,
    pub requests: u64,
    pub generated_tokens: u64,
    /// Prompt tokens run through the model (not those reused from a cached prefix).
    pub prefilled_tokens: u64,
    /// Prompt tokens served from cached prefixes.
    pub reused_tokens: u64,
    pub steps: u64,
    /// Tokens generated per second over the last few seconds.
    pub tokens_per_second: f64,
    pub cached_prefixes: usize,
    pub cached_prefix_bytes: usize,
}

/// The continuous-batching scheduler of one loaded model (see the module docs).
pub struct Scheduler {
    shared: Arc<Shared>,
    model: Arc<ServingModel>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

struct Shared {
    config: SchedulerConfig,
    queue: Mutex<Queue>,
    wake: Condvar,
    counters: Counters,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Pending>,
    shutdown: bool,
}

struct Pending {
    request: Request,
    sink: EventSink,
    done: OnDone,
    cancelled: Arc<AtomicBool>,
    enqueued: Instant,
}

#[derive(Default)]
struct Counters {
    batch_size: AtomicUsize,
    requests: AtomicU64,
    generated_tokens: AtomicU64,
    prefilled_tokens: AtomicU64,
    reused_tokens: AtomicU64,
    steps: AtomicU64,
    cached_prefixes: AtomicUsize,
    cached_prefix_bytes: AtomicUsize,
    /// (end of step, tokens generated in it) for the last few seconds.
    recent: Mutex<VecDeque<(Instant, usize)>>,
}

/// The window of `tokens_per_second`.
const RATE_WINDOW: Duration = Duration::from_secs(5);

impl Scheduler {
    /// Starts the worker thread of `model`. `decoder` turns tokens into text (needed for stop
    /// strings and text events); `pool` runs the model's parallel work (rayon's global pool
    /// when `None`).
    pub fn start(
        model: Arc<ServingModel>,
        decoder: Option<Arc<dyn TokenDecoder + Send + Sync>>,
        config: SchedulerConfig,
        pool: Option<Arc<rayon::ThreadPool>>,
    ) -> Self {
        let config = SchedulerConfig { max_batch: config.max_batch.max(1), ..config };
        let shared = Arc::new(Shared {
            config,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            counters: Counters::default(),
        });
        let worker = {
            let (shared, model) = (shared.clone(), model.clone());
            std::thread::Builder::new()
                .name("apprentice-scheduler".into())
                .spawn(move || {
                    let mut worker = Worker::new(&shared, &model, decoder);
                    match pool {
                        Some(pool) => pool.install(|| worker.run()),
                        None => worker.run(),
                    }
                })
                .expect("spawning the scheduler thread")
        };
        Self { shared, model, worker: Some(worker) }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.config
    }

    pub fn model(&self) -> &Arc<ServingModel> {
        &self.model
    }

    /// Queues `request`. Its tokens go to `sink` as they come and its outcome to `done`, both
    /// called on the scheduler's thread. Errors found without running the model come back here.
    pub fn submit(&self, request: Request, sink: EventSink, done: OnDone) -> Result<Ticket, GenerateError> {
        request.options.validate(true)?;
        let vocab = self.model.config().vocab_size;
        if request.prompt.is_empty() {
            return Err(GenerateError::Prompt { row: 0, reason: "empty prompt".into() });
        }
        if let Some(&bad) = request.prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::Prompt {
                row: 0,
                reason: format!("token id {bad} outside the vocabulary of {vocab}"),
            });
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        let pending = Pending { request, sink, done, cancelled: cancelled.clone(), enqueued: Instant::now() };
        let mut queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.shutdown {
            return Err(GenerateError::Stopped);
        }
        queue.waiting.push_back(pending);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(Ticket { cancelled, on_drop: false })
    }

    pub fn stats(&self) -> SchedulerStats {
        let c = &self.shared.counters;
        let queue_depth = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner).waiting.len();
        let now = Instant::now();
        let recent: usize = c
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        SchedulerStats {
            queue_depth,
            batch_size: c.batch_size.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            generated_tokens: c.generated_tokens.load(Ordering::Relaxed),
            prefilled_tokens: c.prefilled_tokens.load(Ordering::Relaxed),
            reused_tokens: c.reused_tokens.load(Ordering::Relaxed),
            steps: c.steps.load(Ordering::Relaxed),
            tokens_per_second: recent as f64 / RATE_WINDOW.as_secs_f64(),
            cached_prefixes: c.cached_prefixes.load(Ordering::Relaxed),
            cached_prefix_bytes: c.cached_prefix_bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// A request in the batch.
struct Running {
    prompt: Vec<u32>,
    options: GenerateOptions,
    prefix_key: Option<String>,
    cache: SequenceCache,
    row: RowState,
    sink: EventSink,
    done: Option<OnDone>,
    cancelled: Arc<AtomicBool>,
    reused_tokens: usize,
    queued: Duration,
    compute: Duration,
    /// The last sampled token, fed in the next step.
    next: u32,
}

impl Running {
    fn prefilling(&self) -> bool {
        self.cache.len() < self.prompt.len()
    }
}

struct Worker<'a> {
    shared: &'a Shared,
    model: &'a ServingModel,
    decoder: Option<Arc<dyn TokenDecoder + Send + Sync>>,
    running: Vec<Running>,
    prefixes: PrefixStore,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared, model: &'a ServingModel, decoder: Option<Arc<dyn TokenDecoder + Send + Sync>>) -> Self {
        let prefixes = PrefixStore::new(shared.config.prefix_cache_bytes);
        Self { shared, model, decoder, running: Vec::new(), prefixes }
    }

    fn run(&mut self) {
        while self.admit() {
            self.drop_cancelled();
            if self.running.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                // A failed step leaves the caches of the batch inconsistent: fail every request
                // in it and start over with an empty batch; queued requests still run.
                let error = Arc::new(e);
                for mut running in self.running.drain(..) {
                    if let Some(done) = running.done.take() {
                        done(Err(GenerateError::Step(error.clone())));
                    }
                }
            }
            self.shared.counters.batch_size.store(self.running.len(), Ordering::Relaxed);
        }
    }

    /// Waits for work and moves queued requests into free places. Returns false on shutdown,
    /// having failed everything still queued or running.
    fn admit(&mut self) -> bool {
        let mut queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while !queue.shutdown && queue.waiting.is_empty() && self.running.is_empty() {
            queue = self.shared.wake.wait(queue).unwrap_or_else(PoisonError::into_inner);
        }
        if queue.shutdown {
            let waiting: Vec<Pending> = queue.waiting.drain(..).collect();
            drop(queue);
            for pending in waiting {
                (pending.done)(Err(GenerateError::Stopped));
            }
            for mut running in self.running.drain(..) {
                if let Some(done) = running.done.take() {
                    done(Err(GenerateError::Stopped));
                }
            }
            return false;
        }
        let mut admitted = Vec::new();
        while self.running.len() + admitted.len() < self.shared.config.max_batch {
            match queue.waiting.pop_front() {
                Some(pending) => admitted.push(pending),
                None => break,
            }
        }
        drop(queue);
        for pending in admitted {
            self.start(pending);
        }
        self.shared.counters.batch_size.store(self.running.len(), Ordering::Relaxed);
        true
    }

    fn start(&mut self, pending: Pending) {
        let Pending { request, sink, done, cancelled, enqueued } = pending;
        let counters = &self.shared.counters;
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let row = RowState::new(request.prompt.len(), request.options.seed, self.decoder.is_some());
        if request.options.max_new_tokens == 0 || cancelled.load(Ordering::Relaxed) {
            let reason =
                if request.options.max_new_tokens == 0 { FinishReason::Length } else { FinishReason::Cancelled };
            let completion = Completion {
                generation: row.finish_as(reason),
                reused_tokens: 0,
                queued: enqueued.elapsed(),
                compute: Duration::ZERO,
            };
            done(Ok(completion));
            return;
        }
        let cache = self
            .prefixes
            .take(request.prefix_key.as_deref(), &request.prompt)
            .unwrap_or_else(|| self.model.new_cache());
        self.publish_prefix_stats();
        let reused_tokens = cache.len();
        counters.reused_tokens.fetch_add(reused_tokens as u64, Ordering::Relaxed);
        self.running.push(Running {
            prompt: request.prompt,
            options: request.options,
            prefix_key: request.prefix_key,
            cache,
            row,
            sink,
            done: Some(done),
            cancelled,
            reused_tokens,
            queued: enqueued.elapsed(),
            compute: Duration::ZERO,
            next: 0,
        });
    }

    fn drop_cancelled(&mut self) {
        let (cancelled, kept): (Vec<Running>, Vec<Running>) =
            std::mem::take(&mut self.running).into_iter().partition(|r| r.cancelled.load(Ordering::Relaxed));
        self.running = kept;
        self.shared.counters.batch_size.store(self.running.len(), Ordering::Relaxed);
        for mut running in cancelled {
            running.row.finished = Some(FinishReason::Cancelled);
            self.finish(running);
        }
    }

    /// One forward pass over the batch, then one sampled token for every sequence that has its
    /// prompt in the cache.
    fn step(&mut self) -> Result<(), crate::serve::engine::EngineError> {
        let mut budget = self.shared.config.prefill_chunk_tokens.max(1);
        let mut fed_prompt_tokens = 0;
        let mut chunks = Vec::with_capacity(self.running.len());
        let mut members = Vec::with_capacity(self.running.len());
        for (i, running) in self.running.iter_mut().enumerate() {
            let tokens: &[u32] = if running.prefilling() {
                if budget == 0 {
                    continue;
                }
                let from = running.cache.len();
                let n = (running.prompt.len() - from).min(budget);
                budget -= n;
                fed_prompt_tokens += n;
                &running.prompt[from..from + n]
            } else {
                std::slice::from_ref(&running.next)
            };
            let logits = running.cache.len() + tokens.len() >= running.prompt.len();
            chunks.push(Chunk { cache: &mut running.cache, tokens, logits });
            members.push(i);
        }
        let started = Instant::now();
        let logits = self.model.forward(&mut chunks)?;
        drop(chunks);
        let share = started.elapsed() / members.len() as u32;
        for &i in &members {
            self.running[i].compute += share;
        }

        let counters = &self.shared.counters;
        counters.prefilled_tokens.fetch_add(fed_prompt_tokens as u64, Ordering::Relaxed);
        counters.steps.fetch_add(1, Ordering::Relaxed);
        let mut generated = 0;
        let decoder = self.decoder.as_deref().map(|d| d as &dyn TokenDecoder);
        for (&i, logits) in members.iter().zip(logits) {
            let Some(logits) = logits else { continue };
            let running = &mut self.running[i];
            let Some(token) = sample(&logits, &running.options, &mut running.row.rng) else {
                running.row.finished = Some(FinishReason::Cancelled);
                if let Some(done) = running.done.take() {
                    done(Err(GenerateError::NonFinite { row: 0 }));
                }
                continue;
            };
            generated += 1;
            let sink = &mut running.sink;
            running.row.step(0, token, &running.options, decoder, &mut |event| sink(event));
            running.next = token;
        }
        counters.generated_tokens.fetch_add(generated as u64, Ordering::Relaxed);
        {
            let mut recent = counters.recent.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            recent.push_back((now, generated));
            while recent.front().is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW) {
                recent.pop_front();
            }
        }

        let (finished, kept): (Vec<Running>, Vec<Running>) =
            std::mem::take(&mut self.running).into_iter().partition(|r| r.row.finished.is_some());
        self.running = kept;
        // Before the callbacks: whoever hears of a finished request sees it gone from the batch.
        self.shared.counters.batch_size.store(self.running.len(), Ordering::Relaxed);
        for running in finished {
            self.finish(running);
        }
        Ok(())
    }

    /// Completes a request and keeps its cache for the episode's next turn.
    fn finish(&mut self, running: Running) {
        let Running { cache, prefix_key, row, done, reused_tokens, queued, compute, .. } = running;
        // Cached before the caller hears of it, so the episode's next turn always finds it.
        if !cache.is_empty() {
            self.prefixes.put(prefix_key, cache);
            self.publish_prefix_stats();
        }
        if let Some(done) = done {
            done(Ok(Completion { generation: row.into_generation(), reused_tokens, queued, compute }));
        }
    }

    fn publish_prefix_stats(&self) {
        let counters = &self.shared.counters;
        counters.cached_prefixes.store(self.prefixes.entries.len(), Ordering::Relaxed);
        counters.cached_prefix_bytes.store(self.prefixes.bytes, Ordering::Relaxed);
    }
}

/// Caches of finished sequences, least recently used first, within a memory budget.
struct PrefixStore {
    entries: VecDeque<(Option<String>, SequenceCache)>,
    bytes: usize,
    budget: usize,
}

impl PrefixStore {
    fn new(budget: usize) -> Self {
        Self { entries: VecDeque::new(), bytes: 0, budget }
    }

    /// The cache to continue for `prompt`: the entry of the same key if any, else the one with
    /// the longest common token prefix; cut to the common prefix, and never the prompt's last
    /// token (whose logits start the generation). An entry of another key that is not wholly
    /// reused stays for its owner, and a copy of the common part is returned.
    fn take(&mut self, key: Option<&str>, prompt: &[u32]) -> Option<SequenceCache> {
        let limit = prompt.len().saturating_sub(1);
        let (index, common, same_key) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, cache))| {
                let common = cache.tokens().iter().zip(prompt).take_while(|(a, b)| a == b).count().min(limit);
                (i, common, key.is_some() && k.as_deref() == key)
            })
            .filter(|&(_, common, _)| common > 0)
            .max_by_key(|&(i, common, same_key)| (same_key, common, i))?;
        let (owner, cache) = &self.entries[index];
        if same_key || owner.is_none() || common == cache.len() {
            let (_, mut cache) = self.entries.remove(index)?;
            self.bytes -= cache.bytes();
            cache.truncate(common);
            Some(cache)
        } else {
            Some(cache.prefix(common))
        }
    }

    fn put(&mut self, key: Option<String>, cache: SequenceCache) {
        if key.is_some() {
            let stale: Vec<usize> = (0..self.entries.len()).filter(|&i| self.entries[i].0 == key).collect();
            for i in stale.into_iter().rev() {
                if let Some((_, old)) = self.entries.remove(i) {
                    self.bytes -= old.bytes();
                }
            }
        }
        self.bytes += cache.bytes();
        self.entries.push_back((key, cache));
        while self.bytes > self.budget {
            match self.entries.pop_front() {
                Some((_, old)) => self.bytes -= old.bytes(),
                None => break,
            }
        }
    }
}
