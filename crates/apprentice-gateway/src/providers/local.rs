//! A model run inside the gateway process (`type = "local"`): a student checkpoint or a base model
//! from the model cache, served with candle.
//!
//! - **Loading.** Weights are loaded when the gateway starts (when its routers are built), not on
//!   the first call: a missing or broken model is a startup error naming the config key, as for
//!   every other provider, and the first request does not pay the load. Providers that name the
//!   same file or folder share one loaded copy (a process-wide registry keyed by the resolved,
//!   canonical path, holding weak references so a dropped gateway frees its models).
//! - **Prompt.** The rendered request (system, messages, tools) is turned into OpenAI chat messages
//!   exactly as the OpenAI provider sends them and as apprentice-curate exports training examples,
//!   then rendered with the model's own chat template ([`ChatTemplate::render_prompt`]), so the
//!   student is served the text it was trained on.
//! - **Generation** runs on tokio's blocking pool. One generation runs at a time per loaded model
//!   (a mutex): on a CPU every generation already uses all cores through candle's matmuls, so
//!   running two at once would only interleave them; requests queue instead. Batching concurrent
//!   requests would raise throughput and is not done yet.
//! - **Tool calls.** Templates that do not render tools natively (SmolLM2's) get the tool schemas
//!   in the system message and write calls as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
//!   (apprentice-model's convention); such blocks in the output become tool calls when tools were
//!   offered. Streams send text up to the first `<tool_call>`, then the calls at the end.
//! - Usage is the prompt's and the generation's token counts (a final stop token included); local
//!   inference has no price, so models whose providers are all local cost 0.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Instant;

use apprentice_core::config::ToolChoice;
use apprentice_core::record::RenderedRequest;
use apprentice_core::{ContentBlock, ToolCall, ToolDefinition, Usage};
use apprentice_model::cache::{CacheError, ModelCache};
use apprentice_model::{
    generate_stream_reusing, ChatTemplate, FinishReason, GenerateOptions, Generation, Llama, PrefixCache, StreamEvent,
    Tokenizer,
};
use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::openai;
use super::{ChunkStream, ModelRequest, Provider, ProviderError, ProviderResponse, StreamChunk, ToolCallDelta};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// A loaded model with its tokenizer and chat template, shared by every provider that names it.
pub struct LocalModel {
    path: PathBuf,
    model: Llama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    stop_token_ids: Vec<u32>,
    /// One generation at a time (see the module docs), with the KV cache of the last one: an
    /// agent's next turn extends the conversation it just had, and only the new tokens are
    /// prefilled.
    busy: Mutex<PrefixCache>,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel").field("path", &self.path).finish_non_exhaustive()
    }
}

impl LocalModel {
    /// Loads the model, tokenizer and chat template at `path` (a GGUF file or an HF folder).
    pub fn load(path: &Path) -> Result<Self, String> {
        let started = Instant::now();
        let device = candle_core::Device::cuda_if_available(0).unwrap_or(candle_core::Device::Cpu);
        let loaded = apprentice_model::load(path, &device).map_err(|e| format!("cannot load the model: {e}"))?;
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
        tracing::info!(model = %path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "local model loaded");
        Ok(Self {
            path: path.to_path_buf(),
            // Serving never trains: the detached copy shares the weights and builds no graph.
            model: loaded.model.detached(),
            tokenizer,
            template,
            stop_token_ids,
            busy: Mutex::new(PrefixCache::default()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The ids that end a generation: the model's eos ids and the tokenizer's.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// The model's own context length.
    pub fn context_length(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// The prompt text for `rendered`: OpenAI-shaped messages and tools through the chat template.
    pub fn render_prompt(&self, rendered: &RenderedRequest) -> Result<String, String> {
        let messages: Vec<Value> = openai::messages(rendered)
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let tools = chat_tools(&rendered.tools);
        let tools = (!tools.is_empty()).then_some(tools.as_slice());
        self.template.render_prompt(&messages, tools).map_err(|e| format!("cannot render the prompt: {e}"))
    }
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

/// Loaded models by canonical path. Weak references: a model lives as long as a provider uses it.
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<LocalModel>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Weak<LocalModel>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The model at `path`, loaded once per process while any provider holds it.
pub fn shared_model(path: &Path) -> Result<Arc<LocalModel>, String> {
    let key = path.canonicalize().map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // Held while loading, so two providers naming one model never load it twice.
    let mut models = registry().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(model) = models.get(&key).and_then(Weak::upgrade) {
        return Ok(model);
    }
    let model = Arc::new(LocalModel::load(&key)?);
    models.retain(|_, weak| weak.strong_count() > 0);
    models.insert(key, Arc::downgrade(&model));
    Ok(model)
}

/// One configured local provider: a shared model, this provider's context limit and threads.
#[derive(Clone)]
pub struct LocalProvider {
    name: String,
    model: Arc<LocalModel>,
    max_context: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
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
    prompt: Vec<u32>,
    options: GenerateOptions,
    /// Parse `<tool_call>` blocks out of the output.
    tool_calls: bool,
}

impl LocalProvider {
    /// Resolves `model` in the default model cache and loads it (or reuses the loaded copy).
    pub fn from_config(
        name: &str,
        model: &str,
        max_context_tokens: Option<usize>,
        threads: Option<usize>,
    ) -> Result<Self, ProviderError> {
        let config_error = |message: String| ProviderError::Config { provider: name.to_string(), message };
        let cache = ModelCache::from_env().map_err(|e| config_error(e.to_string()))?;
        let path = resolve(&cache, model).map_err(config_error)?;
        let model = shared_model(&path).map_err(config_error)?;
        Self::new(name, model, max_context_tokens, threads)
    }

    pub fn new(
        name: impl Into<String>,
        model: Arc<LocalModel>,
        max_context_tokens: Option<usize>,
        threads: Option<usize>,
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
        let pool = match threads {
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("apprentice-local-{i}"))
                    .build()
                    .map_err(|e| ProviderError::Config { provider: name.clone(), message: e.to_string() })?,
            )),
            None => None,
        };
        Ok(Self { name, model, max_context, pool })
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
        let text = self.model.render_prompt(&request.rendered).map_err(|e| self.error(e))?;
        let prompt =
            self.model.tokenizer.encode(&text, false).map_err(|e| self.error(format!("cannot tokenize: {e}")))?;
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
        Ok(Job { prompt, options, tool_calls })
    }

    /// Runs `job` on the blocking pool, one generation per model at a time, calling `on_event`
    /// as tokens come. Dropping the returned future (a client that hung up on a non-streamed
    /// call, whose answer nobody would see or record) stops the generation at its next token.
    async fn run(
        &self,
        job: Job,
        mut on_event: impl FnMut(StreamEvent<'_>) -> ControlFlow<()> + Send + 'static,
    ) -> Result<Generation, ProviderError> {
        let model = self.model.clone();
        let pool = self.pool.clone();
        let name = self.name.clone();
        let abandoned = Arc::new(AtomicBool::new(false));
        let _on_drop = SetOnDrop(abandoned.clone());
        let on_event = move |event: StreamEvent<'_>| {
            if abandoned.load(Ordering::Relaxed) {
                return ControlFlow::Break(());
            }
            on_event(event)
        };
        let task = tokio::task::spawn_blocking(move || {
            let mut turn = model.busy.lock().unwrap_or_else(PoisonError::into_inner);
            // The cache itself, not the guard, goes to the pool's thread (a guard is not Send).
            let prefix: &mut PrefixCache = &mut turn;
            let decode = |ids: &[u32]| model.tokenizer.decode(ids, true).unwrap_or_default();
            let generate =
                || generate_stream_reusing(&model.model, &job.prompt, &job.options, Some(&decode), prefix, on_event);
            let result = match &pool {
                Some(pool) => pool.install(generate),
                None => generate(),
            };
            result.map(|(generation, reused)| {
                tracing::debug!(prompt_tokens = job.prompt.len(), reused, "local generation");
                generation
            })
        });
        match task.await {
            Ok(Ok(generation)) => Ok(generation),
            Ok(Err(e)) => Err(ProviderError::Local { provider: name, message: format!("generation failed: {e}") }),
            Err(e) => Err(ProviderError::Local { provider: name, message: format!("generation panicked: {e}") }),
        }
    }
}

/// Raises its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
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
        let generation = self.run(job, |_| ControlFlow::Continue(())).await?;
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
            usage: usage(&generation),
            finish_reason: Some(finish_reason(generation.finish_reason, has_calls)),
        })
    }

    async fn infer_stream(&self, request: &ModelRequest) -> Result<ChunkStream, ProviderError> {
        let job = self.job(request)?;
        let (tx, rx) = mpsc::channel::<Result<StreamChunk, ProviderError>>(64);
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
                // Runs on the blocking pool, where waiting for the consumer is allowed.
                match tx.blocking_send(Ok(StreamChunk { text: Some(text), ..StreamChunk::default() })) {
                    Ok(()) => ControlFlow::Continue(()),
                    // Nobody reads the stream any more: stop generating.
                    Err(_) => ControlFlow::Break(()),
                }
            }
        };
        let provider = self.clone();
        tokio::spawn(async move {
            let generation = match provider.run(job, on_event).await {
                Ok(generation) => generation,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
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
                usage: Some(usage(&generation)),
                finish_reason: Some(finish_reason(generation.finish_reason, has_calls)),
            };
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
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
