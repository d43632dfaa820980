//! Example weights for importance-weighted SFT: every example 1 (plain SFT), or proportional to a
//! quality metric (SFT(Q)) or to its percentile band (stratified SFT(Q)), normalised so the
//! dataset's mean weight is 1 and the learning rate
//! keeps its meaning whatever the metric's scale.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::example::Example;
use crate::CurateError;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Weighting {
    #[default]
    Sft,
    /// Weight proportional to the metric's value (booleans count 1/0) at the metric's level.
    SftQ { metric: String },
    /// Stratified SFT(Q), the control code's form (Qin & Springenberg 2025): only episodes at or
    /// above the 90th percentile of an episode-level metric are kept; at or above the 98th they
    /// weigh 3, in [95th, 98th) 2, in [90th, 95th) 1 (where the reference repeats an episode 3×, 2×,
    /// 1×). Percentiles interpolate linearly between the ranked values of the distinct episodes
    /// that reach weighting (numpy's default).
    Stratified { metric: String },
}

impl Weighting {
    /// The metric a weighting reads, if any.
    pub fn metric(&self) -> Option<&str> {
        match self {
            Weighting::Sft => None,
            Weighting::SftQ { metric } | Weighting::Stratified { metric } => Some(metric),
        }
    }
}

/// The `p`th percentile of ascending `sorted` (not empty), linear between closest ranks.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Sets every example's weight. With SFT(Q), examples without a quality value, or with quality 0,
/// carry no signal and are dropped; stratified SFT(Q) drops those without a value or below the
/// 90th percentile. The count of dropped examples is returned.
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
        Weighting::Stratified { .. } => {
            let before = examples.len();
            let qualities: Vec<Option<f64>> = examples.iter().map(&quality).collect();
            let episodes: BTreeMap<Uuid, f64> = examples
                .iter()
                .zip(&qualities)
                .filter_map(|(e, q)| q.filter(|q| !q.is_nan()).map(|q| (e.episode_id, q)))
                .collect();
            let mut sorted: Vec<f64> = episodes.into_values().collect();
            sorted.sort_by(f64::total_cmp);
            let mut kept = Vec::with_capacity(before);
            if !sorted.is_empty() {
                let [p90, p95, p98] = [90.0, 95.0, 98.0].map(|p| percentile(&sorted, p));
                for (mut example, q) in examples.drain(..).zip(qualities) {
                    let Some(q) = q else { continue };
                    example.weight = if q >= p98 {
                        3.0
                    } else if q >= p95 {
                        2.0
                    } else if q >= p90 {
                        1.0
                    } else {
                        continue;
                    };
                    kept.push(example);
                }
            }
            normalise(&mut kept);
            *examples = kept;
            return Ok(before - examples.len());
        }
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
    normalise(&mut kept);
    *examples = kept;
    Ok(before - examples.len())
}

fn normalise(examples: &mut [Example]) {
    let mean = examples.iter().map(|e| e.weight).sum::<f64>() / examples.len().max(1) as f64;
    if mean > 0.0 {
        examples.iter_mut().for_each(|e| e.weight /= mean);
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&values, 100.0), 10.0);
        assert!((percentile(&values, 90.0) - 9.1).abs() < 1e-12);
        assert!((percentile(&values, 95.0) - 9.55).abs() < 1e-12);
        assert_eq!(percentile(&[4.0], 98.0), 4.0);
    }
}
