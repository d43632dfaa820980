//! `POST /v1/chat/completions`: the OpenAI chat completions API, so an unmodified OpenAI SDK can
//! call the gateway and every call is recorded.
//!
//! `model` is `function::NAME` (a configured function; its variants, templates and schemas apply)
//! or `model::NAME` (a configured model, called directly). apprentice's own fields travel in the
//! body (`extra_body` in the Python SDK) or in `x-apprentice-*` headers.

use std::collections::BTreeMap;
use std::sync::Arc;

use apprentice_core::config::{FunctionKind, ToolChoice};
use apprentice_core::{
    ContentBlock, InferenceOutput, InferenceRecord, Input, InputMessage, Role, SystemInput, ToolCall, ToolDefinition,
    ToolResult,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::error::{parse_body, ApiError};
use crate::inference::{InferenceRequest, ParamOverrides, Prepared, Target};
use crate::providers::StreamChunk;
use crate::server::Gateway;
use crate::stream::{self, StreamFormat};

#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    seed: Option<u64>,
    #[serde(default)]
    tools: Vec<ChatTool>,
    tool_choice: Option<Value>,
    // apprentice's fields
    episode_id: Option<Uuid>,
    variant_name: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    dryrun: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum ChatMessage {
    #[serde(alias = "developer")]
    System {
        content: ChatContent,
    },
    User {
        content: ChatContent,
    },
    Assistant {
        #[serde(default)]
        content: Option<ChatContent>,
        #[serde(default)]
        tool_calls: Vec<ChatToolCall>,
    },
    Tool {
        content: ChatContent,
        tool_call_id: String,
    },
}

/// OpenAI content: a string or a list of parts. apprentice adds two shapes for structured input:
/// an object of template arguments, and a `{"type": "template", "name", "arguments"}` part.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatContent {
    Text(String),
    Parts(Vec<ChatPart>),
    Arguments(Map<String, Value>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ChatPart {
    Text {
        text: String,
    },
    Template {
        #[serde(default)]
        name: String,
        arguments: Value,
    },
}

#[derive(Debug, Deserialize)]
struct ChatToolCall {
    id: String,
    function: ChatFunctionCall,
}

#[derive(Debug, Deserialize)]
struct ChatFunctionCall {
    name: String,
    arguments: String,
}

#[derive(Debug, Deserialize)]
struct ChatTool {
    function: ChatToolFunction,
}

#[derive(Debug, Deserialize)]
struct ChatToolFunction {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default = "empty_object_schema")]
    parameters: Value,
    #[serde(default)]
    strict: bool,
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

pub async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ChatCompletionRequest = parse_body(&body)?;
    let target = parse_model(&gateway, &request.model)?;
    let episode_id = match request.episode_id {
        Some(id) => Some(id),
        None => header(&headers, "x-apprentice-episode-id")?
            .map(|v| {
                v.parse::<Uuid>()
                    .map_err(|e| ApiError::bad_request("invalid_request", "x-apprentice-episode-id", e.to_string()))
            })
            .transpose()?,
    };
    let tags = match request.tags {
        Some(tags) => tags,
        None => match header(&headers, "x-apprentice-tags")? {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                ApiError::bad_request(
                    "invalid_request",
                    "x-apprentice-tags",
                    format!("must be a JSON object of strings: {e}"),
                )
            })?,
            None => BTreeMap::new(),
        },
    };
    let variant_name = request.variant_name.or(header(&headers, "x-apprentice-variant-name")?.map(str::to_string));
    let dryrun =
        request.dryrun.unwrap_or(header(&headers, "x-apprentice-dryrun")?.is_some_and(|v| v == "true" || v == "1"));
    let extra_tools = request
        .tools
        .into_iter()
        .map(|t| ToolDefinition {
            name: t.function.name,
            description: t.function.description,
            parameters: t.function.parameters,
            strict: t.function.strict,
        })
        .collect();

    let prepared = gateway
        .prepare(InferenceRequest {
            target,
            input: to_input(request.messages)?,
            episode_id,
            variant_name,
            tags,
            params: ParamOverrides {
                temperature: request.temperature,
                top_p: request.top_p,
                max_tokens: request.max_completion_tokens.or(request.max_tokens),
                seed: request.seed,
            },
            dryrun,
            extra_tools,
            tool_choice: request.tool_choice.as_ref().map(parse_tool_choice).transpose()?,
        })
        .map_err(|mut e| {
            // This API names its target in `model`; point there rather than at the native fields.
            if matches!(e.field.as_deref(), Some("function_name" | "model_name")) {
                e.field = Some("model".into());
            }
            e
        })?;
    if request.stream {
        let routed = gateway.call_stream(&prepared).await?;
        let format = OpenAiStream { model: request.model, created: unix_now(), sent_role: false };
        return Ok(
            stream::respond(gateway.clone(), prepared, routed.provider_name, routed.value, format).into_response()
        );
    }
    let routed = gateway.call(&prepared).await?;
    let completed = gateway.finish(prepared, routed.provider_name, routed.value, None).await?;
    Ok(Json(completion_response(&completed.record, &request.model)).into_response())
}

/// `GET /v1/models`: the functions and models this gateway answers for, as OpenAI lists models.
pub async fn models(State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    let functions = gateway.config.functions.keys().map(|name| format!("function::{name}"));
    let models = gateway.config.models.keys().map(|name| format!("model::{name}"));
    let data: Vec<Value> =
        functions.chain(models).map(|id| json!({"id": id, "object": "model", "owned_by": "apprentice"})).collect();
    Json(json!({"object": "list", "data": data}))
}

fn parse_model(gateway: &Gateway, model: &str) -> Result<Target, ApiError> {
    if let Some(name) = model.strip_prefix("function::") {
        return Ok(Target::Function(name.to_string()));
    }
    if let Some(name) = model.strip_prefix("model::") {
        return Ok(Target::Model(name.to_string()));
    }
    if gateway.config.models.contains_key(model) {
        return Ok(Target::Model(model.to_string()));
    }
    Err(ApiError::not_found(
        "unknown_model",
        "model",
        format!("`{model}` is neither `function::NAME`, `model::NAME` nor a configured model"),
    ))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| v.to_str().map_err(|_| ApiError::bad_request("invalid_request", name, "header is not valid text")))
        .transpose()
}

fn parse_tool_choice(value: &Value) -> Result<ToolChoice, ApiError> {
    match value.as_str() {
        Some("auto") => Ok(ToolChoice::Auto),
        Some("none") => Ok(ToolChoice::None),
        Some("required") => Ok(ToolChoice::Required),
        _ => {
            Err(ApiError::bad_request("invalid_request", "tool_choice", "supported: \"auto\", \"none\", \"required\""))
        }
    }
}

/// Maps OpenAI messages onto apprentice's structured input, keeping template arguments as arguments.
fn to_input(messages: Vec<ChatMessage>) -> Result<Input, ApiError> {
    let mut input = Input::default();
    let mut tool_names: BTreeMap<String, String> = BTreeMap::new();
    for (i, message) in messages.into_iter().enumerate() {
        match message {
            ChatMessage::System { content } => {
                if input.system.is_some() || !input.messages.is_empty() {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        format!("messages[{i}]"),
                        "only one system message, and only first, is supported",
                    ));
                }
                input.system = Some(match content {
                    ChatContent::Text(text) => SystemInput::Text(text),
                    ChatContent::Arguments(arguments) => SystemInput::Arguments(arguments),
                    ChatContent::Parts(parts) => match parts.as_slice() {
                        [ChatPart::Template { arguments: Value::Object(arguments), .. }] => {
                            SystemInput::Arguments(arguments.clone())
                        }
                        _ => SystemInput::Text(
                            parts.iter().map(part_text).collect::<Result<Vec<_>, _>>().map_err(|e| e.at(i))?.concat(),
                        ),
                    },
                });
            }
            ChatMessage::User { content } => push(&mut input, Role::User, blocks(content)),
            ChatMessage::Assistant { content, tool_calls } => {
                let mut content = content.map(blocks).unwrap_or_default();
                for call in tool_calls {
                    tool_names.insert(call.id.clone(), call.function.name.clone());
                    content.push(ContentBlock::ToolCall(ToolCall {
                        id: call.id,
                        name: call.function.name,
                        arguments: call.function.arguments,
                    }));
                }
                push(&mut input, Role::Assistant, content);
            }
            ChatMessage::Tool { content, tool_call_id } => {
                let result = match content {
                    ChatContent::Text(text) => text,
                    ChatContent::Parts(parts) => {
                        parts.iter().map(part_text).collect::<Result<Vec<_>, _>>().map_err(|e| e.at(i))?.concat()
                    }
                    ChatContent::Arguments(map) => Value::Object(map).to_string(),
                };
                let name = tool_names.get(&tool_call_id).cloned().unwrap_or_default();
                push(
                    &mut input,
                    Role::User,
                    vec![ContentBlock::ToolResult(ToolResult { id: tool_call_id, name, result })],
                );
            }
        }
    }
    Ok(input)
}

struct NotText;

impl NotText {
    fn at(self, i: usize) -> ApiError {
        ApiError::bad_request(
            "invalid_request",
            format!("messages[{i}].content"),
            "system and tool messages take text parts only",
        )
    }
}

fn part_text(part: &ChatPart) -> Result<String, NotText> {
    match part {
        ChatPart::Text { text } => Ok(text.clone()),
        ChatPart::Template { .. } => Err(NotText),
    }
}

fn blocks(content: ChatContent) -> Vec<ContentBlock> {
    match content {
        ChatContent::Text(text) => vec![ContentBlock::Text { text }],
        ChatContent::Arguments(arguments) => {
            vec![ContentBlock::Template { name: String::new(), arguments: Value::Object(arguments) }]
        }
        ChatContent::Parts(parts) => parts
            .into_iter()
            .map(|part| match part {
                ChatPart::Text { text } => ContentBlock::Text { text },
                ChatPart::Template { name, arguments } => ContentBlock::Template { name, arguments },
            })
            .collect(),
    }
}

/// Consecutive messages of one role merge, as tool results following each other do in OpenAI's API.
fn push(input: &mut Input, role: Role, content: Vec<ContentBlock>) {
    match input.messages.last_mut() {
        Some(last)
            if last.role == role
                && content.iter().all(|b| matches!(b, ContentBlock::ToolResult(_)))
                && last.content.iter().all(|b| matches!(b, ContentBlock::ToolResult(_))) =>
        {
            last.content.extend(content)
        }
        _ => input.messages.push(InputMessage { role, content }),
    }
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn message_of(record: &InferenceRecord) -> (Value, &'static str) {
    match &record.output {
        InferenceOutput::Json(output) => (json!({"role": "assistant", "content": output.raw}), "stop"),
        InferenceOutput::Chat { content } => {
            let text: String = content
                .iter()
                .filter_map(|b| if let ContentBlock::Text { text } = b { Some(text.as_str()) } else { None })
                .collect();
            let calls: Vec<Value> = content
                .iter()
                .filter_map(|b| if let ContentBlock::ToolCall(call) = b { Some(call) } else { None })
                .map(|call| json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}))
                .collect();
            let finish = if calls.is_empty() { "stop" } else { "tool_calls" };
            let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
            if !calls.is_empty() {
                message["tool_calls"] = json!(calls);
            }
            (message, finish)
        }
    }
}

fn finish_reason(record: &InferenceRecord, fallback: &'static str) -> String {
    match record.finish_reason.as_deref() {
        Some("length" | "max_tokens") => "length".into(),
        _ => fallback.into(),
    }
}

fn usage(record: &InferenceRecord) -> Value {
    let u = record.usage;
    json!({"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.input_tokens + u.output_tokens})
}

fn completion_response(record: &InferenceRecord, model: &str) -> Value {
    let (message, fallback) = message_of(record);
    json!({
        "id": record.id,
        "object": "chat.completion",
        "created": record.created_at.timestamp(),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(record, fallback), "logprobs": null}],
        "usage": usage(record),
        "episode_id": record.episode_id,
        "variant_name": record.variant_name,
    })
}

struct OpenAiStream {
    model: String,
    created: i64,
    sent_role: bool,
}

impl OpenAiStream {
    fn envelope(&self, id: Uuid, delta: Value, finish: Option<String>) -> Value {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    }
}

impl StreamFormat for OpenAiStream {
    fn chunk(&mut self, prepared: &Prepared, chunk: &StreamChunk) -> Option<Value> {
        let mut delta = Map::new();
        if !self.sent_role {
            delta.insert("role".into(), json!("assistant"));
            self.sent_role = true;
        }
        if let Some(text) = &chunk.text {
            delta.insert("content".into(), json!(text));
        }
        if prepared.kind == FunctionKind::Json {
            let raw: String = chunk.tool_calls.iter().map(|d| d.arguments.as_str()).collect();
            if !raw.is_empty() {
                delta.insert("content".into(), json!(raw));
            }
        } else if !chunk.tool_calls.is_empty() {
            let calls: Vec<Value> = chunk
                .tool_calls
                .iter()
                .map(|d| {
                    let mut call = json!({"index": d.index, "function": {"arguments": d.arguments}});
                    if let Some(id) = &d.id {
                        call["id"] = json!(id);
                        call["type"] = json!("function");
                    }
                    if let Some(name) = &d.name {
                        call["function"]["name"] = json!(name);
                    }
                    call
                })
                .collect();
            delta.insert("tool_calls".into(), json!(calls));
        }
        if delta.is_empty() {
            return None;
        }
        let mut event = self.envelope(prepared.inference_id, Value::Object(delta), None);
        event["episode_id"] = json!(prepared.episode_id);
        Some(event)
    }

    fn finish(&mut self, record: &InferenceRecord) -> Option<Value> {
        let (_, fallback) = message_of(record);
        let mut event = self.envelope(record.id, json!({}), Some(finish_reason(record, fallback)));
        event["usage"] = usage(record);
        event["episode_id"] = json!(record.episode_id);
        event["variant_name"] = json!(record.variant_name);
        Some(event)
    }
}
