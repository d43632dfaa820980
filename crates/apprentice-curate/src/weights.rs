//! Example weights for importance-weighted SFT: every example 1 (plain SFT), or proportional to a
//! quality metric (SFT(Q)), normalised so the dataset's mean weight is 1 and the learning rate
//! keeps its meaning whatever the metric's scale.

use serde::{Deserialize, Serialize};

use crate::example::Example;
use crate::CurateError;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Weighting {
    #[default]
    Sft,
    /// Weight proportional to the metric's value (booleans count 1/0) at the metric's level.
    SftQ { metric: String },
}

/// Sets every example's weight. With SFT(Q), examples without a quality value, or with quality 0,
/// carry no signal and are dropped; the count of dropped examples is returned.
pub(crate) fn assign(
    weighting: &Weighting,
    examples: &mut Vec<Example>,
    quality: impl Fn(&Example) -> Option<f64>,
) -> Result<usize, CurateError> {
    let metric = match weighting {
        Weighting::Sft => {
            examples.iter_mut().for_each(|e| e.weight = 1.0);
            return Ok(0);
        }
        Weighting::SftQ { metric } => metric,
    };
    let before = examples.len();
    let mut kept = Vec::with_capacity(before);
    for mut example in examples.drain(..) {
        let Some(q) = quality(&example) else { continue };
        if q < 0.0 {
            return Err(CurateError::NegativeQuality {
                inference: example.inference_id,
                metric: metric.clone(),
                value: q,
            });
        }
        if q > 0.0 {
            example.weight = q;
            kept.push(example);
        }
    }
    let mean = kept.iter().map(|e| e.weight).sum::<f64>() / kept.len().max(1) as f64;
    if mean > 0.0 {
        kept.iter_mut().for_each(|e| e.weight /= mean);
    }
    *examples = kept;
    Ok(before - examples.len())
}
