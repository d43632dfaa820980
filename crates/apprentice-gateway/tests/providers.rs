//! Providers against loopback mock upstreams: request shapes, answers, streams, errors, routing.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apprentice_core::config::{DummyBehavior, JsonMode, ModelConfig, Price, ProviderConfig, ToolChoice};
use apprentice_core::record::{RenderedBlock, RenderedMessage, RenderedRequest};
use apprentice_core::{Config, ContentBlock, Role, ToolCall, ToolDefinition, ToolResult, Usage};
use apprentice_gateway::providers::{
    build_provider, build_routers, ChunkStream, DummyProvider, ModelRequest, ModelRouter, Provider, ProviderError,
    ProviderResponse, StreamAccumulator, StreamChunk,
};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// A mock upstream: records every request and answers with a scripted reply.

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Value,
}

type Reply = Arc<dyn Fn(&Value) -> Response + Send + Sync>;

#[derive(Clone)]
struct MockState {
    reply: Reply,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Mock {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Mock {
    async fn start(reply: impl Fn(&Value) -> Response + Send + Sync + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = MockState { reply: Arc::new(reply), seen: seen.clone() };
        let app = axum::Router::new().fallback(handle).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, seen }
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn only_request(&self) -> Seen {
        let mut requests = self.requests();
        assert_eq!(requests.len(), 1, "expected exactly one upstream request");
        requests.remove(0)
    }
}

async fn handle(State(state): State<MockState>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.seen.lock().unwrap().push(Seen { path: uri.path().to_string(), headers, body: body.clone() });
    (state.reply)(&body)
}

fn json_reply(value: Value) -> Response {
    axum::Json(value).into_response()
}

/// An event stream cut into `piece`-byte frames sent a little apart, so the client really reads
/// lines (and UTF-8 characters) split across network reads.
fn sse_reply(text: String, piece: usize) -> Response {
    let frames: Vec<Bytes> = text.as_bytes().chunks(piece).map(Bytes::copy_from_slice).collect();
    let stream = futures::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, Infallible>(frame)
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

fn data_events(events: &[Value]) -> String {
    let mut text: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    text.push_str("data: [DONE]\n\n");
    text
}

// ---------------------------------------------------------------------------------------------
// Requests and helpers

fn tool(name: &str) -> ToolDefinition {
    ToolDefinition {
        name: name.into(),
        description: format!("the {name} tool"),
        parameters: json!({"type": "object", "properties": {"dir": {"type": "string"}}}),
        strict: true,
    }
}

fn text(t: &str) -> RenderedBlock {
    RenderedBlock::Text { text: t.into() }
}

/// A conversation with every kind of block: system, user text, an assistant tool call, its result.
fn agent_request() -> ModelRequest {
    ModelRequest {
        rendered: RenderedRequest {
            system: Some("You move in a maze.".into()),
            messages: vec![
                RenderedMessage { role: Role::User, content: vec![text("Where now?")] },
                RenderedMessage {
                    role: Role::Assistant,
                    content: vec![
                        text("Let me look."),
                        RenderedBlock::ToolCall(ToolCall {
                            id: "call_a".into(),
                            name: "look".into(),
                            arguments: r#"{"dir": "north"}"#.into(),
                        }),
                    ],
                },
                RenderedMessage {
                    role: Role::User,
                    content: vec![RenderedBlock::ToolResult(ToolResult {
                        id: "call_a".into(),
                        name: "look".into(),
                        result: "a wall".into(),
                    })],
                },
            ],
            tools: vec![tool("look"), tool("move")],
        },
        tool_choice: ToolChoice::Required,
        parallel_tool_calls: Some(false),
        temperature: Some(0.5),
        max_tokens: Some(64),
        seed: Some(7),
        ..ModelRequest::default()
    }
}

fn user_request(message: &str) -> ModelRequest {
    ModelRequest {
        rendered: RenderedRequest {
            system: Some("be brief".into()),
            messages: vec![RenderedMessage { role: Role::User, content: vec![text(message)] }],
            tools: Vec::new(),
        },
        ..ModelRequest::default()
    }
}

fn openai(base: &str, api_key_env: Option<&str>) -> Arc<dyn Provider> {
    let config = ProviderConfig::Openai {
        model_name: "gpt-test".into(),
        api_base: base.into(),
        api_key_env: api_key_env.map(String::from),
        timeout_s: 10.0,
    };
    build_provider("openai", &config, &reqwest::Client::new()).unwrap()
}

fn anthropic(base: &str, key_env: &str) -> Arc<dyn Provider> {
    let config = ProviderConfig::Anthropic {
        model_name: "claude-test".into(),
        api_base: base.into(),
        api_key_env: key_env.into(),
        timeout_s: 10.0,
    };
    build_provider("anthropic", &config, &reqwest::Client::new()).unwrap()
}

fn dummy(behavior: DummyBehavior, content: Option<&str>) -> ProviderConfig {
    ProviderConfig::Dummy { behavior, content: content.map(String::from) }
}

async fn collect(mut stream: ChunkStream) -> Vec<StreamChunk> {
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.expect("stream chunk"));
    }
    chunks
}

fn accumulate(chunks: &[StreamChunk]) -> ProviderResponse {
    let mut accumulator = StreamAccumulator::new();
    for chunk in chunks {
        accumulator.push(chunk);
    }
    accumulator.finish()
}

fn call(id: &str, name: &str, arguments: &str) -> ContentBlock {
    ContentBlock::ToolCall(ToolCall { id: id.into(), name: name.into(), arguments: arguments.into() })
}

// ---------------------------------------------------------------------------------------------
// OpenAI-compatible

#[tokio::test]
async fn openai_maps_request_and_answer() {
    std::env::set_var("APPRENTICE_TEST_OPENAI_KEY", "sk-test");
    let mock = Mock::start(|_| {
        json_reply(json!({
            "id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Moving.",
                "tool_calls": [{"id": "call_b", "type": "function", "function": {"name": "move", "arguments": "{\"dir\":\"east\"}"}}]
            }}],
            "usage": {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40}
        }))
    })
    .await;
    let mut request = agent_request();
    request.json_mode = Some(JsonMode::Strict);
    request.output_schema = Some(json!({"type": "object"}));

    let response =
        openai(&format!("{}/", mock.base), Some("APPRENTICE_TEST_OPENAI_KEY")).infer(&request).await.unwrap();

    assert_eq!(
        response.content,
        vec![ContentBlock::Text { text: "Moving.".into() }, call("call_b", "move", r#"{"dir":"east"}"#)]
    );
    assert_eq!(response.usage, Usage { input_tokens: 31, output_tokens: 9 });
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));

    let seen = mock.only_request();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.headers["authorization"], "Bearer sk-test");
    let body = seen.body;
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "You move in a maze."},
            {"role": "user", "content": "Where now?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "look", "arguments": "{\"dir\": \"north\"}"}}
            ]},
            {"role": "tool", "content": "a wall", "tool_call_id": "call_a"},
        ])
    );
    assert_eq!(
        body["tools"][0],
        json!({"type": "function", "function": {
            "name": "look", "description": "the look tool", "strict": true,
            "parameters": {"type": "object", "properties": {"dir": {"type": "string"}}}
        }})
    );
    assert_eq!(body["tools"].as_array().unwrap().len(), 2);
    assert_eq!(body["tool_choice"], "required");
    assert_eq!(body["parallel_tool_calls"], false);
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["seed"], 7);
    assert_eq!(
        body["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": true}})
    );
    assert!(body.get("stream").is_none(), "{body}");
}

#[tokio::test]
async fn openai_stream_reassembles_split_tool_call_and_usage() {
    let events = [
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        json!({"choices": [{"index": 0, "delta": {"content": "Héllo"}}]}),
        json!({"choices": [{"index": 0, "delta": {"content": " there"}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_s", "type": "function", "function": {"name": "move", "arguments": "{\"di"}}
        ]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "r\": \"west\"}"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}}),
    ];
    let stream_text = data_events(&events);
    // 7-byte frames split every line, the `data:` prefixes and the two-byte `é`.
    let mock = Mock::start(move |_| sse_reply(stream_text.clone(), 7)).await;

    let stream = openai(&mock.base, None).infer_stream(&agent_request()).await.unwrap();
    let chunks = collect(stream).await;

    let texts: Vec<&str> = chunks.iter().filter_map(|c| c.text.as_deref()).collect();
    assert_eq!(texts, ["Héllo", " there"], "empty role-only delta is not a chunk");
    let deltas: Vec<_> = chunks.iter().flat_map(|c| &c.tool_calls).collect();
    assert_eq!(deltas.len(), 2);
    assert_eq!(
        (deltas[0].index, deltas[0].id.as_deref(), deltas[0].name.as_deref()),
        (0, Some("call_s"), Some("move"))
    );
    assert_eq!((deltas[1].id.as_ref(), deltas[1].arguments.as_str()), (None, "r\": \"west\"}"));
    assert_eq!(chunks.last().unwrap().usage, Some(Usage { input_tokens: 12, output_tokens: 5 }));

    let response = accumulate(&chunks);
    assert_eq!(
        response.content,
        vec![ContentBlock::Text { text: "Héllo there".into() }, call("call_s", "move", r#"{"dir": "west"}"#)]
    );
    assert_eq!(response.usage, Usage { input_tokens: 12, output_tokens: 5 });
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));

    let seen = mock.only_request();
    assert!(seen.headers.get("authorization").is_none(), "no key configured → no auth header");
    assert_eq!(seen.body["stream"], true);
    assert_eq!(seen.body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn openai_upstream_errors_are_classified() {
    let mock = Mock::start(|_| (StatusCode::INTERNAL_SERVER_ERROR, "model exploded").into_response()).await;
    let provider = openai(&mock.base, None);
    match provider.infer(&user_request("hi")).await {
        Err(ProviderError::Status { status: 500, body, provider }) => {
            assert_eq!(body, "model exploded");
            assert_eq!(provider, "openai");
        }
        other => panic!("expected a 500 status error, got {other:?}"),
    }
    assert!(matches!(provider.infer_stream(&user_request("hi")).await, Err(ProviderError::Status { status: 500, .. })));

    let long = Mock::start(|_| (StatusCode::BAD_REQUEST, "x".repeat(10_000)).into_response()).await;
    match openai(&long.base, None).infer(&user_request("hi")).await {
        Err(ProviderError::Status { status: 400, body, .. }) => {
            assert!(body.len() < 2200, "body kept whole: {}", body.len())
        }
        other => panic!("expected a 400 status error, got {other:?}"),
    }

    let garbage = Mock::start(|_| json_reply(json!({"choices": "nope"}))).await;
    let err = openai(&garbage.base, None).infer(&user_request("hi")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Protocol { .. }), "{err:?}");

    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let err = openai(&format!("http://{closed}/v1"), None).infer(&user_request("hi")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Transport { .. }), "{err:?}");
}

#[tokio::test]
async fn openai_missing_key_variable_is_a_config_error() {
    let config = ProviderConfig::Openai {
        model_name: "m".into(),
        api_base: "http://127.0.0.1:1/v1".into(),
        api_key_env: Some("APPRENTICE_TEST_NEVER_SET_KEY".into()),
        timeout_s: 1.0,
    };
    let err = build_provider("openai", &config, &reqwest::Client::new()).err().unwrap();
    assert!(matches!(err, ProviderError::Config { .. }));
    assert!(err.to_string().contains("APPRENTICE_TEST_NEVER_SET_KEY"), "{err}");
}

#[tokio::test]
async fn openai_mid_stream_error_ends_the_stream_with_an_error() {
    let text = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\ndata: {not json\n\n".to_string();
    let mock = Mock::start(move |_| sse_reply(text.clone(), 1000)).await;
    let mut stream = openai(&mock.base, None).infer_stream(&user_request("hi")).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().text.as_deref(), Some("a"));
    assert!(matches!(stream.next().await, Some(Err(ProviderError::Protocol { .. }))));
    assert!(stream.next().await.is_none());
}

// ---------------------------------------------------------------------------------------------
// Anthropic

#[tokio::test]
async fn anthropic_maps_request_and_answer() {
    std::env::set_var("APPRENTICE_TEST_ANTHROPIC_KEY", "ak-test");
    let mock = Mock::start(|_| {
        json_reply(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [
                {"type": "text", "text": "Going east."},
                {"type": "tool_use", "id": "toolu_1", "name": "move", "input": {"dir": "east"}}
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 40, "output_tokens": 12}
        }))
    })
    .await;
    let mut request = agent_request();
    request.max_tokens = None;
    request.rendered.messages[1].content[1] =
        RenderedBlock::ToolCall(ToolCall { id: "call_a".into(), name: "look".into(), arguments: "not json".into() });

    let response = anthropic(&mock.base, "APPRENTICE_TEST_ANTHROPIC_KEY").infer(&request).await.unwrap();
    assert_eq!(
        response.content,
        vec![ContentBlock::Text { text: "Going east.".into() }, call("toolu_1", "move", r#"{"dir":"east"}"#)]
    );
    assert_eq!(response.usage, Usage { input_tokens: 40, output_tokens: 12 });
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));

    let seen = mock.only_request();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], "ak-test");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    let body = seen.body;
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body["system"], "You move in a maze.");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Where now?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "call_a", "name": "look", "input": {"_raw": "not json"}}
            ]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a", "content": "a wall"}]},
        ])
    );
    assert_eq!(
        body["tools"][1],
        json!({"name": "move", "description": "the move tool", "input_schema": {"type": "object", "properties": {"dir": {"type": "string"}}}})
    );
    assert_eq!(body["tool_choice"], json!({"type": "any", "disable_parallel_tool_use": true}));
    assert!(body.get("seed").is_none(), "the messages API has no seed");
}

#[tokio::test]
async fn anthropic_stream_reassembles_tool_use() {
    std::env::set_var("APPRENTICE_TEST_ANTHROPIC_KEY", "ak-test");
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Okay, "}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "moving."}}),
        ),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "move", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"dir\": "}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"south\"}"}}),
        ),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 17}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    let stream_text: String = events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect();
    let mock = Mock::start(move |_| sse_reply(stream_text.clone(), 11)).await;

    let stream = anthropic(&mock.base, "APPRENTICE_TEST_ANTHROPIC_KEY").infer_stream(&agent_request()).await.unwrap();
    let chunks = collect(stream).await;
    let last = chunks.last().unwrap();
    assert_eq!(last.usage, Some(Usage { input_tokens: 25, output_tokens: 17 }));
    assert_eq!(last.finish_reason.as_deref(), Some("tool_calls"));
    let response = accumulate(&chunks);
    assert_eq!(
        response.content,
        vec![ContentBlock::Text { text: "Okay, moving.".into() }, call("toolu_9", "move", r#"{"dir": "south"}"#)]
    );
    assert_eq!(mock.only_request().body["stream"], true);
}

// ---------------------------------------------------------------------------------------------
// Dummy

fn dummy_provider(behavior: DummyBehavior, content: Option<&str>) -> DummyProvider {
    DummyProvider::new("dummy", behavior, content.map(String::from))
}

async fn streamed(provider: &dyn Provider, request: &ModelRequest) -> ProviderResponse {
    accumulate(&collect(provider.infer_stream(request).await.unwrap()).await)
}

#[tokio::test]
async fn dummy_echo_is_deterministic_and_streams_the_same_text() {
    let provider = dummy_provider(DummyBehavior::Echo, None);
    let request = user_request("  go to   the red\tball ");
    let first = provider.infer(&request).await.unwrap();
    let second = provider.infer(&request).await.unwrap();
    assert_eq!(first.content, second.content);
    assert_eq!(first.content, vec![ContentBlock::Text { text: "  go to   the red\tball ".into() }]);
    // "be brief" (2) + 5 words in; 5 words out.
    assert_eq!(first.usage, Usage { input_tokens: 7, output_tokens: 5 });
    assert_eq!(first.finish_reason.as_deref(), Some("stop"));

    let chunks = collect(provider.infer_stream(&request).await.unwrap()).await;
    assert_eq!(chunks.len(), 6, "five words and a closing chunk: {chunks:?}");
    let last = chunks.last().unwrap();
    assert_eq!((last.usage, last.finish_reason.as_deref()), (Some(first.usage), Some("stop")));
    let again = accumulate(&chunks);
    assert_eq!((again.content, again.usage, again.finish_reason), (first.content, first.usage, first.finish_reason));
}

#[tokio::test]
async fn dummy_echoes_tool_results_and_calls_tools() {
    let request = agent_request();
    let echo = dummy_provider(DummyBehavior::Echo, None).infer(&request).await.unwrap();
    assert_eq!(echo.content, vec![ContentBlock::Text { text: "a wall".into() }]);

    let caller = dummy_provider(DummyBehavior::ToolCall, Some(r#"{"dir": "up"}"#));
    let response = caller.infer(&request).await.unwrap();
    assert_eq!(response.content, vec![call("call_0", "look", r#"{"dir": "up"}"#)]);
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));
    let again = streamed(&caller, &request).await;
    assert_eq!(
        (again.content, again.usage, again.finish_reason),
        (response.content, response.usage, response.finish_reason)
    );

    let no_tools = dummy_provider(DummyBehavior::ToolCall, None).infer(&user_request("hello")).await.unwrap();
    assert_eq!(no_tools.content, vec![ContentBlock::Text { text: "hello".into() }]);

    let fixed = dummy_provider(DummyBehavior::Fixed, None).infer(&request).await.unwrap();
    assert_eq!(fixed.content, vec![ContentBlock::Text { text: "dummy".into() }]);
    let json_reply = dummy_provider(DummyBehavior::Json, Some(r#"{"a": 1}"#)).infer(&request).await.unwrap();
    assert_eq!(json_reply.content, vec![ContentBlock::Text { text: r#"{"a": 1}"#.into() }]);

    let failing = dummy_provider(DummyBehavior::Error, None);
    assert!(matches!(failing.infer(&request).await, Err(ProviderError::Scripted { .. })));
    assert!(matches!(failing.infer_stream(&request).await, Err(ProviderError::Scripted { .. })));
}

// ---------------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn router_falls_back_and_reports_skipped_failures() {
    let broken = Mock::start(|_| (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response()).await;
    let config = ModelConfig {
        providers: vec![
            ("scripted".into(), dummy(DummyBehavior::Error, None)),
            (
                "upstream".into(),
                ProviderConfig::Openai {
                    model_name: "m".into(),
                    api_base: broken.base.clone(),
                    api_key_env: None,
                    timeout_s: 5.0,
                },
            ),
            ("backup".into(), dummy(DummyBehavior::Fixed, Some("from backup"))),
        ],
        price: Some(Price { input_per_million: 1.0, output_per_million: 2.0, per_hour: 0.0 }),
    };
    let router = ModelRouter::from_config("maze", &config, &reqwest::Client::new()).unwrap();
    assert_eq!(router.price(), Some(Price { input_per_million: 1.0, output_per_million: 2.0, per_hour: 0.0 }));
    assert_eq!(router.provider_names().collect::<Vec<_>>(), ["scripted", "upstream", "backup"]);

    let routed = router.infer(&user_request("hi")).await.unwrap();
    assert_eq!(routed.provider_name, "backup");
    assert_eq!(routed.value.content, vec![ContentBlock::Text { text: "from backup".into() }]);
    let names: Vec<&str> = routed.failures.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["scripted", "upstream"]);
    assert!(matches!(routed.failures[0].1, ProviderError::Scripted { .. }));
    assert!(matches!(routed.failures[1].1, ProviderError::Status { status: 503, .. }));

    let routed = router.infer_stream(&user_request("hi")).await.unwrap();
    assert_eq!((routed.provider_name.as_str(), routed.failures.len()), ("backup", 2));
    let response = accumulate(&collect(routed.value).await);
    assert_eq!(response.content, vec![ContentBlock::Text { text: "from backup".into() }]);
}

#[tokio::test]
async fn router_reports_every_failure_when_all_fail() {
    let broken = Mock::start(|_| (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()).await;
    let providers: Vec<(String, Arc<dyn Provider>)> = vec![
        ("first".into(), Arc::new(dummy_provider(DummyBehavior::Error, None))),
        ("second".into(), openai(&broken.base, None)),
    ];
    let router = ModelRouter::new("doomed", providers, None);
    let err = router.infer(&user_request("hi")).await.unwrap_err();
    assert_eq!(err.model, "doomed");
    assert_eq!(err.failures.len(), 2);
    let message = err.to_string();
    for needle in ["doomed", "first", "second", "500", "boom"] {
        assert!(message.contains(needle), "`{needle}` missing from: {message}");
    }
    let Err(err) = router.infer_stream(&user_request("hi")).await else { panic!("stream should fail") };
    assert_eq!(err.failures.len(), 2);
}

#[tokio::test]
async fn routers_are_built_for_every_configured_model() {
    let text = r#"
        [models.echo]
        routing = ["a"]
        [models.echo.providers.a]
        type = "dummy"
        [models.echo.price]
        input_per_million = 0.5
        output_per_million = 1.5

        [models.remote]
        routing = ["main", "fallback"]
        [models.remote.providers.main]
        type = "openai"
        model_name = "gpt-x"
        api_base = "http://127.0.0.1:9/v1"
        [models.remote.providers.fallback]
        type = "dummy"
        behavior = "fixed"
    "#;
    let config = Config::parse(text, Path::new("test.toml"), Path::new(".")).unwrap();
    let routers = build_routers(&config, &reqwest::Client::new()).unwrap();
    assert_eq!(routers.keys().collect::<Vec<_>>(), ["echo", "remote"]);
    assert_eq!(routers["echo"].price().map(|p| p.output_per_million), Some(1.5));
    assert_eq!(routers["remote"].provider_names().collect::<Vec<_>>(), ["main", "fallback"]);

    let keyed = text.replace("api_base = ", "api_key_env = \"APPRENTICE_TEST_UNSET_ROUTER_KEY\"\n        api_base = ");
    let config = Config::parse(&keyed, Path::new("test.toml"), Path::new(".")).unwrap();
    let err = build_routers(&config, &reqwest::Client::new()).unwrap_err().to_string();
    assert!(err.contains("models.remote.providers.main") && err.contains("APPRENTICE_TEST_UNSET_ROUTER_KEY"), "{err}");
}
