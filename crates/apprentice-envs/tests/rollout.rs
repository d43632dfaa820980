//! The rollout driver on a small env written here: records land in the store with every step,
//! their episode, and the env's feedback, for the expert (straight to the store) and for a policy
//! served by a gateway in front of a loopback mock LLM.

use std::sync::Arc;

use apprentice_core::config::{MetricType, Optimize, WriteMode};
use apprentice_core::{Config, ContentBlock, FeedbackValue, Input, InputMessage, MetricLevel, Role, SystemInput};
use apprentice_envs::babyai::BabyAi;
use apprentice_envs::rollout::{rollout, step_seed, Policy, RolloutOptions, RolloutSummary};
use apprentice_envs::{
    Env, EnvError, EnvSpec, Feedback, FunctionSpec, MetricSpec, Observation, Split, StepOutcome, TaskId,
};
use apprentice_store::{InferenceQuery, Recorder, SqliteStore, Store};
use serde_json::json;

/// Walk to the end of a corridor of length 2 + index % 3 by answering "forward"; 8 steps allowed.
struct Corridor {
    spec: EnvSpec,
    length: u32,
    position: u32,
    steps: u32,
    input: Input,
}

const MAX_STEPS: u32 = 8;

impl Corridor {
    fn new() -> Self {
        let metric = |name: &str, kind, level| MetricSpec { name: name.into(), kind, level, optimize: Optimize::Max };
        let spec = EnvSpec {
            name: "corridor".into(),
            functions: vec![FunctionSpec {
                name: "corridor::act".into(),
                system_schema: json!({"type": "object", "required": ["length"], "properties": {"length": {"type": "integer"}}}),
                user_schema: json!({"type": "object", "required": ["position"], "properties": {"position": {"type": "integer"}}}),
                system_template: "Walk {{ length }} cells. Answer forward, back or wait.".into(),
                user_template: "You are at cell {{ position }}.".into(),
                prompt_styles: Vec::new(),
            }],
            tools: vec![],
            metrics: vec![
                metric("reward", MetricType::Float, MetricLevel::Inference),
                metric("progress", MetricType::Boolean, MetricLevel::Inference),
                metric("success", MetricType::Boolean, MetricLevel::Episode),
                metric("return", MetricType::Float, MetricLevel::Episode),
            ],
            horizon: MAX_STEPS,
        };
        Corridor { spec, length: 0, position: 0, steps: 0, input: Input::default() }
    }

    fn user_message(&self) -> InputMessage {
        InputMessage {
            role: Role::User,
            content: vec![ContentBlock::Template {
                name: "user".into(),
                arguments: json!({"position": self.position}),
            }],
        }
    }

    fn observation(&self) -> Observation {
        Observation { function_name: "corridor::act".into(), input: self.input.clone() }
    }
}

impl Env for Corridor {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }
    fn num_tasks(&self, _: Split) -> u64 {
        1000
    }
    fn reset(&mut self, task: TaskId) -> Result<Observation, EnvError> {
        self.length = 2 + (task.index % 3) as u32;
        self.position = 0;
        self.steps = 0;
        let system = json!({"length": self.length}).as_object().cloned().unwrap();
        self.input = Input { system: Some(SystemInput::Arguments(system)), messages: vec![self.user_message()] };
        Ok(self.observation())
    }
    fn step(&mut self, action: &[ContentBlock]) -> Result<StepOutcome, EnvError> {
        let text: String = action
            .iter()
            .filter_map(|b| if let ContentBlock::Text { text } = b { Some(text.clone()) } else { None })
            .collect();
        let before = self.position;
        match text.trim() {
            "forward" => self.position += 1,
            "back" => self.position = self.position.saturating_sub(1),
            _ => {}
        }
        self.steps += 1;
        let success = self.position >= self.length;
        let truncated = !success && self.steps >= MAX_STEPS;
        let reward = if success { 1.0 - 0.9 * self.steps as f64 / MAX_STEPS as f64 } else { 0.0 };
        let mut feedback = Feedback {
            inference: vec![
                ("reward".into(), FeedbackValue::Float(reward)),
                ("progress".into(), FeedbackValue::Boolean(self.position > before)),
            ],
            episode: vec![],
        };
        if success || truncated {
            feedback.episode = vec![
                ("success".into(), FeedbackValue::Boolean(success)),
                ("return".into(), FeedbackValue::Float(reward)),
            ];
        }
        self.input.messages.push(InputMessage { role: Role::Assistant, content: action.to_vec() });
        self.input.messages.push(self.user_message());
        Ok(StepOutcome { observation: self.observation(), feedback, terminated: success, truncated })
    }
    fn expert_action(&mut self) -> Option<String> {
        Some("forward".into())
    }
    fn action_space(&self) -> Vec<String> {
        vec!["forward".into(), "back".into(), "wait".into()]
    }
}

/// Every step is an inference of its episode with reward and progress feedback, and the episode's
/// stored verdict (success, return) is the env's.
async fn check_recorded(store: &dyn Store, summary: &RolloutSummary) {
    for episode in &summary.episodes {
        let steps = store
            .inferences(&InferenceQuery { episode_id: Some(episode.episode_id), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(steps.len() as u32, episode.steps);
        assert!(steps.iter().all(|s| s.tags.get("task") == Some(&episode.task)));
        for step in &steps {
            let feedback = store.feedback_for(step.id).await.unwrap();
            let names: Vec<&str> = feedback.iter().map(|f| f.metric_name.as_str()).collect();
            assert_eq!(names, ["reward", "progress"]);
        }
        let verdict = store.feedback_for(episode.episode_id).await.unwrap();
        assert_eq!(verdict.len(), 2);
        assert_eq!(
            verdict[0].value,
            FeedbackValue::Boolean(episode.success),
            "stored success matches the env's verdict"
        );
        assert_eq!(verdict[1].value, FeedbackValue::Float(episode.episode_return));
    }
}

#[tokio::test]
async fn noisy_expert_rollout_records_every_step_with_feedback() {
    let (_dir, store, recorder) = expert_store().await;
    let options = RolloutOptions {
        split: Split::Train,
        start_index: 0,
        episodes: 60,
        concurrency: 4,
        seed: 7,
        tags: Default::default(),
    };
    let policy: Policy = "expert?epsilon=0.5".parse().unwrap();
    let summary = rollout(Corridor::new, &policy, Some(recorder.clone()), &options, |_| {}).await.unwrap();

    assert_eq!(summary.episodes.len(), 60);
    let successes = summary.episodes.iter().filter(|e| e.success).count();
    assert!(successes > 0 && successes < 60, "ε=0.5 should succeed sometimes and fail sometimes: {successes}/60");

    let inferences = store
        .inferences(&InferenceQuery { function_name: Some("corridor::act".into()), ..Default::default() })
        .await
        .unwrap();
    let total_steps: u32 = summary.episodes.iter().map(|e| e.steps).sum();
    assert_eq!(inferences.len() as u32, total_steps, "one inference per step");
    assert!(inferences
        .iter()
        .all(|i| i.variant_name == "expert-eps0.5" && i.model_name == "expert::corridor?epsilon=0.5"));
    // The structured input is kept and the env's templates rendered it.
    let first = &inferences[0];
    assert_eq!(first.rendered.system.as_deref(), Some(&*format!("Walk {} cells. Answer forward, back or wait.", 2)));
    check_recorded(store.as_ref(), &summary).await;
}

#[tokio::test]
async fn same_seed_gives_the_same_noisy_rollout() {
    let run = || async {
        let (_dir, _store, recorder) = expert_store().await;
        let options = RolloutOptions {
            split: Split::Test,
            start_index: 5,
            episodes: 20,
            concurrency: 3,
            seed: 11,
            tags: Default::default(),
        };
        let summary =
            rollout(Corridor::new, &Policy::Expert { epsilon: 0.3 }, Some(recorder), &options, |_| {}).await.unwrap();
        summary.episodes.iter().map(|e| (e.task.clone(), e.steps, e.success)).collect::<Vec<_>>()
    };
    assert_eq!(run().await, run().await);
}

#[tokio::test]
async fn gateway_policy_with_a_mock_llm_records_the_same_way() {
    let (server, store, _dir) = gateway_with_mock_llm(&Corridor::new().spec, "forward").await;

    let policy = Policy::gateway(&server.url(), "function::corridor::act").unwrap();
    let options = RolloutOptions {
        split: Split::Train,
        start_index: 0,
        episodes: 6,
        concurrency: 3,
        seed: 0,
        tags: Default::default(),
    };
    let summary = rollout(Corridor::new, &policy, None, &options, |_| {}).await.unwrap();
    assert!(summary.episodes.iter().all(|e| e.success), "always forward always succeeds");

    for episode in &summary.episodes {
        let steps = store
            .inferences(&InferenceQuery { episode_id: Some(episode.episode_id), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(steps.len() as u32, episode.steps);
        assert!(steps.iter().all(|s| s.variant_name == "mock-llm" && s.provider_name == "mock"));
        assert_eq!(steps[0].rendered.messages[0].content.len(), 1);
        assert_eq!(store.feedback_for(steps[0].id).await.unwrap().len(), 2);
        let verdict = store.feedback_for(episode.episode_id).await.unwrap();
        assert_eq!(verdict[0].value, FeedbackValue::Boolean(true));
    }
    server.shutdown().await.unwrap();
}

/// A gateway policy sends every step a seed derived from (rollout seed, task, step) only: played one
/// episode at a time or four at once, the same tasks send the same seeds and, with an LLM that
/// answers from the seed, play the same episodes.
#[tokio::test]
async fn gateway_policy_sends_the_same_seeds_and_plays_the_same_episodes_at_any_concurrency() {
    let mut played = Vec::new();
    for concurrency in [1, 4] {
        let (server, store, _dir) = gateway_with_seeded_mock_llm(&Corridor::new().spec).await;
        let policy = Policy::gateway(&server.url(), "function::corridor::act/mock-llm").unwrap();
        let options = RolloutOptions {
            split: Split::Test,
            start_index: 3,
            episodes: 12,
            concurrency,
            seed: 5,
            tags: Default::default(),
        };
        let summary = rollout(Corridor::new, &policy, None, &options, |_| {}).await.unwrap();
        server.shutdown().await.unwrap();

        let mut seeds = Vec::new();
        for episode in &summary.episodes {
            let task: TaskId = episode.task.parse().unwrap();
            let steps = store
                .inferences(&InferenceQuery { episode_id: Some(episode.episode_id), ..Default::default() })
                .await
                .unwrap();
            assert_eq!(steps.len() as u32, episode.steps);
            for inference in &steps {
                // The conversation is the first observation, then an answer and an observation per step.
                let step = (inference.input.messages.len() as u32 - 1) / 2;
                let seed = inference.params["seed"].as_u64().expect("every step is sent with a seed");
                assert_eq!(seed, step_seed(5, task, step), "{task} step {step}");
                seeds.push((episode.task.clone(), step, seed));
            }
        }
        seeds.sort();
        let episodes: Vec<(String, u32, bool, bool)> =
            summary.episodes.iter().map(|e| (e.task.clone(), e.steps, e.success, e.truncated)).collect();
        played.push((episodes, seeds));
    }
    let (episodes, seeds) = &played[0];
    let tasks: Vec<&str> = episodes.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(tasks, (3..15).map(|i| format!("test/{i}")).collect::<Vec<_>>(), "in task order");
    let successes = episodes.iter().filter(|e| e.2).count();
    assert!(0 < successes && successes < 12, "answers follow the seeds, so some episodes fail: {episodes:?}");
    assert_eq!(seeds.iter().map(|s| s.2).collect::<std::collections::BTreeSet<_>>().len(), seeds.len(), "distinct");
    assert_eq!(played[0], played[1], "concurrency 1 and 4 differ");
}

#[tokio::test]
async fn babyai_noisy_expert_rollout_of_200_episodes_lands_in_the_store() {
    let (_dir, store, recorder) = expert_store().await;
    let options = RolloutOptions {
        split: Split::Train,
        start_index: 0,
        episodes: 200,
        concurrency: 4,
        seed: 3,
        tags: Default::default(),
    };
    let summary =
        rollout(BabyAi::new, &Policy::Expert { epsilon: 0.3 }, Some(recorder), &options, |_| {}).await.unwrap();
    assert_eq!(summary.episodes.len(), 200);
    let total_steps: u32 = summary.episodes.iter().map(|e| e.steps).sum();
    assert_eq!(store.count_inferences().await.unwrap(), u64::from(total_steps), "one inference per step");
    let failures = summary.episodes.iter().filter(|e| !e.success).count();
    assert!(summary.success_rate() > 0.9, "noisy expert at ε=0.3 should mostly succeed: {}", summary.table());
    check_recorded(store.as_ref(), &summary).await;
    // Every task family was played (family = index % 5), and failures, if any, are recorded as such.
    let tasks: std::collections::BTreeSet<u64> =
        summary.episodes.iter().map(|e| e.task.trim_start_matches("train/").parse::<u64>().unwrap() % 5).collect();
    assert_eq!(tasks.len(), 5);
    let stored_failures = summary.episodes.len() - summary.episodes.iter().filter(|e| e.success).count();
    assert_eq!(failures, stored_failures);
}

#[tokio::test]
async fn babyai_through_the_gateway_with_a_mock_llm_records_the_same_way() {
    let (server, store, _dir) = gateway_with_mock_llm(BabyAi::new().spec(), "I will turn left.").await;

    let policy = Policy::gateway(&server.url(), "function::babyai::act").unwrap();
    let options = RolloutOptions {
        split: Split::Test,
        start_index: 0,
        episodes: 3,
        concurrency: 3,
        seed: 0,
        tags: Default::default(),
    };
    let summary = rollout(BabyAi::new, &policy, None, &options, |_| {}).await.unwrap();
    // Turning in place rarely completes a mission (only a "go to" whose target comes to face the
    // agent); failing episodes run to their step limit.
    assert!(summary.episodes.iter().any(|e| e.truncated), "{}", summary.table());
    assert!(summary.episodes.iter().all(|e| e.success != e.truncated), "{}", summary.table());
    check_recorded(store.as_ref(), &summary).await;
    let steps = store
        .inferences(&InferenceQuery { episode_id: Some(summary.episodes[0].episode_id), ..Default::default() })
        .await
        .unwrap();
    assert!(steps.iter().all(|s| s.function_name == "babyai::act" && s.variant_name == "mock-llm"));
    // The conversation grows by the answer and the next observation each step.
    assert_eq!(steps[1].input.messages.len(), steps[0].input.messages.len() + 2);
    assert!(steps.iter().all(|s| s.cost.is_none() && s.usage.input_tokens == 120));
    server.shutdown().await.unwrap();
}

/// A gateway serving `spec`'s function through a loopback OpenAI-compatible "LLM" that always
/// gives `answer`, recording into a fresh store.
async fn gateway_with_mock_llm(
    spec: &apprentice_envs::EnvSpec,
    answer: &'static str,
) -> (apprentice_gateway::RunningGateway, Arc<SqliteStore>, tempfile::TempDir) {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || async move {
            axum::Json(json!({
                "id": "x", "object": "chat.completion", "created": 0, "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 120, "completion_tokens": 4, "total_tokens": 124}
            }))
        }),
    );
    serve_mock_llm(spec, app).await
}

/// A gateway serving `spec`'s function through a loopback OpenAI-compatible "LLM" that answers
/// `forward`, `back` or `wait` as the request's seed modulo 3 says (`wait` without a seed).
async fn gateway_with_seeded_mock_llm(
    spec: &apprentice_envs::EnvSpec,
) -> (apprentice_gateway::RunningGateway, Arc<SqliteStore>, tempfile::TempDir) {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|axum::Json(body): axum::Json<serde_json::Value>| async move {
            let answer = match body["seed"].as_u64().map(|s| s % 3) {
                Some(0) => "forward",
                Some(1) => "back",
                _ => "wait",
            };
            axum::Json(json!({
                "id": "x", "object": "chat.completion", "created": 0, "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 120, "completion_tokens": 1, "total_tokens": 121}
            }))
        }),
    );
    serve_mock_llm(spec, app).await
}

/// A gateway whose model `llm` is the OpenAI-compatible `app`, served on a loopback port, recording
/// into a fresh store.
async fn serve_mock_llm(
    spec: &apprentice_envs::EnvSpec,
    app: axum::Router,
) -> (apprentice_gateway::RunningGateway, Arc<SqliteStore>, tempfile::TempDir) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let env_config = spec.gateway_config("llm", "mock-llm").unwrap();
    let config_text = format!(
        "{env_config}\n[models.llm]\nrouting = [\"mock\"]\n[models.llm.providers.mock]\ntype = \"openai\"\nmodel_name = \"m\"\napi_base = \"http://{upstream}/v1\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&config_text, "env.toml".as_ref(), dir.path()).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("g.db"), WriteMode::Durable).await.unwrap());
    let gateway = apprentice_gateway::Gateway::with_store(config, store.clone()).unwrap();
    let server = apprentice_gateway::RunningGateway::start(gateway, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    (server, store, dir)
}

/// A fresh durable store in a scratch folder, and a recorder writing to it.
async fn expert_store() -> (tempfile::TempDir, Arc<dyn Store>, Arc<Recorder>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("rollout.db"), WriteMode::Durable).await.unwrap());
    let recorder = Arc::new(Recorder::spawn(store.clone(), WriteMode::Durable, 4096, None));
    (dir, store, recorder)
}
