//! `apprentice bench gateway`: how much latency the gateway adds, and at what throughput.
//!
//! A loopback mock of an OpenAI-compatible upstream answers every chat completion with the same
//! pre-serialized bytes. The same open-loop load is sent first straight to the mock ("direct"),
//! then through a gateway that renders a template, validates its arguments against a schema,
//! calls the mock and records every inference in a SQLite store. The difference between the two
//! latency distributions is what the gateway adds.
//!
//! The load is open-loop at a constant rate: request `i` is due at `start + i / rate` whether or
//! not earlier requests have finished, and its latency is measured from that due time, so a
//! stalled server is charged for the requests it kept waiting (no coordinated omission). The
//! schedule is kept by a dedicated OS thread (`std::thread::sleep` is precise to tens of
//! microseconds, tokio's timer only to a millisecond) and the requests are sent by a client on its
//! own single-threaded runtime, over a fixed pool of keep-alive HTTP/1.1 connections.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apprentice_core::config::{ConfigError, WriteMode};
use apprentice_core::Config;
use apprentice_store::{SqliteStore, Store, StoreError};
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use axum::Router;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use crate::server::{Gateway, GatewayError};

/// The latency the gateway may add at the 99th percentile, at [`TARGET_RATE`].
pub const TARGET_ADDED_P99_MS: f64 = 1.0;
/// The request rate at which [`TARGET_ADDED_P99_MS`] must hold.
pub const TARGET_RATE: u32 = 2000;

/// One request that takes longer than this counts as an error (and its connection is replaced).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Histogram range in microseconds: 1 µs to 2 minutes, 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 120_000_000;
/// Lets the client finish setting up before the first request is due.
const SCHEDULE_LEAD: Duration = Duration::from_millis(20);

/// What the mock upstream answers to every chat completion, serialized once.
const UPSTREAM_RESPONSE: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"4"},"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":1,"total_tokens":15}}"#;

/// The question every request asks; the gateway renders it into the same text the direct body
/// carries, so both targets send the upstream the same prompt.
const QUESTION: &str = "What is 2 + 2?";

/// The gateway's configuration; `{API_BASE}` and `{WRITE_MODE}` are filled in at run time. The
/// store path is not used: the bench opens its own store.
const CONFIG_TEMPLATE: &str = r#"
[store]
write_mode = "{WRITE_MODE}"
queue_capacity = 10000

[models.bench]
routing = ["upstream"]
price = { input_per_million = 0.4, output_per_million = 1.6 }

[models.bench.providers.upstream]
type = "openai"
model_name = "bench-model"
api_base = "{API_BASE}"
timeout_s = 10

[functions.bench]
type = "chat"
description = "gateway benchmark: one templated question"

[functions.bench.user_schema]
type = "object"
required = ["question"]
additionalProperties = false

[functions.bench.user_schema.properties.question]
type = "string"
minLength = 1
maxLength = 2000

[functions.bench.variants.baseline]
model = "bench"
user_template = "Answer briefly.\nQuestion: {{ question }}"
max_tokens = 16
"#;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid bench options: {0}")]
    Options(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("the bench gateway configuration is invalid: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot open the bench store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("cannot read back the bench store: {0}")]
    StoreRead(StoreError),
    #[error("cannot start the gateway: {0}")]
    Gateway(#[from] GatewayError),
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("the load generator failed: {0}")]
    LoadGenerator(String),
    #[error("histogram error: {0}")]
    Histogram(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}

/// How hard and how long to push.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Requests per second, sent open-loop at a constant rate.
    pub rate: u32,
    /// How long each target is measured, after its warm-up.
    pub duration: Duration,
    /// Load sent to each target before measuring, not counted.
    pub warmup: Duration,
    /// Keep-alive connections the client keeps open to each target (its concurrency limit).
    pub connections: usize,
    /// How the gateway acknowledges records.
    pub write_mode: WriteMode,
    /// Folder for the bench's SQLite store (`gateway-bench-<mode>.db`, recreated each run).
    pub store_dir: PathBuf,
    /// Also measure the gateway's OpenAI-compatible `/v1/chat/completions` (an extra row).
    pub openai_api: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            rate: TARGET_RATE,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 64,
            write_mode: WriteMode::Durable,
            store_dir: std::env::temp_dir().join("apprentice-bench"),
            openai_api: true,
        }
    }
}

impl BenchOptions {
    fn validate(&self) -> Result<(), BenchError> {
        if self.rate == 0 {
            return Err(BenchError::Options("rate must be at least 1 request per second".into()));
        }
        if self.duration.is_zero() {
            return Err(BenchError::Options("duration must be positive".into()));
        }
        if self.connections == 0 {
            return Err(BenchError::Options("connections must be at least 1".into()));
        }
        if self.measured_requests() == 0 {
            return Err(BenchError::Options(format!(
                "{} req/s for {:?} schedules no request",
                self.rate, self.duration
            )));
        }
        Ok(())
    }

    fn warmup_requests(&self) -> u64 {
        (self.warmup.as_secs_f64() * f64::from(self.rate)).round() as u64
    }

    fn measured_requests(&self) -> u64 {
        (self.duration.as_secs_f64() * f64::from(self.rate)).round() as u64
    }
}

fn mode_name(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Durable => "durable",
        WriteMode::Async => "async",
    }
}

impl Serialize for BenchOptions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            rate: u32,
            duration_s: f64,
            warmup_s: f64,
            connections: usize,
            write_mode: &'static str,
            store_dir: &'a Path,
            openai_api: bool,
        }
        Wire {
            rate: self.rate,
            duration_s: self.duration.as_secs_f64(),
            warmup_s: self.warmup.as_secs_f64(),
            connections: self.connections,
            write_mode: mode_name(self.write_mode),
            store_dir: &self.store_dir,
            openai_api: self.openai_api,
        }
        .serialize(serializer)
    }
}

/// One measured target. Latencies run from each request's scheduled send time to the last byte
/// of its response.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// `direct`, `gateway (durable)`, `gateway openai (async)`, ...
    pub target: String,
    /// Requests scheduled in the measured window (warm-up excluded), errors included.
    pub requests: u64,
    /// Of those, how many failed (transport error, timeout or non-2xx status).
    pub errors: u64,
    /// Successful measured requests per second, up to the last one's completion.
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub options: BenchOptions,
    /// `direct`, then the gateway's native `/inference`, then (if asked) its `/v1/chat/completions`.
    pub rows: Vec<BenchRow>,
    /// Gateway (native API) p50 minus direct p50.
    pub added_p50_ms: f64,
    /// Gateway (native API) p99 minus direct p99.
    pub added_p99_ms: f64,
    /// Inferences found in the store after the gateway runs (and a recorder flush).
    pub recorded: u64,
    /// Successful gateway requests, warm-up included: what `recorded` should equal.
    pub gateway_requests: u64,
    /// The store the gateway recorded into.
    pub store_path: PathBuf,
    /// Whether the target holds: p99 added under [`TARGET_ADDED_P99_MS`] at [`TARGET_RATE`] req/s
    /// or more, achieved, with no errors and every request recorded.
    pub pass: bool,
}

impl BenchReport {
    /// A human-readable table of the rows and the verdict.
    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "gateway bench: {} req/s open-loop for {:.1} s after {:.1} s warm-up, {} connections, write mode {}",
            o.rate,
            o.duration.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.connections,
            mode_name(o.write_mode)
        );
        let width = self.rows.iter().map(|r| r.target.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(
            out,
            "{:<width$}  {:>8}  {:>6}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
            "target", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{:<width$}  {:>8}  {:>6}  {:>8.1}  {:>8.3}  {:>8.3}  {:>8.3}  {:>8.3}",
                r.target, r.requests, r.errors, r.achieved_rps, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
            );
        }
        let _ = writeln!(
            out,
            "added latency (gateway - direct): p50 {:+.3} ms, p99 {:+.3} ms",
            self.added_p50_ms, self.added_p99_ms
        );
        if let (Some(direct), Some(openai)) = (self.rows.first(), self.rows.get(2)) {
            let _ = writeln!(
                out,
                "added latency (gateway openai - direct): p50 {:+.3} ms, p99 {:+.3} ms",
                openai.p50_ms - direct.p50_ms,
                openai.p99_ms - direct.p99_ms
            );
        }
        let _ = writeln!(
            out,
            "recorded: {} inferences in {} ({} successful gateway requests)",
            self.recorded,
            self.store_path.display(),
            self.gateway_requests
        );
        let mut verdict = format!(
            "target: p99 added < {TARGET_ADDED_P99_MS} ms at {TARGET_RATE} req/s: {}",
            if self.pass { "PASS" } else { "FAIL" }
        );
        if o.rate < TARGET_RATE {
            let _ = write!(verdict, " (ran at {} req/s only)", o.rate);
        }
        let _ = writeln!(out, "{verdict}");
        out
    }
}

/// Runs the whole bench: direct, then through a recording gateway. Servers run on the caller's
/// runtime (use a multi-threaded one); the client runs on threads of its own.
pub async fn run_gateway_bench(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    options.validate()?;
    let mode = mode_name(options.write_mode);

    let (upstream_addr, upstream) = serve_on_loopback(mock_upstream()).await?;
    let result = bench_with_upstream(options, mode, upstream_addr).await;
    upstream.abort();
    result
}

async fn bench_with_upstream(
    options: &BenchOptions,
    mode: &str,
    upstream_addr: SocketAddr,
) -> Result<BenchReport, BenchError> {
    let direct_body = Bytes::from(
        serde_json::json!({
            "model": "bench-model",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": format!("Answer briefly.\nQuestion: {QUESTION}")}],
        })
        .to_string(),
    );
    let direct = run_phase(Phase::new(options, upstream_addr, "/v1/chat/completions", direct_body)).await?;

    std::fs::create_dir_all(&options.store_dir)
        .map_err(io_error(format!("cannot create {}", options.store_dir.display())))?;
    let store_path = options.store_dir.join(format!("gateway-bench-{mode}.db"));
    remove_database(&store_path)?;
    let store = Arc::new(
        SqliteStore::open(&store_path, options.write_mode)
            .await
            .map_err(|source| BenchError::Store { path: store_path.display().to_string(), source })?,
    );
    let before = store.count_inferences().await.map_err(BenchError::StoreRead)?;

    let text =
        CONFIG_TEMPLATE.replace("{API_BASE}", &format!("http://{upstream_addr}/v1")).replace("{WRITE_MODE}", mode);
    let config = Config::parse(&text, Path::new("<gateway bench>"), &options.store_dir)?;
    let gateway = Gateway::with_store(config, store.clone())?;
    let (gateway_addr, server) = serve_on_loopback(gateway.router()).await?;

    let phases = async {
        let native_body = Bytes::from(
            serde_json::json!({
                "function_name": "bench",
                "input": {"messages": [{"role": "user", "content": {"question": QUESTION}}]},
            })
            .to_string(),
        );
        let native = run_phase(Phase::new(options, gateway_addr, "/inference", native_body)).await?;
        let openai = if options.openai_api {
            let body = Bytes::from(
                serde_json::json!({
                    "model": "function::bench",
                    "messages": [{"role": "user", "content": {"question": QUESTION}}],
                })
                .to_string(),
            );
            Some(run_phase(Phase::new(options, gateway_addr, "/v1/chat/completions", body)).await?)
        } else {
            None
        };
        gateway.recorder.flush().await.map_err(BenchError::StoreRead)?;
        let after = store.count_inferences().await.map_err(BenchError::StoreRead)?;
        Ok::<_, BenchError>((native, openai, after.saturating_sub(before)))
    }
    .await;
    server.abort();
    let shutdown = gateway.recorder.shutdown().await;
    drop(gateway);
    store.close().await;
    let (native, openai, recorded) = phases?;
    shutdown.map_err(BenchError::StoreRead)?;

    let mut rows = vec![direct.row("direct".into()), native.row(format!("gateway ({mode})"))];
    let mut gateway_requests = native.total_ok;
    if let Some(openai) = &openai {
        rows.push(openai.row(format!("gateway openai ({mode})")));
        gateway_requests += openai.total_ok;
    }
    let added_p50_ms = rows[1].p50_ms - rows[0].p50_ms;
    let added_p99_ms = rows[1].p99_ms - rows[0].p99_ms;
    let pass = options.rate >= TARGET_RATE
        && added_p99_ms < TARGET_ADDED_P99_MS
        && rows.iter().all(|r| r.errors == 0 && r.achieved_rps >= 0.95 * f64::from(options.rate))
        && recorded == gateway_requests;
    Ok(BenchReport {
        options: options.clone(),
        rows,
        added_p50_ms,
        added_p99_ms,
        recorded,
        gateway_requests,
        store_path,
        pass,
    })
}

/// Removes the bench's own database from an earlier run (with its WAL files), so every run
/// starts from an empty store.
fn remove_database(path: &Path) -> Result<(), BenchError> {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("cannot remove {}", Path::new(&file).display()))(e)),
        }
    }
    Ok(())
}

/// An OpenAI-compatible upstream that costs as little as possible: the body is read and dropped,
/// the answer is a static byte string.
fn mock_upstream() -> Router {
    Router::new().route(
        "/v1/chat/completions",
        post(|body: Bytes| async move {
            drop(body);
            ([(CONTENT_TYPE, "application/json")], Bytes::from_static(UPSTREAM_RESPONSE))
        }),
    )
}

async fn serve_on_loopback(router: Router) -> Result<(SocketAddr, JoinHandle<()>), BenchError> {
    let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listener = TcpListener::bind(bind).await.map_err(io_error("cannot listen on 127.0.0.1"))?;
    let addr = listener.local_addr().map_err(io_error("cannot read the listening address"))?;
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("bench server on {addr} failed: {e}");
        }
    });
    Ok((addr, handle))
}

// ---------------------------------------------------------------------------------------------
// Load generator

/// One target under one open-loop schedule.
#[derive(Clone)]
struct Phase {
    addr: SocketAddr,
    path: &'static str,
    body: Bytes,
    rate: u32,
    warmup_requests: u64,
    measured_requests: u64,
    connections: usize,
}

impl Phase {
    fn new(options: &BenchOptions, addr: SocketAddr, path: &'static str, body: Bytes) -> Self {
        Self {
            addr,
            path,
            body,
            rate: options.rate,
            warmup_requests: options.warmup_requests(),
            measured_requests: options.measured_requests(),
            connections: options.connections,
        }
    }

    fn total_requests(&self) -> u64 {
        self.warmup_requests + self.measured_requests
    }

    /// When request `i` is due, relative to the start of the schedule.
    fn due(&self, i: u64) -> Duration {
        Duration::from_nanos((u128::from(i) * 1_000_000_000 / u128::from(self.rate)) as u64)
    }
}

struct PhaseResult {
    /// Latencies of successful measured requests, in microseconds.
    histogram: Histogram<u64>,
    measured_ok: u64,
    measured_errors: u64,
    /// Successful requests, warm-up included.
    total_ok: u64,
    /// From the first measured request's due time to the last measured completion.
    measured_span: Duration,
}

impl PhaseResult {
    fn row(&self, target: String) -> BenchRow {
        let h = &self.histogram;
        let ms = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1e3
            }
        };
        let span = self.measured_span.as_secs_f64();
        BenchRow {
            target,
            requests: self.measured_ok + self.measured_errors,
            errors: self.measured_errors,
            achieved_rps: if span > 0.0 { self.measured_ok as f64 / span } else { 0.0 },
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            max_ms: if h.is_empty() { 0.0 } else { h.max() as f64 / 1e3 },
        }
    }
}

/// Runs one phase on a client thread of its own (a single-threaded runtime) and waits for it.
async fn run_phase(phase: Phase) -> Result<PhaseResult, BenchError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io_error("cannot start the client runtime"))
                .and_then(|runtime| runtime.block_on(drive(phase)));
            let _ = tx.send(result);
        })
        .map_err(io_error("cannot start the client thread"))?;
    rx.await.map_err(|_| BenchError::LoadGenerator("the client thread stopped without a result".into()))?
}

/// What each connection worker sends back.
struct WorkerResult {
    histogram: Histogram<u64>,
    measured_ok: u64,
    measured_errors: u64,
    total_ok: u64,
    last_measured_done: Option<Instant>,
}

fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).map_err(|e| BenchError::Histogram(e.to_string()))
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, BenchError> {
    let error = |message: String| BenchError::Connect { addr, message };
    let stream = TcpStream::connect(addr).await.map_err(|e| error(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| error(e.to_string()))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| error(e.to_string()))?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes; errors surface on requests.
        let _ = connection.await;
    });
    Ok(sender)
}

async fn drive(phase: Phase) -> Result<PhaseResult, BenchError> {
    let phase = Arc::new(phase);
    let mut senders = Vec::with_capacity(phase.connections);
    for _ in 0..phase.connections {
        senders.push(connect(phase.addr).await?);
    }

    let (due_tx, due_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let due_rx = Arc::new(Mutex::new(due_rx));
    let start = Instant::now() + SCHEDULE_LEAD;
    let measure_start = start + phase.due(phase.warmup_requests);

    let mut workers = Vec::with_capacity(senders.len());
    for sender in senders {
        let histogram = new_histogram()?;
        workers.push(tokio::spawn(worker(phase.clone(), sender, due_rx.clone(), histogram)));
    }
    // Only the workers hold the receiver: if they all die, the schedule stops.
    drop(due_rx);

    // The schedule: a plain thread that sleeps until each request is due and hands it over.
    let scheduler = {
        let phase = phase.clone();
        std::thread::Builder::new()
            .name("bench-schedule".into())
            .spawn(move || {
                for i in 0..phase.total_requests() {
                    let due = start + phase.due(i);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if due_tx.send((i, due)).is_err() {
                        break;
                    }
                }
            })
            .map_err(io_error("cannot start the schedule thread"))?
    };

    let mut histogram = new_histogram()?;
    let (mut measured_ok, mut measured_errors, mut total_ok) = (0, 0, 0);
    let mut last_done: Option<Instant> = None;
    let mut failure = None;
    for worker in workers {
        match worker.await {
            Ok(result) => {
                histogram.add(&result.histogram).map_err(|e| BenchError::Histogram(e.to_string()))?;
                measured_ok += result.measured_ok;
                measured_errors += result.measured_errors;
                total_ok += result.total_ok;
                last_done = last_done.max(result.last_measured_done);
            }
            Err(e) => failure = Some(BenchError::LoadGenerator(format!("a connection worker failed: {e}"))),
        }
    }
    // The workers only stop once the schedule has closed its channel, so this does not block.
    if scheduler.join().is_err() {
        failure = Some(BenchError::LoadGenerator("the schedule thread panicked".into()));
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let measured_span = last_done.map(|t| t.saturating_duration_since(measure_start)).unwrap_or_default();
    Ok(PhaseResult { histogram, measured_ok, measured_errors, total_ok, measured_span })
}

/// Takes the next due request, sends it on this worker's connection, records its latency.
async fn worker(
    phase: Arc<Phase>,
    sender: SendRequest<Full<Bytes>>,
    due: Arc<Mutex<mpsc::UnboundedReceiver<(u64, Instant)>>>,
    mut histogram: Histogram<u64>,
) -> WorkerResult {
    let host = phase.addr.to_string();
    let mut sender = Some(sender);
    let (mut measured_ok, mut measured_errors, mut total_ok) = (0, 0, 0);
    let mut last_measured_done = None;
    loop {
        // Idle workers queue on the (fair) mutex; the one holding it waits for the next request.
        let next = due.lock().await.recv().await;
        let Some((i, due_at)) = next else { break };
        let ok = match tokio::time::timeout(REQUEST_TIMEOUT, send_one(&phase, &host, &mut sender)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!("bench request to {}{} failed: {e}", phase.addr, phase.path);
                false
            }
            Err(_) => {
                sender = None;
                false
            }
        };
        let done = Instant::now();
        let measured = i >= phase.warmup_requests;
        total_ok += u64::from(ok);
        if !measured {
            continue;
        }
        if ok {
            measured_ok += 1;
            let micros = done.saturating_duration_since(due_at).as_micros();
            histogram.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX).max(1));
            last_measured_done = Some(done);
        } else {
            measured_errors += 1;
        }
    }
    WorkerResult { histogram, measured_ok, measured_errors, total_ok, last_measured_done }
}

/// One request and its whole response; a broken connection is dropped and replaced on the next
/// request.
async fn send_one(phase: &Phase, host: &str, sender: &mut Option<SendRequest<Full<Bytes>>>) -> Result<(), String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = None;
        *sender = Some(connect(phase.addr).await.map_err(|e| e.to_string())?);
    }
    let Some(conn) = sender.as_mut() else {
        return Err("no connection".into());
    };
    let request = hyper::Request::post(phase.path)
        .header(hyper::header::HOST, host)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(phase.body.clone()))
        .map_err(|e| e.to_string())?;
    let result = async {
        conn.ready().await.map_err(|e| e.to_string())?;
        let response = conn.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])))
        }
    }
    .await;
    if result.is_err() && conn.is_closed() {
        *sender = None;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tiny_bench_records_every_gateway_request() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = BenchOptions {
            rate: 200,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            connections: 8,
            write_mode: WriteMode::Durable,
            store_dir: dir.path().to_path_buf(),
            openai_api: true,
        };
        let report = run_gateway_bench(&options).await.expect("bench runs");
        println!("{}", report.table());

        assert_eq!(report.rows.len(), 3);
        for row in &report.rows {
            assert_eq!(row.requests, 200, "{}: every scheduled request is counted", row.target);
            assert_eq!(row.errors, 0, "{}: no request fails", row.target);
            assert!(row.achieved_rps > 100.0 && row.achieved_rps < 300.0, "{}: {} req/s", row.target, row.achieved_rps);
            assert!(row.p50_ms > 0.0 && row.p50_ms <= row.p99_ms && row.p99_ms <= row.max_ms, "{row:?}");
        }
        // Warm-up included: 240 per gateway row.
        assert_eq!(report.gateway_requests, 480);
        assert_eq!(report.recorded, report.gateway_requests);
        assert!(report.table().contains("gateway (durable)"));
        assert!(!report.pass, "200 req/s cannot pass a target set at 2000 req/s");

        let json = serde_json::to_value(&report).expect("report serializes");
        assert_eq!(json["options"]["write_mode"], "durable");
        assert_eq!(json["rows"][0]["target"], "direct");
    }
}
