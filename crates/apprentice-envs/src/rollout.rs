//! The rollout driver: plays tasks of an env with a policy and records every step exactly as a
//! production call would be recorded, so teacher data and production data are the same kind of
//! record.
//!
//! - The env's scripted expert (optionally noisy) is recorded straight into the store as
//!   inferences of the env's function, under a variant named for the expert and its ε.
//! - Any function or variant served by a gateway (a real LLM, the dummy provider, a local student)
//!   is called through the gateway's HTTP API, which records it; the env's feedback is sent to the
//!   gateway's `/feedback`. Every call carries a sampling seed derived from (seed, task, step), see
//!   [`step_seed`], so a rollout does not depend on how many episodes are played at once.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use apprentice_core::config::FunctionConfig;
use apprentice_core::render::render_input;
use apprentice_core::templates::Templates;
use apprentice_core::{
    new_id, ContentBlock, FeedbackRecord, FeedbackValue, InferenceOutput, InferenceRecord, MetricLevel, Usage,
};
use apprentice_store::{Record, Recorder};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{Env, EnvError, EnvSpec, FunctionSpec, Observation, Split, TaskId};

/// Who chooses the actions.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// The env's scripted expert; with probability `epsilon` a uniformly random action instead.
    Expert { epsilon: f64 },
    /// A function served by an apprentice gateway, optionally pinned to one variant.
    Gateway { url: String, function_name: String, variant_name: Option<String> },
}

impl Policy {
    /// Parses `expert`, `expert?epsilon=0.3`; gateway policies need the gateway's URL, see [`Policy::gateway`].
    pub fn expert(spec: &str) -> Result<Self, RolloutError> {
        let query = match spec.split_once('?') {
            Some(("expert", query)) => query,
            None if spec == "expert" => "",
            _ => return Err(RolloutError::Policy(format!("`{spec}` is not `expert` or `expert?epsilon=E`"))),
        };
        let mut epsilon = 0.0;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("epsilon", value)) => {
                    epsilon =
                        value.parse::<f64>().ok().filter(|e| (0.0..=1.0).contains(e)).ok_or_else(|| {
                            RolloutError::Policy(format!("epsilon `{value}` is not a number in [0, 1]"))
                        })?;
                }
                _ => return Err(RolloutError::Policy(format!("unknown expert option `{pair}`; expected epsilon=E"))),
            }
        }
        Ok(Policy::Expert { epsilon })
    }

    /// `function::NAME` or `function::NAME/VARIANT` served by the gateway at `url`.
    pub fn gateway(url: &str, spec: &str) -> Result<Self, RolloutError> {
        let target = spec.strip_prefix("function::").ok_or_else(|| {
            RolloutError::Policy(format!(
                "`{spec}` is not `expert[?epsilon=E]`, `function::NAME` or `function::NAME/VARIANT`"
            ))
        })?;
        let (function_name, variant_name) = match target.rsplit_once('/') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (target.to_string(), None),
        };
        Ok(Policy::Gateway { url: url.trim_end_matches('/').to_string(), function_name, variant_name })
    }

    /// The variant name expert steps are recorded under, e.g. `expert-eps0.3`.
    pub fn expert_variant(epsilon: f64) -> String {
        format!("expert-eps{epsilon}")
    }
}

impl FromStr for Policy {
    type Err = RolloutError;
    fn from_str(s: &str) -> Result<Self, RolloutError> {
        Policy::expert(s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("bad policy: {0}")]
    Policy(String),
    #[error("env: {0}")]
    Env(#[from] EnvError),
    #[error("the env has no expert")]
    NoExpert,
    #[error("cannot record: {0}")]
    Store(#[from] apprentice_store::StoreError),
    #[error("gateway {url}: {message}")]
    Gateway { url: String, message: String },
    #[error("the env's function `{function}` cannot be rendered: {message}")]
    Render { function: String, message: String },
}

#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub split: Split,
    pub start_index: u64,
    pub episodes: u64,
    /// Episodes played at once (LLM policies wait on the network; a local model decodes the
    /// concurrent episodes' calls in one batch). Results do not depend on it: episodes come back in
    /// task order, and every random draw is seeded from (seed, task, step) only.
    pub concurrency: usize,
    /// Seeds the noise of a noisy expert (episode i's noise depends only on (seed, task)) and the
    /// sampling of gateway policies: step `s` (0 for the first call) of task `t` is sent with
    /// `params.seed = step_seed(seed, t, s)` and its episode id (from the second step on; the gateway
    /// mints it at the first). A request's seed overrides a variant's own `seed`, as for any request
    /// that sets `params`. Which variant an unpinned function picks still depends on the minted
    /// episode id, hence is not reproducible; pin a variant for reproducible rollouts.
    pub seed: u64,
    /// Added to every step's tags (with `env` and `task`), e.g. an evaluation run's id.
    pub tags: BTreeMap<String, String>,
}

/// How one episode went, as the env judged it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpisodeSummary {
    pub task: String,
    pub episode_id: Uuid,
    pub steps: u32,
    pub success: bool,
    pub episode_return: f64,
    pub truncated: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RolloutSummary {
    pub policy: String,
    pub episodes: Vec<EpisodeSummary>,
}

impl RolloutSummary {
    pub fn success_rate(&self) -> f64 {
        self.episodes.iter().filter(|e| e.success).count() as f64 / self.episodes.len().max(1) as f64
    }

    pub fn mean_return(&self) -> f64 {
        self.episodes.iter().map(|e| e.episode_return).sum::<f64>() / self.episodes.len().max(1) as f64
    }

    pub fn table(&self) -> String {
        let n = self.episodes.len();
        let steps = self.episodes.iter().map(|e| e.steps as f64).sum::<f64>() / n.max(1) as f64;
        let truncated = self.episodes.iter().filter(|e| e.truncated).count();
        format!(
            "{:<24} {:>8} {:>9} {:>12} {:>10} {:>10}\n{:<24} {:>8} {:>8.1}% {:>12.3} {:>10.1} {:>10}",
            "policy",
            "episodes",
            "success",
            "mean return",
            "mean steps",
            "truncated",
            self.policy,
            n,
            100.0 * self.success_rate(),
            self.mean_return(),
            steps,
            truncated
        )
    }
}

/// Plays `options.episodes` consecutive tasks of `options.split` with `policy`, recording each step.
/// `recorder` receives expert steps; gateway policies are recorded by the gateway.
pub async fn rollout<E, F>(
    make_env: F,
    policy: &Policy,
    recorder: Option<Arc<Recorder>>,
    options: &RolloutOptions,
    on_episode: impl Fn(&EpisodeSummary) + Send + Sync,
) -> Result<RolloutSummary, RolloutError>
where
    E: Env + 'static,
    F: Fn() -> E + Send + Sync,
{
    let spec = make_env().spec().clone();
    let sink = match policy {
        Policy::Expert { epsilon } => {
            let recorder = recorder.ok_or_else(|| RolloutError::Policy("expert rollouts need a store".into()))?;
            Sink::Expert(Box::new(ExpertSink::new(&spec, *epsilon, recorder)?))
        }
        Policy::Gateway { url, function_name, variant_name } => Sink::Gateway(GatewaySink {
            client: reqwest::Client::new(),
            url: url.clone(),
            function_name: function_name.clone(),
            variant_name: variant_name.clone(),
        }),
    };
    let tasks: Vec<TaskId> =
        (0..options.episodes).map(|i| TaskId { split: options.split, index: options.start_index + i }).collect();
    let results: Vec<Result<EpisodeSummary, RolloutError>> = stream::iter(tasks)
        .map(|task| {
            let (sink, make_env, on_episode) = (&sink, &make_env, &on_episode);
            async move {
                let summary = play_episode(make_env(), task, policy, sink, options).await?;
                on_episode(&summary);
                Ok(summary)
            }
        })
        .buffered(options.concurrency.max(1))
        .collect()
        .await;
    if let Sink::Expert(expert) = &sink {
        expert.recorder.flush().await?;
    }
    let episodes = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let policy = match policy {
        Policy::Expert { epsilon } => format!("expert?epsilon={epsilon}"),
        Policy::Gateway { function_name, variant_name, .. } => match variant_name {
            Some(v) => format!("function::{function_name}/{v}"),
            None => format!("function::{function_name}"),
        },
    };
    Ok(RolloutSummary { policy, episodes })
}

async fn play_episode<E: Env>(
    mut env: E,
    task: TaskId,
    policy: &Policy,
    sink: &Sink,
    options: &RolloutOptions,
) -> Result<EpisodeSummary, RolloutError> {
    let mut noise =
        SplitMix64::new(options.seed ^ task.index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (task.split as u64) << 63);
    let mut observation = env.reset(task)?;
    let mut episode_id = match sink {
        Sink::Expert(_) => Some(new_id()),
        Sink::Gateway(_) => None,
    };
    let mut tags = options.tags.clone();
    tags.insert("env".to_string(), env.spec().name.clone());
    tags.insert("task".to_string(), task.to_string());
    let mut steps: u32 = 0;
    loop {
        let started = Instant::now();
        let (inference_id, answer) = match (policy, sink) {
            (Policy::Expert { epsilon }, Sink::Expert(expert)) => {
                let text = if noise.next_f64() < *epsilon {
                    let actions = env.action_space();
                    actions[(noise.next_u64() % actions.len() as u64) as usize].clone()
                } else {
                    env.expert_action().ok_or(RolloutError::NoExpert)?
                };
                let answer = vec![ContentBlock::Text { text }];
                let episode = episode_id.unwrap_or_else(new_id);
                let id = expert.record(episode, &observation, &answer, started, &tags).await?;
                (id, answer)
            }
            (_, Sink::Gateway(gateway)) => {
                let seed = step_seed(options.seed, task, steps);
                let (id, episode, answer) = gateway.infer(episode_id, &observation, &tags, seed).await?;
                episode_id = Some(episode);
                (id, answer)
            }
            (Policy::Gateway { .. }, Sink::Expert(_)) => unreachable!("the sink is built from the policy"),
        };
        let outcome = env.step(&answer)?;
        steps += 1;
        let episode = episode_id.ok_or_else(|| RolloutError::Policy("no episode id".into()))?;
        for (metric, value) in &outcome.feedback.inference {
            sink.feedback(metric, MetricLevel::Inference, inference_id, value.clone()).await?;
        }
        for (metric, value) in &outcome.feedback.episode {
            sink.feedback(metric, MetricLevel::Episode, episode, value.clone()).await?;
        }
        if outcome.terminated || outcome.truncated {
            let find = |name: &str| outcome.feedback.episode.iter().find(|(m, _)| m == name).map(|(_, v)| v.clone());
            return Ok(EpisodeSummary {
                task: task.to_string(),
                episode_id: episode,
                steps,
                success: matches!(find("success"), Some(FeedbackValue::Boolean(true))),
                episode_return: match find("return") {
                    Some(FeedbackValue::Float(r)) => r,
                    _ => 0.0,
                },
                truncated: outcome.truncated,
            });
        }
        observation = outcome.observation;
    }
}

enum Sink {
    Expert(Box<ExpertSink>),
    Gateway(GatewaySink),
}

impl Sink {
    async fn feedback(
        &self,
        metric: &str,
        level: MetricLevel,
        target: Uuid,
        value: FeedbackValue,
    ) -> Result<(), RolloutError> {
        match self {
            Sink::Expert(expert) => {
                let record = FeedbackRecord {
                    id: new_id(),
                    metric_name: metric.to_string(),
                    target_level: level,
                    target_id: target,
                    value,
                    tags: BTreeMap::new(),
                    created_at: chrono::Utc::now(),
                };
                Ok(expert.recorder.record(Record::Feedback(Box::new(record))).await?)
            }
            Sink::Gateway(gateway) => gateway.feedback(metric, level, target, value).await,
        }
    }
}

/// Records expert steps as inferences of the env's function, rendered with the env's templates.
struct ExpertSink {
    recorder: Arc<Recorder>,
    function: FunctionSpec,
    function_config: FunctionConfig,
    templates: Templates,
    variant: String,
    model: String,
    epsilon: f64,
}

impl ExpertSink {
    fn new(spec: &EnvSpec, epsilon: f64, recorder: Arc<Recorder>) -> Result<Self, RolloutError> {
        let function = spec.functions.first().cloned().ok_or(RolloutError::NoExpert)?;
        let variant = Policy::expert_variant(epsilon);
        let templates = function.templates(&variant)?;
        let function_config = function.config(&spec.tools)?;
        Ok(Self {
            model: format!("expert::{}?epsilon={epsilon}", spec.name),
            recorder,
            function,
            function_config,
            templates,
            variant,
            epsilon,
        })
    }

    async fn record(
        &self,
        episode_id: Uuid,
        observation: &Observation,
        answer: &[ContentBlock],
        started: Instant,
        tags: &BTreeMap<String, String>,
    ) -> Result<Uuid, RolloutError> {
        let rendered = render_input(
            &self.templates,
            &self.function.name,
            Some(&self.function_config),
            &self.variant,
            &observation.input,
        )
        .map_err(|e| RolloutError::Render { function: self.function.name.clone(), message: e.to_string() })?;
        let record = InferenceRecord {
            id: new_id(),
            function_name: observation.function_name.clone(),
            variant_name: self.variant.clone(),
            episode_id,
            input: observation.input.clone(),
            rendered,
            output: InferenceOutput::Chat { content: answer.to_vec() },
            model_name: self.model.clone(),
            provider_name: "expert".into(),
            usage: Usage::default(),
            latency_ms: started.elapsed().as_secs_f64() * 1e3,
            ttft_ms: None,
            cost: Some(0.0),
            tags: tags.clone(),
            params: json!({"epsilon": self.epsilon}),
            finish_reason: Some("stop".into()),
            created_at: chrono::Utc::now(),
        };
        let id = record.id;
        self.recorder.record(Record::Inference(Box::new(record))).await?;
        Ok(id)
    }
}

/// Calls a function through a gateway's native API, as any application would.
struct GatewaySink {
    client: reqwest::Client,
    url: String,
    function_name: String,
    variant_name: Option<String>,
}

impl GatewaySink {
    async fn post(&self, path: &str, body: &Value) -> Result<Value, RolloutError> {
        let error = |message: String| RolloutError::Gateway { url: self.url.clone(), message };
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .map_err(|e| error(e.to_string()))?;
        let status = response.status();
        let answer: Value = response.json().await.map_err(|e| error(format!("{path} answered {status}: {e}")))?;
        if !status.is_success() {
            return Err(error(format!("{path} answered {status}: {answer}")));
        }
        Ok(answer)
    }

    async fn infer(
        &self,
        episode_id: Option<Uuid>,
        observation: &Observation,
        tags: &BTreeMap<String, String>,
        seed: u64,
    ) -> Result<(Uuid, Uuid, Vec<ContentBlock>), RolloutError> {
        let body = json!({
            "function_name": self.function_name,
            "variant_name": self.variant_name,
            "episode_id": episode_id,
            "input": observation.input,
            "tags": tags,
            "params": {"seed": seed},
        });
        let answer = self.post("/inference", &body).await?;
        let bad = |what: &str| RolloutError::Gateway {
            url: self.url.clone(),
            message: format!("answer lacks {what}: {answer}"),
        };
        let id = answer["inference_id"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad("inference_id"))?;
        let episode = answer["episode_id"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad("episode_id"))?;
        let content: Vec<ContentBlock> =
            serde_json::from_value(answer["content"].clone()).map_err(|_| bad("content"))?;
        Ok((id, episode, content))
    }

    async fn feedback(
        &self,
        metric: &str,
        level: MetricLevel,
        target: Uuid,
        value: FeedbackValue,
    ) -> Result<(), RolloutError> {
        let value = match value {
            FeedbackValue::Boolean(b) => json!(b),
            FeedbackValue::Float(f) => json!(f),
            FeedbackValue::Comment(c) => json!(c),
            FeedbackValue::Demonstration(output) => json!(output),
        };
        let id_field = match level {
            MetricLevel::Inference => "inference_id",
            MetricLevel::Episode => "episode_id",
        };
        self.post("/feedback", &json!({"metric_name": metric, id_field: target, "value": value})).await?;
        Ok(())
    }
}

/// The sampling seed of step `step` (0 for the first call) of `task` played by a gateway policy
/// under the rollout seed `seed`; it depends on nothing else (not on the concurrency, the order in
/// which episodes finish, or the time). Each input is mixed in with a SplitMix64 step:
/// `h = mix(mix(mix(seed) ^ (index | split << 63)) ^ step)`, where `mix(x)` is the first output of
/// SplitMix64 seeded with `x` and split is 0 for train, 1 for test; the result keeps h's top 53
/// bits, so it fits an int64 (what OpenAI-compatible APIs take) and is exact as a JSON double.
pub fn step_seed(seed: u64, task: TaskId, step: u32) -> u64 {
    let mix = |x: u64| SplitMix64::new(x).next_u64();
    let task_key = task.index | ((task.split as u64) << 63);
    mix(mix(mix(seed) ^ task_key) ^ u64::from(step)) >> 11
}

/// A tiny seeded generator for the expert's noise and the gateway steps' seeds, identical on every
/// platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies() {
        assert_eq!(Policy::expert("expert").unwrap(), Policy::Expert { epsilon: 0.0 });
        assert_eq!(Policy::expert("expert?epsilon=0.3").unwrap(), Policy::Expert { epsilon: 0.3 });
        assert!(Policy::expert("expert?epsilon=2").is_err());
        assert!(Policy::expert("expert?eps=0.1").is_err());
        assert!(Policy::expert("oracle").is_err());
        assert_eq!(
            Policy::gateway("http://h:3000/", "function::babyai::act/student").unwrap(),
            Policy::Gateway {
                url: "http://h:3000".into(),
                function_name: "babyai::act".into(),
                variant_name: Some("student".into())
            }
        );
        assert!(Policy::gateway("http://h", "babyai::act").is_err());
    }

    #[test]
    fn step_seeds_depend_on_seed_task_and_step_only() {
        let task = |split, index| TaskId { split, index };
        let a = step_seed(7, task(Split::Train, 3), 2);
        assert_eq!(a, step_seed(7, task(Split::Train, 3), 2));
        assert!(a < 1 << 53);
        let others = [
            step_seed(8, task(Split::Train, 3), 2),
            step_seed(7, task(Split::Test, 3), 2),
            step_seed(7, task(Split::Train, 4), 2),
            step_seed(7, task(Split::Train, 3), 1),
        ];
        assert!(others.iter().all(|&o| o != a), "{a} {others:?}");
        // Pinned, so a change of the formula is a deliberate one (recorded seeds would change).
        // Computed apart from this code (Python) from the formula in step_seed's doc.
        assert_eq!(step_seed(0, task(Split::Train, 0), 0), 1_249_383_295_688_599);
        assert_eq!(step_seed(7, task(Split::Test, 3), 2), 4_789_239_972_798_806);
    }
}
