//! `POST /inference` and `POST /feedback`, in the shape users of LLM gateways know.

use std::collections::BTreeMap;
use std::sync::Arc;

use apprentice_core::config::{FunctionKind, MetricType};
use apprentice_core::{
    new_id, ContentBlock, FeedbackRecord, FeedbackValue, InferenceOutput, InferenceRecord, Input, JsonOutput,
    MetricLevel,
};
use apprentice_store::Record;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::{parse_body, ApiError};
use crate::inference::{usage_json, InferenceRequest, ParamOverrides, Prepared, Target};
use crate::providers::StreamChunk;
use crate::server::Gateway;
use crate::stream::{self, StreamFormat};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeInference {
    function_name: Option<String>,
    model_name: Option<String>,
    #[serde(default)]
    input: Input,
    episode_id: Option<Uuid>,
    variant_name: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    params: ParamOverrides,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    dryrun: bool,
}

pub async fn inference(State(gateway): State<Arc<Gateway>>, body: Bytes) -> Result<Response, ApiError> {
    let request: NativeInference = parse_body(&body)?;
    let target = match (request.function_name, request.model_name) {
        (Some(function), None) => Target::Function(function),
        (None, Some(model)) => Target::Model(model),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "model_name",
                "give function_name or model_name, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::bad_request("invalid_request", "function_name", "give function_name or model_name"))
        }
    };
    let prepared = gateway.prepare(InferenceRequest {
        target,
        input: request.input,
        episode_id: request.episode_id,
        variant_name: request.variant_name,
        tags: request.tags,
        params: request.params,
        dryrun: request.dryrun,
        extra_tools: Vec::new(),
        tool_choice: None,
    })?;
    if request.stream {
        let routed = gateway.call_stream(&prepared).await?;
        return Ok(stream::respond(gateway.clone(), prepared, routed.provider_name, routed.value, NativeStream)
            .into_response());
    }
    let routed = gateway.call(&prepared).await?;
    let completed = gateway.finish(prepared, routed.provider_name, routed.value, None).await?;
    Ok(Json(inference_response(&completed.record)).into_response())
}

fn inference_response(record: &InferenceRecord) -> Value {
    let mut body = json!({
        "inference_id": record.id,
        "episode_id": record.episode_id,
        "variant_name": record.variant_name,
        "usage": usage_json(&record.usage),
        "finish_reason": record.finish_reason,
    });
    match &record.output {
        InferenceOutput::Chat { content } => body["content"] = json!(content),
        InferenceOutput::Json(output) => body["output"] = json!(output),
    }
    body
}

struct NativeStream;

impl StreamFormat for NativeStream {
    fn chunk(&mut self, prepared: &Prepared, chunk: &StreamChunk) -> Option<Value> {
        let mut event = json!({
            "inference_id": prepared.inference_id,
            "episode_id": prepared.episode_id,
            "variant_name": prepared.variant_name,
        });
        if prepared.kind == FunctionKind::Json {
            let raw: String =
                chunk.text.iter().cloned().chain(chunk.tool_calls.iter().map(|d| d.arguments.clone())).collect();
            if raw.is_empty() {
                return None;
            }
            event["raw"] = json!(raw);
            return Some(event);
        }
        let mut content = Vec::new();
        if let Some(text) = &chunk.text {
            content.push(json!({"type": "text", "id": "0", "text": text}));
        }
        for delta in &chunk.tool_calls {
            content.push(json!({"type": "tool_call", "index": delta.index, "id": delta.id, "name": delta.name, "arguments": delta.arguments}));
        }
        if content.is_empty() {
            return None;
        }
        event["content"] = json!(content);
        Some(event)
    }

    fn finish(&mut self, record: &InferenceRecord) -> Option<Value> {
        Some(json!({
            "inference_id": record.id,
            "episode_id": record.episode_id,
            "variant_name": record.variant_name,
            "content": [],
            "usage": usage_json(&record.usage),
            "finish_reason": record.finish_reason,
        }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeFeedback {
    metric_name: String,
    value: Value,
    inference_id: Option<Uuid>,
    episode_id: Option<Uuid>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    dryrun: bool,
}

pub async fn feedback(State(gateway): State<Arc<Gateway>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: NativeFeedback = parse_body(&body)?;
    let (level, target_id) = target_of(&gateway, &request)?;
    let inference = match level {
        MetricLevel::Inference => Some(find_inference(&gateway, target_id).await?),
        MetricLevel::Episode => {
            ensure_episode(&gateway, target_id).await?;
            None
        }
    };
    let value = feedback_value(&gateway, &request, inference.as_ref())?;
    let record = FeedbackRecord {
        id: new_id(),
        metric_name: request.metric_name,
        target_level: level,
        target_id,
        value,
        tags: request.tags,
        created_at: chrono::Utc::now(),
    };
    if !request.dryrun {
        gateway.recorder.record(Record::Feedback(Box::new(record.clone()))).await?;
    }
    Ok(Json(json!({"feedback_id": record.id})))
}

/// The metric's level decides which id the feedback must carry.
fn target_of(gateway: &Gateway, request: &NativeFeedback) -> Result<(MetricLevel, Uuid), ApiError> {
    let name = request.metric_name.as_str();
    let level = match name {
        "demonstration" => Some(MetricLevel::Inference),
        "comment" => None,
        _ => Some(
            gateway
                .config
                .metrics
                .get(name)
                .ok_or_else(|| {
                    ApiError::not_found(
                        "unknown_metric",
                        "metric_name",
                        format!("no metric named `{name}` in the configuration"),
                    )
                })?
                .level,
        ),
    };
    match (level, request.inference_id, request.episode_id) {
        (_, Some(_), Some(_)) => {
            Err(ApiError::bad_request("invalid_request", "episode_id", "give inference_id or episode_id, not both"))
        }
        (Some(MetricLevel::Inference) | None, Some(id), None) => Ok((MetricLevel::Inference, id)),
        (Some(MetricLevel::Episode) | None, None, Some(id)) => Ok((MetricLevel::Episode, id)),
        (Some(MetricLevel::Inference), None, _) => Err(ApiError::bad_request(
            "wrong_level",
            "inference_id",
            format!("metric `{name}` is inference-level: give inference_id"),
        )),
        (Some(MetricLevel::Episode), _, None) => Err(ApiError::bad_request(
            "wrong_level",
            "episode_id",
            format!("metric `{name}` is episode-level: give episode_id"),
        )),
        (None, None, None) => {
            Err(ApiError::bad_request("invalid_request", "inference_id", "give inference_id or episode_id"))
        }
    }
}

/// In async write mode a just-acknowledged inference may still sit in the queue: flush once before
/// concluding that it does not exist.
async fn find_inference(gateway: &Gateway, id: Uuid) -> Result<InferenceRecord, ApiError> {
    if let Some(found) = gateway.store.inference(id).await? {
        return Ok(found);
    }
    gateway.recorder.flush().await?;
    gateway
        .store
        .inference(id)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_inference", "inference_id", format!("no inference with id {id}")))
}

async fn ensure_episode(gateway: &Gateway, id: Uuid) -> Result<(), ApiError> {
    if gateway.store.episode_exists(id).await? {
        return Ok(());
    }
    gateway.recorder.flush().await?;
    if gateway.store.episode_exists(id).await? {
        return Ok(());
    }
    Err(ApiError::not_found("unknown_episode", "episode_id", format!("no episode with id {id}")))
}

fn feedback_value(
    gateway: &Gateway,
    request: &NativeFeedback,
    inference: Option<&InferenceRecord>,
) -> Result<FeedbackValue, ApiError> {
    let wrong_type = |expected: &str| {
        ApiError::bad_request(
            "invalid_value",
            "value",
            format!("metric `{}` takes {expected}, got {}", request.metric_name, kind_of(&request.value)),
        )
    };
    match request.metric_name.as_str() {
        "comment" => {
            request.value.as_str().map(|s| FeedbackValue::Comment(s.to_string())).ok_or_else(|| wrong_type("a string"))
        }
        "demonstration" => {
            // target_of guarantees an inference for demonstrations.
            let inference = inference.ok_or_else(|| {
                ApiError::bad_request("wrong_level", "inference_id", "a demonstration needs inference_id")
            })?;
            demonstration(gateway, inference, &request.value).map(FeedbackValue::Demonstration)
        }
        name => match gateway.config.metrics.get(name).map(|m| m.kind) {
            Some(MetricType::Boolean) => {
                request.value.as_bool().map(FeedbackValue::Boolean).ok_or_else(|| wrong_type("a boolean"))
            }
            Some(MetricType::Float) => request
                .value
                .as_f64()
                .filter(|v| v.is_finite())
                .map(FeedbackValue::Float)
                .ok_or_else(|| wrong_type("a finite number")),
            None => Err(ApiError::not_found("unknown_metric", "metric_name", format!("no metric named `{name}`"))),
        },
    }
}

/// A demonstration is an output of the inference's function: content blocks for chat functions,
/// a value satisfying the output schema for json functions.
fn demonstration(gateway: &Gateway, inference: &InferenceRecord, value: &Value) -> Result<InferenceOutput, ApiError> {
    let function = gateway.config.function(&inference.function_name);
    let kind = function.map(|f| f.kind).unwrap_or_default();
    match kind {
        FunctionKind::Json => {
            if let Some(schema) = function.and_then(|f| f.output_schema.as_ref()) {
                schema.validate(value).map_err(|e| {
                    ApiError::bad_request(
                        "invalid_value",
                        "value",
                        format!("demonstration does not match the output schema: {e}"),
                    )
                })?;
            }
            Ok(InferenceOutput::Json(JsonOutput { raw: value.to_string(), parsed: Some(value.clone()) }))
        }
        FunctionKind::Chat => {
            let content = match value {
                Value::String(text) => vec![ContentBlock::Text { text: text.clone() }],
                Value::Array(_) => serde_json::from_value::<Vec<ContentBlock>>(value.clone()).map_err(|e| {
                    ApiError::bad_request(
                        "invalid_value",
                        "value",
                        format!("demonstration is not a list of content blocks: {e}"),
                    )
                })?,
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_value",
                        "value",
                        format!("a chat demonstration is text or a list of content blocks, got {}", kind_of(other)),
                    ))
                }
            };
            if let Some(bad) =
                content.iter().position(|b| !matches!(b, ContentBlock::Text { .. } | ContentBlock::ToolCall(_)))
            {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    format!("value[{bad}]"),
                    "a demonstration holds only text and tool_call blocks",
                ));
            }
            Ok(InferenceOutput::Chat { content })
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
