//! The rollout driver on a small env written here: records land in the store with every step,
//! their episode, and the env's feedback, for the expert (straight to the store) and for a policy
//! served by a gateway in front of a loopback mock LLM.

use std::sync::Arc;

use apprentice_core::config::{MetricType, Optimize, WriteMode};
use apprentice_core::{Config, ContentBlock, FeedbackValue, Input, InputMessage, MetricLevel, Role, SystemInput};
use apprentice_envs::rollout::{rollout, Policy, RolloutOptions};
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

#[tokio::test]
async fn noisy_expert_rollout_records_every_step_with_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("r.db"), WriteMode::Durable).await.unwrap());
    let recorder = Arc::new(Recorder::spawn(store.clone(), WriteMode::Durable, 1024, None));
    let options = RolloutOptions { split: Split::Train, start_index: 0, episodes: 60, concurrency: 4, seed: 7 };
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
async fn same_seed_gives_the_same_noisy_rollout() {
    let run = || async {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("r.db"), WriteMode::Durable).await.unwrap());
        let recorder = Arc::new(Recorder::spawn(store, WriteMode::Durable, 64, None));
        let options = RolloutOptions { split: Split::Test, start_index: 5, episodes: 20, concurrency: 3, seed: 11 };
        let summary =
            rollout(Corridor::new, &Policy::Expert { epsilon: 0.3 }, Some(recorder), &options, |_| {}).await.unwrap();
        summary.episodes.iter().map(|e| (e.task.clone(), e.steps, e.success)).collect::<Vec<_>>()
    };
    assert_eq!(run().await, run().await);
}

#[tokio::test]
async fn gateway_policy_with_a_mock_llm_records_the_same_way() {
    // A loopback OpenAI-compatible "LLM" that always answers "forward".
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            axum::Json(json!({
                "id": "x", "object": "chat.completion", "created": 0, "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "forward"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let env_config = Corridor::new().spec.gateway_config("llm", "mock-llm").unwrap();
    let config_text = format!(
        "{env_config}\n[models.llm]\nrouting = [\"mock\"]\n[models.llm.providers.mock]\ntype = \"openai\"\nmodel_name = \"m\"\napi_base = \"http://{upstream}/v1\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&config_text, "env.toml".as_ref(), dir.path()).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("g.db"), WriteMode::Durable).await.unwrap());
    let gateway = apprentice_gateway::Gateway::with_store(config, store.clone()).unwrap();
    let server = apprentice_gateway::RunningGateway::start(gateway, "127.0.0.1:0".parse().unwrap()).await.unwrap();

    let policy = Policy::gateway(&server.url(), "function::corridor::act").unwrap();
    let options = RolloutOptions { split: Split::Train, start_index: 0, episodes: 6, concurrency: 3, seed: 0 };
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
