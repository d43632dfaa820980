//! The training objectives of reference/iw-sft.md: `sft`, `iw-sft`, `sft-q`, `iw-sft-q`.
//!
//! Every objective is a weighted sum of per-token log-probabilities, `loss = −Σ_{b,t} c[b,t] ·
//! log π_θ(y_t)`, whose coefficients `c` carry no gradient. [`coefficients`] computes them from
//! plain numbers (the loss mask, the dataset's per-token weights, the helper policy's and the
//! reference's log-probs), so the weight formula is testable on hand-computed cases;
//! [`token_log_probs`] and [`weighted_loss`] are the tensor side.
//!
//! The sequence weight, exactly as the reference code computes it:
//! ```text
//! n_b = Σ_t m[b,t]                                   (n_b = 0 → the sequence is dropped)
//! d_b = Σ_t m[b,t] (log q̃(y_t) − log q(y_t)) / n_b   (mean per-token log-ratio)
//! w_b = clamp(exp(temp · d_b), 0, w_max)             (optionally w_b ← w_b / Σ_b w_b)
//! LLM:     loss = − Σ_b w_b Σ_t m[b,t] log π_θ(y_t) / Σ_b n_b
//! control: loss = mean_b of − w_b (Σ_t m[b,t] log π_θ(y_t)) / n_b
//! ```
//! The `-q` objectives multiply in the dataset's quality weights: the per-token weights of
//! `render_record` (message weight × example weight) replace the binary mask inside the sums
//! (`n_b` still counts trained tokens).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    Sft,
    IwSft,
    SftQ,
    IwSftQ,
}

impl Objective {
    pub fn importance_weighted(self) -> bool {
        matches!(self, Objective::IwSft | Objective::IwSftQ)
    }

    pub fn quality_weighted(self) -> bool {
        matches!(self, Objective::SftQ | Objective::IwSftQ)
    }

    pub fn name(self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::IwSft => "iw-sft",
            Objective::SftQ => "sft-q",
            Objective::IwSftQ => "iw-sft-q",
        }
    }
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sft" => Ok(Objective::Sft),
            "iw-sft" => Ok(Objective::IwSft),
            "sft-q" => Ok(Objective::SftQ),
            "iw-sft-q" => Ok(Objective::IwSftQ),
            other => Err(format!("unknown objective `{other}` (sft, iw-sft, sft-q, iw-sft-q)")),
        }
    }
}

/// What one importance weight covers: a whole sequence (one dataset line: an example, or an
/// episode exported as one conversation), or each token (ratio clipped to [0.2, 1.8]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    Sequence,
    Token,
}

/// The helper distribution q̃ of the bound: the current policy without gradient (LLM code), or
/// an exponential moving average of it (control code, decay 0.9).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum HelperPolicy {
    Current,
    Ema { decay: f64 },
}

/// How the weighted token log-probs are reduced to one loss: LLM code (`Σ_b w_b Σ_t … / Σ_b n_b`)
/// or control code (`mean_b w_b Σ_t … / n_b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reduction {
    Token,
    Sequence,
}

/// iw-SFT settings; `Default` is the LLM code's (temp 1, clip 16, no normalisation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IwConfig {
    pub temperature: f64,
    pub w_max: f64,
    /// `w_b ← w_b / Σ_b w_b` over the sequences of the batch (control code).
    pub normalize: bool,
    /// `w_b ← K · w_b / Σ_b w_b` over the batch's K sequences (self-normalised importance
    /// weights): they average 1, so only their ratios matter and the step size stays SFT's. Where
    /// the student is still learning the answer format, every raw weight sits at the clip and
    /// iw-SFT without this is SFT at w_max times the learning rate. Takes precedence over `normalize`.
    pub self_normalize: bool,
    pub granularity: Granularity,
    pub helper: HelperPolicy,
    pub reduction: Reduction,
    /// The clip of the token variant's per-token ratio.
    pub token_clip: (f64, f64),
}

impl Default for IwConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            w_max: 16.0,
            normalize: false,
            self_normalize: false,
            granularity: Granularity::Sequence,
            helper: HelperPolicy::Current,
            reduction: Reduction::Token,
            token_clip: (0.2, 1.8),
        }
    }
}

impl IwConfig {
    /// The control code's defaults: temp 10, clip 1000, per-batch normalisation, EMA helper.
    pub fn control() -> Self {
        Self {
            temperature: 10.0,
            w_max: 1000.0,
            normalize: true,
            helper: HelperPolicy::Ema { decay: 0.9 },
            reduction: Reduction::Sequence,
            ..Self::default()
        }
    }
}

/// One batch as plain numbers, rows aligned with the target positions of the batch tensor.
pub struct BatchNumbers<'a> {
    /// Dataset weight per target token (0 = no loss), as `render_record` gives them.
    pub token_weights: &'a [Vec<f32>],
    /// log q̃(y_t): the helper policy's log-probs (iw objectives only).
    pub helper: Option<&'a [Vec<f32>]>,
    /// log q(y_t): the reference's cached log-probs (iw objectives only).
    pub reference: Option<&'a [Vec<f32>]>,
}

/// Per-step weight statistics (over kept sequences, or over trained tokens for the token variant).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct WeightStats {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Sequences with no trained token, dropped.
    pub dropped: usize,
}

/// The loss coefficients `c[b][t]` and what they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Coefficients {
    pub c: Vec<Vec<f32>>,
    /// Importance weight of each sequence (`None`: dropped); all 1 for non-iw objectives.
    pub sequence_weights: Vec<Option<f64>>,
    pub stats: WeightStats,
    /// Σ_b n_b over kept sequences.
    pub trained_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    #[error("{0}")]
    Shape(String),
    #[error("iw objective without {0} log-probs")]
    Missing(&'static str),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `w_b = clamp(exp(temp · d_b), 0, w_max)` for `d_b` the mean per-token log-ratio over the
/// masked tokens; `None` when the mask is empty (the sequence is dropped, never NaN). Exposed
/// for tests; computed in f64 from f32 log-probs.
pub fn sequence_weight(mask: &[f32], helper: &[f32], reference: &[f32], temperature: f64, w_max: f64) -> Option<f64> {
    let mut n = 0usize;
    let mut sum = 0f64;
    for ((&m, &h), &r) in mask.iter().zip(helper).zip(reference) {
        if m > 0.0 {
            n += 1;
            sum += h as f64 - r as f64;
        }
    }
    if n == 0 {
        return None;
    }
    let d = sum / n as f64;
    let w = (temperature * d).exp();
    // exp never gives NaN for finite d; a −∞ log-prob would, so clamp after mapping NaN to w_max.
    Some(if w.is_nan() { w_max } else { w.clamp(0.0, w_max) })
}

/// The coefficients of `loss = −Σ c[b,t] log π_θ(y_t)` for `objective` on one batch.
pub fn coefficients(objective: Objective, iw: &IwConfig, batch: &BatchNumbers) -> Result<Coefficients, ObjectiveError> {
    let rows = batch.token_weights.len();
    let check = |what: &'static str, other: Option<&[Vec<f32>]>| -> Result<(), ObjectiveError> {
        if let Some(other) = other {
            if other.len() != rows || other.iter().zip(batch.token_weights).any(|(a, b)| a.len() != b.len()) {
                return Err(ObjectiveError::Shape(format!("{what} log-probs do not match the batch's shape")));
            }
        }
        Ok(())
    };
    check("helper", batch.helper)?;
    check("reference", batch.reference)?;

    let masks: Vec<Vec<f32>> =
        batch.token_weights.iter().map(|row| row.iter().map(|&w| if w > 0.0 { 1.0 } else { 0.0 }).collect()).collect();
    let n: Vec<usize> = masks.iter().map(|m| m.iter().filter(|&&x| x > 0.0).count()).collect();
    // The per-token factor inside the sums: the binary mask, or the dataset weight for -q.
    let base: Vec<Vec<f32>> = if objective.quality_weighted() {
        batch.token_weights.iter().map(|row| row.iter().map(|&w| w.max(0.0)).collect()).collect()
    } else {
        masks.clone()
    };

    let mut weights: Vec<Option<f64>> = n.iter().map(|&n| (n > 0).then_some(1.0)).collect();
    // Token variant: per-token ratios, clipped; they multiply `base` below.
    let mut token_ratios: Option<Vec<Vec<f64>>> = None;
    let mut token_stats: Vec<f64> = Vec::new();
    if objective.importance_weighted() {
        let helper = batch.helper.ok_or(ObjectiveError::Missing("helper"))?;
        let reference = batch.reference.ok_or(ObjectiveError::Missing("reference"))?;
        match iw.granularity {
            Granularity::Sequence => {
                for b in 0..rows {
                    weights[b] = sequence_weight(&masks[b], &helper[b], &reference[b], iw.temperature, iw.w_max);
                }
                if iw.normalize || iw.self_normalize {
                    let total: f64 = weights.iter().flatten().sum();
                    let scale = if iw.self_normalize { weights.iter().flatten().count() as f64 } else { 1.0 };
                    if total > 0.0 {
                        for w in weights.iter_mut().flatten() {
                            *w *= scale / total;
                        }
                    }
                }
            }
            Granularity::Token => {
                let (lo, hi) = iw.token_clip;
                let ratios = (0..rows)
                    .map(|b| {
                        (0..masks[b].len())
                            .map(|t| {
                                if masks[b][t] > 0.0 {
                                    let r = (helper[b][t] as f64 - reference[b][t] as f64).exp();
                                    let r = if r.is_nan() { hi } else { r.clamp(lo, hi) };
                                    token_stats.push(r);
                                    r
                                } else {
                                    0.0
                                }
                            })
                            .collect()
                    })
                    .collect();
                token_ratios = Some(ratios);
            }
        }
    }

    let kept: Vec<usize> = (0..rows).filter(|&b| weights[b].is_some()).collect();
    let trained_tokens: usize = kept.iter().map(|&b| n[b]).sum();
    let mut c = vec![Vec::new(); rows];
    for b in 0..rows {
        c[b] = vec![0f32; base[b].len()];
        let Some(w) = weights[b] else { continue };
        let denom = match iw.reduction {
            Reduction::Token => trained_tokens as f64,
            Reduction::Sequence => (n[b] * kept.len()) as f64,
        };
        for t in 0..base[b].len() {
            let ratio = token_ratios.as_ref().map_or(1.0, |r| r[b][t]);
            c[b][t] = (w * ratio * base[b][t] as f64 / denom) as f32;
        }
    }

    let values: Vec<f64> =
        if token_ratios.is_some() { token_stats } else { kept.iter().filter_map(|&b| weights[b]).collect() };
    let stats = if values.is_empty() {
        WeightStats { dropped: rows - kept.len(), ..WeightStats::default() }
    } else {
        WeightStats {
            mean: values.iter().sum::<f64>() / values.len() as f64,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            dropped: rows - kept.len(),
        }
    };
    Ok(Coefficients { c, sequence_weights: weights, stats, trained_tokens })
}

/// `log softmax(logits)[targets]`: `[B, T, V]` logits and `[B, T]` target ids → `[B, T]`, in f32
/// via logsumexp (max-shifted, so no token underflows to −∞). Differentiable.
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor, ObjectiveError> {
    let logits = logits.to_dtype(DType::F32)?;
    let (b, t, _) = logits.dims3()?;
    if targets.dims() != [b, t] {
        return Err(ObjectiveError::Shape(format!(
            "targets {:?} do not match logits {:?}",
            targets.dims(),
            logits.dims()
        )));
    }
    Ok(apprentice_model::ops::log_softmax_gather(&logits, targets)?)
}

/// `−Σ c ⊙ log_probs` as a scalar tensor; `c` has no gradient.
pub fn weighted_loss(log_probs: &Tensor, c: &[Vec<f32>]) -> Result<Tensor, ObjectiveError> {
    let (b, t) = log_probs.dims2()?;
    if c.len() != b || c.iter().any(|row| row.len() != t) {
        return Err(ObjectiveError::Shape(format!("coefficients do not match log-probs [{b}, {t}]")));
    }
    let flat: Vec<f32> = c.iter().flatten().copied().collect();
    let c = Tensor::from_vec(flat, (b, t), log_probs.device())?;
    Ok((log_probs * c)?.sum_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * (1.0 + b.abs())
    }

    #[test]
    fn weight_is_exp_of_mean_log_ratio_times_temperature() {
        // Two trained tokens with log-ratios 0.2 and 0.4 (mean 0.3); the untrained one is ignored.
        let mask = [0.0, 1.0, 1.0];
        let helper = [-5.0, -1.0, -2.0];
        let reference = [0.0, -1.2, -2.4];
        let w = sequence_weight(&mask, &helper, &reference, 1.0, 16.0).unwrap();
        assert!(close(w, 0.3f64.exp()), "{w}");
        let w = sequence_weight(&mask, &helper, &reference, 10.0, 1000.0).unwrap();
        assert!(close(w, 3.0f64.exp()), "{w}");
        let w = sequence_weight(&mask, &helper, &reference, 0.5, 16.0).unwrap();
        assert!(close(w, 0.15f64.exp()), "{w}");
    }

    #[test]
    fn weight_is_clipped_at_w_max_and_never_nan() {
        let w = sequence_weight(&[1.0], &[-0.1], &[-10.0], 1.0, 16.0).unwrap();
        assert_eq!(w, 16.0);
        let w = sequence_weight(&[1.0], &[-0.1], &[f32::NEG_INFINITY], 1.0, 16.0).unwrap();
        assert_eq!(w, 16.0);
        let w = sequence_weight(&[1.0], &[-50.0], &[-0.1], 1.0, 16.0).unwrap();
        assert!(w > 0.0 && w < 1e-20);
    }

    #[test]
    fn empty_mask_drops_the_sequence() {
        assert_eq!(sequence_weight(&[0.0, 0.0], &[-1.0, -1.0], &[-2.0, -2.0], 1.0, 16.0), None);
        let tw = vec![vec![0.0, 0.0], vec![0.0, 1.0]];
        let helper = vec![vec![-1.0, -1.0], vec![-1.0, -1.0]];
        let reference = vec![vec![-1.0, -1.0], vec![-1.0, -1.5]];
        let batch = BatchNumbers { token_weights: &tw, helper: Some(&helper), reference: Some(&reference) };
        let c = coefficients(Objective::IwSft, &IwConfig::default(), &batch).unwrap();
        assert_eq!(c.sequence_weights[0], None);
        assert!(c.c[0].iter().all(|&x| x == 0.0));
        assert_eq!(c.stats.dropped, 1);
        assert_eq!(c.trained_tokens, 1);
        assert!(close(c.c[1][1] as f64, 0.5f64.exp()));
        assert!(c.c.iter().flatten().all(|x| x.is_finite()));
    }

    #[test]
    fn batch_normalisation_makes_weights_sum_to_one() {
        let tw = vec![vec![1.0], vec![1.0], vec![1.0]];
        let helper = vec![vec![0.0], vec![0.0], vec![0.0]];
        let reference = vec![vec![0.0], vec![-(2f32.ln())], vec![-(5f32.ln())]]; // weights 1, 2, 5
        let batch = BatchNumbers { token_weights: &tw, helper: Some(&helper), reference: Some(&reference) };
        let iw = IwConfig { normalize: true, ..IwConfig::default() };
        let c = coefficients(Objective::IwSft, &iw, &batch).unwrap();
        let w: Vec<f64> = c.sequence_weights.iter().map(|w| w.unwrap()).collect();
        assert!(close(w[0], 1.0 / 8.0) && close(w[1], 2.0 / 8.0) && close(w[2], 5.0 / 8.0), "{w:?}");
        // Token reduction: c = w_b · m / Σ n_b with Σ n_b = 3.
        assert!(close(c.c[2][0] as f64, 5.0 / 8.0 / 3.0));
        // Self-normalised: the same ratios, averaging 1.
        let iw = IwConfig { self_normalize: true, ..IwConfig::default() };
        let c = coefficients(Objective::IwSft, &iw, &batch).unwrap();
        let w: Vec<f64> = c.sequence_weights.iter().map(|w| w.unwrap()).collect();
        assert!(close(w[0], 3.0 / 8.0) && close(w[1], 6.0 / 8.0) && close(w[2], 15.0 / 8.0), "{w:?}");
        assert!(close(c.stats.mean, 1.0));
        // Without normalisation: raw weights, the stats report them.
        let c = coefficients(Objective::IwSft, &IwConfig::default(), &batch).unwrap();
        assert!(close(c.stats.mean, 8.0 / 3.0) && close(c.stats.min, 1.0) && close(c.stats.max, 5.0));
    }

    #[test]
    fn control_reduction_is_mean_over_sequences_of_length_normalised_sums() {
        let tw = vec![vec![1.0, 1.0, 0.0, 0.0], vec![1.0, 1.0, 1.0, 1.0]];
        let batch = BatchNumbers { token_weights: &tw, helper: None, reference: None };
        let iw = IwConfig { reduction: Reduction::Sequence, ..IwConfig::default() };
        let c = coefficients(Objective::Sft, &iw, &batch).unwrap();
        assert!(close(c.c[0][0] as f64, 1.0 / 4.0) && close(c.c[1][0] as f64, 1.0 / 8.0));
        let c = coefficients(Objective::Sft, &IwConfig::default(), &batch).unwrap();
        assert!(close(c.c[0][0] as f64, 1.0 / 6.0) && close(c.c[1][3] as f64, 1.0 / 6.0));
    }

    #[test]
    fn identical_policies_give_weight_one_and_the_sft_coefficients() {
        let tw = vec![vec![0.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]];
        let lp = vec![vec![-0.3, -1.7, -0.01], vec![-2.5, -0.2, -9.0]];
        let iw_batch = BatchNumbers { token_weights: &tw, helper: Some(&lp), reference: Some(&lp) };
        let sft_batch = BatchNumbers { token_weights: &tw, helper: None, reference: None };
        let iw = coefficients(Objective::IwSft, &IwConfig::default(), &iw_batch).unwrap();
        let sft = coefficients(Objective::Sft, &IwConfig::default(), &sft_batch).unwrap();
        assert_eq!(iw.sequence_weights, vec![Some(1.0), Some(1.0)]);
        assert_eq!(iw.c, sft.c);
        let token = IwConfig { granularity: Granularity::Token, ..IwConfig::default() };
        assert_eq!(coefficients(Objective::IwSft, &token, &iw_batch).unwrap().c, sft.c);
    }

    #[test]
    fn token_variant_clips_ratios_to_the_band() {
        let tw = vec![vec![1.0, 1.0, 1.0]];
        let helper = vec![vec![0.0, 0.0, 0.0]];
        let reference = vec![vec![-5.0, 5.0, -(1.5f32.ln())]];
        let batch = BatchNumbers { token_weights: &tw, helper: Some(&helper), reference: Some(&reference) };
        let iw = IwConfig { granularity: Granularity::Token, ..IwConfig::default() };
        let c = coefficients(Objective::IwSft, &iw, &batch).unwrap();
        let got: Vec<f64> = c.c[0].iter().map(|&x| x as f64 * 3.0).collect();
        assert!(close(got[0], 1.8) && close(got[1], 0.2) && (got[2] - 1.5).abs() < 1e-5, "{got:?}");
    }

    #[test]
    fn quality_objectives_multiply_in_dataset_weights() {
        let tw = vec![vec![3.0, 0.0], vec![1.0, 0.5]];
        let batch = BatchNumbers { token_weights: &tw, helper: None, reference: None };
        let q = coefficients(Objective::SftQ, &IwConfig::default(), &batch).unwrap();
        assert_eq!(q.trained_tokens, 3);
        assert!(close(q.c[0][0] as f64, 1.0) && close(q.c[1][1] as f64, 0.5 / 3.0));
        let plain = coefficients(Objective::Sft, &IwConfig::default(), &batch).unwrap();
        assert!(close(plain.c[0][0] as f64, 1.0 / 3.0));
        let helper = vec![vec![0.0, 0.0], vec![0.0, 0.0]];
        let reference = vec![vec![-(2f32.ln()), 0.0], vec![0.0, 0.0]];
        let batch = BatchNumbers { token_weights: &tw, helper: Some(&helper), reference: Some(&reference) };
        let iwq = coefficients(Objective::IwSftQ, &IwConfig::default(), &batch).unwrap();
        assert!(close(iwq.c[0][0] as f64, 2.0 * 3.0 / 3.0));
        assert!(coefficients(Objective::IwSft, &IwConfig::default(), &BatchNumbers { helper: None, ..batch }).is_err());
    }

    #[test]
    fn token_log_probs_match_a_direct_log_softmax_and_stay_finite() {
        let logits =
            Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 1000.0, 0.0, -1000.0], (1, 2, 3), &candle_core::Device::Cpu)
                .unwrap();
        let targets = Tensor::from_vec(vec![2u32, 2], (1, 2), &candle_core::Device::Cpu).unwrap();
        let lp = token_log_probs(&logits, &targets).unwrap().to_vec2::<f32>().unwrap();
        let expected = 3.0 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lp[0][0] as f64 - expected).abs() < 1e-5);
        assert!((lp[0][1] + 2000.0).abs() < 1e-2 && lp[0][1].is_finite());
    }
}
