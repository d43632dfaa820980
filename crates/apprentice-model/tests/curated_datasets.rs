//! Datasets exported by `apprentice curate` as the student sees them: every line is OpenAI chat
//! fine-tuning JSONL field for field, renders through SmolLM2's own chat template into tokens
//! with a loss mask, and an episode packed into one conversation trains exactly the tokens, in
//! exactly the contexts, of its per-inference examples.

use std::collections::HashMap;
use std::sync::Arc;

use apprentice_core::config::WriteMode;
use apprentice_curate::{Curator, DatasetSpec, MetricInfo, Metrics, Packing};
use apprentice_envs::babyai::{BabyAi, FUNCTION_NAME};
use apprentice_envs::rollout::{rollout, Policy, RolloutOptions};
use apprentice_envs::{Env, Split};
use apprentice_model::{resolve_model, ChatTemplate, LossMaskedExample, Tokenizer};
use apprentice_store::{Recorder, SqliteStore};
use serde_json::{json, Value};

async fn babyai_store(dir: &std::path::Path) -> Arc<SqliteStore> {
    let store = Arc::new(SqliteStore::open(&dir.join("s.db"), WriteMode::Durable).await.unwrap());
    let recorder = Arc::new(Recorder::spawn(store.clone(), WriteMode::Durable, 4096, None));
    let options = RolloutOptions {
        split: Split::Train,
        start_index: 0,
        episodes: 12,
        concurrency: 4,
        seed: 3,
        tags: Default::default(),
    };
    rollout(BabyAi::new, &Policy::Expert { epsilon: 0.3 }, Some(recorder.clone()), &options, |_| {}).await.unwrap();
    recorder.shutdown().await.unwrap();
    store
}

fn metrics() -> Metrics {
    BabyAi::new()
        .spec()
        .metrics
        .iter()
        .map(|m| (m.name.clone(), MetricInfo { level: m.level, optimize: m.optimize }))
        .collect()
}

fn spec(packing: Packing) -> DatasetSpec {
    let mut spec: DatasetSpec = serde_json::from_value(json!({
        "name": "babyai", "function": FUNCTION_NAME,
        "selection": {"type": "boolean_metric", "metric": "success", "value": true},
        "steps": {"type": "boolean_metric", "metric": "progress", "value": true},
        "weighting": {"type": "sft-q", "metric": "return"},
    }))
    .unwrap();
    spec.packing = packing;
    spec
}

fn student() -> (Tokenizer, ChatTemplate) {
    let path = resolve_model("smollm2-135m").unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = Tokenizer::from_gguf(&path).unwrap();
    let template = ChatTemplate::from_tokenizer(&tokenizer).unwrap();
    (tokenizer, template)
}

/// The OpenAI chat fine-tuning line format, checked key by key: an unknown key anywhere fails.
fn check_openai_line(line: &Value) {
    let object = line.as_object().expect("a line is a JSON object");
    for key in object.keys() {
        assert!(["messages", "tools", "weight", "parallel_tool_calls"].contains(&key.as_str()), "line key {key}");
    }
    if let Some(weight) = object.get("weight") {
        assert!(weight.as_f64().is_some_and(|w| w.is_finite() && w >= 0.0), "weight {weight}");
    }
    for tool in object.get("tools").and_then(Value::as_array).into_iter().flatten() {
        assert_eq!(tool["type"], "function");
        assert!(tool["function"]["name"].is_string() && tool["function"]["parameters"].is_object(), "{tool}");
    }
    let messages = object["messages"].as_array().expect("messages is an array");
    assert!(!messages.is_empty());
    assert_eq!(messages.last().unwrap()["role"], "assistant", "the last message is the one learned");
    for message in messages {
        let message = message.as_object().expect("a message is an object");
        let role = message["role"].as_str().expect("role is a string");
        let allowed: &[&str] = match role {
            "system" | "user" => &["role", "content", "name"],
            "assistant" => &["role", "content", "tool_calls", "weight", "name"],
            "tool" => &["role", "content", "tool_call_id"],
            other => panic!("role {other}"),
        };
        for key in message.keys() {
            assert!(allowed.contains(&key.as_str()), "{role} message key {key}");
        }
        if role == "assistant" {
            if let Some(weight) = message.get("weight") {
                assert!(weight == 0 || weight == 1, "a message weight is 0 or 1, got {weight}");
            }
            assert!(message["content"].is_string() || message.contains_key("tool_calls"), "{message:?}");
        } else {
            assert!(message["content"].is_string(), "{role} content is a string");
        }
    }
}

fn render(tokenizer: &Tokenizer, template: &ChatTemplate, jsonl: &str) -> Vec<LossMaskedExample> {
    jsonl
        .lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line).unwrap();
            check_openai_line(&line);
            let rendered = template.render_record(tokenizer, &line).unwrap();
            assert!(rendered.trained_tokens() > 0, "every exported example trains on something");
            rendered
        })
        .collect()
}

#[tokio::test]
async fn exported_lines_are_openai_format_and_tokenize_with_the_students_template() {
    let dir = tempfile::tempdir().unwrap();
    let store = babyai_store(dir.path()).await;
    let (tokenizer, template) = student();
    for packing in [Packing::Auto, Packing::PerInference] {
        let dataset = Curator::new(&store, metrics()).curate(&spec(packing)).await.unwrap();
        assert!(dataset.train.len() > 5, "{:?}", dataset.summary);
        for (file, jsonl) in dataset.export().unwrap() {
            let rendered = render(&tokenizer, &template, &jsonl);
            assert_eq!(rendered.len(), file.examples, "{}", file.file);
            // The weighted file carries each example's weight into every trained token.
            if file.file == "train.weighted.jsonl" {
                for (example, rendered) in dataset.train.iter().zip(&rendered) {
                    for turn in rendered.turns.iter().filter(|t| t.weight > 0.0) {
                        assert!((f64::from(turn.weight) - example.weight).abs() < 1e-5);
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn a_packed_episode_trains_the_same_tokens_in_the_same_contexts_as_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let store = babyai_store(dir.path()).await;
    let (tokenizer, template) = student();
    let packed = Curator::new(&store, metrics()).curate(&spec(Packing::Auto)).await.unwrap();
    let steps = Curator::new(&store, metrics()).curate(&spec(Packing::PerInference)).await.unwrap();
    assert!(packed.summary.packed_episodes > 0, "{:?}", packed.summary);
    let step_lines = render(&tokenizer, &template, &apprentice_curate::to_jsonl(&steps.train, true).unwrap());
    let by_inference: HashMap<_, _> = steps.train.iter().zip(&step_lines).map(|(e, r)| (e.inference_id, r)).collect();
    let packed_lines = render(&tokenizer, &template, &apprentice_curate::to_jsonl(&packed.train, true).unwrap());

    let (mut packed_tokens, mut step_tokens, mut compared) = (0, 0, 0);
    for (example, rendered) in packed.train.iter().zip(&packed_lines) {
        packed_tokens += rendered.input_ids.len();
        let trained: Vec<_> = rendered.turns.iter().filter(|t| t.weight > 0.0).collect();
        assert_eq!(trained.len(), example.inference_ids.len(), "one trained turn per packed inference");
        for (turn, inference) in trained.iter().zip(&example.inference_ids) {
            let step = by_inference[inference];
            step_tokens += step.input_ids.len();
            // The step's example is exactly the packed conversation up to the end of this turn
            // (then only the template's untrained line break after the end-of-turn token)...
            let end = turn.token_range.end;
            assert_eq!(&step.input_ids[..end], &rendered.input_ids[..end], "context of {inference}");
            assert!(step.weights[end..].iter().all(|&w| w == 0.0) && step.input_ids.len() - end <= 1);
            // ...and it trains exactly this turn's tokens with the same weight.
            let step_turn = step.turns.iter().find(|t| t.weight > 0.0).unwrap();
            assert_eq!(step_turn.token_range, turn.token_range);
            assert_eq!(&step.weights[..end], &only(&rendered.weights[..end], &turn.token_range)[..]);
            compared += 1;
        }
    }
    assert!(compared > 10);
    // Every trained step of the per-inference form is covered by the packed form.
    assert_eq!(
        compared,
        steps.train.iter().filter(|e| packed.train.iter().any(|p| p.inference_ids.contains(&e.inference_id))).count()
    );
    println!("{compared} steps: {step_tokens} tokens one example per step, {packed_tokens} packed");
    assert!(packed_tokens < step_tokens);
}

/// `weights` with everything outside `range` set to 0.
fn only(weights: &[f32], range: &std::ops::Range<usize>) -> Vec<f32> {
    weights.iter().enumerate().map(|(i, &w)| if range.contains(&i) { w } else { 0.0 }).collect()
}
