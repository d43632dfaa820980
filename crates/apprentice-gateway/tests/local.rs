//! The local provider end to end: the real SmolLM2-135M-Instruct from the model cache (fetched by
//! `apprentice model fetch smollm2-135m`; these tests fail without it, CI fetches it first),
//! served as `local::smollm2-135m` behind the native and OpenAI-compatible APIs, every call
//! recorded. Generations are kept short (≤ 12 tokens) so the file runs in seconds.

use std::sync::{Arc, OnceLock};

use apprentice_core::config::WeightFormat;
use apprentice_core::{Config, ContentBlock, InferenceOutput, ToolDefinition};
use apprentice_gateway::providers::local::{resolve, shared_model, LocalModel, ServingSettings};
use apprentice_gateway::{Gateway, RunningGateway};
use apprentice_model::cache::ModelCache;
use apprentice_model::serve::{Request, Scheduler, SchedulerConfig, ServingModel};
use apprentice_model::{resolve_model, GenerateOptions, LoadedModel, Tokenizer};
use apprentice_store::{InferenceQuery, SqliteStore};
use serde_json::{json, Value};
use uuid::Uuid;

const MODEL: &str = "local::smollm2-135m";
const SYSTEM: &str = "You are a concise assistant.";
const QUESTION: &str = "What is the capital of France?";
const MAX_TOKENS: usize = 12;

fn config_text() -> String {
    format!(
        r#"
[models."{MODEL}"]
routing = ["local"]
[models."{MODEL}".providers.local]
type = "local"
model = "smollm2-135m"

[models.tiny-context]
routing = ["local"]
[models.tiny-context.providers.local]
type = "local"
model = "smollm2-135m"
max_context_tokens = 48
threads = 1

[functions.chat.variants.student]
model = "{MODEL}"
temperature = 0.0
max_tokens = {MAX_TOKENS}
"#
    )
}

fn model_path() -> std::path::PathBuf {
    resolve_model("smollm2-135m").unwrap_or_else(|e| panic!("the SmolLM2 model is required by these tests: {e}"))
}

/// Holds the gateway's copy for the whole test binary, so every gateway here shares one load.
fn served_model() -> &'static Arc<LocalModel> {
    static MODEL: OnceLock<Arc<LocalModel>> = OnceLock::new();
    MODEL.get_or_init(|| shared_model(&model_path(), &ServingSettings::default()).unwrap())
}

/// A copy loaded straight through apprentice-model and served with the provider's default
/// weights (q8_0), for the reference generations.
fn reference() -> &'static (Arc<ServingModel>, LoadedModel, Tokenizer) {
    static REFERENCE: OnceLock<(Arc<ServingModel>, LoadedModel, Tokenizer)> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = model_path();
        let loaded = apprentice_model::load(&path, &candle_core::Device::Cpu).unwrap();
        let serving = Arc::new(ServingModel::from_llama(&loaded.model, WeightFormat::default()).unwrap());
        (serving, loaded, Tokenizer::from_path(&path).unwrap())
    })
}

/// What apprentice-model generates greedily for `messages` with the model's own template, one
/// request alone: (text, prompt tokens, completion tokens, finish reason).
fn direct_greedy(messages: &[Value], max_tokens: usize) -> (String, usize, usize, apprentice_model::FinishReason) {
    let (serving, loaded, tokenizer) = reference();
    let template = apprentice_model::ChatTemplate::from_tokenizer(tokenizer).unwrap();
    let prompt = tokenizer.encode(&template.render_prompt(messages, None).unwrap(), false).unwrap();
    let options =
        GenerateOptions { stop_token_ids: loaded.config.eos_token_ids.clone(), ..GenerateOptions::greedy(max_tokens) };
    let scheduler = Scheduler::start(serving.clone(), None, SchedulerConfig::default(), None);
    let (tx, rx) = std::sync::mpsc::channel();
    let _ticket = scheduler
        .submit(
            Request { prompt, options, prefix_key: None },
            Box::new(|_| std::ops::ControlFlow::Continue(())),
            Box::new(move |c| tx.send(c).unwrap()),
        )
        .unwrap();
    let out = rx.recv().unwrap().unwrap().generation;
    let text = tokenizer.decode(&out.tokens, true).unwrap();
    (text, out.prompt_tokens, out.completion_tokens, out.finish_reason)
}

struct Harness {
    server: RunningGateway,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        served_model();
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(&config_text(), "local.toml".as_ref(), dir.path()).unwrap();
        let store = SqliteStore::open(&dir.path().join("local.db"), config.store.write_mode).await.unwrap();
        let gateway = Gateway::with_store(config, Arc::new(store)).unwrap();
        let server = RunningGateway::start(gateway, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        Harness { server, client: reqwest::Client::new(), _dir: dir }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.client.post(format!("{}{path}", self.server.url())).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn record(&self, id: Uuid) -> apprentice_core::InferenceRecord {
        self.server.gateway.store.inference(id).await.unwrap().expect("acknowledged inference is in the store")
    }
}

fn native_body() -> Value {
    json!({
        "function_name": "chat",
        "input": {"system": SYSTEM, "messages": [{"role": "user", "content": QUESTION}]},
        "tags": {"test": "local"}
    })
}

fn text_of(output: &InferenceOutput) -> String {
    match output {
        InferenceOutput::Chat { content } => content
            .iter()
            .map(|block| match block {
                ContentBlock::Text { text } => text.clone(),
                other => panic!("unexpected block {other:?}"),
            })
            .collect(),
        other => panic!("not a chat output: {other:?}"),
    }
}

#[tokio::test]
async fn native_inference_is_recorded_and_equals_direct_greedy_generation() {
    let h = Harness::start().await;
    let (status, answer) = h.post("/inference", native_body()).await;
    assert_eq!(status, 200, "{answer}");
    let record = h.record(answer["inference_id"].as_str().unwrap().parse().unwrap()).await;
    assert_eq!((record.model_name.as_str(), record.provider_name.as_str()), (MODEL, "local"));
    assert_eq!(record.function_name, "chat");

    let messages = [json!({"role": "system", "content": SYSTEM}), json!({"role": "user", "content": QUESTION})];
    let (text, prompt_tokens, completion_tokens, reason) = direct_greedy(&messages, MAX_TOKENS);
    assert!(!text.is_empty());
    assert_eq!(text_of(&record.output), text, "the provider adds nothing to what the model generates");
    assert_eq!(answer["content"][0]["text"], text.as_str());
    assert_eq!(
        (record.usage.input_tokens as usize, record.usage.output_tokens as usize),
        (prompt_tokens, completion_tokens)
    );
    assert_eq!(answer["usage"]["output_tokens"], completion_tokens);
    let expected_reason = match reason {
        apprentice_model::FinishReason::Length => "length",
        _ => "stop",
    };
    assert_eq!(record.finish_reason.as_deref(), Some(expected_reason));
    assert_eq!(record.cost, Some(0.0), "a local model costs nothing");
    assert_eq!(record.params["temperature"], 0.0);
    assert_eq!(record.params["max_tokens"], MAX_TOKENS);
}

#[tokio::test]
async fn openai_api_answers_streamed_and_not_and_records_both() {
    let h = Harness::start().await;
    let episode = apprentice_core::new_id();
    let body = |stream: bool| {
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 8,
            "stream": stream,
            "episode_id": episode,
        })
    };
    let (status, answer) = h.post("/v1/chat/completions", body(false)).await;
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let (expected, prompt_tokens, completion_tokens, _) =
        direct_greedy(&[json!({"role": "user", "content": QUESTION})], 8);
    assert_eq!(text, expected);
    assert_eq!(answer["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(answer["usage"]["completion_tokens"], completion_tokens);

    let response =
        h.client.post(format!("{}/v1/chat/completions", h.server.url())).json(&body(true)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events: Vec<String> = response
        .text()
        .await
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data:").map(|s| s.trim().to_string()))
        .collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let deltas: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(deltas.len() >= 2, "text arrives token by token: {deltas:?}");
    assert_eq!(deltas.concat(), expected, "streamed and non-streamed greedy answers are the same");
    let finish = chunks.iter().rev().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap();
    assert!(finish == "length" || finish == "stop", "{finish}");

    let records = h
        .server
        .gateway
        .store
        .inferences(&InferenceQuery { episode_id: Some(episode), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_eq!(record.model_name, MODEL);
        assert_eq!(text_of(&record.output), expected);
        assert_eq!(
            (record.usage.input_tokens as usize, record.usage.output_tokens as usize),
            (prompt_tokens, completion_tokens)
        );
    }
    assert_eq!(records.iter().filter(|r| r.ttft_ms.is_some()).count(), 1, "the streamed one has a ttft");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_both_succeed() {
    let h = Harness::start().await;
    let mut second = native_body();
    second["input"]["messages"][0]["content"] = json!("Name a color.");
    let (a, b) = tokio::join!(h.post("/inference", native_body()), h.post("/inference", second));
    for (status, answer) in [a, b] {
        assert_eq!(status, 200, "{answer}");
        let record = h.record(answer["inference_id"].as_str().unwrap().parse().unwrap()).await;
        assert_eq!(record.model_name, MODEL);
        assert!(record.usage.output_tokens > 0);
    }
}

/// Sixteen calls at once to one local model: each answers what it answers alone, and each is
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_requests_all_answer_as_alone_and_are_all_recorded() {
    let h = Harness::start().await;
    let questions: Vec<String> = (0..16).map(|i| format!("Give me a word that rhymes with number {i}.")).collect();
    let calls = questions.iter().map(|q| {
        let mut body = native_body();
        body["input"]["messages"][0]["content"] = json!(q);
        h.post("/inference", body)
    });
    let answers = futures::future::join_all(calls).await;
    for (question, (status, answer)) in questions.iter().zip(answers) {
        assert_eq!(status, 200, "{answer}");
        let messages = [json!({"role": "system", "content": SYSTEM}), json!({"role": "user", "content": question})];
        let (text, _, completion_tokens, _) = direct_greedy(&messages, MAX_TOKENS);
        assert_eq!(answer["content"][0]["text"], text.as_str(), "{question}");
        let record = h.record(answer["inference_id"].as_str().unwrap().parse().unwrap()).await;
        assert_eq!(text_of(&record.output), text);
        assert_eq!(record.usage.output_tokens as usize, completion_tokens);
    }
    let stats = served_model().scheduler().stats();
    assert!(stats.steps < stats.generated_tokens, "calls shared decode steps: {stats:?}");
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let h = Harness::start().await;
    let long = "Tell me everything about the history of France. ".repeat(8);
    let (status, answer) = h
        .post(
            "/inference",
            json!({"model_name": "tiny-context", "input": {"messages": [{"role": "user", "content": long}]}}),
        )
        .await;
    assert_eq!(status, 502, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("leaves no room to generate in the context of 48 tokens"), "{message}");
    // A short prompt fits, and max_tokens is cut to what the context leaves.
    let (status, answer) = h
        .post(
            "/inference",
            json!({"model_name": "tiny-context", "input": {"messages": [{"role": "user", "content": "Hi"}]},
                   "params": {"temperature": 0.0, "max_tokens": 1000}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let usage = &answer["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap() <= 48, "{usage}");
}

#[tokio::test]
async fn missing_models_name_apprentice_model_fetch() {
    // A known model that is not in the cache.
    let empty = tempfile::tempdir().unwrap();
    let err = resolve(&ModelCache::new(empty.path()), "smollm2-135m").unwrap_err();
    assert!(err.contains("run `apprentice model fetch smollm2-135m`"), "{err}");

    // A name the cache does not know, through the gateway: a startup error naming the config key.
    let text = config_text().replacen("model = \"smollm2-135m\"", "model = \"no-such-model\"", 1);
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&text, "local.toml".as_ref(), dir.path()).unwrap();
    let store = SqliteStore::open(&dir.path().join("local.db"), config.store.write_mode).await.unwrap();
    let err = Gateway::with_store(config, Arc::new(store)).err().expect("a missing model fails at startup").to_string();
    assert!(err.contains(&format!("models.{MODEL}.providers.local")), "{err}");
    assert!(err.contains("no-such-model") && err.contains("apprentice model fetch"), "{err}");

    // A relative path is resolved against the config file's folder.
    let text = config_text().replacen("model = \"smollm2-135m\"", "model = \"models/student.gguf\"", 1);
    let config = Config::parse(&text, "local.toml".as_ref(), dir.path()).unwrap();
    let store = SqliteStore::open(&dir.path().join("local2.db"), config.store.write_mode).await.unwrap();
    let err = Gateway::with_store(config, Arc::new(store)).err().unwrap().to_string();
    assert!(err.contains(&dir.path().join("models/student.gguf").display().to_string()), "{err}");
}

#[test]
fn providers_naming_one_model_share_one_copy() {
    let by_name = shared_model(&model_path(), &ServingSettings::default()).unwrap();
    assert!(Arc::ptr_eq(&by_name, served_model()));
    // Through a different spelling of the same file.
    let path = model_path();
    let dotted = path.parent().unwrap().join(".").join(path.file_name().unwrap());
    assert!(Arc::ptr_eq(&shared_model(&dotted, &ServingSettings::default()).unwrap(), served_model()));
}

#[test]
fn tools_are_written_into_the_prompt_for_templates_without_tool_support() {
    let rendered = apprentice_core::RenderedRequest {
        system: Some(SYSTEM.into()),
        messages: vec![apprentice_core::record::RenderedMessage {
            role: apprentice_core::Role::User,
            content: vec![apprentice_core::RenderedBlock::Text { text: "go".into() }],
        }],
        tools: vec![ToolDefinition {
            name: "move".into(),
            description: "Move one cell.".into(),
            parameters: json!({"type": "object", "properties": {"to": {"type": "string"}}}),
            strict: false,
        }],
    };
    let prompt = served_model().render_prompt(&rendered).unwrap();
    assert!(prompt.starts_with(&format!("<|im_start|>system\n{SYSTEM}\n\n# Tools")), "{prompt}");
    assert!(prompt.contains("\"name\": \"move\"") && prompt.contains("<tool_call>"), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n"), "{prompt}");
}

/// A caller that stops waiting for a non-streamed answer frees the model at once: the next call
/// does not wait for the abandoned one to run to its (long) end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_stops_generating() {
    use apprentice_gateway::providers::{LocalProvider, ModelRequest, Provider};
    let provider = LocalProvider::new("local", served_model().clone(), None).unwrap();
    let request = |text: &str, max_tokens: u32| ModelRequest {
        rendered: apprentice_core::RenderedRequest {
            system: None,
            messages: vec![apprentice_core::record::RenderedMessage {
                role: apprentice_core::Role::User,
                content: vec![apprentice_core::RenderedBlock::Text { text: text.into() }],
            }],
            tools: Vec::new(),
        },
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..ModelRequest::default()
    };
    // This essay runs past 300 tokens greedily (≈16 s in a debug build), unless it is stopped.
    let long = request("Write a very long essay about the history of Rome.", 4000);
    let abandoned = tokio::time::timeout(std::time::Duration::from_millis(500), provider.infer(&long)).await;
    assert!(abandoned.is_err(), "the long call should still have been running");
    // Its place in the batch is freed at the next step, not at its end.
    let scheduler = provider.model().scheduler();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while scheduler.stats().batch_size > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(scheduler.stats().batch_size, 0, "the abandoned call left the batch");
    let started = std::time::Instant::now();
    let answer = provider.infer(&request("Hi", 2)).await.unwrap();
    assert_eq!(answer.usage.output_tokens, 2);
    let waited = started.elapsed();
    assert!(waited < std::time::Duration::from_secs(5), "the next call waited {waited:?}");
}
