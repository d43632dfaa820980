//! The Anthropic messages API.
//!
//! Finish reasons are translated to the OpenAI vocabulary (`stop`, `length`, `tool_calls`) so that
//! records and the OpenAI-compatible endpoint speak one language whatever the provider.

use std::collections::HashMap;

use apprentice_core::config::ToolChoice;
use apprentice_core::record::{RenderedBlock, RenderedMessage};
use apprentice_core::{ContentBlock, Role, ToolCall, ToolDefinition, Usage};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::http::{self, protocol, HttpSettings};
use super::sse::{self, SseEvent, SseStep};
use super::{ChunkStream, ModelRequest, Provider, ProviderError, ProviderResponse, StreamChunk, ToolCallDelta};

const API_VERSION: &str = "2023-06-01";
/// The API requires `max_tokens`; this is used when the variant sets none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

#[derive(Debug)]
pub struct AnthropicProvider {
    name: String,
    settings: HttpSettings,
    client: reqwest::Client,
}

impl AnthropicProvider {
    /// `name` is the provider's name in the model's routing (used in errors); `client` is shared so
    /// all providers use one connection pool.
    pub fn new(name: impl Into<String>, settings: HttpSettings, client: reqwest::Client) -> Self {
        Self { name: name.into(), settings, client }
    }

    fn request(&self, request: &ModelRequest, stream: bool) -> reqwest::RequestBuilder {
        let body = build_request(&self.settings.model_name, request, stream);
        let builder = self
            .client
            .post(self.settings.url("messages"))
            .timeout(self.settings.timeout)
            .header("anthropic-version", API_VERSION)
            .json(&body);
        match &self.settings.api_key {
            Some(key) => builder.header("x-api-key", key),
            None => builder,
        }
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    async fn infer(&self, request: &ModelRequest) -> Result<ProviderResponse, ProviderError> {
        let response = http::send(&self.name, self.request(request, false)).await?;
        let body: MessagesResponse = http::read_json(&self.name, response).await?;
        Ok(parse_response(body))
    }

    async fn infer_stream(&self, request: &ModelRequest) -> Result<ChunkStream, ProviderError> {
        let response = http::send(&self.name, self.request(request, true)).await?;
        let mut state = StreamState { provider: self.name.clone(), ..StreamState::default() };
        Ok(sse::chunk_stream(&self.name, response, move |event| state.event(event)))
    }
}

/// OpenAI's words for why generation stopped; unknown reasons pass through unchanged.
fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        other => other,
    }
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// Request

#[derive(Debug, Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text { text: &'a str },
    ToolUse { id: &'a str, name: &'a str, input: Value },
    ToolResult { tool_use_id: &'a str, content: &'a str },
}

#[derive(Debug, Serialize)]
struct Tool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    input_schema: &'a Value,
}

// The API has no seed and no JSON mode: json functions rely on their prompt here.
fn build_request<'a>(model: &'a str, request: &'a ModelRequest, stream: bool) -> MessagesRequest<'a> {
    let rendered = &request.rendered;
    let has_tools = !rendered.tools.is_empty();
    MessagesRequest {
        model,
        max_tokens: request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        // An empty system prompt is rejected by the API, and means the same as none.
        system: rendered.system.as_deref().filter(|s| !s.is_empty()),
        messages: rendered.messages.iter().map(message).collect(),
        tools: rendered.tools.iter().map(tool).collect(),
        tool_choice: has_tools.then(|| tool_choice(&request.tool_choice, request.parallel_tool_calls)),
        temperature: request.temperature,
        top_p: request.top_p,
        stream,
    }
}

fn tool_choice(choice: &ToolChoice, parallel: Option<bool>) -> Value {
    let kind = match choice {
        ToolChoice::Auto => "auto",
        ToolChoice::Required => "any",
        ToolChoice::None => return json!({"type": "none"}),
    };
    match parallel {
        Some(false) => json!({"type": kind, "disable_parallel_tool_use": true}),
        _ => json!({"type": kind}),
    }
}

fn tool(definition: &ToolDefinition) -> Tool<'_> {
    Tool { name: &definition.name, description: &definition.description, input_schema: &definition.parameters }
}

/// Tool results go first in their message, as the API requires; empty text blocks are dropped
/// because the API rejects them.
fn message(message: &RenderedMessage) -> Message<'_> {
    let mut results = Vec::new();
    let mut others = Vec::new();
    for block in &message.content {
        match block {
            RenderedBlock::Text { text } if text.is_empty() => {}
            RenderedBlock::Text { text } => others.push(Block::Text { text }),
            RenderedBlock::ToolCall(call) => {
                others.push(Block::ToolUse { id: &call.id, name: &call.name, input: tool_input(&call.arguments) })
            }
            RenderedBlock::ToolResult(result) => {
                results.push(Block::ToolResult { tool_use_id: &result.id, content: &result.result })
            }
        }
    }
    results.extend(others);
    Message { role: role(message.role), content: results }
}

fn role(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// `tool_use.input` must be an object, while recorded arguments are whatever text the model
/// wrote; text that is not a JSON object is kept under `_raw` rather than lost.
pub fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(object)) => Value::Object(object),
        _ => {
            let mut object = Map::new();
            object.insert("_raw".into(), Value::String(arguments.to_string()));
            Value::Object(object)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response

#[derive(Debug, Deserialize)]
struct MessagesResponse {
    #[serde(default)]
    content: Vec<ResponseBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// Thinking and other block kinds are not part of the answer.
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    /// Cached prompt tokens are counted apart from `input_tokens` but were still read.
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl WireUsage {
    /// All prompt tokens, or `None` when this usage object does not report input at all.
    fn input(&self) -> Option<u32> {
        let parts = [self.input_tokens, self.cache_creation_input_tokens, self.cache_read_input_tokens];
        parts.iter().any(Option::is_some).then(|| parts.iter().flatten().fold(0u32, |a, b| a.saturating_add(*b)))
    }
}

fn parse_response(body: MessagesResponse) -> ProviderResponse {
    let content = body
        .content
        .into_iter()
        .filter_map(|block| match block {
            ResponseBlock::Text { text } if !text.is_empty() => Some(ContentBlock::Text { text }),
            ResponseBlock::ToolUse { id, name, input } => {
                Some(ContentBlock::ToolCall(ToolCall { id, name, arguments: arguments_text(&input) }))
            }
            _ => None,
        })
        .collect::<Vec<_>>();
    let content = merge_texts(content);
    ProviderResponse {
        content,
        usage: Usage {
            input_tokens: body.usage.input().unwrap_or(0),
            output_tokens: body.usage.output_tokens.unwrap_or(0),
        },
        finish_reason: body.stop_reason.as_deref().map(finish_reason),
        compute_ms: None,
    }
}

/// A missing input means the tool takes no arguments: `{}` as OpenAI would write it.
fn arguments_text(input: &Value) -> String {
    if input.is_null() {
        "{}".to_string()
    } else {
        input.to_string()
    }
}

/// Several text blocks (e.g. around a tool call) are one answer text, as a stream would give it.
fn merge_texts(blocks: Vec<ContentBlock>) -> Vec<ContentBlock> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block {
            ContentBlock::Text { text: t } => text.push_str(&t),
            other => calls.push(other),
        }
    }
    let mut out = Vec::with_capacity(calls.len() + 1);
    if !text.is_empty() {
        out.push(ContentBlock::Text { text });
    }
    out.extend(calls);
    out
}

// ---------------------------------------------------------------------------------------------
// Stream

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: WireUsage,
    },
    MessageStop,
    Error {
        error: Value,
    },
    /// `ping` and kinds added later.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking and signature deltas are not part of the answer.
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// What a stream must remember between events: input tokens arrive first and output tokens last,
/// and content-block indexes (text and tools together) must become tool-call indexes.
#[derive(Debug, Default)]
struct StreamState {
    provider: String,
    input_tokens: u32,
    /// Content-block index → (tool-call index, whether any argument text arrived).
    tools: HashMap<usize, (usize, bool)>,
}

impl StreamState {
    fn event(&mut self, event: SseEvent) -> Result<SseStep, ProviderError> {
        let parsed: StreamEvent = serde_json::from_str(&event.data).map_err(|e| {
            protocol(&self.provider, format!("bad stream event: {e}; data: {}", http::truncate(&event.data, 512)))
        })?;
        let chunk = match parsed {
            StreamEvent::MessageStart { message } => {
                self.input_tokens = message.usage.input().unwrap_or(0);
                None
            }
            StreamEvent::ContentBlockStart { index, content_block: StartBlock::ToolUse { id, name } } => {
                let call = self.tools.len();
                self.tools.insert(index, (call, false));
                Some(tool_chunk(ToolCallDelta {
                    index: call,
                    id: Some(id),
                    name: Some(name),
                    arguments: String::new(),
                }))
            }
            StreamEvent::ContentBlockDelta { index, delta } => self.delta(index, delta)?,
            StreamEvent::ContentBlockStop { index } => self.block_stop(index),
            StreamEvent::MessageDelta { delta, usage } => Some(StreamChunk {
                usage: Some(Usage {
                    // Newer API versions repeat the input count here; older ones only at the start.
                    input_tokens: usage.input().unwrap_or(self.input_tokens),
                    output_tokens: usage.output_tokens.unwrap_or(0),
                }),
                finish_reason: delta.stop_reason.as_deref().map(finish_reason),
                ..StreamChunk::default()
            }),
            StreamEvent::MessageStop => return Ok(SseStep::Done),
            StreamEvent::Error { error } => {
                return Err(protocol(&self.provider, format!("upstream reported an error mid-stream: {error}")))
            }
            StreamEvent::ContentBlockStart { .. } | StreamEvent::Other => None,
        };
        Ok(SseStep::Chunks(chunk.into_iter().collect()))
    }

    fn delta(&mut self, index: usize, delta: BlockDelta) -> Result<Option<StreamChunk>, ProviderError> {
        match delta {
            BlockDelta::TextDelta { text } if text.is_empty() => Ok(None),
            BlockDelta::TextDelta { text } => Ok(Some(StreamChunk { text: Some(text), ..StreamChunk::default() })),
            BlockDelta::InputJsonDelta { partial_json } => {
                let (call, seen) = self.tools.get_mut(&index).ok_or_else(|| {
                    protocol(
                        &self.provider,
                        format!("argument delta for content block {index}, which is not a tool call"),
                    )
                })?;
                if partial_json.is_empty() {
                    return Ok(None);
                }
                *seen = true;
                Ok(Some(tool_chunk(ToolCallDelta { index: *call, id: None, name: None, arguments: partial_json })))
            }
            BlockDelta::Other => Ok(None),
        }
    }

    /// A tool without arguments streams no argument text; `{}` keeps the streamed answer equal to
    /// the non-streamed one.
    fn block_stop(&mut self, index: usize) -> Option<StreamChunk> {
        match self.tools.get(&index) {
            Some(&(call, false)) => {
                Some(tool_chunk(ToolCallDelta { index: call, id: None, name: None, arguments: "{}".into() }))
            }
            _ => None,
        }
    }
}

fn tool_chunk(delta: ToolCallDelta) -> StreamChunk {
    StreamChunk { tool_calls: vec![delta], ..StreamChunk::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_object_arguments_are_wrapped() {
        assert_eq!(tool_input(r#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(tool_input("not json"), json!({"_raw": "not json"}));
        assert_eq!(tool_input("[1]"), json!({"_raw": "[1]"}));
    }

    #[test]
    fn tool_choice_mapping() {
        assert_eq!(tool_choice(&ToolChoice::Auto, None), json!({"type": "auto"}));
        assert_eq!(
            tool_choice(&ToolChoice::Required, Some(false)),
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(tool_choice(&ToolChoice::None, Some(false)), json!({"type": "none"}));
    }

    #[test]
    fn argumentless_streamed_tool_gets_empty_object() {
        let mut state = StreamState::default();
        let events = [
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "n", "input": {}}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            json!({"type": "content_block_stop", "index": 0}),
        ];
        let mut arguments = String::new();
        for event in events {
            if let SseStep::Chunks(chunks) = state.event(SseEvent { event: None, data: event.to_string() }).unwrap() {
                for chunk in chunks {
                    arguments.extend(chunk.tool_calls.iter().map(|c| c.arguments.as_str()));
                }
            }
        }
        assert_eq!(arguments, "{}");
    }
}
