//! Which of a function's inferences go into a dataset: a tree of and/or/not over leaves.
//!
//! Evaluation gives one boolean per inference of the [`History`], in its order. Every leaf is one
//! pass over the inferences (top-episodes adds a sort of the episodes), so a selection costs
//! O(n · leaves) over rows loaded once. An inference without feedback for a metric matches no
//! metric leaf, so `not` of that leaf keeps it.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

use apprentice_core::config::Optimize;
use apprentice_core::MetricLevel;
use apprentice_store::InferenceHead;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::history::{History, Scalar};
use crate::{CurateError, MetricInfo, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Comparison {
    Gt,
    Gte,
    Lt,
    Lte,
    Eq,
}

impl Comparison {
    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparison::Gt => value > threshold,
            Comparison::Gte => value >= threshold,
            Comparison::Lt => value < threshold,
            Comparison::Lte => value <= threshold,
            Comparison::Eq => value == threshold,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Selection {
    And {
        of: Vec<Selection>,
    },
    Or {
        of: Vec<Selection>,
    },
    Not {
        of: Box<Selection>,
    },
    /// The metric's latest boolean feedback equals `value`.
    BooleanMetric {
        metric: String,
        value: bool,
    },
    /// The metric's latest float feedback compared to `threshold`.
    FloatMetric {
        metric: String,
        op: Comparison,
        threshold: f64,
    },
    Tag {
        key: String,
        value: String,
    },
    Variant {
        name: String,
    },
    /// Inferences created in `[from, to)`; a missing bound is open.
    TimeRange {
        #[serde(default)]
        from: Option<DateTime<Utc>>,
        #[serde(default)]
        to: Option<DateTime<Utc>>,
    },
    /// Every inference of the best `k` (or best `percentile` percent) episodes by an episode-level
    /// metric, best as the metric's `optimize` says; per task (tag `task`) when `per_task`.
    TopEpisodes {
        metric: String,
        #[serde(default)]
        k: Option<usize>,
        #[serde(default)]
        percentile: Option<f64>,
        #[serde(default)]
        per_task: bool,
    },
}

impl Selection {
    /// The metrics this selection reads, in first-use order.
    pub fn metrics(&self) -> Vec<String> {
        let mut names = Vec::new();
        self.collect_metrics(&mut names);
        names
    }

    fn collect_metrics(&self, names: &mut Vec<String>) {
        match self {
            Selection::And { of } | Selection::Or { of } => of.iter().for_each(|child| child.collect_metrics(names)),
            Selection::Not { of } => of.collect_metrics(names),
            Selection::BooleanMetric { metric, .. }
            | Selection::FloatMetric { metric, .. }
            | Selection::TopEpisodes { metric, .. } => {
                if !names.contains(metric) {
                    names.push(metric.clone());
                }
            }
            Selection::Tag { .. } | Selection::Variant { .. } | Selection::TimeRange { .. } => {}
        }
    }

    /// One flag per inference of `history`, in its order.
    pub fn evaluate(&self, history: &History, metrics: &Metrics) -> Result<Vec<bool>, CurateError> {
        let inferences = &history.heads;
        Ok(match self {
            Selection::And { of } => {
                let mut mask = vec![true; inferences.len()];
                for child in of {
                    for (keep, child) in mask.iter_mut().zip(child.evaluate(history, metrics)?) {
                        *keep &= child;
                    }
                }
                mask
            }
            Selection::Or { of } => {
                let mut mask = vec![false; inferences.len()];
                for child in of {
                    for (keep, child) in mask.iter_mut().zip(child.evaluate(history, metrics)?) {
                        *keep |= child;
                    }
                }
                mask
            }
            Selection::Not { of } => of.evaluate(history, metrics)?.into_iter().map(|keep| !keep).collect(),
            Selection::BooleanMetric { metric, value } => {
                let info = metric_info(metrics, metric)?;
                inferences.iter().map(|i| scalar(history, metric, info, i) == Some(Scalar::Bool(*value))).collect()
            }
            Selection::FloatMetric { metric, op, threshold } => {
                if !threshold.is_finite() {
                    return Err(CurateError::InvalidSelection(format!(
                        "threshold for metric `{metric}` is {threshold}, not a finite number"
                    )));
                }
                let info = metric_info(metrics, metric)?;
                inferences
                    .iter()
                    .map(|i| match scalar(history, metric, info, i) {
                        Some(Scalar::Float(x)) => op.holds(x, *threshold),
                        _ => false,
                    })
                    .collect()
            }
            Selection::Tag { key, value } => inferences.iter().map(|i| i.tags.get(key) == Some(value)).collect(),
            Selection::Variant { name } => inferences.iter().map(|i| &i.variant_name == name).collect(),
            Selection::TimeRange { from, to } => inferences
                .iter()
                .map(|i| from.is_none_or(|from| i.created_at >= from) && to.is_none_or(|to| i.created_at < to))
                .collect(),
            Selection::TopEpisodes { metric, k, percentile, per_task } => {
                let kept = top_episodes(history, metrics, metric, *k, *percentile, *per_task)?;
                inferences.iter().map(|i| kept.contains(&i.episode_id)).collect()
            }
        })
    }
}

fn metric_info(metrics: &Metrics, metric: &str) -> Result<MetricInfo, CurateError> {
    metrics.get(metric).copied().ok_or_else(|| CurateError::UnknownMetric(metric.to_owned()))
}

/// An episode-level metric is read from the inference's episode, so it selects the whole episode.
fn scalar(history: &History, metric: &str, info: MetricInfo, inference: &InferenceHead) -> Option<Scalar> {
    let target = match info.level {
        MetricLevel::Inference => inference.id,
        MetricLevel::Episode => inference.episode_id,
    };
    history.scalar(metric, target)
}

fn top_episodes(
    history: &History,
    metrics: &Metrics,
    metric: &str,
    k: Option<usize>,
    percentile: Option<f64>,
    per_task: bool,
) -> Result<HashSet<Uuid>, CurateError> {
    let info = metric_info(metrics, metric)?;
    if info.level != MetricLevel::Episode {
        return Err(CurateError::InvalidSelection(format!(
            "top_episodes ranks by an episode-level metric; `{metric}` is inference-level"
        )));
    }
    let count = |n: usize| -> Result<usize, CurateError> {
        match (k, percentile) {
            (Some(k), None) => Ok(k.min(n)),
            (None, Some(p)) if p > 0.0 && p <= 100.0 => {
                // Rounded up, so a small group keeps its best episode rather than none.
                let kept = (n as f64 * p / 100.0).ceil();
                Ok((kept as usize).min(n))
            }
            (None, Some(p)) => {
                Err(CurateError::InvalidSelection(format!("top_episodes percentile must be in (0, 100], got {p}")))
            }
            _ => Err(CurateError::InvalidSelection("top_episodes needs exactly one of `k` and `percentile`".into())),
        }
    };
    // Group episodes (first seen order) by task; an episode without a metric value is not ranked.
    let mut seen = HashSet::new();
    let mut groups: BTreeMap<Option<&str>, Vec<(Uuid, f64)>> = BTreeMap::new();
    for inference in &history.heads {
        if !seen.insert(inference.episode_id) {
            continue;
        }
        let Some(value) = history.scalar(metric, inference.episode_id) else { continue };
        let value = value.number();
        let task = if per_task { inference.tags.get("task").map(String::as_str) } else { None };
        groups.entry(task).or_default().push((inference.episode_id, value));
    }
    let mut kept = HashSet::new();
    for episodes in groups.values_mut() {
        // Best first; ties go to the smaller (older) episode id so the result never depends on load order.
        episodes.sort_by(|(a_id, a), (b_id, b)| {
            let by_value = match info.optimize {
                Optimize::Max => b.partial_cmp(a),
                Optimize::Min => a.partial_cmp(b),
            };
            by_value.unwrap_or(Ordering::Equal).then(a_id.cmp(b_id))
        });
        let n = count(episodes.len())?;
        kept.extend(episodes.iter().take(n).map(|(id, _)| *id));
    }
    // Validate k/percentile even when no episode has the metric.
    count(0)?;
    Ok(kept)
}
