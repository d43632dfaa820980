//! Environment evaluation: play the same tasks with several policies, recorded like any rollout
//! and tagged with the evaluation run, then measure each policy from the store (success, return,
//! steps, tokens, latency per step, cost) and compare them task by task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use apprentice_envs::rollout::{rollout, EpisodeSummary, Policy, RolloutError, RolloutOptions};
use apprentice_envs::{Env, Split};
use apprentice_store::{InferenceQuery, Recorder, SqliteStore, Store, StoreError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::stats::{paired_difference, percentile, wilson, AdaptiveStopping, Interval, Z95};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("policy `{policy}`: {source}")]
    Rollout { policy: String, source: RolloutError },
    #[error("reading the evaluation's records: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

/// One policy to evaluate, under the name reports show.
#[derive(Debug, Clone)]
pub struct Contender {
    pub name: String,
    pub policy: Policy,
    /// How its calls are priced, for the report (e.g. `Price::describe` of its model).
    pub price: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub run_id: String,
    pub split: Split,
    pub start_index: u64,
    /// The most episodes per policy.
    pub episodes: u64,
    pub concurrency: usize,
    pub seed: u64,
    /// Stop a policy early once its success interval is narrow enough; checked every `batch`.
    pub stopping: Option<AdaptiveStopping>,
    pub batch: u64,
}

/// One episode as measured: the env's verdict and what its calls cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeResult {
    pub task: String,
    pub episode_id: Uuid,
    pub success: bool,
    pub episode_return: f64,
    pub steps: u32,
    pub truncated: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost: f64,
    /// Latency of each step's call, ms, in order.
    pub step_latency_ms: Vec<f64>,
}

/// Everything measured for one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyEvaluation {
    pub name: String,
    pub policy: String,
    pub price: Option<String>,
    pub episodes: Vec<EpisodeResult>,
    pub wall_s: f64,
    pub stopped_early: bool,
}

/// The table row of a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySummary {
    pub name: String,
    pub policy: String,
    pub episodes: usize,
    pub successes: usize,
    pub success: Interval,
    pub mean_return: f64,
    pub steps_per_episode: f64,
    pub input_tokens_per_episode: f64,
    pub output_tokens_per_episode: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub wall_s: f64,
    pub cost_per_episode: f64,
    /// None when nothing succeeded.
    pub cost_per_success: Option<f64>,
    pub price: Option<String>,
}

impl PolicyEvaluation {
    pub fn summary(&self) -> PolicySummary {
        let n = self.episodes.len();
        let per_episode =
            |f: &dyn Fn(&EpisodeResult) -> f64| self.episodes.iter().map(f).sum::<f64>() / n.max(1) as f64;
        let successes = self.episodes.iter().filter(|e| e.success).count();
        let latencies: Vec<f64> = self.episodes.iter().flat_map(|e| e.step_latency_ms.iter().copied()).collect();
        let total_cost: f64 = self.episodes.iter().map(|e| e.cost).sum();
        PolicySummary {
            name: self.name.clone(),
            policy: self.policy.clone(),
            episodes: n,
            successes,
            success: wilson(successes, n, Z95),
            mean_return: per_episode(&|e| e.episode_return),
            steps_per_episode: per_episode(&|e| e.steps as f64),
            input_tokens_per_episode: per_episode(&|e| e.input_tokens as f64),
            output_tokens_per_episode: per_episode(&|e| e.output_tokens as f64),
            latency_p50_ms: percentile(&latencies, 0.5),
            latency_p95_ms: percentile(&latencies, 0.95),
            wall_s: self.wall_s,
            cost_per_episode: total_cost / n.max(1) as f64,
            cost_per_success: (successes > 0).then(|| total_cost / successes as f64),
            price: self.price.clone(),
        }
    }

    /// Success (1/0) per task, keyed by task, for paired comparison.
    fn outcomes(&self) -> BTreeMap<&str, f64> {
        self.episodes.iter().map(|e| (e.task.as_str(), if e.success { 1.0 } else { 0.0 })).collect()
    }
}

/// `a − b` in success rate on the tasks both played.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub tasks: usize,
    pub success_difference: Interval,
}

/// Compares `a` with `b` on the tasks both played (adaptive stopping can end them at different
/// counts; tasks are matched by id, never by position).
pub fn compare(a: &PolicyEvaluation, b: &PolicyEvaluation) -> Comparison {
    let (oa, ob) = (a.outcomes(), b.outcomes());
    let (xs, ys): (Vec<f64>, Vec<f64>) = oa.iter().filter_map(|(task, x)| ob.get(task).map(|y| (*x, *y))).unzip();
    // A difference of success rates lies in [-1, 1]; the normal approximation can overshoot on
    // few tasks.
    let success_difference = paired_difference(&xs, &ys, Z95)
        .map(|d| Interval { low: d.low.max(-1.0), high: d.high.min(1.0), ..d })
        .unwrap_or(Interval { estimate: f64::NAN, low: f64::NAN, high: f64::NAN });
    Comparison { a: a.name.clone(), b: b.name.clone(), tasks: xs.len(), success_difference }
}

/// A finished evaluation run: what `apprentice report` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub run_id: String,
    pub env: String,
    pub split: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub policies: Vec<PolicyEvaluation>,
}

impl Evaluation {
    pub fn summaries(&self) -> Vec<PolicySummary> {
        self.policies.iter().map(PolicyEvaluation::summary).collect()
    }

    /// Every policy against `reference` (by name; the first policy when None).
    pub fn comparisons(&self, reference: Option<&str>) -> Vec<Comparison> {
        let reference = match reference {
            Some(name) => self.policies.iter().find(|p| p.name == name),
            None => self.policies.first(),
        };
        let Some(reference) = reference else { return Vec::new() };
        self.policies.iter().filter(|p| p.name != reference.name).map(|p| compare(p, reference)).collect()
    }
}

/// Plays `options.episodes` tasks (or fewer, with adaptive stopping) with every contender, in
/// order, and measures them. Steps are tagged `eval_run` and `policy`. Expert steps go to
/// `recorder`; gateway policies are recorded by the gateway, whose store `store` must be.
pub async fn evaluate<E, F>(
    make_env: F,
    contenders: &[Contender],
    store: &SqliteStore,
    recorder: Option<Arc<Recorder>>,
    options: &EvalOptions,
    on_episode: impl Fn(&str, &EpisodeSummary) + Send + Sync,
) -> Result<Evaluation, EvalError>
where
    E: Env + 'static,
    F: Fn() -> E + Send + Sync,
{
    if contenders.is_empty() {
        return Err(EvalError::Invalid("nothing to evaluate: no policies given".into()));
    }
    let env = make_env().spec().name.clone();
    let mut policies = Vec::new();
    for contender in contenders {
        let started = Instant::now();
        let mut summaries: Vec<EpisodeSummary> = Vec::new();
        let mut stopped_early = false;
        let batch = options.batch.max(1);
        while (summaries.len() as u64) < options.episodes {
            let count = batch.min(options.episodes - summaries.len() as u64);
            let rollout_options = RolloutOptions {
                split: options.split,
                start_index: options.start_index + summaries.len() as u64,
                episodes: count,
                concurrency: options.concurrency,
                seed: options.seed,
                tags: BTreeMap::from([
                    ("eval_run".to_string(), options.run_id.clone()),
                    ("policy".to_string(), contender.name.clone()),
                ]),
            };
            let on = |s: &EpisodeSummary| on_episode(&contender.name, s);
            let played = rollout(&make_env, &contender.policy, recorder.clone(), &rollout_options, on)
                .await
                .map_err(|source| EvalError::Rollout { policy: contender.name.clone(), source })?;
            summaries.extend(played.episodes);
            if let Some(rule) = options.stopping {
                let successes = summaries.iter().filter(|s| s.success).count();
                if (summaries.len() as u64) < options.episodes && rule.should_stop(successes, summaries.len()) {
                    stopped_early = true;
                    break;
                }
            }
        }
        let wall_s = started.elapsed().as_secs_f64();
        let mut episodes = Vec::with_capacity(summaries.len());
        for summary in summaries {
            episodes.push(measure_episode(store, summary).await?);
        }
        policies.push(PolicyEvaluation {
            name: contender.name.clone(),
            policy: policy_spec(&contender.policy),
            price: contender.price.clone(),
            episodes,
            wall_s,
            stopped_early,
        });
    }
    Ok(Evaluation {
        run_id: options.run_id.clone(),
        env,
        split: options.split.as_str().to_string(),
        created_at: chrono::Utc::now(),
        policies,
    })
}

/// Tokens, cost and step latencies of an episode, from its recorded inferences.
async fn measure_episode(store: &SqliteStore, summary: EpisodeSummary) -> Result<EpisodeResult, EvalError> {
    let query = InferenceQuery { episode_id: Some(summary.episode_id), ..InferenceQuery::default() };
    // In creation order: the store orders by id, and ids are time-ordered (UUIDv7).
    let inferences = store.inferences(&query).await?;
    Ok(EpisodeResult {
        task: summary.task,
        episode_id: summary.episode_id,
        success: summary.success,
        episode_return: summary.episode_return,
        steps: summary.steps,
        truncated: summary.truncated,
        input_tokens: inferences.iter().map(|i| i.usage.input_tokens as u64).sum(),
        output_tokens: inferences.iter().map(|i| i.usage.output_tokens as u64).sum(),
        cost: inferences.iter().filter_map(|i| i.cost).sum(),
        step_latency_ms: inferences.iter().map(|i| i.latency_ms).collect(),
    })
}

fn policy_spec(policy: &Policy) -> String {
    match policy {
        Policy::Expert { epsilon } => format!("expert?epsilon={epsilon}"),
        Policy::Gateway { function_name, variant_name: Some(v), .. } => format!("function::{function_name}/{v}"),
        Policy::Gateway { function_name, variant_name: None, .. } => format!("function::{function_name}"),
    }
}

/// A `--fail-below METRIC=VALUE` threshold: `success`, `success_low` (the interval's lower
/// bound) or `mean_return`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub metric: String,
    pub value: f64,
}

impl std::str::FromStr for Threshold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (metric, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not METRIC=VALUE"))?;
        if !["success", "success_low", "mean_return"].contains(&metric) {
            return Err(format!("unknown metric `{metric}`; expected success, success_low or mean_return"));
        }
        let value = value.parse::<f64>().map_err(|_| format!("`{value}` in `{s}` is not a number"))?;
        Ok(Threshold { metric: metric.to_string(), value })
    }
}

impl Threshold {
    fn measure(&self, summary: &PolicySummary) -> f64 {
        match self.metric.as_str() {
            "success" => summary.success.estimate,
            "success_low" => summary.success.low,
            _ => summary.mean_return,
        }
    }

    /// One line per policy below the threshold; empty when every policy passes.
    pub fn failures(&self, summaries: &[PolicySummary]) -> Vec<String> {
        summaries
            .iter()
            // NaN (no episodes) fails too.
            .filter(|s| self.measure(s).partial_cmp(&self.value).is_none_or(|o| o.is_lt()))
            .map(|s| format!("{}: {} = {:.4} is below {}", s.name, self.metric, self.measure(s), self.value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, successes: &[bool]) -> PolicyEvaluation {
        let episodes = successes
            .iter()
            .enumerate()
            .map(|(i, &success)| EpisodeResult {
                task: format!("test/{i}"),
                episode_id: Uuid::nil(),
                success,
                episode_return: 0.0,
                steps: 1,
                truncated: false,
                input_tokens: 0,
                output_tokens: 0,
                cost: 0.0,
                step_latency_ms: vec![1.0],
            })
            .collect();
        PolicyEvaluation {
            name: name.into(),
            policy: "p".into(),
            price: None,
            episodes,
            wall_s: 0.0,
            stopped_early: false,
        }
    }

    #[test]
    fn cost_per_episode_and_per_success_add_up_the_recorded_costs() {
        let mut p = policy("student", &[true, false, true, false]);
        for (episode, cost) in p.episodes.iter_mut().zip([0.25, 0.5, 0.25, 1.0]) {
            episode.cost = cost;
            episode.input_tokens = 100;
            episode.output_tokens = 10;
            episode.step_latency_ms = vec![10.0, 30.0];
        }
        let s = p.summary();
        assert_eq!((s.episodes, s.successes), (4, 2));
        assert!((s.cost_per_episode - 0.5).abs() < 1e-12, "2.0 over 4 episodes");
        assert_eq!(s.cost_per_success, Some(1.0), "2.0 over 2 successes");
        assert_eq!((s.input_tokens_per_episode, s.output_tokens_per_episode), (100.0, 10.0));
        assert_eq!((s.latency_p50_ms, s.latency_p95_ms), (20.0, 30.0));
        // Nothing succeeded: no cost per success.
        assert_eq!(policy("none", &[false, false]).summary().cost_per_success, None);
    }

    #[test]
    fn a_difference_of_success_rates_stays_within_minus_one_and_one() {
        // Per-task differences 1, 1, 0: mean 2/3, normal interval [0.01, 1.32] before clamping.
        let c = compare(&policy("a", &[true, true, true]), &policy("b", &[false, false, true]));
        let d = c.success_difference;
        assert!((d.estimate - 2.0 / 3.0).abs() < 1e-12 && d.high == 1.0 && d.low > 0.0, "{d:?}");
        // Tasks are matched by id: a policy that played fewer tasks is compared on those only.
        let c = compare(&policy("a", &[true, false, true, true]), &policy("b", &[true, false]));
        assert_eq!(c.tasks, 2);
        assert_eq!(c.success_difference.estimate, 0.0);
    }
}
