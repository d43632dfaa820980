//! The gateway end to end on loopback: the dummy provider, a mock OpenAI-compatible upstream, the
//! SQLite store in a scratch folder, and real HTTP requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use apprentice_core::record::RenderedBlock;
use apprentice_core::{Config, ContentBlock, FeedbackValue, InferenceOutput, MetricLevel, SystemInput};
use apprentice_gateway::{Gateway, RunningGateway};
use apprentice_store::{InferenceQuery, SqliteStore};
use axum::routing::post;
use axum::Json;
use serde_json::{json, Value};
use uuid::Uuid;

/// A loopback OpenAI-compatible upstream that fails its first `fail_first` calls with a 500.
struct MockUpstream {
    url: String,
    calls: Arc<AtomicUsize>,
}

async fn mock_upstream(fail_first: usize) -> MockUpstream {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if n < fail_first {
                    return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "upstream is down").into_response();
                }
                let text = format!("mock saw {} messages", body["messages"].as_array().map_or(0, |m| m.len()));
                Json(json!({
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
                }))
                .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    MockUpstream { url: format!("http://{addr}/v1"), calls }
}

use axum::response::IntoResponse;

fn config_text(upstream: &str) -> String {
    format!(
        r#"
[models.echo]
routing = ["dummy"]
[models.echo.providers.dummy]
type = "dummy"
behavior = "echo"

[models.teacher]
routing = ["primary", "backup"]
price = {{ input_per_million = 1.0, output_per_million = 2.0 }}
[models.teacher.providers.primary]
type = "openai"
model_name = "gpt-test"
api_base = "{upstream}"
[models.teacher.providers.backup]
type = "dummy"
behavior = "fixed"
content = "backup answer"

[models.solo]
routing = ["primary"]
[models.solo.providers.primary]
type = "openai"
model_name = "gpt-test"
api_base = "{upstream}"

[functions.retrying]
type = "chat"
[functions.retrying.variants.patient]
model = "solo"
retries = {{ num_retries = 2, max_delay_s = 0.01 }}
[functions.retrying.variants.impatient]
model = "solo"
weight = 0.0

[models.caller]
routing = ["dummy"]
[models.caller.providers.dummy]
type = "dummy"
behavior = "tool_call"
content = '{{"direction": "left"}}'

[models.jsonish]
routing = ["dummy"]
[models.jsonish.providers.dummy]
type = "dummy"
behavior = "json"
content = '{{"action": "forward"}}'

[tools.turn]
description = "Turn the agent"
parameters = {{ type = "object", properties = {{ direction = {{ type = "string" }} }}, required = ["direction"] }}

[functions.act]
type = "chat"
system_schema = {{ type = "object", required = ["mission"], properties = {{ mission = {{ type = "string" }} }} }}
user_schema = {{ type = "object", required = ["observation"], properties = {{ observation = {{ type = "string" }}, step = {{ type = "integer" }} }} }}
[functions.act.variants.a]
model = "echo"
weight = 1.0
system_template = "Mission: {{{{ mission }}}}"
user_template = "You see {{{{ observation }}}}."
[functions.act.variants.b]
model = "echo"
weight = 1.0
system_template = "MISSION={{{{ mission }}}}"
user_template = "OBS={{{{ observation }}}}"
[functions.act.variants.shadow]
model = "echo"
weight = 0.0
system_template = "{{{{ mission }}}}"
user_template = "{{{{ observation }}}}"

[functions.ask]
type = "chat"
[functions.ask.variants.teacher]
model = "teacher"

[functions.tools]
type = "chat"
tools = ["turn"]
[functions.tools.variants.only]
model = "caller"

[functions.decide]
type = "json"
output_schema = {{ type = "object", required = ["action"], properties = {{ action = {{ type = "string" }} }} }}
[functions.decide.variants.only]
model = "jsonish"

[metrics.success]
type = "boolean"
level = "episode"
optimize = "max"

[metrics.reward]
type = "float"
level = "inference"
optimize = "max"
"#
    )
}

struct Harness {
    server: RunningGateway,
    client: reqwest::Client,
    upstream: MockUpstream,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(fail_first: usize) -> Self {
        let upstream = mock_upstream(fail_first).await;
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(&config_text(&upstream.url), "test.toml".as_ref(), dir.path()).unwrap();
        let store = SqliteStore::open(&dir.path().join("test.db"), config.store.write_mode).await.unwrap();
        let gateway = Gateway::with_store(config, Arc::new(store)).unwrap();
        let server = RunningGateway::start(gateway, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        Harness { server, client: reqwest::Client::new(), upstream, _dir: dir }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.client.post(format!("{}{path}", self.server.url())).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.server.url()))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    fn gateway(&self) -> &Gateway {
        &self.server.gateway
    }
}

fn act_body(observation: &str) -> Value {
    json!({
        "function_name": "act",
        "input": {
            "system": {"mission": "go to the red ball"},
            "messages": [{"role": "user", "content": [{"type": "template", "name": "user", "arguments": {"observation": observation, "step": 1}}]}]
        },
        "tags": {"env": "test"}
    })
}

#[tokio::test]
async fn records_structured_input_and_rendered_messages() {
    let h = Harness::start(0).await;
    let (status, answer) = h.post("/inference", act_body("a wall ahead")).await;
    assert_eq!(status, 200, "{answer}");
    let id: Uuid = answer["inference_id"].as_str().unwrap().parse().unwrap();
    let variant = answer["variant_name"].as_str().unwrap().to_string();
    let record = h.gateway().store.inference(id).await.unwrap().expect("acknowledged inference is in the store");

    // The structured input is kept as given...
    match &record.input.system {
        Some(SystemInput::Arguments(args)) => assert_eq!(args["mission"], "go to the red ball"),
        other => panic!("system arguments not kept: {other:?}"),
    }
    match &record.input.messages[0].content[0] {
        ContentBlock::Template { name, arguments } => {
            assert_eq!(name, "user");
            assert_eq!(arguments["observation"], "a wall ahead");
        }
        other => panic!("template arguments not kept: {other:?}"),
    }
    // ...beside what the model was actually sent, rendered with the chosen variant's templates.
    let (system, user) = if variant == "a" {
        ("Mission: go to the red ball", "You see a wall ahead.")
    } else {
        ("MISSION=go to the red ball", "OBS=a wall ahead")
    };
    assert_eq!(record.rendered.system.as_deref(), Some(system));
    assert_eq!(record.rendered.messages[0].content, vec![RenderedBlock::Text { text: user.into() }]);
    // The echo model answers with the rendered user text.
    assert_eq!(answer["content"][0]["text"], user);
    assert_eq!(record.output, InferenceOutput::Chat { content: vec![ContentBlock::Text { text: user.into() }] });
    assert_eq!(record.tags.get("env").map(String::as_str), Some("test"));
    assert_eq!(record.model_name, "echo");
    assert_eq!(record.provider_name, "dummy");
    assert!(record.usage.input_tokens > 0 && record.usage.output_tokens > 0);
    assert!(record.latency_ms > 0.0);
    assert_eq!(record.episode_id.get_version_num(), 7, "the gateway mints UUIDv7 episode ids");
    assert_eq!(id.get_version_num(), 7);
}

#[tokio::test]
async fn variants_are_sticky_per_episode_and_both_are_used() {
    let h = Harness::start(0).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..16 {
        let (_, first) = h.post("/inference", act_body("x")).await;
        let episode = first["episode_id"].as_str().unwrap().to_string();
        let variant = first["variant_name"].as_str().unwrap().to_string();
        assert_ne!(variant, "shadow", "a weight-0 variant is never sampled");
        for _ in 0..4 {
            let mut body = act_body("y");
            body["episode_id"] = json!(episode);
            let (status, next) = h.post("/inference", body).await;
            assert_eq!(status, 200);
            assert_eq!(next["episode_id"], json!(episode));
            assert_eq!(next["variant_name"], json!(variant), "variant changed within an episode");
        }
        seen.insert(variant);
    }
    assert_eq!(seen.len(), 2, "16 episodes with equal weights should use both variants, saw {seen:?}");

    // Pinning wins, even for a variant with weight 0.
    let mut body = act_body("z");
    body["variant_name"] = json!("shadow");
    let (status, pinned) = h.post("/inference", body).await;
    assert_eq!(status, 200);
    assert_eq!(pinned["variant_name"], "shadow");
}

#[tokio::test]
async fn falls_back_to_the_next_provider_and_records_which_answered() {
    let h = Harness::start(usize::MAX).await;
    let (status, answer) = h
        .post("/inference", json!({"function_name": "ask", "input": {"messages": [{"role": "user", "content": "hi"}]}}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["content"][0]["text"], "backup answer");
    assert_eq!(h.upstream.calls.load(Ordering::SeqCst), 1, "the primary was tried first");
    let record =
        h.gateway().store.inference(answer["inference_id"].as_str().unwrap().parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(record.provider_name, "backup");
    let metrics = h.client.get(format!("{}/metrics", h.server.url())).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("apprentice_provider_errors_total{model=\"teacher\",provider=\"primary\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn variant_retries_the_model_and_reports_upstream_failure_as_502() {
    let h = Harness::start(2).await;
    let body = json!({"function_name": "retrying", "variant_name": "impatient", "input": {"messages": [{"role": "user", "content": "hi"}]}});
    let (status, error) = h.post("/inference", body).await;
    assert_eq!(status, 502, "{error}");
    assert_eq!(error["error"]["type"], "upstream_error");
    assert!(error["error"]["message"].as_str().unwrap().contains("500"), "{error}");
    assert_eq!(h.upstream.calls.load(Ordering::SeqCst), 1, "no retries configured");

    // One failure left upstream: two retries are enough.
    let body = json!({"function_name": "retrying", "variant_name": "patient", "input": {"messages": [{"role": "user", "content": "hi"}]}});
    let (status, answer) = h.post("/inference", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(h.upstream.calls.load(Ordering::SeqCst), 3, "failed once more, then succeeded on the retry");
    assert_eq!(h.gateway().store.count_inferences().await.unwrap(), 1, "failed calls are not recorded as inferences");
}

#[tokio::test]
async fn openai_compatible_upstream_answers_and_cost_is_recorded() {
    let h = Harness::start(0).await;
    let (status, answer) = h.post("/inference", json!({"function_name": "ask", "input": {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]}})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["content"][0]["text"], "mock saw 2 messages");
    assert_eq!(answer["usage"], json!({"input_tokens": 11, "output_tokens": 4}));
    let record =
        h.gateway().store.inference(answer["inference_id"].as_str().unwrap().parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(record.provider_name, "primary");
    let expected = (11.0 * 1.0 + 4.0 * 2.0) / 1e6;
    assert!((record.cost.unwrap() - expected).abs() < 1e-15, "cost {:?}", record.cost);
}

async fn sse_events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test]
async fn native_streaming_records_the_whole_answer() {
    let h = Harness::start(0).await;
    let mut body = act_body("three little words");
    body["stream"] = json!(true);
    let response = h.client.post(format!("{}/inference", h.server.url())).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() >= 3, "expected several chunks, got {chunks:?}");
    let text: String = chunks
        .iter()
        .flat_map(|c| c["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["text"].as_str().map(str::to_string))
        .collect();
    let id: Uuid = chunks[0]["inference_id"].as_str().unwrap().parse().unwrap();
    let last = chunks.last().unwrap();
    assert!(last["usage"]["output_tokens"].as_u64().unwrap() > 0);
    let record = h.gateway().store.inference(id).await.unwrap().expect("streamed inference is recorded before [DONE]");
    assert_eq!(record.output, InferenceOutput::Chat { content: vec![ContentBlock::Text { text: text.clone() }] });
    assert!(text.contains("three little words"));
    assert!(record.ttft_ms.is_some());
}

#[tokio::test]
async fn openai_compatible_api_streams_and_records() {
    let h = Harness::start(0).await;
    let episode = apprentice_core::new_id();
    let body = json!({
        "model": "function::act",
        "messages": [
            {"role": "system", "content": {"mission": "open the door"}},
            {"role": "user", "content": [{"type": "template", "name": "user", "arguments": {"observation": "a door"}}]}
        ],
        "stream": true,
        "episode_id": episode,
        "tags": {"sdk": "raw"}
    });
    let response = h.client.post(format!("{}/v1/chat/completions", h.server.url())).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let records = h
        .gateway()
        .store
        .inferences(&InferenceQuery { episode_id: Some(episode), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.function_name, "act");
    assert_eq!(record.tags.get("sdk").map(String::as_str), Some("raw"));
    assert_eq!(record.output, InferenceOutput::Chat { content: vec![ContentBlock::Text { text }] });

    // Episode id and tags through headers instead of the body.
    let header_episode = apprentice_core::new_id();
    let response = h
        .client
        .post(format!("{}/v1/chat/completions", h.server.url()))
        .header("x-apprentice-episode-id", header_episode.to_string())
        .header("x-apprentice-tags", r#"{"via": "header"}"#)
        .json(&json!({"model": "model::echo", "messages": [{"role": "user", "content": "ping"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "ping");
    assert_eq!(answer["usage"]["total_tokens"], 2);
    let records = h
        .gateway()
        .store
        .inferences(&InferenceQuery { episode_id: Some(header_episode), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].function_name, apprentice_core::config::DEFAULT_FUNCTION);
    assert_eq!(records[0].tags.get("via").map(String::as_str), Some("header"));
}

#[tokio::test]
async fn tool_calls_round_trip_through_both_apis() {
    let h = Harness::start(0).await;
    let (status, answer) = h
        .post(
            "/inference",
            json!({"function_name": "tools", "input": {"messages": [{"role": "user", "content": "turn please"}]}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let call = &answer["content"][0];
    assert_eq!(call["type"], "tool_call");
    assert_eq!(call["name"], "turn");
    assert_eq!(call["arguments"], r#"{"direction": "left"}"#);
    let record =
        h.gateway().store.inference(answer["inference_id"].as_str().unwrap().parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(record.rendered.tools.len(), 1, "the function's tools are offered and recorded");
    assert_eq!(record.rendered.tools[0].name, "turn");

    // OpenAI shape: the tool call comes back as tool_calls, and a tool result can be sent back.
    let (status, answer) = h
        .post(
            "/v1/chat/completions",
            json!({"model": "function::tools", "messages": [{"role": "user", "content": "turn"}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let message = &answer["choices"][0]["message"];
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "turn");
    let call_id = message["tool_calls"][0]["id"].clone();
    let (status, answer) = h
        .post(
            "/v1/chat/completions",
            json!({"model": "function::tools", "messages": [
                {"role": "user", "content": "turn"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "turn", "arguments": "{\"direction\":\"left\"}"}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "turned left"}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let record = h.gateway().store.inference(answer["id"].as_str().unwrap().parse().unwrap()).await.unwrap().unwrap();
    match &record.input.messages[2].content[0] {
        ContentBlock::ToolResult(result) => {
            assert_eq!(result.name, "turn", "the tool name is recovered from the assistant's call");
            assert_eq!(result.result, "turned left");
        }
        other => panic!("expected a tool result, got {other:?}"),
    }
}

#[tokio::test]
async fn json_functions_parse_and_validate_output() {
    let h = Harness::start(0).await;
    let (status, answer) = h
        .post(
            "/inference",
            json!({"function_name": "decide", "input": {"messages": [{"role": "user", "content": "what now?"}]}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["output"]["parsed"], json!({"action": "forward"}));
    assert_eq!(answer["output"]["raw"], r#"{"action": "forward"}"#);
}

#[tokio::test]
async fn feedback_at_both_levels_and_demonstrations() {
    let h = Harness::start(0).await;
    let (_, answer) = h.post("/inference", act_body("a key")).await;
    let inference_id = answer["inference_id"].clone();
    let episode_id = answer["episode_id"].clone();

    let (status, fb) =
        h.post("/feedback", json!({"metric_name": "reward", "inference_id": inference_id, "value": 0.75})).await;
    assert_eq!(status, 200, "{fb}");
    let (status, _) = h
        .post(
            "/feedback",
            json!({"metric_name": "success", "episode_id": episode_id, "value": true, "tags": {"judge": "env"}}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = h
        .post(
            "/feedback",
            json!({"metric_name": "demonstration", "inference_id": inference_id, "value": "pick up the key"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = h
        .post("/feedback", json!({"metric_name": "comment", "episode_id": episode_id, "value": "took the long way"}))
        .await;
    assert_eq!(status, 200);

    let store = &h.gateway().store;
    let on_inference = store.feedback_for(inference_id.as_str().unwrap().parse().unwrap()).await.unwrap();
    assert_eq!(on_inference.len(), 2);
    assert_eq!(on_inference[0].value, FeedbackValue::Float(0.75));
    assert_eq!(on_inference[0].target_level, MetricLevel::Inference);
    assert_eq!(
        on_inference[1].value,
        FeedbackValue::Demonstration(InferenceOutput::Chat {
            content: vec![ContentBlock::Text { text: "pick up the key".into() }]
        })
    );
    let on_episode = store.feedback_for(episode_id.as_str().unwrap().parse().unwrap()).await.unwrap();
    assert_eq!(on_episode.len(), 2);
    assert_eq!(on_episode[0].value, FeedbackValue::Boolean(true));
    assert_eq!(on_episode[0].target_level, MetricLevel::Episode);
    assert_eq!(on_episode[0].tags.get("judge").map(String::as_str), Some("env"));
    assert_eq!(on_episode[1].value, FeedbackValue::Comment("took the long way".into()));
    assert_eq!(fb["feedback_id"].as_str().unwrap().parse::<Uuid>().unwrap().get_version_num(), 7);
}

/// Every client mistake gets a 4xx JSON error that names the offending field.
#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_field() {
    let h = Harness::start(0).await;
    let (_, ok) = h.post("/inference", act_body("x")).await;
    let inference_id = ok["inference_id"].clone();
    let episode_id = ok["episode_id"].clone();
    let unknown = apprentice_core::new_id();

    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "unknown function",
            "/inference",
            json!({"function_name": "nope", "input": {"messages": []}}),
            404,
            "function_name",
        ),
        ("unknown model", "/inference", json!({"model_name": "nope", "input": {"messages": []}}), 404, "model_name"),
        ("neither function nor model", "/inference", json!({"input": {"messages": []}}), 400, "function_name"),
        (
            "unknown variant",
            "/inference",
            {
                let mut b = act_body("x");
                b["variant_name"] = json!("zzz");
                b
            },
            404,
            "variant_name",
        ),
        (
            "arguments failing the schema",
            "/inference",
            json!({"function_name": "act", "input": {"system": {"mission": "m"}, "messages": [{"role": "user", "content": {"observation": 42}}]}}),
            400,
            "input.messages[0].content[0]",
        ),
        (
            "missing required argument",
            "/inference",
            json!({"function_name": "act", "input": {"system": {"wrong": "m"}, "messages": []}}),
            400,
            "input.system",
        ),
        (
            "text where arguments are required",
            "/inference",
            json!({"function_name": "act", "input": {"system": {"mission": "m"}, "messages": [{"role": "user", "content": "plain"}]}}),
            400,
            "input.messages[0].content[0]",
        ),
        (
            "unknown content block type",
            "/inference",
            json!({"function_name": "act", "input": {"messages": [{"role": "user", "content": [{"type": "image"}]}]}}),
            400,
            "input.messages[0].content",
        ),
        (
            "unknown field",
            "/inference",
            json!({"function_name": "act", "input": {"messages": []}, "temprature": 1}),
            400,
            "temprature",
        ),
        (
            "malformed episode id",
            "/inference",
            json!({"function_name": "act", "episode_id": "not-a-uuid", "input": {"messages": []}}),
            400,
            "episode_id",
        ),
        (
            "unknown metric",
            "/feedback",
            json!({"metric_name": "nope", "inference_id": inference_id, "value": true}),
            404,
            "metric_name",
        ),
        (
            "unknown inference",
            "/feedback",
            json!({"metric_name": "reward", "inference_id": unknown, "value": 1.0}),
            404,
            "inference_id",
        ),
        (
            "unknown episode",
            "/feedback",
            json!({"metric_name": "success", "episode_id": unknown, "value": true}),
            404,
            "episode_id",
        ),
        (
            "episode metric given an inference",
            "/feedback",
            json!({"metric_name": "success", "inference_id": inference_id, "value": true}),
            400,
            "episode_id",
        ),
        (
            "inference metric given an episode",
            "/feedback",
            json!({"metric_name": "reward", "episode_id": episode_id, "value": 1.0}),
            400,
            "inference_id",
        ),
        (
            "boolean metric given a number",
            "/feedback",
            json!({"metric_name": "success", "episode_id": episode_id, "value": 1}),
            400,
            "value",
        ),
        (
            "float metric given a string",
            "/feedback",
            json!({"metric_name": "reward", "inference_id": inference_id, "value": "high"}),
            400,
            "value",
        ),
        (
            "demonstration of the wrong shape",
            "/feedback",
            json!({"metric_name": "demonstration", "inference_id": inference_id, "value": 3}),
            400,
            "value",
        ),
        (
            "openai: unknown model",
            "/v1/chat/completions",
            json!({"model": "function::nope", "messages": []}),
            404,
            "model",
        ),
        (
            "openai: bad message role",
            "/v1/chat/completions",
            json!({"model": "model::echo", "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
    ];
    for (what, path, body, status, field) in cases {
        let (got, error) = h.post(path, body).await;
        assert_eq!(got, status, "{what}: {error}");
        assert_eq!(error["error"]["field"], json!(field), "{what}: {error}");
        assert!(!error["error"]["message"].as_str().unwrap_or_default().is_empty(), "{what}: {error}");
    }

    let (status, error) = h.post_raw("/inference", "{\"function_name\": \"act\", ").await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["type"], "invalid_json");
    let (status, error) = h.post_raw("/feedback", "not json").await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["type"], "invalid_json");

    // Nothing above was recorded: only the first, valid inference is in the store.
    assert_eq!(h.gateway().store.count_inferences().await.unwrap(), 1);
}

#[tokio::test]
async fn dryrun_answers_without_recording() {
    let h = Harness::start(0).await;
    let mut body = act_body("x");
    body["dryrun"] = json!(true);
    let (status, answer) = h.post("/inference", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(h.gateway().store.count_inferences().await.unwrap(), 0);
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let h = Harness::start(0).await;
    let health: Value = h.client.get(format!("{}/health", h.server.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    h.post("/inference", act_body("x")).await;
    h.post("/inference", json!({"function_name": "nope"})).await;
    let text = h.client.get(format!("{}/metrics", h.server.url())).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("apprentice_requests_total{endpoint=\"/inference\",status=\"200\"} 1"), "{text}");
    assert!(text.contains("apprentice_requests_total{endpoint=\"/inference\",status=\"404\"} 1"), "{text}");
    assert!(text.contains("apprentice_request_duration_seconds_count{endpoint=\"/inference\"} 2"), "{text}");
    assert!(text.contains("apprentice_store_write_duration_seconds_count 1"), "{text}");
    assert!(text.contains("apprentice_inferences_total{function=\"act\""), "{text}");
}
