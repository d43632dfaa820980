//! A function's history, loaded from the store once: its inferences (heads only) in id (creation)
//! order and an index of the latest feedback on each target, so selection and weighting are
//! lookups, not queries.

use std::collections::{HashMap, HashSet};

use apprentice_core::{FeedbackValue, InferenceOutput};
use apprentice_store::{InferenceHead, SqliteStore};
use uuid::Uuid;

use crate::CurateError;

/// A boolean or float feedback value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar {
    Bool(bool),
    Float(f64),
}

impl Scalar {
    /// Booleans count as 1 and 0 where a number is needed (ranking, SFT(Q) weights).
    pub(crate) fn number(self) -> f64 {
        match self {
            Scalar::Bool(b) => f64::from(u8::from(b)),
            Scalar::Float(x) => x,
        }
    }
}

#[derive(Debug, Default)]
pub struct History {
    /// Every inference of the function, without content, in id order.
    pub heads: Vec<InferenceHead>,
    /// metric name → target id → latest value. Keyed by metric first so a lookup borrows the name.
    scalars: HashMap<String, HashMap<Uuid, Scalar>>,
    /// inference id → latest demonstration, whatever its metric name.
    demonstrations: HashMap<Uuid, InferenceOutput>,
}

impl History {
    /// Loads the inferences of `function_name` and the feedback on `metrics` (and demonstrations)
    /// that targets them or their episodes. Content is read later, only for what is selected.
    pub async fn load(store: &SqliteStore, function_name: &str, metrics: &[String]) -> Result<Self, CurateError> {
        let heads = store.inference_heads(function_name).await?;
        if heads.is_empty() {
            return Err(CurateError::NoInferences(function_name.to_owned()));
        }
        let targets: HashSet<Uuid> = heads.iter().flat_map(|h| [h.id, h.episode_id]).collect();
        let mut history = History { heads, ..Default::default() };
        // Oldest first, so a later value for the same target and metric overwrites an earlier one.
        for feedback in store.curation_feedback(metrics).await? {
            if !targets.contains(&feedback.target_id) {
                continue;
            }
            let scalar = match feedback.value {
                FeedbackValue::Boolean(b) => Scalar::Bool(b),
                FeedbackValue::Float(x) => Scalar::Float(x),
                FeedbackValue::Demonstration(output) => {
                    history.demonstrations.insert(feedback.target_id, output);
                    continue;
                }
                FeedbackValue::Comment(_) => continue,
            };
            history.scalars.entry(feedback.metric_name).or_default().insert(feedback.target_id, scalar);
        }
        Ok(history)
    }

    pub(crate) fn scalar(&self, metric: &str, target: Uuid) -> Option<Scalar> {
        self.scalars.get(metric)?.get(&target).copied()
    }

    pub(crate) fn demonstration(&self, inference: Uuid) -> Option<&InferenceOutput> {
        self.demonstrations.get(&inference)
    }
}
