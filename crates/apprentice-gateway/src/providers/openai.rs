//! Any OpenAI-compatible chat completions API: OpenAI itself, vLLM, Ollama, llama.cpp server,
//! Together, Fireworks, and the gateway's own students.

use apprentice_core::config::{JsonMode, ToolChoice};
use apprentice_core::record::{RenderedBlock, RenderedMessage, RenderedRequest};
use apprentice_core::{ContentBlock, Role, ToolCall, ToolDefinition, Usage};
use async_trait::async_trait;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use super::http::{self, protocol, HttpSettings};
use super::sse::{self, SseEvent, SseStep};
use super::{ChunkStream, ModelRequest, Provider, ProviderError, ProviderResponse, StreamChunk, ToolCallDelta};

/// Texts of one message are joined with a newline when the message has several text blocks: one
/// string is what every compatible server accepts, while content-part arrays are not universal.
pub(crate) const TEXT_JOINER: &str = "\n";

#[derive(Debug)]
pub struct OpenAiProvider {
    name: String,
    settings: HttpSettings,
    client: reqwest::Client,
}

impl OpenAiProvider {
    /// `name` is the provider's name in the model's routing (used in errors); `client` is shared so
    /// all providers use one connection pool.
    pub fn new(name: impl Into<String>, settings: HttpSettings, client: reqwest::Client) -> Self {
        Self { name: name.into(), settings, client }
    }

    fn request(&self, request: &ModelRequest, stream: bool) -> reqwest::RequestBuilder {
        let body = build_request(&self.settings.model_name, request, stream);
        let builder =
            self.client.post(self.settings.url("chat/completions")).timeout(self.settings.timeout).json(&body);
        match &self.settings.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn infer(&self, request: &ModelRequest) -> Result<ProviderResponse, ProviderError> {
        let response = http::send(&self.name, self.request(request, false)).await?;
        let body: ChatResponse = http::read_json(&self.name, response).await?;
        parse_response(&self.name, body)
    }

    async fn infer_stream(&self, request: &ModelRequest) -> Result<ChunkStream, ProviderError> {
        let response = http::send(&self.name, self.request(request, true)).await?;
        let name = self.name.clone();
        Ok(sse::chunk_stream(&self.name, response, move |event| parse_event(&name, event)))
    }
}

// ---------------------------------------------------------------------------------------------
// Request

#[derive(Debug, Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Message<'a> {
    role: &'static str,
    /// `null` is allowed (and expected) for an assistant message that only calls tools.
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Debug, Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Debug, Serialize)]
struct Tool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: ToolFunction<'a>,
}

#[derive(Debug, Serialize)]
struct ToolFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    parameters: &'a Value,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    strict: bool,
}

fn build_request<'a>(model: &'a str, request: &'a ModelRequest, stream: bool) -> ChatRequest<'a> {
    let rendered = &request.rendered;
    let has_tools = !rendered.tools.is_empty();
    ChatRequest {
        model,
        messages: messages(rendered),
        tools: rendered.tools.iter().map(tool).collect(),
        // Both are rejected by some servers when no tools are offered.
        tool_choice: has_tools.then(|| tool_choice(&request.tool_choice)),
        parallel_tool_calls: request.parallel_tool_calls.filter(|_| has_tools),
        temperature: request.temperature,
        top_p: request.top_p,
        max_tokens: request.max_tokens,
        seed: request.seed,
        response_format: response_format(request.json_mode, request.output_schema.as_ref()),
        stream,
        // Without this, streamed answers carry no token counts and could not be priced.
        stream_options: stream.then_some(StreamOptions { include_usage: true }),
    }
}

fn tool_choice(choice: &ToolChoice) -> &'static str {
    match choice {
        ToolChoice::Auto => "auto",
        ToolChoice::None => "none",
        ToolChoice::Required => "required",
    }
}

fn response_format(mode: Option<JsonMode>, schema: Option<&Value>) -> Option<Value> {
    match (mode?, schema) {
        (JsonMode::Strict, Some(schema)) => Some(json!({
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": true},
        })),
        // Strict without a schema can still ask for JSON.
        (JsonMode::Strict, None) | (JsonMode::On, _) => Some(json!({"type": "json_object"})),
        (JsonMode::Off, _) => None,
    }
}

fn tool(definition: &ToolDefinition) -> Tool<'_> {
    Tool {
        kind: "function",
        function: ToolFunction {
            name: &definition.name,
            description: &definition.description,
            parameters: &definition.parameters,
            strict: definition.strict,
        },
    }
}

pub(crate) fn messages(rendered: &RenderedRequest) -> Vec<Message<'_>> {
    let mut out = Vec::with_capacity(rendered.messages.len() + 1);
    if let Some(system) = &rendered.system {
        out.push(Message { role: "system", content: Some(system.clone()), tool_calls: Vec::new(), tool_call_id: None });
    }
    for message in &rendered.messages {
        push_message(&mut out, message);
    }
    out
}

/// One rendered message may become several OpenAI messages: tool results are separate `tool`
/// messages, and they go first because OpenAI requires them right after the assistant message
/// whose calls they answer.
fn push_message<'a>(out: &mut Vec<Message<'a>>, message: &'a RenderedMessage) {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for block in &message.content {
        match block {
            RenderedBlock::Text { text } => texts.push(text.as_str()),
            RenderedBlock::ToolCall(call) => calls.push(WireToolCall {
                id: &call.id,
                kind: "function",
                function: WireFunction { name: &call.name, arguments: &call.arguments },
            }),
            RenderedBlock::ToolResult(result) => out.push(Message {
                role: "tool",
                content: Some(result.result.clone()),
                tool_calls: Vec::new(),
                tool_call_id: Some(&result.id),
            }),
        }
    }
    let text = (!texts.is_empty()).then(|| texts.join(TEXT_JOINER));
    match message.role {
        Role::Assistant => {
            if text.is_some() || !calls.is_empty() {
                out.push(Message { role: "assistant", content: text, tool_calls: calls, tool_call_id: None });
            }
        }
        Role::User => {
            // Tool calls only come from assistants; should a user message carry some, they are
            // sent as the assistant turn they must have been rather than dropped.
            if !calls.is_empty() {
                out.push(Message { role: "assistant", content: None, tool_calls: calls, tool_call_id: None });
            }
            let only_tool_results = text.is_none() && !message.content.is_empty();
            if !only_tool_results {
                out.push(Message {
                    role: "user",
                    content: Some(text.unwrap_or_default()),
                    tool_calls: Vec::new(),
                    tool_call_id: None,
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response

#[derive(Debug, Deserialize)]
struct ChatResponse {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: ResponseMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    tool_calls: Vec<ResponseToolCall>,
}

#[derive(Debug, Deserialize)]
struct ResponseToolCall {
    /// Some local servers leave it out; a stable stand-in is made from the position.
    #[serde(default)]
    id: Option<String>,
    function: ResponseFunction,
}

#[derive(Debug, Deserialize)]
struct ResponseFunction {
    name: String,
    /// Text per the spec; some servers send an object, which is kept as its JSON text.
    #[serde(default, deserialize_with = "text_or_json")]
    arguments: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        Usage { input_tokens: usage.prompt_tokens, output_tokens: usage.completion_tokens }
    }
}

fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn text_or_json<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(text) => text,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

fn parse_response(provider: &str, body: ChatResponse) -> Result<ProviderResponse, ProviderError> {
    let usage = body.usage.map(Usage::from).unwrap_or_default();
    let choice = body.choices.into_iter().next().ok_or_else(|| protocol(provider, "answer has no choices"))?;
    let mut content = Vec::new();
    if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
        content.push(ContentBlock::Text { text });
    }
    for (i, call) in choice.message.tool_calls.into_iter().enumerate() {
        content.push(ContentBlock::ToolCall(ToolCall {
            id: call.id.unwrap_or_else(|| format!("call_{i}")),
            name: call.function.name,
            arguments: call.function.arguments,
        }));
    }
    Ok(ProviderResponse { content, usage, finish_reason: choice.finish_reason, compute_ms: None })
}

// ---------------------------------------------------------------------------------------------
// Stream

#[derive(Debug, Deserialize)]
struct StreamEvent {
    #[serde(default, deserialize_with = "null_as_empty")]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Some servers report failures mid-stream as an event with an `error` object.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamChoice {
    #[serde(default)]
    index: usize,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    tool_calls: Vec<DeltaToolCall>,
}

#[derive(Debug, Deserialize)]
struct DeltaToolCall {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<DeltaFunction>,
}

#[derive(Debug, Deserialize)]
struct DeltaFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "text_or_json")]
    arguments: String,
}

fn parse_event(provider: &str, event: SseEvent) -> Result<SseStep, ProviderError> {
    let data = event.data.trim();
    if data == "[DONE]" {
        return Ok(SseStep::Done);
    }
    if data.is_empty() {
        return Ok(SseStep::Chunks(Vec::new()));
    }
    let parsed: StreamEvent = serde_json::from_str(data)
        .map_err(|e| protocol(provider, format!("bad stream event: {e}; data: {}", http::truncate(data, 512))))?;
    if let Some(error) = parsed.error {
        return Err(protocol(provider, format!("upstream reported an error mid-stream: {error}")));
    }
    let chunk = stream_chunk(parsed);
    Ok(SseStep::Chunks(if chunk == StreamChunk::default() { Vec::new() } else { vec![chunk] }))
}

/// Only the first choice is followed: the gateway never asks for more than one.
fn stream_chunk(event: StreamEvent) -> StreamChunk {
    let mut chunk = StreamChunk { usage: event.usage.map(Usage::from), ..StreamChunk::default() };
    let Some(choice) = event.choices.into_iter().find(|c| c.index == 0) else {
        return chunk;
    };
    chunk.finish_reason = choice.finish_reason;
    let delta = choice.delta.unwrap_or_default();
    // Empty strings (e.g. the opening role-only delta) are not content and would make the
    // time-to-first-token measure the headers rather than the first token.
    chunk.text = delta.content.filter(|t| !t.is_empty());
    chunk.tool_calls = delta
        .tool_calls
        .into_iter()
        .enumerate()
        .map(|(position, call)| {
            let (name, arguments) = call.function.map(|f| (f.name, f.arguments)).unwrap_or_default();
            ToolCallDelta { index: call.index.unwrap_or(position), id: call.id, name, arguments }
        })
        .collect();
    chunk
}

#[cfg(test)]
mod tests {
    use super::*;
    use apprentice_core::ToolResult;

    fn text(t: &str) -> RenderedBlock {
        RenderedBlock::Text { text: t.into() }
    }

    #[test]
    fn tool_results_go_before_user_text_and_calls_ride_on_assistant() {
        let rendered = RenderedRequest {
            system: Some("sys".into()),
            messages: vec![
                RenderedMessage { role: Role::User, content: vec![text("a"), text("b")] },
                RenderedMessage {
                    role: Role::Assistant,
                    content: vec![RenderedBlock::ToolCall(ToolCall {
                        id: "c1".into(),
                        name: "go".into(),
                        arguments: "{\"x\":1}".into(),
                    })],
                },
                RenderedMessage {
                    role: Role::User,
                    content: vec![
                        text("then"),
                        RenderedBlock::ToolResult(ToolResult {
                            id: "c1".into(),
                            name: "go".into(),
                            result: "ok".into(),
                        }),
                    ],
                },
            ],
            tools: Vec::new(),
        };
        let value = serde_json::to_value(messages(&rendered)).unwrap();
        assert_eq!(
            value,
            json!([
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "a\nb"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "go", "arguments": "{\"x\":1}"}}
                ]},
                {"role": "tool", "content": "ok", "tool_call_id": "c1"},
                {"role": "user", "content": "then"},
            ])
        );
    }

    #[test]
    fn tool_options_are_left_out_without_tools() {
        let request = ModelRequest { parallel_tool_calls: Some(false), ..ModelRequest::default() };
        let value = serde_json::to_value(build_request("m", &request, false)).unwrap();
        assert!(value.get("tool_choice").is_none() && value.get("parallel_tool_calls").is_none(), "{value}");
        assert!(value.get("stream").is_none() && value.get("stream_options").is_none(), "{value}");
    }

    #[test]
    fn json_modes() {
        let schema = json!({"type": "object"});
        assert_eq!(response_format(Some(JsonMode::Strict), Some(&schema)).unwrap()["json_schema"]["schema"], schema);
        assert_eq!(response_format(Some(JsonMode::On), Some(&schema)).unwrap(), json!({"type": "json_object"}));
        assert_eq!(response_format(Some(JsonMode::Off), Some(&schema)), None);
        assert_eq!(response_format(None, Some(&schema)), None);
    }

    #[test]
    fn object_arguments_and_missing_ids_are_tolerated() {
        let body: ChatResponse = serde_json::from_value(json!({
            "choices": [{"message": {"content": null, "tool_calls": [
                {"type": "function", "function": {"name": "go", "arguments": {"x": 1}}}
            ]}, "finish_reason": "tool_calls"}]
        }))
        .unwrap();
        let response = parse_response("p", body).unwrap();
        assert_eq!(
            response.content,
            vec![ContentBlock::ToolCall(ToolCall {
                id: "call_0".into(),
                name: "go".into(),
                arguments: "{\"x\":1}".into()
            })]
        );
        assert_eq!(response.usage, Usage::default());
    }

    #[test]
    fn mid_stream_error_event_is_an_error() {
        let event = SseEvent { event: None, data: r#"{"error": {"message": "overloaded"}}"#.into() };
        let err = parse_event("p", event).err().unwrap().to_string();
        assert!(err.contains("overloaded"), "{err}");
    }
}
