//! Packed history examples train every kept step in the context the local provider serves it.
//!
//! BabyAI episodes recorded by the noisy expert with the `full` prompt (the whole conversation
//! every step) are curated with packing `auto` and the steps without progress left out, so each
//! episode is one multi-turn example with trained turns (`"weight": 1`) and context turns
//! (`"weight": 0`). Each exported line is loaded as training loads it (the student's tokenizer and
//! chat template, `load_jsonl`); each trained step's input is rendered as the gateway renders it
//! for a student variant with the same prompt and tokenized as the local provider does. The packed
//! ids must start with exactly the served prompt followed by the step's output and end-of-turn
//! token, and the trained tokens must be exactly those outputs. Only the tokenizer and template of
//! the real SmolLM2-135M-Instruct are used (from the model cache: `apprentice model fetch
//! smollm2-135m`; this test fails without it); no weights are loaded.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use apprentice_core::config::{FunctionConfig, WriteMode};
use apprentice_core::render::render_input;
use apprentice_core::{Config, ContentBlock, InferenceOutput, InferenceRecord, RenderedRequest, Role};
use apprentice_curate::{Curator, DatasetSpec, MetricInfo, Metrics, Packing};
use apprentice_envs::babyai::{BabyAi, FUNCTION_NAME};
use apprentice_envs::rollout::{rollout, Policy, RolloutOptions};
use apprentice_envs::{Env, Split, VariantParams};
use apprentice_gateway::providers::local::prompt_ids;
use apprentice_model::{ChatTemplate, LossMaskedExample, Tokenizer};
use apprentice_store::{InferenceQuery, Recorder, SqliteStore, Store};
use apprentice_train::data::load_jsonl;
use serde_json::json;
use uuid::Uuid;

const STUDENT: &str = "local::smollm2-135m";
const VARIANT: &str = "student";
const EPISODES: u64 = 12;
/// Enough random actions that some steps make no progress (context only), few enough that most
/// episodes still succeed and stay short.
const EPSILON: f64 = 0.3;
/// Tokens shown either side of a difference.
const AROUND: usize = 12;

/// The student's tokenizer and chat template, loaded as `apprentice train` and the local provider
/// load them.
struct Student {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    end_of_turn: u32,
}

impl Student {
    fn load() -> Self {
        let path = apprentice_model::resolve_model("smollm2-135m")
            .unwrap_or_else(|e| panic!("the SmolLM2 model is required by this test: {e}"));
        let tokenizer = Tokenizer::from_path(&path).expect("the SmolLM2 tokenizer");
        let template = ChatTemplate::from_tokenizer(&tokenizer).expect("the SmolLM2 chat template");
        let end_of_turn = tokenizer.eos_token_id().expect("SmolLM2 ends its turns with its eos token");
        Student { tokenizer, template, end_of_turn }
    }

    fn show(&self, ids: &[u32]) -> String {
        format!("{:?}", self.tokenizer.decode(ids, false).expect("decode"))
    }

    /// The tokens a served step consists of: its prompt as the provider tokenizes it, then its
    /// output as the student writes it, ended by the end-of-turn token that stops generation.
    fn served(&self, rendered: &RenderedRequest, output: &InferenceOutput) -> (Vec<u32>, usize) {
        let mut ids = prompt_ids(&self.tokenizer, &self.template, rendered).expect("the provider renders the prompt");
        let prompt_len = ids.len();
        ids.extend(self.tokenizer.encode(&output_text(output), false).expect("tokenize the output"));
        ids.push(self.end_of_turn);
        (ids, prompt_len)
    }

    /// Checks that `packed` starts with `served`; on success returns the output's token range.
    fn check_step(
        &self,
        step: &str,
        packed: &LossMaskedExample,
        served: &[u32],
        prompt_len: usize,
    ) -> Result<Range<usize>, String> {
        let actual = &packed.input_ids;
        let Some(at) = served.iter().zip(actual).position(|(s, a)| s != a).or_else(|| {
            // Equal as far as both go: the packed example must not end before the step does.
            (actual.len() < served.len()).then_some(actual.len())
        }) else {
            return Ok(prompt_len..served.len());
        };
        let part = if at < prompt_len { "prompt" } else { "output" };
        let window = |ids: &[u32]| {
            let from = at.saturating_sub(AROUND);
            let to = (at + AROUND).min(ids.len());
            format!("{} ‖ {}", self.show(&ids[from..at.min(ids.len())]), self.show(&ids[at.min(to)..to]))
        };
        Err(format!(
            "{step}: the packed example differs from what is served at token {at} (in the {part}, which is {prompt_len} \
             tokens of {}): packed {:?}, served {:?}\n  packed: {}\n  served: {}",
            served.len(),
            actual.get(at),
            served.get(at),
            window(actual),
            window(served),
        ))
    }
}

/// The text of a recorded output, as the local provider returns generated text.
fn output_text(output: &InferenceOutput) -> String {
    match output {
        InferenceOutput::Chat { content } => content
            .iter()
            .map(|block| match block {
                ContentBlock::Text { text } => text.as_str(),
                other => panic!("a BabyAI action is text, found {other:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        InferenceOutput::Json(json) => json.raw.clone(),
    }
}

fn babyai_metrics() -> Metrics {
    BabyAi::new()
        .spec()
        .metrics
        .iter()
        .map(|m| (m.name.clone(), MetricInfo { level: m.level, optimize: m.optimize }))
        .collect()
}

/// The gateway configuration of a student served the `full` prompt, as `apprentice env config`
/// writes it.
fn student_config() -> Config {
    let text =
        BabyAi::new().spec().gateway_config_with(STUDENT, VARIANT, &VariantParams::default()).expect("env config");
    Config::parse(&text, "env.toml".as_ref(), ".".as_ref()).expect("the env config parses")
}

/// The request the gateway sends the student's provider for `inference`'s input.
fn served_request(config: &Config, function: &FunctionConfig, inference: &InferenceRecord) -> RenderedRequest {
    render_input(&config.templates, FUNCTION_NAME, Some(function), VARIANT, &inference.input).expect("render")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_history_examples_train_each_kept_step_in_its_served_context() {
    let started = std::time::Instant::now();
    let student = Student::load();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("h.db"), WriteMode::Durable).await.unwrap());
    let recorder = Arc::new(Recorder::spawn(store.clone(), WriteMode::Durable, 4096, None));
    let options = RolloutOptions {
        split: Split::Train,
        start_index: 0,
        episodes: EPISODES,
        concurrency: 2,
        seed: 11,
        tags: Default::default(),
    };
    rollout(BabyAi::new, &Policy::Expert { epsilon: EPSILON }, Some(recorder), &options, |_| {}).await.unwrap();
    let inferences: HashMap<Uuid, InferenceRecord> = store
        .inferences(&InferenceQuery { function_name: Some(FUNCTION_NAME.into()), ..Default::default() })
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i))
        .collect();

    let spec: DatasetSpec = serde_json::from_value(json!({
        "name": "history",
        "function": FUNCTION_NAME,
        "steps": {"type": "boolean_metric", "metric": "progress", "value": true},
    }))
    .unwrap();
    assert_eq!(spec.packing, Packing::Auto, "the default");
    let dataset = Curator::new(&store, babyai_metrics()).curate(&spec).await.unwrap();
    assert!(dataset.summary.packed_episodes > 0, "{:?}", dataset.summary);
    assert!(dataset.summary.masked_steps > 0, "some steps are context only: {:?}", dataset.summary);
    let jsonl = dataset.export_train(false).unwrap().jsonl;
    let file = dir.path().join("train.jsonl");
    std::fs::write(&file, &jsonl).unwrap();
    // No windowing (a `max_len` beyond every line): each line is one example, rendered whole as
    // training renders it. A line over the trainer's `max_len` (1024 by default) is split into
    // windows that keep less history than is served; that trade-off is the trainer's setting.
    let (training_examples, stats) = load_jsonl(&file, &student.tokenizer, &student.template, usize::MAX).unwrap();
    assert_eq!((stats.lines, stats.examples, stats.split_lines), (dataset.train.len(), dataset.train.len(), 0));

    let config = student_config();
    let function = config.function(FUNCTION_NAME).expect("the env's function");
    assert_eq!(function.variants[VARIANT].history_turns, None, "the full prompt keeps the whole conversation");
    let mut steps_checked = 0;
    let mut context_turns = 0;
    let mut other_histories_caught = 0;
    for ((example, line), loaded) in dataset.train.iter().zip(jsonl.lines()).zip(&training_examples) {
        let packed = student.template.render_record(&student.tokenizer, &serde_json::from_str(line).unwrap()).unwrap();
        assert_eq!((&packed.input_ids, &packed.weights), (&loaded.input_ids, &loaded.weights), "load_jsonl renders it");
        let mut outputs = BTreeSet::new();
        for (k, id) in example.inference_ids.iter().enumerate() {
            let inference = &inferences[id];
            let request = served_request(&config, function, inference);
            assert_eq!(request, inference.rendered, "the student is served what the teacher was sent");
            let (served, prompt_len) = student.served(&request, &inference.output);
            let step = format!("episode {} step {k} (inference {id})", example.episode_id);
            let span = student.check_step(&step, &packed, &served, prompt_len).unwrap_or_else(|e| panic!("{e}"));
            outputs.extend(span);
            steps_checked += 1;

            // The same step served with a shorter history is another context, and is caught.
            let user_turns = inference.input.messages.iter().filter(|m| m.role == Role::User).count();
            if user_turns > 2 {
                let mut narrow = function.clone();
                narrow.variants.get_mut(VARIANT).unwrap().history_turns = Some(2);
                let (other, other_len) =
                    student.served(&served_request(&config, &narrow, inference), &inference.output);
                let err = student.check_step(&step, &packed, &other, other_len).expect_err("a shorter history differs");
                assert!(err.contains("in the prompt"), "{err}");
                other_histories_caught += 1;
            }
        }
        let trained: BTreeSet<usize> = (0..packed.weights.len()).filter(|&i| packed.weights[i] > 0.0).collect();
        if let Some(&first) = trained.symmetric_difference(&outputs).next() {
            panic!(
                "episode {}: token {first} is {} but {} a kept step's output; around it: {}",
                example.episode_id,
                if trained.contains(&first) { "trained" } else { "not trained" },
                if outputs.contains(&first) { "is" } else { "is not" },
                student.show(
                    &packed.input_ids[first.saturating_sub(AROUND)..(first + AROUND).min(packed.input_ids.len())]
                )
            );
        }
        // Context turns: left out by curation, yet in the prompt of a later trained step.
        let last_trained = packed.turns.iter().rposition(|t| t.weight > 0.0).unwrap_or(0);
        context_turns += packed.turns[..last_trained].iter().filter(|t| t.weight == 0.0).count();
    }
    assert!(steps_checked > dataset.train.len(), "packed examples hold several steps");
    assert!(context_turns > 0, "some weight-0 steps sit between trained ones");
    assert!(other_histories_caught > 0, "the check tells another history window apart");
    eprintln!(
        "{steps_checked} steps in {} examples ({context_turns} context turns, {other_histories_caught} shorter \
         histories told apart) checked in {:.1?}",
        dataset.train.len(),
        started.elapsed()
    );
}
