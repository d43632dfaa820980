//! `apprentice bench serve`: K concurrent agent-like clients against a local model through the
//! gateway, and llama.cpp single stream on the same GGUF and the same prompt token ids.
//!
//! - **Server.** A gateway runs in-process on `127.0.0.1:0` with one chat function, `bench`, whose
//!   only variant uses `local::bench`: a provider of `type = "local"` on the benchmarked model,
//!   greedy (`temperature = 0`), `max_tokens` answers. The provider settings the user gives
//!   (`threads`, `max_context_tokens`, and the batching keys `weights`, `max_batch`,
//!   `prefill_chunk_tokens`, `prefix_cache_mb`) are written into its TOML, and only those given.
//!   Every call is recorded in a temporary SQLite store, in `async` write mode by default (the
//!   answer does not wait for the commit, so recording is not what is measured; `durable` on
//!   request); the report counts the records after a flush.
//! - **Clients.** Each of K clients plays whole episodes through the native `POST /inference`
//!   with an `episode_id`: a system prompt and a first observation (about 70 prompt tokens with
//!   the chat template), then each turn appends the model's answer and a new observation (about
//!   20 tokens more), for `turns` turns. Every K plays the same `episodes` episodes (same
//!   missions and observations, seeded), taken from a shared queue, so every K does the same work;
//!   before each K, every client plays `warmup_turns` turns of an episode of its own, not counted.
//! - **Figures per K.** Requests, generated tokens and prompt tokens (from each response's
//!   usage), over the wall time from the start of the measured phase to the last answer:
//!   aggregate generated tokens/s, prompt tokens/s (whole prompts, cached prefixes included) and
//!   requests/s; latency per request (send to parsed answer) p50/p95 from an HDR histogram.
//! - **llama.cpp** (`baselines/llama_cpp_serve.py`, `llama-cpp-python`) plays the episodes as the
//!   first measured K played them: the same prompt token ids, made by apprentice's tokenizer and
//!   the model's chat template from the conversations the clients sent (checked against the
//!   gateway's own prompt token counts), one request at a time, keeping the KV cache of the common
//!   prefix between requests, greedy, up to `max_tokens` tokens with the same stop tokens, on the
//!   same number of threads. A missing Python or package becomes a row note with the install
//!   command.
//! - **Targets** (issue 13), as ratios of this run's figures: K=8 aggregate generated tokens/s at
//!   least 4× K=1's, and our K=1 at least 0.75× llama.cpp's single stream.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use apprentice_core::config::{ConfigError, WriteMode};
use apprentice_core::{new_id, Config};
use apprentice_gateway::{Gateway, GatewayError, RunningGateway};
use apprentice_model::cache::ModelCache;
use apprentice_model::{ChatTemplate, Tokenizer};
use apprentice_store::{SqliteStore, Store, StoreError};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// The llama.cpp baseline, shipped as `crates/apprentice-bench/baselines/llama_cpp_serve.py`.
pub const LLAMA_CPP_SERVE_SCRIPT: &str = include_str!("../baselines/llama_cpp_serve.py");

/// Exit status with which a baseline script says that a Python package is missing.
const MISSING_PACKAGE_EXIT: i32 = 3;

/// Issue 13: K=8 aggregate generated tokens/s over K=1's, at least this.
pub const TARGET_K8_OVER_K1: f64 = 4.0;
/// Issue 13: our K=1 generated tokens/s over llama.cpp's single stream, at least this.
pub const TARGET_K1_OVER_LLAMA_CPP: f64 = 0.75;

/// The model and function the bench gateway serves.
const MODEL_NAME: &str = "local::bench";
const FUNCTION_NAME: &str = "bench";

/// One request that takes longer than this fails (a stuck server must not hang the bench).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Latency histogram range in microseconds: 1 µs to 10 minutes, 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 600_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ServeBenchError {
    #[error("invalid bench options: {0}")]
    Options(String),
    #[error("{0}")]
    Model(String),
    #[error("the bench gateway configuration is invalid: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot open the bench store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("cannot read back the bench store: {0}")]
    StoreRead(StoreError),
    #[error("cannot start the gateway: {0}")]
    Gateway(#[from] GatewayError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("the bench client failed: {0}")]
    Client(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeBenchError {
    let context = context.into();
    move |source| ServeBenchError::Io { context, source }
}

/// Settings of the local provider under test; each is written into its config only when given.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LocalProviderSettings {
    /// `threads`: CPU threads for generation (llama.cpp gets the same number).
    pub threads: Option<usize>,
    /// `max_context_tokens`.
    pub max_context_tokens: Option<usize>,
    /// `weights`: what the batching engine computes with (`q8_0` or `f32`).
    pub weights: Option<String>,
    /// `max_batch`: sequences decoded together at most.
    pub max_batch: Option<usize>,
    /// `prefill_chunk_tokens`: prompt tokens prefilled per step and sequence at most.
    pub prefill_chunk_tokens: Option<usize>,
    /// `prefix_cache_mb`: memory for KV caches kept for the next turn of an episode.
    pub prefix_cache_mb: Option<usize>,
}

impl LocalProviderSettings {
    /// The provider's TOML table body (after `type` and `model`), only the keys given.
    fn toml_lines(&self) -> String {
        let mut out = String::new();
        let mut number = |key: &str, value: Option<usize>| {
            if let Some(value) = value {
                let _ = writeln!(out, "{key} = {value}");
            }
        };
        number("threads", self.threads);
        number("max_context_tokens", self.max_context_tokens);
        number("max_batch", self.max_batch);
        number("prefill_chunk_tokens", self.prefill_chunk_tokens);
        number("prefix_cache_mb", self.prefix_cache_mb);
        if let Some(weights) = &self.weights {
            let _ = writeln!(out, "weights = {}", toml_string(weights));
        }
        out
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeBenchOptions {
    /// A cached model name (`apprentice model fetch NAME`), a GGUF file or an HF model folder.
    pub model: String,
    /// The numbers of concurrent clients, measured in this order.
    pub concurrency: Vec<usize>,
    /// Episodes played at every K (the same ones), shared out among the K clients.
    pub episodes: usize,
    /// Requests per episode.
    pub turns: usize,
    /// Generated tokens per request at most.
    pub max_tokens: u32,
    /// Turns each client plays before each K is measured, not counted.
    pub warmup_turns: usize,
    /// Seeds the episodes' missions and observations.
    pub seed: u64,
    pub provider: LocalProviderSettings,
    #[serde(serialize_with = "serialize_write_mode")]
    pub write_mode: WriteMode,
    /// Python interpreter for the llama.cpp baseline; `None` measures ours only.
    pub python: Option<String>,
    /// Draw progress bars on stderr (when it is a terminal).
    #[serde(skip)]
    pub progress: bool,
}

impl Default for ServeBenchOptions {
    fn default() -> Self {
        Self {
            model: "smollm2-135m".into(),
            concurrency: vec![1, 2, 4, 8, 16],
            episodes: 16,
            turns: 8,
            max_tokens: 4,
            warmup_turns: 2,
            seed: 13,
            provider: LocalProviderSettings::default(),
            write_mode: WriteMode::Async,
            python: Some("python3".into()),
            progress: true,
        }
    }
}

impl ServeBenchOptions {
    fn validate(&self) -> Result<(), ServeBenchError> {
        let fail = |m: &str| Err(ServeBenchError::Options(m.into()));
        if self.concurrency.is_empty() || self.concurrency.contains(&0) {
            return fail("concurrency must list at least one K, each at least 1");
        }
        if self.episodes == 0 || self.turns == 0 || self.max_tokens == 0 {
            return fail("episodes, turns and max tokens must be at least 1");
        }
        Ok(())
    }
}

fn write_mode_name(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Durable => "durable",
        WriteMode::Async => "async",
    }
}

fn serialize_write_mode<S: serde::Serializer>(mode: &WriteMode, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(write_mode_name(*mode))
}

/// One measured K, or the llama.cpp baseline's single stream.
#[derive(Debug, Clone, Serialize)]
pub struct ServeRow {
    /// `apprentice` or `llama.cpp`.
    pub implementation: String,
    /// Concurrent clients (1 for llama.cpp).
    pub concurrency: usize,
    /// Successful measured requests.
    pub requests: u64,
    /// Failed measured requests (an error ends its episode).
    pub errors: u64,
    /// Generated tokens of the successful requests, from their usage (stop tokens included).
    pub generated_tokens: u64,
    /// Prompt tokens of the successful requests (whole prompts, cached prefixes included).
    pub prompt_tokens: u64,
    /// Fewest and most tokens one request generated.
    pub completion_tokens_min: u64,
    pub completion_tokens_max: u64,
    /// From the start of the measured phase to its last answer.
    pub wall_s: f64,
    pub generated_tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Latency per request: sent to answer parsed (llama.cpp: first evaluation to last token).
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
}

/// The llama.cpp baseline: a measurement, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub struct LlamaCppRow {
    /// What it computes with.
    pub computes_with: String,
    /// The GGUF it ran.
    pub weights: String,
    pub threads: usize,
    pub version: Option<String>,
    pub load_s: Option<f64>,
    /// Prompt tokens it took from its KV cache instead of evaluating them.
    pub reused_prompt_tokens: Option<u64>,
    pub measurement: Option<ServeRow>,
    /// Why there is no measurement (a missing package names the pip command that installs it).
    pub unavailable: Option<String>,
}

/// One target of issue 13: a ratio of two figures of this run, at least `required_ratio`.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub required_ratio: f64,
    /// `None` when either figure was not measured.
    pub ratio: Option<f64>,
    pub met: Option<bool>,
}

/// Whether the prompt ids given to llama.cpp are the prompts the gateway ran: their lengths
/// against the prompt token counts in the gateway's answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PromptCheck {
    pub prompts: u64,
    pub same_length: u64,
    /// The first differing turn, described.
    pub first_difference: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeBenchReport {
    pub machine: String,
    /// `/proc/loadavg` before and after: other work on the machine slows every row.
    pub load_average_before: Option<String>,
    pub load_average_after: Option<String>,
    /// The resolved model path.
    pub model: String,
    /// Storage types of the GGUF's tensors (what llama.cpp computes with), or `HF folder`.
    pub model_storage: String,
    /// The gateway configuration the bench served (model path, provider settings, variant).
    pub gateway_config: String,
    /// `CANDLE_NUM_THREADS` as the process had it (candle's elementwise pool).
    pub candle_num_threads: Option<String>,
    pub options: ServeBenchOptions,
    /// Prompt tokens of the first and of the last turn, averaged over the baseline episodes.
    pub first_turn_prompt_tokens: f64,
    pub last_turn_prompt_tokens: f64,
    /// Prompt tokens per request past the longest prefix shared with the episode's previous
    /// prompt (a first turn counts whole; the previous answer's tokens count too): at most what
    /// a server that keeps each episode's cache must still prefill.
    pub new_prompt_tokens_per_request: f64,
    /// One row per K, in the order measured.
    pub rows: Vec<ServeRow>,
    /// The first failed request's error, if any failed.
    pub first_error: Option<String>,
    /// Inferences in the bench store after a flush, and successful requests (warm-up included):
    /// equal when every answered call was recorded.
    pub recorded: u64,
    pub gateway_requests: u64,
    pub store_path: String,
    pub llama_cpp: LlamaCppRow,
    pub prompt_check: PromptCheck,
    pub targets: Vec<TargetCheck>,
}

// ---------------------------------------------------------------------------------------------
// Episodes

const SYSTEM_PROMPT: &str =
    "You are a grid world agent. Say your aim, then one action: left, right, forward, pickup, drop, toggle, done.";

const COLORS: [&str; 6] = ["red", "green", "blue", "purple", "yellow", "grey"];
const OBJECTS: [&str; 3] = ["ball", "box", "key"];

/// One episode's user messages: the mission and first observation, then one observation a turn.
#[derive(Debug, Clone)]
struct EpisodeScript {
    observations: Vec<String>,
}

fn object(rng: &mut StdRng) -> String {
    format!("{} {}", COLORS[rng.gen_range(0..COLORS.len())], OBJECTS[rng.gen_range(0..OBJECTS.len())])
}

/// Where something is: `3 ahead`, `2 ahead, 1 left`.
fn place(rng: &mut StdRng) -> String {
    let ahead = rng.gen_range(1..6);
    match rng.gen_range(0..3) {
        0 => format!("{ahead} ahead"),
        1 => format!("{ahead} ahead, {} left", rng.gen_range(1..4)),
        _ => format!("{ahead} ahead, {} right", rng.gen_range(1..4)),
    }
}

/// What the agent sees: `things` objects, sometimes a wall.
fn sight(rng: &mut StdRng, things: usize) -> String {
    let mut seen: Vec<String> = (0..things).map(|_| format!("a {} {}", object(rng), place(rng))).collect();
    if rng.gen_bool(0.3) {
        seen.push(format!("a wall {} ahead", rng.gen_range(1..6)));
    }
    seen.join("; ")
}

/// The episode at `index` for `seed`: the same text every run and at every K. With SmolLM2's
/// template the first prompt is about 70 tokens and each turn adds about 25 (answer, observation
/// and the template's markers).
fn episode_script(seed: u64, index: usize, turns: usize) -> EpisodeScript {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(index as u64));
    let target = object(&mut rng);
    let mission = match rng.gen_range(0..3) {
        0 => format!("go to the {target}"),
        1 => format!("pick up the {target}"),
        _ => format!("put the {target} next to the {}", object(&mut rng)),
    };
    let mut observations = Vec::with_capacity(turns);
    observations.push(format!("Mission: {mission}.\nYou see {}.", sight(&mut rng, 2)));
    for _ in 1..turns {
        observations.push(format!("You see {}.", sight(&mut rng, 1)));
    }
    EpisodeScript { observations }
}

/// The conversation of a turn: system, then user and assistant alternating, ending with the
/// user's `answers.len()`-th observation.
fn conversation(script: &EpisodeScript, answers: &[String]) -> Vec<Value> {
    let mut messages = vec![json!({"role": "system", "content": SYSTEM_PROMPT})];
    for (turn, observation) in script.observations.iter().enumerate().take(answers.len() + 1) {
        messages.push(json!({"role": "user", "content": observation}));
        if let Some(answer) = answers.get(turn) {
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
    messages
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One turn as a client saw it.
#[derive(Debug, Clone)]
struct Turn {
    answer: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    latency: Duration,
}

/// One episode as played: its index in the episode list and its answered turns.
#[derive(Debug, Clone)]
struct Played {
    index: usize,
    turns: Vec<Turn>,
}

#[derive(Default)]
struct PhaseOutcome {
    played: Vec<Played>,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

/// What every client shares.
struct Clients {
    http: reqwest::Client,
    url: String,
    max_tokens: u32,
}

impl Clients {
    /// One turn through the native API: the answer's text and usage.
    async fn turn(&self, episode_id: Uuid, messages: &[Value]) -> Result<Turn, String> {
        let (system, rest) = messages.split_first().ok_or("no messages")?;
        let body = json!({
            "function_name": FUNCTION_NAME,
            "episode_id": episode_id,
            "input": {"system": system["content"], "messages": rest},
            "params": {"max_tokens": self.max_tokens, "temperature": 0.0},
        });
        let started = Instant::now();
        let response = self.http.post(&self.url).json(&body).send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        let latency = started.elapsed();
        if !status.is_success() {
            return Err(format!("status {status}: {}", &text[..text.len().min(400)]));
        }
        let answer: Value = serde_json::from_str(&text).map_err(|e| format!("unreadable answer ({e}): {text}"))?;
        let count = |key: &str| answer["usage"][key].as_u64().ok_or_else(|| format!("no usage.{key} in {text}"));
        let content: String = answer["content"]
            .as_array()
            .map(|blocks| blocks.iter().filter_map(|b| b["text"].as_str()).collect())
            .unwrap_or_default();
        Ok(Turn {
            // An empty answer would be dropped from the next prompt by the provider's rendering:
            // the client writes that it had nothing to say instead.
            answer: if content.is_empty() { "...".to_string() } else { content },
            prompt_tokens: count("input_tokens")?,
            completion_tokens: count("output_tokens")?,
            latency,
        })
    }
}

/// K clients play `scripts` (each client takes the next unplayed one) for `turns` turns each.
async fn play(
    clients: &Arc<Clients>,
    k: usize,
    scripts: Arc<Vec<EpisodeScript>>,
    turns: usize,
    bar: &ProgressBar,
) -> PhaseOutcome {
    let next = Arc::new(AtomicUsize::new(0));
    let outcome = Arc::new(Mutex::new(PhaseOutcome::default()));
    let mut tasks = Vec::with_capacity(k);
    for _ in 0..k {
        let (clients, scripts, next, outcome, bar) =
            (clients.clone(), scripts.clone(), next.clone(), outcome.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(script) = scripts.get(index) else { break };
                let episode_id = new_id();
                let mut played = Played { index, turns: Vec::with_capacity(turns) };
                let mut answers: Vec<String> = Vec::with_capacity(turns);
                for _ in 0..turns.min(script.observations.len()) {
                    let messages = conversation(script, &answers);
                    let result = tokio::time::timeout(REQUEST_TIMEOUT, clients.turn(episode_id, &messages))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
                    let done = Instant::now();
                    bar.inc(1);
                    let mut shared = outcome.lock().unwrap_or_else(PoisonError::into_inner);
                    shared.last_done = shared.last_done.max(Some(done));
                    match result {
                        Ok(turn) => {
                            answers.push(turn.answer.clone());
                            played.turns.push(turn);
                        }
                        Err(e) => {
                            shared.errors += 1;
                            shared.first_error.get_or_insert(e);
                            break;
                        }
                    }
                }
                outcome.lock().unwrap_or_else(PoisonError::into_inner).played.push(played);
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            let mut shared = outcome.lock().unwrap_or_else(PoisonError::into_inner);
            shared.errors += 1;
            shared.first_error.get_or_insert(format!("a client task failed: {e}"));
        }
    }
    let mut outcome = std::mem::take(&mut *outcome.lock().unwrap_or_else(PoisonError::into_inner));
    outcome.played.sort_by_key(|p| p.index);
    outcome
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds")
}

/// The row of one measured phase.
fn row(implementation: &str, k: usize, outcome: &PhaseOutcome, started: Instant) -> ServeRow {
    let mut histogram = new_histogram();
    let (mut requests, mut generated, mut prompt) = (0u64, 0u64, 0u64);
    let (mut least, mut most) = (u64::MAX, 0u64);
    for turn in outcome.played.iter().flat_map(|p| &p.turns) {
        requests += 1;
        generated += turn.completion_tokens;
        prompt += turn.prompt_tokens;
        least = least.min(turn.completion_tokens);
        most = most.max(turn.completion_tokens);
        histogram.saturating_record(u64::try_from(turn.latency.as_micros()).unwrap_or(u64::MAX).max(1));
    }
    let wall_s = outcome.last_done.map_or(0.0, |done| done.saturating_duration_since(started).as_secs_f64());
    let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
    let ms = |q: f64| if histogram.is_empty() { 0.0 } else { histogram.value_at_quantile(q) as f64 / 1e3 };
    ServeRow {
        implementation: implementation.into(),
        concurrency: k,
        requests,
        errors: outcome.errors,
        generated_tokens: generated,
        prompt_tokens: prompt,
        completion_tokens_min: if requests == 0 { 0 } else { least },
        completion_tokens_max: most,
        wall_s,
        generated_tokens_per_s: per_s(generated),
        prompt_tokens_per_s: per_s(prompt),
        requests_per_s: per_s(requests),
        p50_ms: ms(0.50),
        p95_ms: ms(0.95),
        max_ms: if histogram.is_empty() { 0.0 } else { histogram.max() as f64 / 1e3 },
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// The gateway configuration: one chat function on one local model.
fn gateway_config(model_path: &Path, options: &ServeBenchOptions) -> String {
    format!(
        r#"[store]
write_mode = "{mode}"

[models."{MODEL_NAME}"]
routing = ["local"]

[models."{MODEL_NAME}".providers.local]
type = "local"
model = {model}
{settings}
[functions.{FUNCTION_NAME}]
type = "chat"
description = "bench serve: an agent in a grid world, one short answer a turn"

[functions.{FUNCTION_NAME}.variants.local]
model = "{MODEL_NAME}"
temperature = 0.0
max_tokens = {max_tokens}
"#,
        mode = write_mode_name(options.write_mode),
        model = toml_string(&model_path.to_string_lossy()),
        settings = options.provider.toml_lines(),
        max_tokens = options.max_tokens,
    )
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn progress_bar(options: &ServeBenchOptions, len: u64, message: String) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len),
        if options.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    if let Ok(style) = ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} requests {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}

/// Runs the bench: every K through the gateway, then llama.cpp. Run it on a multi-threaded
/// runtime: the gateway and the clients share it, generation runs on its blocking pool.
pub async fn run_serve_bench(options: &ServeBenchOptions) -> Result<ServeBenchReport, ServeBenchError> {
    options.validate()?;
    let cache = ModelCache::from_env().map_err(|e| ServeBenchError::Model(e.to_string()))?;
    let model_path = apprentice_gateway::providers::local::resolve(&cache, &options.model)
        .map_err(|e| ServeBenchError::Model(format!("model `{}`: {e}", options.model)))?;
    let tokenizer = Tokenizer::from_path(&model_path)
        .map_err(|e| ServeBenchError::Model(format!("cannot load the tokenizer of {}: {e}", model_path.display())))?;
    let template = ChatTemplate::from_tokenizer(&tokenizer)
        .map_err(|e| ServeBenchError::Model(format!("cannot use the chat template: {e}")))?;
    let model_storage = storage_types(&model_path);
    let load_average_before = load_average();

    let scratch = tempfile::tempdir().map_err(io_error("cannot create a scratch folder"))?;
    let store_path = scratch.path().join("bench-serve.db");
    let config_text = gateway_config(&model_path, options);
    let config = Config::parse(&config_text, Path::new("<bench serve>"), scratch.path())?;
    let store = Arc::new(
        SqliteStore::open(&store_path, options.write_mode)
            .await
            .map_err(|source| ServeBenchError::Store { path: store_path.display().to_string(), source })?,
    );
    tracing::info!("loading {} into the gateway", model_path.display());
    // Building the routers loads the model: blocking work.
    let gateway = {
        let store: Arc<dyn Store> = store.clone();
        tokio::task::spawn_blocking(move || Gateway::with_store(config, store))
            .await
            .map_err(|e| ServeBenchError::Client(format!("loading the model panicked: {e}")))??
    };
    let server = RunningGateway::start(gateway, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;

    let measured = measure_all(options, &server).await;
    let flushed = server.gateway.recorder.flush().await.map_err(ServeBenchError::StoreRead);
    let recorded = store.count_inferences().await.map_err(ServeBenchError::StoreRead);
    let shutdown = server.shutdown().await;
    store.close().await;
    let Measured { rows, baseline_played, first_error, answered: gateway_requests } = measured?;
    flushed?;
    let recorded = recorded?;
    shutdown?;

    // The baseline plays the episodes as the first measured K played them.
    let scripts: Vec<EpisodeScript> =
        (0..options.episodes).map(|i| episode_script(options.seed, i, options.turns)).collect();
    let (prompts, prompt_check) = baseline_prompts(&scripts, &baseline_played, &tokenizer, &template)?;
    let turn_mean = |pick: fn(&EpisodePrompts) -> Option<&Vec<u32>>| {
        let lengths: Vec<usize> = prompts.iter().filter_map(pick).map(Vec::len).collect();
        if lengths.is_empty() {
            0.0
        } else {
            lengths.iter().sum::<usize>() as f64 / lengths.len() as f64
        }
    };
    let first_turn_prompt_tokens = turn_mean(|episode| episode.first());
    let last_turn_prompt_tokens = turn_mean(|episode| episode.last());
    let new_prompt_tokens_per_request = new_prompt_tokens(&prompts);

    let threads =
        options.provider.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let llama_cpp = match &options.python {
        None => LlamaCppRow::unavailable(&model_path, &model_storage, threads, "baselines not run (--no-baselines)"),
        Some(_) if !model_path.is_file() => LlamaCppRow::unavailable(
            &model_path,
            &model_storage,
            threads,
            "llama.cpp runs GGUF files; the model is an HF folder",
        ),
        Some(python) => {
            tracing::info!("measuring llama.cpp");
            let episodes_file = scratch.path().join("episodes.json");
            let spec = json!({
                "episodes": prompts,
                "max_tokens": options.max_tokens,
                "stop_token_ids": tokenizer.eos_token_id().into_iter().collect::<Vec<_>>(),
            });
            std::fs::write(&episodes_file, spec.to_string())
                .map_err(io_error(format!("cannot write {}", episodes_file.display())))?;
            let (python, model_path, storage) = (python.clone(), model_path.clone(), model_storage.clone());
            let (dir, warmup) = (scratch.path().to_path_buf(), options.warmup_turns);
            tokio::task::spawn_blocking(move || {
                run_llama_cpp(&python, &dir, &model_path, &storage, &episodes_file, threads, warmup)
            })
            .await
            .map_err(|e| ServeBenchError::Client(format!("the llama.cpp baseline panicked: {e}")))?
        }
    };

    let targets = targets(&rows, &llama_cpp);
    Ok(ServeBenchReport {
        machine: apprentice_model::bench::machine_description(),
        load_average_before,
        load_average_after: load_average(),
        model: model_path.display().to_string(),
        model_storage,
        gateway_config: config_text,
        candle_num_threads: std::env::var("CANDLE_NUM_THREADS").ok(),
        options: options.clone(),
        first_turn_prompt_tokens,
        last_turn_prompt_tokens,
        new_prompt_tokens_per_request,
        rows,
        first_error,
        recorded,
        gateway_requests,
        store_path: store_path.display().to_string(),
        llama_cpp,
        prompt_check,
        targets,
    })
}

/// The prompt token ids of an episode's turns, in order.
type EpisodePrompts = Vec<Vec<u32>>;

/// What the clients measured, every K.
struct Measured {
    rows: Vec<ServeRow>,
    /// The episodes as the first K played them.
    baseline_played: Vec<Played>,
    first_error: Option<String>,
    /// Successful requests, warm-up included.
    answered: u64,
}

/// Every K in turn: warm-up, then the measured episodes.
async fn measure_all(options: &ServeBenchOptions, server: &RunningGateway) -> Result<Measured, ServeBenchError> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency.iter().copied().max().unwrap_or(1))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ServeBenchError::Client(e.to_string()))?;
    let clients =
        Arc::new(Clients { http, url: format!("{}/inference", server.url()), max_tokens: options.max_tokens });
    let scripts: Arc<Vec<EpisodeScript>> =
        Arc::new((0..options.episodes).map(|i| episode_script(options.seed, i, options.turns)).collect());

    let mut rows = Vec::with_capacity(options.concurrency.len());
    let mut baseline_played = None;
    let mut first_error = None;
    let mut answered = 0u64;
    for &k in &options.concurrency {
        if options.warmup_turns > 0 {
            // Episodes of their own (indices past the measured ones), one per client.
            let warmup: Vec<EpisodeScript> = (0..k)
                .map(|i| episode_script(options.seed, options.episodes + 1000 * k + i, options.warmup_turns))
                .collect();
            let bar = progress_bar(options, (k * options.warmup_turns) as u64, format!("K={k} warm-up"));
            let outcome = play(&clients, k, Arc::new(warmup), options.warmup_turns, &bar).await;
            bar.finish_and_clear();
            answered += outcome.played.iter().map(|p| p.turns.len() as u64).sum::<u64>();
            if let Some(e) = outcome.first_error {
                first_error.get_or_insert(e);
            }
        }
        let bar = progress_bar(options, (options.episodes * options.turns) as u64, format!("K={k}"));
        let started = Instant::now();
        let outcome = play(&clients, k, scripts.clone(), options.turns, &bar).await;
        bar.finish_and_clear();
        let row = row("apprentice", k, &outcome, started);
        tracing::info!(
            k,
            requests = row.requests,
            errors = row.errors,
            generated_tokens_per_s = format!("{:.1}", row.generated_tokens_per_s),
            p50_ms = format!("{:.1}", row.p50_ms),
            "measured"
        );
        answered += row.requests;
        if let Some(e) = outcome.first_error.clone() {
            first_error.get_or_insert(e);
        }
        baseline_played.get_or_insert(outcome.played);
        rows.push(row);
    }
    Ok(Measured { rows, baseline_played: baseline_played.unwrap_or_default(), first_error, answered })
}

/// The prompt token ids of every answered turn of `played`, per episode, as the provider makes
/// them (the chat template's prompt, tokenized without added special tokens), and how many have
/// the length the gateway reported.
fn baseline_prompts(
    scripts: &[EpisodeScript],
    played: &[Played],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<(Vec<EpisodePrompts>, PromptCheck), ServeBenchError> {
    let mut check = PromptCheck::default();
    let mut episodes = Vec::with_capacity(played.len());
    for episode in played.iter().filter(|p| !p.turns.is_empty()) {
        let script = &scripts[episode.index];
        let answers: Vec<String> = episode.turns.iter().map(|t| t.answer.clone()).collect();
        let mut prompts = Vec::with_capacity(episode.turns.len());
        for (turn, played_turn) in episode.turns.iter().enumerate() {
            let text = template
                .render_prompt(&conversation(script, &answers[..turn]), None)
                .map_err(|e| ServeBenchError::Model(format!("cannot render a prompt: {e}")))?;
            let ids = tokenizer
                .encode(&text, false)
                .map_err(|e| ServeBenchError::Model(format!("cannot tokenize a prompt: {e}")))?;
            check.prompts += 1;
            if ids.len() as u64 == played_turn.prompt_tokens {
                check.same_length += 1;
            } else {
                check.first_difference.get_or_insert_with(|| {
                    format!(
                        "episode {} turn {}: {} ids here, {} in the gateway's usage",
                        episode.index,
                        turn + 1,
                        ids.len(),
                        played_turn.prompt_tokens
                    )
                });
            }
            prompts.push(ids);
        }
        episodes.push(prompts);
    }
    Ok((episodes, check))
}

/// Mean prompt tokens per request not shared with the episode's previous prompt.
fn new_prompt_tokens(episodes: &[EpisodePrompts]) -> f64 {
    let (mut new, mut requests) = (0usize, 0usize);
    for episode in episodes {
        let mut previous: &[u32] = &[];
        for prompt in episode {
            let shared = prompt.iter().zip(previous).take_while(|(a, b)| a == b).count();
            new += prompt.len() - shared;
            requests += 1;
            previous = prompt;
        }
    }
    if requests == 0 {
        0.0
    } else {
        new as f64 / requests as f64
    }
}

// ---------------------------------------------------------------------------------------------
// llama.cpp

impl LlamaCppRow {
    fn new(weights: &Path, storage: &str, threads: usize) -> Self {
        Self {
            computes_with: format!("{storage}, natively (llama.cpp's own kernels)"),
            weights: weights.display().to_string(),
            threads,
            version: None,
            load_s: None,
            reused_prompt_tokens: None,
            measurement: None,
            unavailable: None,
        }
    }

    fn unavailable(weights: &Path, storage: &str, threads: usize, reason: impl Into<String>) -> Self {
        Self { unavailable: Some(reason.into()), ..Self::new(weights, storage, threads) }
    }
}

/// What the baseline script prints: a measurement, or why it could not make one.
#[derive(Debug, serde::Deserialize)]
struct ScriptOutput {
    error: Option<String>,
    install: Option<String>,
    version: Option<String>,
    load_s: Option<f64>,
    requests: Option<u64>,
    generated_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    reused_prompt_tokens: Option<u64>,
    completion_tokens_min: Option<u64>,
    completion_tokens_max: Option<u64>,
    wall_s: Option<f64>,
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    max_ms: Option<f64>,
}

/// Runs `baselines/llama_cpp_serve.py` with `python` on the GGUF at `gguf` and the episodes in
/// `episodes_file` (written by the bench). Never fails: whatever goes wrong becomes the row's
/// note. `scratch` is where the script is written.
pub fn run_llama_cpp(
    python: &str,
    scratch: &Path,
    gguf: &Path,
    storage: &str,
    episodes_file: &Path,
    threads: usize,
    warmup_turns: usize,
) -> LlamaCppRow {
    let unavailable = |reason: String| LlamaCppRow::unavailable(gguf, storage, threads, reason);
    let script = scratch.join("llama_cpp_serve.py");
    if let Err(e) = std::fs::write(&script, LLAMA_CPP_SERVE_SCRIPT) {
        return unavailable(format!("cannot write {}: {e}", script.display()));
    }
    let output = Command::new(python)
        .arg(&script)
        .arg("--gguf")
        .arg(gguf)
        .arg("--episodes")
        .arg(episodes_file)
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--warmup-turns")
        .arg(warmup_turns.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return unavailable(format!("Python interpreter `{python}` not found (set APPRENTICE_PYTHON or --python)"))
        }
        Err(e) => return unavailable(format!("cannot run `{python}`: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .and_then(|line| serde_json::from_str::<ScriptOutput>(line).ok());
    let stderr_tail = || {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    };
    let Some(parsed) = parsed else {
        return unavailable(format!("llama_cpp_serve.py failed ({}): {}", output.status, stderr_tail()));
    };
    if let Some(error) = parsed.error {
        let install = parsed.install.map(|i| format!("; install with: {i}")).unwrap_or_default();
        let code = output.status.code().filter(|&c| c != MISSING_PACKAGE_EXIT);
        let status = code.map(|c| format!(" (exit {c})")).unwrap_or_default();
        return unavailable(format!("{error}{status}{install}"));
    }
    let (Some(requests), Some(generated), Some(prompt), Some(wall_s)) =
        (parsed.requests, parsed.generated_tokens, parsed.prompt_tokens, parsed.wall_s)
    else {
        return unavailable(format!("llama_cpp_serve.py printed no measurement: {}", stderr_tail()));
    };
    let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
    LlamaCppRow {
        version: parsed.version,
        load_s: parsed.load_s,
        reused_prompt_tokens: parsed.reused_prompt_tokens,
        measurement: Some(ServeRow {
            implementation: "llama.cpp".into(),
            concurrency: 1,
            requests,
            errors: 0,
            generated_tokens: generated,
            prompt_tokens: prompt,
            completion_tokens_min: parsed.completion_tokens_min.unwrap_or(0),
            completion_tokens_max: parsed.completion_tokens_max.unwrap_or(0),
            wall_s,
            generated_tokens_per_s: per_s(generated),
            prompt_tokens_per_s: per_s(prompt),
            requests_per_s: per_s(requests),
            p50_ms: parsed.p50_ms.unwrap_or(f64::NAN),
            p95_ms: parsed.p95_ms.unwrap_or(f64::NAN),
            max_ms: parsed.max_ms.unwrap_or(f64::NAN),
        }),
        ..LlamaCppRow::new(gguf, storage, threads)
    }
}

// ---------------------------------------------------------------------------------------------
// Targets and the table

fn targets(rows: &[ServeRow], llama_cpp: &LlamaCppRow) -> Vec<TargetCheck> {
    let at = |k: usize| rows.iter().find(|r| r.concurrency == k && r.requests > 0).map(|r| r.generated_tokens_per_s);
    let check = |target: String, required: f64, ratio: Option<f64>| TargetCheck {
        target,
        required_ratio: required,
        ratio,
        met: ratio.map(|r| r >= required),
    };
    let theirs = llama_cpp.measurement.as_ref().map(|m| m.generated_tokens_per_s).filter(|&t| t > 0.0);
    vec![
        check(
            "K=8 over K=1, aggregate generated tokens/s".into(),
            TARGET_K8_OVER_K1,
            at(8).zip(at(1)).filter(|(_, one)| *one > 0.0).map(|(eight, one)| eight / one),
        ),
        check(
            "our K=1 over llama.cpp single stream, generated tokens/s".into(),
            TARGET_K1_OVER_LLAMA_CPP,
            at(1).zip(theirs).map(|(ours, theirs)| ours / theirs),
        ),
    ]
}

impl ServeBenchReport {
    /// All targets measured and met.
    pub fn met(&self) -> bool {
        self.targets.iter().all(|t| t.met == Some(true))
    }

    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(out, "model: {} ({})", self.model, self.model_storage);
        let _ = writeln!(out, "machine: {}", self.machine);
        if let (Some(before), Some(after)) = (&self.load_average_before, &self.load_average_after) {
            let _ = writeln!(
                out,
                "load average before {before}, after {after} (other work on the machine slows every row)"
            );
        }
        let settings = o.provider.toml_lines().trim().replace('\n', ", ");
        let _ = writeln!(
            out,
            "server: the gateway's POST /inference (in-process, loopback) -> {MODEL_NAME} (type = \"local\"{}{settings}); \
             every call recorded, store {} (SQLite, temporary); CANDLE_NUM_THREADS={}",
            if settings.is_empty() { "" } else { ", " },
            write_mode_name(o.write_mode),
            self.candle_num_threads.as_deref().unwrap_or("unset"),
        );
        let _ = writeln!(
            out,
            "clients: each K plays the same {} episodes of {} turns (prompt {:.0} tokens at turn 1, {:.0} at turn {}; \
             {:.1} not in the episode's previous prompt per request), answers of at most {} tokens, greedy, native API \
             with episode ids; warm-up {} turns per client before each K",
            o.episodes,
            o.turns,
            self.first_turn_prompt_tokens,
            self.last_turn_prompt_tokens,
            o.turns,
            self.new_prompt_tokens_per_request,
            o.max_tokens,
            o.warmup_turns
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<12} {:>3} {:>8} {:>6} {:>10} {:>9} {:>12} {:>7} {:>8} {:>8} {:>8}",
            "impl",
            "K",
            "requests",
            "errors",
            "gen tokens",
            "gen tok/s",
            "prompt tok/s",
            "req/s",
            "p50 ms",
            "p95 ms",
            "vs K=1"
        );
        let one = self.rows.iter().find(|r| r.concurrency == 1).map(|r| r.generated_tokens_per_s);
        let mut line = |r: &ServeRow, errors: String, versus: String| {
            let _ = writeln!(
                out,
                "{:<12} {:>3} {:>8} {:>6} {:>10} {:>9.1} {:>12.1} {:>7.2} {:>8.1} {:>8.1} {:>8}",
                r.implementation,
                r.concurrency,
                r.requests,
                errors,
                r.generated_tokens,
                r.generated_tokens_per_s,
                r.prompt_tokens_per_s,
                r.requests_per_s,
                r.p50_ms,
                r.p95_ms,
                versus
            );
        };
        let ratio = |theirs: f64| match one {
            Some(one) if one > 0.0 => format!("{:.2}x", theirs / one),
            _ => "-".into(),
        };
        for r in &self.rows {
            line(r, r.errors.to_string(), ratio(r.generated_tokens_per_s));
        }
        match &self.llama_cpp.measurement {
            Some(m) => line(m, "-".into(), ratio(m.generated_tokens_per_s)),
            None => {
                let _ = writeln!(
                    out,
                    "{:<12} {:>3} {:>8} {:>6} {:>10} {:>9} {:>12} {:>7} {:>8} {:>8} {:>8}",
                    "llama.cpp", 1, "-", "-", "-", "-", "-", "-", "-", "-", "-"
                );
            }
        }
        let _ = writeln!(out);
        let l = &self.llama_cpp;
        match (&l.measurement, &l.unavailable) {
            (_, Some(reason)) => {
                let _ = writeln!(out, "llama.cpp: not measured: {reason}");
            }
            (Some(_), None) => {
                let _ = writeln!(
                    out,
                    "llama.cpp: {} on {} threads, {}; single stream over the same prompt ids, KV cache of the common \
                     prefix kept ({} prompt tokens reused); load {:.1} s",
                    l.version.as_deref().unwrap_or("llama-cpp-python"),
                    l.threads,
                    l.computes_with,
                    l.reused_prompt_tokens.unwrap_or(0),
                    l.load_s.unwrap_or(f64::NAN)
                );
            }
            (None, None) => {}
        }
        let c = &self.prompt_check;
        let _ = writeln!(
            out,
            "prompt ids for llama.cpp: {} of {} have the gateway's prompt length{}",
            c.same_length,
            c.prompts,
            c.first_difference.as_ref().map(|d| format!(" (first difference: {d})")).unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "recorded: {} inferences ({} answered gateway requests, warm-up included)",
            self.recorded, self.gateway_requests
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(out, "first error: {e}");
        }
        let _ = writeln!(out, "\ntargets (ratios of this run's figures):");
        for t in &self.targets {
            let verdict = match (t.ratio, t.met) {
                (Some(r), Some(true)) => format!("{r:.2}x, met (needs >= {:.2}x)", t.required_ratio),
                (Some(r), _) => format!("{r:.2}x, MISSED (needs >= {:.2}x)", t.required_ratio),
                (None, _) => "not measured".into(),
            };
            let _ = writeln!(out, "  {:<58} {verdict}", t.target);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Machine and model descriptions

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// Storage types of the GGUF's tensors, most common first: `Q4_1 x210, F32 x61, Q8_0 x1`.
fn storage_types(path: &Path) -> String {
    if !path.is_file() {
        return "HF folder".into();
    }
    let Ok(content) = apprentice_model::tokenizer::read_gguf_content(path) else {
        return "GGUF (unreadable header)".into();
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts.iter().map(|(n, c)| format!("{n} x{c}")).collect::<Vec<_>>().join(", ")
}

/// Where a `--json` report goes, with its folder created.
pub fn write_json(report: &ServeBenchReport, path: &Path) -> Result<(), ServeBenchError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_error(format!("cannot create {}", dir.display())))?;
    }
    let text = serde_json::to_string_pretty(report).map_err(|e| ServeBenchError::Client(e.to_string()))?;
    std::fs::write(path, text).map_err(io_error(format!("cannot write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episodes_are_the_same_for_a_seed_and_differ_between_episodes() {
        let a = episode_script(13, 0, 8);
        assert_eq!(a.observations, episode_script(13, 0, 8).observations);
        assert_ne!(a.observations, episode_script(13, 1, 8).observations);
        assert_eq!(a.observations.len(), 8);
        assert!(a.observations[0].starts_with("Mission: "));
    }

    #[test]
    fn conversation_alternates_and_ends_with_the_next_observation() {
        let script = episode_script(1, 2, 3);
        let messages = conversation(&script, &["go forward".into()]);
        let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(messages[3]["content"], script.observations[1]);
    }

    #[test]
    fn provider_settings_are_written_only_when_given() {
        let options = ServeBenchOptions::default();
        let text = gateway_config(Path::new("/models/m.gguf"), &options);
        for key in ["threads", "max_batch", "weights", "prefill_chunk_tokens", "prefix_cache_mb", "max_context"] {
            assert!(!text.contains(key), "{key} in {text}");
        }
        let dir = tempfile::tempdir().unwrap();
        Config::parse(&text, Path::new("bench.toml"), dir.path()).expect("the default config parses");

        let options = ServeBenchOptions {
            provider: LocalProviderSettings {
                threads: Some(2),
                weights: Some("q8_0".into()),
                max_batch: Some(16),
                ..LocalProviderSettings::default()
            },
            ..ServeBenchOptions::default()
        };
        let text = gateway_config(Path::new("/models/m.gguf"), &options);
        assert!(
            text.contains("threads = 2\n")
                && text.contains("weights = \"q8_0\"\n")
                && text.contains("max_batch = 16\n")
        );
        assert!(!text.contains("prefix_cache_mb"));
    }

    #[test]
    fn new_prompt_tokens_count_what_the_previous_prompt_does_not_cover() {
        let episodes = vec![vec![vec![1, 2, 3], vec![1, 2, 3, 4, 5], vec![1, 2, 9]], vec![vec![7]]];
        // 3 (first turn), 2, 1 (diverges after 2), 1 (first turn).
        assert_eq!(new_prompt_tokens(&episodes), 7.0 / 4.0);
        assert_eq!(new_prompt_tokens(&[]), 0.0);
    }

    #[test]
    fn targets_are_ratios_of_the_rows() {
        let r = |k: usize, tps: f64| ServeRow {
            implementation: "apprentice".into(),
            concurrency: k,
            requests: 10,
            errors: 0,
            generated_tokens: 40,
            prompt_tokens: 1000,
            completion_tokens_min: 4,
            completion_tokens_max: 4,
            wall_s: 1.0,
            generated_tokens_per_s: tps,
            prompt_tokens_per_s: 1000.0,
            requests_per_s: 10.0,
            p50_ms: 1.0,
            p95_ms: 2.0,
            max_ms: 3.0,
        };
        let mut llama = LlamaCppRow::new(Path::new("m.gguf"), "Q4_1", 2);
        llama.measurement = Some(ServeRow { implementation: "llama.cpp".into(), ..r(1, 50.0) });
        let t = targets(&[r(1, 40.0), r(8, 200.0)], &llama);
        assert_eq!(t[0].ratio, Some(5.0));
        assert_eq!(t[0].met, Some(true));
        assert_eq!(t[1].ratio, Some(0.8));
        assert_eq!(t[1].met, Some(true));
        let t = targets(&[r(1, 40.0)], &LlamaCppRow::unavailable(Path::new("m.gguf"), "Q4_1", 2, "missing"));
        assert!(t.iter().all(|t| t.ratio.is_none() && t.met.is_none()));
    }
}
