//! A function's history, loaded from the store once: its inferences in id (creation) order and an
//! index of the latest feedback on each target, so selection and weighting are lookups, not queries.

use std::collections::HashMap;

use apprentice_core::{FeedbackValue, InferenceOutput, InferenceRecord};
use apprentice_store::{InferenceQuery, SqliteStore, Store};
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
    pub inferences: Vec<InferenceRecord>,
    /// metric name → target id → latest value. Keyed by metric first so a lookup borrows the name.
    scalars: HashMap<String, HashMap<Uuid, Scalar>>,
    /// inference id → latest demonstration, whatever its metric name.
    demonstrations: HashMap<Uuid, InferenceOutput>,
}

impl History {
    pub async fn load(store: &SqliteStore, function_name: &str) -> Result<Self, CurateError> {
        let query = InferenceQuery { function_name: Some(function_name.to_owned()), ..Default::default() };
        let inferences = store.inferences(&query).await?;
        if inferences.is_empty() {
            return Err(CurateError::NoInferences(function_name.to_owned()));
        }
        let mut history = History { inferences, ..Default::default() };
        // Oldest first, so a later value for the same target and metric overwrites an earlier one.
        for feedback in store.feedback_for_function(function_name).await? {
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
