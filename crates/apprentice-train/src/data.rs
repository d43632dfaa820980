//! Training data: dataset JSONL rendered with the student's chat template into token ids and
//! per-token loss weights, length-bucketed batches under a token budget, a seeded batch order.

use std::path::Path;

use anyhow::{bail, Context, Result};
use apprentice_model::{ChatTemplate, Tokenizer};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// One rendered example: ids and, per token, its loss weight (message weight × example weight;
/// 0 = context only).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Example {
    pub fn trained_tokens(&self) -> usize {
        self.weights.iter().skip(1).filter(|&&w| w > 0.0).count()
    }
}

/// Reads OpenAI chat fine-tuning JSONL (optional `weight`), rendering each line with `template`.
/// Examples longer than `max_len` keep their first `max_len` tokens; returns how many were cut.
pub fn load_jsonl(
    path: &Path,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<(Vec<Example>, usize)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut examples = Vec::new();
    let mut truncated = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let rendered = template
            .render_record(tokenizer, &record)
            .with_context(|| format!("{} line {}: cannot render", path.display(), i + 1))?;
        let (mut input_ids, mut weights) = (rendered.input_ids, rendered.weights);
        if input_ids.len() > max_len {
            input_ids.truncate(max_len);
            weights.truncate(max_len);
            truncated += 1;
        }
        if input_ids.len() < 2 {
            continue;
        }
        examples.push(Example { input_ids, weights });
    }
    Ok((examples, truncated))
}

/// Groups examples of similar length: sorted by length (ties by index), then filled greedily
/// while `rows × longest ≤ token_budget` and `rows ≤ max_batch`. Each batch lists indices.
pub fn bucket_batches(lengths: &[usize], token_budget: usize, max_batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        let longest = current.iter().map(|&j| lengths[j]).max().unwrap_or(0).max(lengths[i]);
        if !current.is_empty() && ((current.len() + 1) * longest > token_budget || current.len() >= max_batch.max(1)) {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The order of the batches in `epoch`: a shuffle seeded by (seed, epoch), so a run's data
/// position is a function of its step alone.
pub fn epoch_order(n_batches: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_batches).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    order.shuffle(&mut rng);
    order
}

/// A batch as tensors: inputs `[B, L−1]` (the last token of each row only ever a target),
/// targets `[B, L−1]` (inputs shifted by one), and the targets' loss weights; rows right-padded
/// with `pad_id` and weight 0 (causal attention: padding never reaches real positions).
pub struct BatchTensors {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub token_weights: Vec<Vec<f32>>,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
}

pub fn batch_tensors(examples: &[&Example], pad_id: u32, device: &Device) -> Result<BatchTensors> {
    if examples.is_empty() {
        bail!("empty batch");
    }
    let len = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let t = len - 1;
    let mut inputs = Vec::with_capacity(examples.len() * t);
    let mut targets = Vec::with_capacity(examples.len() * t);
    let mut token_weights = Vec::with_capacity(examples.len());
    let mut tokens = 0;
    for e in examples {
        let n = e.input_ids.len();
        tokens += n - 1;
        let mut row_w = vec![0f32; t];
        for p in 0..t {
            inputs.push(if p < n - 1 { e.input_ids[p] } else { pad_id });
            targets.push(if p + 1 < n { e.input_ids[p + 1] } else { pad_id });
            if p + 1 < n {
                row_w[p] = e.weights[p + 1];
            }
        }
        token_weights.push(row_w);
    }
    let b = examples.len();
    Ok(BatchTensors {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        token_weights,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_respect_budget_and_batch_size() {
        let lengths = [10, 50, 12, 48, 11, 100];
        let batches = bucket_batches(&lengths, 100, 3);
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * longest <= 100);
            assert!(b.len() <= 3);
        }
        assert_eq!(batches[0], vec![0, 4, 2]);
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        assert_eq!(epoch_order(7, 3, 1), epoch_order(7, 3, 1));
        assert_ne!(epoch_order(50, 3, 1), epoch_order(50, 3, 2));
        let mut o = epoch_order(7, 3, 1);
        o.sort();
        assert_eq!(o, (0..7).collect::<Vec<_>>());
    }
}
