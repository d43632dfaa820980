//! One inference, independent of the API it arrived through: choose the variant, validate and
//! render the structured input, call the model, build the output and record it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apprentice_core::config::{
    FunctionConfig, FunctionKind, JsonMode, Schema, ToolChoice, VariantConfig, DEFAULT_FUNCTION,
};
use apprentice_core::record::RenderedRequest;
use apprentice_core::render::render_input;
use apprentice_core::{
    new_id, ContentBlock, InferenceOutput, InferenceRecord, Input, JsonOutput, ToolDefinition, Usage,
};
use apprentice_store::Record;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::ApiError;
use crate::providers::{AllProvidersFailed, ChunkStream, ModelRequest, ModelRouter, ProviderResponse, Routed};
use crate::server::Gateway;

/// What the caller asked for.
#[derive(Debug, Clone)]
pub enum Target {
    Function(String),
    Model(String),
}

/// Sampling parameters a request may override for this call only.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamOverrides {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub seed: Option<u64>,
}

/// An inference request after API-specific parsing.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub target: Target,
    pub input: Input,
    pub episode_id: Option<Uuid>,
    pub variant_name: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub params: ParamOverrides,
    pub dryrun: bool,
    /// Tools given with the request (OpenAI-style), offered in addition to the function's.
    pub extra_tools: Vec<ToolDefinition>,
    pub tool_choice: Option<ToolChoice>,
}

/// A request that passed validation and rendering, ready to send to the model.
pub struct Prepared {
    pub inference_id: Uuid,
    pub episode_id: Uuid,
    pub function_name: String,
    pub variant_name: String,
    pub kind: FunctionKind,
    pub model_name: String,
    pub router: Arc<ModelRouter>,
    pub model_request: ModelRequest,
    pub input: Input,
    pub tags: BTreeMap<String, String>,
    pub dryrun: bool,
    retries: apprentice_core::config::RetryConfig,
    output_schema: Option<Schema>,
    started: Instant,
}

impl Prepared {
    /// Time since the request arrived.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The answer of a finished inference.
pub struct Completed {
    pub record: InferenceRecord,
}

impl Gateway {
    /// Validates and renders a request without calling any model.
    pub fn prepare(&self, request: InferenceRequest) -> Result<Prepared, ApiError> {
        let started = Instant::now();
        let episode_id = request.episode_id.unwrap_or_else(new_id);
        // Only an episode the caller names can have a next turn that continues this call.
        let continued_episode = request.episode_id;
        let (function_name, function, variant_name, variant) = match &request.target {
            Target::Function(name) => {
                let function = self.config.function(name).ok_or_else(|| {
                    ApiError::not_found(
                        "unknown_function",
                        "function_name",
                        format!("no function named `{name}` in the configuration"),
                    )
                })?;
                let (variant_name, variant) =
                    choose_variant(name, function, request.variant_name.as_deref(), episode_id)?;
                (name.clone(), Some(function), variant_name, variant.clone())
            }
            Target::Model(name) => {
                if !self.routers.contains_key(name) {
                    return Err(ApiError::not_found(
                        "unknown_model",
                        "model_name",
                        format!("no model named `{name}` in the configuration"),
                    ));
                }
                if let Some(v) = &request.variant_name {
                    if v != name {
                        return Err(ApiError::bad_request(
                            "unknown_variant",
                            "variant_name",
                            "a direct model call has exactly one variant: the model itself",
                        ));
                    }
                }
                (DEFAULT_FUNCTION.to_string(), None, name.clone(), model_variant(name))
            }
        };
        let router = self.routers.get(&variant.model).cloned().ok_or_else(|| {
            ApiError::upstream(format!("variant `{variant_name}` names model `{}` that has no router", variant.model))
        })?;

        let rendered = render_input(&self.config.templates, &function_name, function, &variant_name, &request.input)
            .map_err(|e| ApiError::bad_request(e.kind, e.field, e.message))?;
        let mut tools = function.map(|f| self.config.tools_of(f)).unwrap_or_default();
        for tool in request.extra_tools {
            if tools.iter().any(|t| t.name == tool.name) {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "tools",
                    format!("tool `{}` is already defined by the function", tool.name),
                ));
            }
            tools.push(tool);
        }
        let kind = function.map(|f| f.kind).unwrap_or_default();
        let output_schema = function.and_then(|f| f.output_schema.clone());
        let model_request = ModelRequest {
            rendered: RenderedRequest { tools, ..rendered },
            tool_choice: request.tool_choice.or_else(|| function.map(|f| f.tool_choice.clone())).unwrap_or_default(),
            parallel_tool_calls: function.and_then(|f| f.parallel_tool_calls),
            temperature: request.params.temperature.or(variant.temperature),
            top_p: request.params.top_p.or(variant.top_p),
            max_tokens: request.params.max_tokens.or(variant.max_tokens),
            seed: request.params.seed.or(variant.seed),
            episode_id: continued_episode,
            json_mode: (kind == FunctionKind::Json).then_some(variant.json_mode),
            output_schema: output_schema.as_ref().map(|s| s.value.clone()),
        };
        Ok(Prepared {
            inference_id: new_id(),
            episode_id,
            function_name,
            variant_name,
            kind,
            model_name: variant.model.clone(),
            router,
            model_request,
            input: request.input,
            tags: request.tags,
            dryrun: request.dryrun,
            retries: variant.retries,
            output_schema,
            started,
        })
    }

    /// Calls the model, retrying the whole routing chain as the variant allows.
    pub async fn call(&self, prepared: &Prepared) -> Result<Routed<ProviderResponse>, ApiError> {
        self.with_retries(prepared, || prepared.router.infer(&prepared.model_request)).await
    }

    /// Starts a streamed answer; only failures before the first chunk are retried.
    pub async fn call_stream(&self, prepared: &Prepared) -> Result<Routed<ChunkStream>, ApiError> {
        self.with_retries(prepared, || prepared.router.infer_stream(&prepared.model_request)).await
    }

    async fn with_retries<T, F, Fut>(&self, prepared: &Prepared, attempt_once: F) -> Result<Routed<T>, ApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Routed<T>, AllProvidersFailed>>,
    {
        let mut attempt = 0;
        loop {
            match self.note_failures(prepared, attempt_once().await) {
                Ok(routed) => return Ok(routed),
                Err(e) if attempt >= prepared.retries.num_retries => return Err(ApiError::upstream(e.to_string())),
                Err(_) => {
                    tokio::time::sleep(backoff(attempt, prepared.retries.max_delay_s)).await;
                    attempt += 1;
                }
            }
        }
    }

    fn note_failures<T>(
        &self,
        prepared: &Prepared,
        result: Result<Routed<T>, AllProvidersFailed>,
    ) -> Result<Routed<T>, AllProvidersFailed> {
        let failures = match &result {
            Ok(routed) => &routed.failures,
            Err(all) => &all.failures,
        };
        // The router already logs each failure; here it is only counted.
        for (provider, _) in failures {
            self.metrics.provider_error(&prepared.model_name, provider);
        }
        result
    }

    /// Turns the model's answer into a record and writes it (unless dry run). Returns once the
    /// record is as durable as the store's write mode promises.
    pub async fn finish(
        &self,
        prepared: Prepared,
        provider_name: String,
        response: ProviderResponse,
        ttft: Option<Duration>,
    ) -> Result<Completed, ApiError> {
        let latency = prepared.started.elapsed();
        let output = match prepared.kind {
            FunctionKind::Chat => InferenceOutput::Chat { content: response.content },
            FunctionKind::Json => {
                InferenceOutput::Json(json_output(&response.content, prepared.output_schema.as_ref()))
            }
        };
        let cost = prepared.router.price().map(|p| {
            let compute_ms = response.compute_ms.unwrap_or(latency.as_secs_f64() * 1000.0);
            p.cost(response.usage.input_tokens, response.usage.output_tokens, compute_ms)
        });
        let record = InferenceRecord {
            id: prepared.inference_id,
            function_name: prepared.function_name,
            variant_name: prepared.variant_name,
            episode_id: prepared.episode_id,
            input: prepared.input,
            params: params_json(&prepared.model_request),
            rendered: prepared.model_request.rendered,
            output,
            model_name: prepared.model_name,
            provider_name,
            usage: response.usage,
            latency_ms: latency.as_secs_f64() * 1e3,
            ttft_ms: ttft.map(|t| t.as_secs_f64() * 1e3),
            cost,
            tags: prepared.tags,
            finish_reason: response.finish_reason,
            created_at: chrono::Utc::now(),
        };
        self.metrics.inference(&record.function_name, &record.variant_name);
        if !prepared.dryrun {
            self.recorder.record(Record::Inference(Box::new(record.clone()))).await?;
        }
        Ok(Completed { record })
    }
}

/// A pinned variant is used as is (even with weight 0, so it can be tested before it takes
/// traffic); otherwise variants are sampled by weight with a draw derived from the episode id, so
/// every inference of an episode gets the same variant without any shared state.
fn choose_variant<'a>(
    function_name: &str,
    function: &'a FunctionConfig,
    pinned: Option<&str>,
    episode_id: Uuid,
) -> Result<(String, &'a VariantConfig), ApiError> {
    if let Some(name) = pinned {
        return function.variants.get(name).map(|v| (name.to_string(), v)).ok_or_else(|| {
            ApiError::not_found(
                "unknown_variant",
                "variant_name",
                format!("function `{function_name}` has no variant `{name}`"),
            )
        });
    }
    let total: f64 = function.variants.values().map(|v| v.weight).sum();
    let mut draw = sticky_uniform(episode_id, function_name) * total;
    let mut last = None;
    for (name, variant) in function.variants.iter().filter(|(_, v)| v.weight > 0.0) {
        if draw < variant.weight {
            return Ok((name.clone(), variant));
        }
        draw -= variant.weight;
        last = Some((name.clone(), variant));
    }
    // Rounding can leave the draw a hair past the last bucket; config validation guarantees one exists.
    last.ok_or_else(|| ApiError::upstream(format!("function `{function_name}` has no variant with positive weight")))
}

/// A number in [0, 1) fixed by (episode, function): FNV-1a, stable across processes and versions.
fn sticky_uniform(episode_id: Uuid, function_name: &str) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in episode_id.as_bytes().iter().chain(function_name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche so nearby ids spread over the whole interval.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

fn model_variant(model: &str) -> VariantConfig {
    VariantConfig {
        model: model.to_string(),
        weight: 1.0,
        template_names: Vec::new(),
        temperature: None,
        top_p: None,
        max_tokens: None,
        seed: None,
        history_turns: None,
        json_mode: JsonMode::Off,
        retries: Default::default(),
    }
}

fn backoff(attempt: u32, max_delay_s: f64) -> Duration {
    Duration::from_secs_f64((0.1 * 2f64.powi(attempt as i32)).min(max_delay_s.max(0.0)))
}

fn json_output(content: &[ContentBlock], schema: Option<&Schema>) -> JsonOutput {
    let raw: String = content
        .iter()
        .map(|block| match block {
            ContentBlock::Text { text } => text.as_str(),
            // Some providers answer json functions through a tool call; its arguments are the JSON.
            ContentBlock::ToolCall(call) => call.arguments.as_str(),
            _ => "",
        })
        .collect();
    let parsed =
        serde_json::from_str::<Value>(&raw).ok().filter(|value| schema.is_none_or(|s| s.validate(value).is_ok()));
    JsonOutput { raw, parsed }
}

fn params_json(request: &ModelRequest) -> Value {
    let mut params = json!({
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "seed": request.seed,
    });
    if let Some(mode) = request.json_mode {
        params["json_mode"] = json!(mode);
    }
    params
}

/// Usage as the native API reports it.
pub fn usage_json(usage: &Usage) -> Value {
    json!({"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_draw_is_deterministic_and_spread() {
        let id = new_id();
        assert_eq!(sticky_uniform(id, "f"), sticky_uniform(id, "f"));
        let draws: Vec<f64> = (0..2000).map(|_| sticky_uniform(new_id(), "f")).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let below_half = draws.iter().filter(|d| **d < 0.5).count();
        assert!((850..1150).contains(&below_half), "draws are not uniform: {below_half}/2000 below 0.5");
    }

    #[test]
    fn json_output_parses_and_checks_schema() {
        let schema = Schema::compile(json!({"type": "object", "required": ["a"]})).unwrap();
        let ok = json_output(&[ContentBlock::Text { text: "{\"a\": 1}".into() }], Some(&schema));
        assert_eq!(ok.parsed, Some(json!({"a": 1})));
        let wrong = json_output(&[ContentBlock::Text { text: "{\"b\": 1}".into() }], Some(&schema));
        assert_eq!(wrong.parsed, None);
        assert_eq!(wrong.raw, "{\"b\": 1}");
        let broken = json_output(&[ContentBlock::Text { text: "{oops".into() }], None);
        assert_eq!(broken.parsed, None);
    }
}
