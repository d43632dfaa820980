//! A model run inside the gateway process (`type = "local"`): a student checkpoint or a base model
//! from the model cache, served on the CPU to many episodes at once.
//!
//! - **Loading.** Weights are loaded when the gateway starts (when its routers are built), not on
//!   the first call: a missing or broken model is a startup error naming the config key, as for
//!   every other provider, and the first request does not pay the load. Providers that name the
//!   same file or folder with the same serving settings share one loaded copy (a process-wide
//!   registry keyed by the resolved, canonical path and the settings, holding weak references so
//!   a dropped gateway frees its models).
//! - **Prompt.** The rendered request (system, messages, tools) is turned into OpenAI chat messages
//!   exactly as the OpenAI provider sends them and as apprentice-curate exports training examples,
//!   then rendered with the model's own chat template ([`ChatTemplate::render_prompt`]), so the
//!   student is served the text it was trained on.
//! - **Generation** goes through the model's continuous-batching [`Scheduler`]: concurrent calls
//!   are decoded together in one pass over the weights per token (stored as q8_0 blocks by
//!   default), each with its own sampling parameters, and a call that names its episode continues
//!   the keys and values the episode's previous call left, so only its new tokens are prefilled.
//!   A call generates the same tokens whatever else runs beside it.
//! - **Tool calls.** Templates that do not render tools natively (SmolLM2's) get the tool schemas
//!   in the system message and write calls as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
//!   (apprentice-model's convention); such blocks in the output become tool calls when tools were
//!   offered. Streams send text up to the first `<tool_call>`, then the calls at the end.
//! - Usage is the prompt's and the generation's token counts (a final stop token included); local
//!   inference has no price, so models whose providers are all local cost 0.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Instant;

use apprentice_core::config::{ToolChoice, WeightFormat};
use apprentice_core::record::RenderedRequest;
use apprentice_core::{ContentBlock, ToolCall, ToolDefinition, Usage};
use apprentice_model::cache::{CacheError, ModelCache};
use apprentice_model::serve::{Completion, Request, Scheduler, SchedulerConfig, SchedulerStats, ServingModel};
use apprentice_model::{ChatTemplate, FinishReason, GenerateOptions, Generation, StreamEvent, TokenDecoder, Tokenizer};
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::openai;
use super::{ChunkStream, ModelRequest, Provider, ProviderError, ProviderResponse, StreamChunk, ToolCallDelta};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// How a loaded model is served: its weight format, threads and batching. Part of the key of the
/// shared-model registry, so providers that differ here load their own copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ServingSettings {
    pub weights: WeightFormat,
    /// Threads of the model's own pool; `None`: rayon's global pool (one per core).
    pub threads: Option<usize>,
    pub max_batch: Option<usize>,
    pub prefill_chunk_tokens: Option<usize>,
    pub prefix_cache_mb: Option<usize>,
}

impl ServingSettings {
    /// From a `type = "local"` provider's config fields.
    pub fn from_config(
        weights: WeightFormat,
        threads: Option<usize>,
        max_batch: Option<usize>,
        prefill_chunk_tokens: Option<usize>,
        prefix_cache_mb: Option<usize>,
    ) -> Self {
        Self { weights, threads, max_batch, prefill_chunk_tokens, prefix_cache_mb }
    }

    fn scheduler(&self) -> SchedulerConfig {
        let default = SchedulerConfig::default();
        SchedulerConfig {
            max_batch: self.max_batch.unwrap_or(default.max_batch),
            prefill_chunk_tokens: self.prefill_chunk_tokens.unwrap_or(default.prefill_chunk_tokens),
            prefix_cache_bytes: self.prefix_cache_mb.map_or(default.prefix_cache_bytes, |mb| mb << 20),
        }
    }
}

/// A loaded model with its tokenizer, chat template and scheduler, shared by every provider that
/// names it with the same settings.
pub struct LocalModel {
    path: PathBuf,
    settings: ServingSettings,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    stop_token_ids: Vec<u32>,
    context_length: usize,
    scheduler: Scheduler,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel").field("path", &self.path).field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl LocalModel {
    /// Loads the model, tokenizer and chat template at `path` (a GGUF file or an HF folder) and
    /// starts its scheduler.
    pub fn load(path: &Path, settings: &ServingSettings) -> Result<Self, String> {
        let started = Instant::now();
        let loaded = apprentice_model::load(path, &candle_core::Device::Cpu)
            .map_err(|e| format!("cannot load the model: {e}"))?;
        let tokenizer =
            Tokenizer::from_path(path).map_err(|e| format!("cannot load the tokenizer of {}: {e}", path.display()))?;
        let template = ChatTemplate::from_tokenizer(&tokenizer)
            .map_err(|e| format!("cannot use the chat template of {}: {e}", path.display()))?;
        let mut stop_token_ids = loaded.config.eos_token_ids.clone();
        stop_token_ids.extend(tokenizer.eos_token_id().filter(|id| !stop_token_ids.contains(id)));
        if stop_token_ids.is_empty() {
            return Err(format!(
                "{} declares no end-of-sequence token: generation could only stop at max_tokens",
                path.display()
            ));
        }
        let serving = ServingModel::from_llama(&loaded.model, settings.weights)
            .map_err(|e| format!("cannot prepare {} for serving: {e}", path.display()))?;
        let context_length = loaded.config.max_position_embeddings;
        // The f32 training copy is not needed any more: serving keeps only its own layout.
        drop(loaded);
        let pool = match settings.threads {
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("apprentice-local-{i}"))
                    .build()
                    .map_err(|e| format!("cannot start {n} threads: {e}"))?,
            )),
            None => None,
        };
        let tokenizer = Arc::new(tokenizer);
        let decoder: Arc<dyn TokenDecoder + Send + Sync> = {
            let tokenizer = tokenizer.clone();
            Arc::new(move |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default())
        };
        let scheduler = settings.scheduler();
        tracing::info!(
            model = %path.display(),
            weights = %settings.weights,
            weight_mb = serving.weight_bytes() >> 20,
            kv_kb_per_token = serving.kv_bytes_per_token() >> 10,
            kernels = apprentice_model::serve::cpu_kernels(),
            max_batch = scheduler.max_batch,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "local model loaded"
        );
        let scheduler = Scheduler::start(Arc::new(serving), Some(decoder), scheduler, pool);
        Ok(Self {
            path: path.to_path_buf(),
            settings: settings.clone(),
            tokenizer,
            template,
            stop_token_ids,
            context_length,
            scheduler,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn settings(&self) -> &ServingSettings {
        &self.settings
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The ids that end a generation: the model's eos ids and the tokenizer's.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// The model's own context length.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The prompt text for `rendered`: OpenAI-shaped messages and tools through the chat template.
    pub fn render_prompt(&self, rendered: &RenderedRequest) -> Result<String, String> {
        render_prompt(&self.template, rendered)
    }

    /// The prompt's token ids, as generation is fed them.
    pub fn prompt_ids(&self, rendered: &RenderedRequest) -> Result<Vec<u32>, String> {
        prompt_ids(&self.tokenizer, &self.template, rendered)
    }
}

/// What [`LocalModel::render_prompt`] does, given the model's chat template alone: callers that
/// check training data against what is served need the tokenizer and template, not the weights.
pub fn render_prompt(template: &ChatTemplate, rendered: &RenderedRequest) -> Result<String, String> {
    let messages: Vec<Value> = openai::messages(rendered)
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let tools = chat_tools(&rendered.tools);
    let tools = (!tools.is_empty()).then_some(tools.as_slice());
    template.render_prompt(&messages, tools).map_err(|e| format!("cannot render the prompt: {e}"))
}

/// What [`LocalModel::prompt_ids`] does, given the model's tokenizer and chat template alone. The
/// text is tokenized whole, without added special tokens: the template writes its own.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    rendered: &RenderedRequest,
) -> Result<Vec<u32>, String> {
    let text = render_prompt(template, rendered)?;
    tokenizer.encode(&text, false).map_err(|e| format!("cannot tokenize: {e}"))
}

/// Tool definitions in the OpenAI shape apprentice-curate exports them in (all four fields), so
/// a template that writes them into the prompt writes what the student was trained on.
fn chat_tools(tools: &[ToolDefinition]) -> Vec<Value> {
    tools
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict,
            }})
        })
        .collect()
}

/// Resolves a `model` setting (cached name, GGUF path or HF folder) in `cache`. Errors tell how to
/// get the model: `apprentice model fetch NAME` for a known model that is not cached.
pub fn resolve(cache: &ModelCache, model: &str) -> Result<PathBuf, String> {
    match cache.resolve(model) {
        Ok(resolved) => Ok(resolved.path),
        Err(e @ CacheError::NotCached { .. }) => Err(e.to_string()),
        Err(e @ CacheError::Unresolvable { .. }) => Err(format!(
            "{e}; `apprentice model list` shows the cached models and `apprentice model fetch NAME` fetches a known one"
        )),
        Err(e) => Err(e.to_string()),
    }
}

type Registry = HashMap<(PathBuf, ServingSettings), Weak<LocalModel>>;

/// Loaded models by canonical path and settings. Weak references: a model lives as long as a
/// provider uses it.
fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The model at `path` served with `settings`, loaded once per process while any provider holds it.
pub fn shared_model(path: &Path, settings: &ServingSettings) -> Result<Arc<LocalModel>, String> {
    let path = path.canonicalize().map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let key = (path, settings.clone());
    // Held while loading, so two providers naming one model never load it twice.
    let mut models = registry().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(model) = models.get(&key).and_then(Weak::upgrade) {
        return Ok(model);
    }
    let model = Arc::new(LocalModel::load(&key.0, settings)?);
    models.retain(|_, weak| weak.strong_count() > 0);
    models.insert(key, Arc::downgrade(&model));
    Ok(model)
}

/// The scheduler figures of every loaded local model, by model path and weight format.
pub fn loaded_model_stats() -> Vec<(String, WeightFormat, SchedulerStats)> {
    let models = registry().lock().unwrap_or_else(PoisonError::into_inner);
    let mut stats: Vec<_> = models
        .values()
        .filter_map(Weak::upgrade)
        .map(|m| (m.path.display().to_string(), m.settings.weights, m.scheduler.stats()))
        .collect();
    stats.sort_by(|a, b| (&a.0, a.1.name()).cmp(&(&b.0, b.1.name())));
    stats
}

/// One configured local provider: a shared model and this provider's context limit.
#[derive(Clone)]
pub struct LocalProvider {
    name: String,
    model: Arc<LocalModel>,
    max_context: usize,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("name", &self.name)
            .field("model", &self.model.path)
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

/// What one call will run, prepared before any generation starts.
struct Job {
    request: Request,
    /// Parse `<tool_call>` blocks out of the output.
    tool_calls: bool,
}

impl LocalProvider {
    /// Resolves `model` in the default model cache and loads it (or reuses the loaded copy).
    pub fn from_config(
        name: &str,
        model: &str,
        max_context_tokens: Option<usize>,
        serving: ServingSettings,
    ) -> Result<Self, ProviderError> {
        let config_error = |message: String| ProviderError::Config { provider: name.to_string(), message };
        let cache = ModelCache::from_env().map_err(|e| config_error(e.to_string()))?;
        let path = resolve(&cache, model).map_err(config_error)?;
        let model = shared_model(&path, &serving).map_err(config_error)?;
        Self::new(name, model, max_context_tokens)
    }

    pub fn new(
        name: impl Into<String>,
        model: Arc<LocalModel>,
        max_context_tokens: Option<usize>,
    ) -> Result<Self, ProviderError> {
        let name = name.into();
        let limit = model.context_length();
        let max_context = match max_context_tokens {
            Some(n) if n > limit => {
                return Err(ProviderError::Config {
                    provider: name,
                    message: format!("max_context_tokens {n} exceeds the model's context length of {limit} tokens"),
                })
            }
            Some(n) => n,
            None => limit,
        };
        Ok(Self { name, model, max_context })
    }

    pub fn model(&self) -> &Arc<LocalModel> {
        &self.model
    }

    fn error(&self, message: impl Into<String>) -> ProviderError {
        ProviderError::Local { provider: self.name.clone(), message: message.into() }
    }

    /// Renders and tokenizes the prompt and fixes the sampling options; every error that does not
    /// need the model to run is found here.
    fn job(&self, request: &ModelRequest) -> Result<Job, ProviderError> {
        let prompt = self.model.prompt_ids(&request.rendered).map_err(|e| self.error(e))?;
        if prompt.is_empty() {
            return Err(self.error("the prompt is empty"));
        }
        let room = self.max_context.saturating_sub(prompt.len());
        if room == 0 {
            return Err(self.error(format!(
                "the prompt is {} tokens, which leaves no room to generate in the context of {} tokens",
                prompt.len(),
                self.max_context
            )));
        }
        let max_new_tokens = request.max_tokens.map_or(room, |n| (n as usize).min(room));
        let options = GenerateOptions {
            max_new_tokens,
            // OpenAI's defaults: temperature 1, no nucleus cut.
            temperature: request.temperature.unwrap_or(1.0),
            top_p: request.top_p,
            top_k: None,
            seed: request.seed.unwrap_or_else(rand::random),
            stop_token_ids: self.model.stop_token_ids.clone(),
            stop_strings: Vec::new(),
        };
        let tool_calls = !request.rendered.tools.is_empty() && request.tool_choice != ToolChoice::None;
        let prefix_key = request.episode_id.map(|id| id.to_string());
        Ok(Job { request: Request { prompt, options, prefix_key }, tool_calls })
    }

    /// Queues `job` on the model's scheduler and waits for it, `on_event` seeing the tokens as
    /// they come (on the scheduler's thread). Dropping the returned future (a client that hung up
    /// on a non-streamed call, whose answer nobody would see or record) takes the request out of
    /// the batch at the next step.
    async fn run(
        &self,
        job: Request,
        on_event: impl FnMut(StreamEvent<'_>) -> ControlFlow<()> + Send + 'static,
    ) -> Result<Completion, ProviderError> {
        let (done, outcome) = oneshot::channel();
        let prompt_tokens = job.prompt.len();
        let _ticket = self
            .model
            .scheduler
            .submit(
                job,
                Box::new(on_event),
                Box::new(move |outcome| {
                    let _ = done.send(outcome);
                }),
            )
            .map_err(|e| self.error(format!("cannot generate: {e}")))?
            .cancel_on_drop();
        match outcome.await {
            Ok(Ok(completion)) => {
                tracing::debug!(
                    prompt_tokens,
                    reused = completion.reused_tokens,
                    queued_ms = completion.queued.as_millis() as u64,
                    "local generation"
                );
                Ok(completion)
            }
            Ok(Err(e)) => Err(self.error(format!("generation failed: {e}"))),
            Err(_) => Err(self.error("the model's scheduler stopped before answering")),
        }
    }
}

fn usage(generation: &Generation) -> Usage {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Usage { input_tokens: count(generation.prompt_tokens), output_tokens: count(generation.completion_tokens) }
}

fn finish_reason(reason: FinishReason, has_calls: bool) -> String {
    match reason {
        _ if has_calls => "tool_calls",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
    .to_string()
}

#[async_trait]
impl Provider for LocalProvider {
    async fn infer(&self, request: &ModelRequest) -> Result<ProviderResponse, ProviderError> {
        let job = self.job(request)?;
        let mut splitter = ToolCallSplitter::new(job.tool_calls);
        let completion = self.run(job.request, |_| ControlFlow::Continue(())).await?;
        let generation = &completion.generation;
        let mut text = splitter.push(generation.text.as_deref().unwrap_or_default());
        let (rest, calls) = splitter.finish();
        text.push_str(&rest);
        let mut content = Vec::with_capacity(calls.len() + 1);
        if !text.is_empty() {
            content.push(ContentBlock::Text { text });
        }
        let has_calls = !calls.is_empty();
        content.extend(calls.into_iter().map(ContentBlock::ToolCall));
        Ok(ProviderResponse {
            content,
            usage: usage(generation),
            finish_reason: Some(finish_reason(generation.finish_reason, has_calls)),
            compute_ms: Some(completion.compute.as_secs_f64() * 1000.0),
        })
    }

    async fn infer_stream(&self, request: &ModelRequest) -> Result<ChunkStream, ProviderError> {
        let job = self.job(request)?;
        // Unbounded: the scheduler's thread must never wait for a slow reader (the whole batch
        // would wait), and a stream holds at most `max_tokens` pieces.
        let (tx, rx) = mpsc::unbounded_channel::<Result<StreamChunk, ProviderError>>();
        let splitter = Arc::new(Mutex::new(ToolCallSplitter::new(job.tool_calls)));
        let on_event = {
            let tx = tx.clone();
            let splitter = splitter.clone();
            move |event: StreamEvent<'_>| {
                let delta = match event {
                    StreamEvent::Token { text_delta, .. } | StreamEvent::Finished { text_delta, .. } => text_delta,
                };
                let text = splitter.lock().unwrap_or_else(PoisonError::into_inner).push(delta);
                if text.is_empty() {
                    return ControlFlow::Continue(());
                }
                match tx.send(Ok(StreamChunk { text: Some(text), ..StreamChunk::default() })) {
                    Ok(()) => ControlFlow::Continue(()),
                    // Nobody reads the stream any more: stop generating.
                    Err(_) => ControlFlow::Break(()),
                }
            }
        };
        let provider = self.clone();
        tokio::spawn(async move {
            let completion = match provider.run(job.request, on_event).await {
                Ok(completion) => completion,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let splitter = std::mem::take(&mut *splitter.lock().unwrap_or_else(PoisonError::into_inner));
            let (rest, calls) = splitter.finish();
            let has_calls = !calls.is_empty();
            let tool_calls = calls
                .into_iter()
                .enumerate()
                .map(|(index, call)| ToolCallDelta {
                    index,
                    id: Some(call.id),
                    name: Some(call.name),
                    arguments: call.arguments,
                })
                .collect();
            let last = StreamChunk {
                text: (!rest.is_empty()).then_some(rest),
                tool_calls,
                usage: Some(usage(&completion.generation)),
                finish_reason: Some(finish_reason(completion.generation.finish_reason, has_calls)),
                compute_ms: Some(completion.compute.as_secs_f64() * 1000.0),
            };
            let _ = tx.send(Ok(last));
        });
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }
}

/// Separates text from `<tool_call>` blocks as text arrives, with the same result however the
/// text is cut into pieces: text before the first block is released as it comes (holding back
/// what could be the start of `<tool_call>`); from the first block on, everything is kept until
/// [`ToolCallSplitter::finish`] parses it.
#[derive(Debug, Default)]
pub struct ToolCallSplitter {
    enabled: bool,
    held: String,
    in_calls: bool,
}

impl ToolCallSplitter {
    /// A splitter that passes all text through when not `enabled` (no tools offered).
    pub fn new(enabled: bool) -> Self {
        Self { enabled, ..Self::default() }
    }

    /// Takes the next piece of text; returns the text that can be released now.
    pub fn push(&mut self, delta: &str) -> String {
        if !self.enabled {
            return delta.to_string();
        }
        self.held.push_str(delta);
        if self.in_calls {
            return String::new();
        }
        if let Some(at) = self.held.find(CALL_OPEN) {
            self.in_calls = true;
            return self.held.drain(..at).collect();
        }
        // The longest tail that could begin `<tool_call>` waits for the next piece.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.held.len() - i < CALL_OPEN.len() && CALL_OPEN.starts_with(&self.held[i..]))
            .unwrap_or(self.held.len());
        self.held.drain(..keep_from).collect()
    }

    /// The rest of the text and the tool calls. Blocks that do not hold a `{"name": ..,
    /// "arguments": ..}` object stay text; whitespace between blocks is dropped.
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        if !self.in_calls {
            return (self.held, Vec::new());
        }
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut rest = self.held.as_str();
        while let Some(open) = rest.find(CALL_OPEN) {
            text.push_str(&rest[..open]);
            let body_start = open + CALL_OPEN.len();
            let (body, block_end) = match rest[body_start..].find(CALL_CLOSE) {
                Some(close) => (&rest[body_start..body_start + close], body_start + close + CALL_CLOSE.len()),
                // Cut off (max_tokens): a block that still parses is kept.
                None => (&rest[body_start..], rest.len()),
            };
            match parse_call(body) {
                Some((name, arguments)) => calls.push(ToolCall { id: call_id(), name, arguments }),
                None => text.push_str(&rest[open..block_end]),
            }
            rest = &rest[block_end..];
        }
        text.push_str(rest);
        (text.trim().to_string(), calls)
    }
}

/// `{"name": "...", "arguments": {...}}` (arguments may also be JSON text, or absent) → name and
/// arguments as JSON text.
fn parse_call(body: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    };
    Some((name, arguments))
}

/// A fresh id per call, as OpenAI gives, so tool results of different turns never collide.
fn call_id() -> String {
    format!("call_{}", apprentice_core::new_id().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pieces: &[&str], enabled: bool) -> (String, Vec<(String, String)>) {
        let mut splitter = ToolCallSplitter::new(enabled);
        let mut text: String = pieces.iter().map(|p| splitter.push(p)).collect();
        let (rest, calls) = splitter.finish();
        text.push_str(&rest);
        (text, calls.into_iter().map(|c| (c.name, c.arguments)).collect())
    }

    #[test]
    fn tool_calls_are_parsed_however_the_text_is_cut() {
        let full = "I will move.\n<tool_call>\n{\"name\": \"move\", \"arguments\": {\"to\": \"left\"}}\n</tool_call>\n\
                    <tool_call>\n{\"name\": \"look\"}\n</tool_call>";
        let expected = (
            "I will move.\n".to_string(),
            vec![("move".to_string(), "{\"to\":\"left\"}".to_string()), ("look".to_string(), "{}".to_string())],
        );
        assert_eq!(split(&[full], true), expected);
        let chars: Vec<String> = full.chars().map(String::from).collect();
        assert_eq!(split(&chars.iter().map(String::as_str).collect::<Vec<_>>(), true), expected);
        for cut in 1..full.len() {
            if full.is_char_boundary(cut) {
                assert_eq!(split(&[&full[..cut], &full[cut..]], true), expected, "cut at {cut}");
            }
        }
    }

    #[test]
    fn text_passes_through_and_bad_blocks_stay_text() {
        assert_eq!(split(&["go <tool", "_call> left"], false), ("go <tool_call> left".into(), vec![]));
        assert_eq!(split(&["a < b and <tool", "_cal"], true), ("a < b and <tool_cal".into(), vec![]));
        let bad = "<tool_call>not json</tool_call>";
        assert_eq!(split(&[bad], true), (bad.into(), vec![]));
        let cut = "<tool_call>\n{\"name\": \"move\", \"argu";
        assert_eq!(split(&[cut], true), (cut.into(), vec![]));
        let unterminated = "<tool_call>\n{\"name\": \"move\", \"arguments\": \"{}\"}";
        assert_eq!(split(&[unterminated], true), (String::new(), vec![("move".into(), "{}".into())]));
        assert_eq!(split(&["héllo wörld"], true), ("héllo wörld".into(), vec![]));
    }
}
