//! Training data: dataset JSONL rendered with the student's chat template into token ids and
//! per-token loss weights, length-bucketed batches under a token budget, a seeded batch order.

use std::path::Path;

use apprentice_model::{ChatTemplate, Tokenizer};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::error::{Result, TrainError};

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

/// What loading did to a JSONL file's lines: how many examples (windows) came out and how many
/// trained tokens could not be kept within `max_len`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadStats {
    pub lines: usize,
    /// Examples produced (a line longer than `max_len` gives several windows).
    pub examples: usize,
    /// Lines longer than `max_len`, split into windows.
    pub split_lines: usize,
    /// Trained tokens in the rendered lines.
    pub trained_tokens: usize,
    /// Trained tokens in no window (a single assistant turn longer than a window, or a line
    /// with nothing but trained tokens after its first one).
    pub dropped_trained_tokens: usize,
    /// Lines that yield no example (fewer than 2 tokens).
    pub skipped_lines: usize,
}

/// Reads OpenAI chat fine-tuning JSONL (optional `weight`), rendering each line with `template`.
/// A line longer than `max_len` tokens is split by [`split_windows`] at assistant-turn
/// boundaries into windows that each start with the conversation's system message; the stats
/// count the trained tokens that fit in no window.
pub fn load_jsonl(
    path: &Path,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    max_len: usize,
) -> Result<(Vec<Example>, LoadStats)> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io("reading", path))?;
    let mut examples = Vec::new();
    let mut stats = LoadStats::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        stats.lines += 1;
        let record: serde_json::Value = serde_json::from_str(line).map_err(|source| TrainError::Json {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        let rendered = template.render_record(tokenizer, &record).map_err(|source| TrainError::Render {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        let whole = Example { input_ids: rendered.input_ids, weights: rendered.weights };
        stats.trained_tokens += whole.trained_tokens();
        if whole.input_ids.len() < 2 {
            stats.skipped_lines += 1;
            continue;
        }
        if whole.input_ids.len() <= max_len {
            stats.examples += 1;
            examples.push(whole);
            continue;
        }
        stats.split_lines += 1;
        let prefix_len = system_prefix_len(tokenizer, template, &record, &whole.input_ids);
        let turn_ends: Vec<usize> = rendered.turns.iter().map(|t| t.token_range.end).collect();
        let windows = split_windows(&whole, prefix_len, &turn_ends, max_len);
        let kept: usize = windows.iter().map(Example::trained_tokens).sum();
        stats.dropped_trained_tokens += whole.trained_tokens().saturating_sub(kept);
        stats.examples += windows.len();
        examples.extend(windows);
    }
    Ok((examples, stats))
}

/// The number of leading tokens that render the record's system message (and tools) alone, when
/// that rendering is a prefix of the whole conversation's; else 0.
fn system_prefix_len(tokenizer: &Tokenizer, template: &ChatTemplate, record: &serde_json::Value, ids: &[u32]) -> usize {
    let Some(first) = record.get("messages").and_then(|m| m.get(0)) else { return 0 };
    if first.get("role").and_then(|r| r.as_str()) != Some("system") {
        return 0;
    }
    let mut alone = serde_json::json!({ "messages": [first] });
    if let Some(tools) = record.get("tools") {
        alone["tools"] = tools.clone();
    }
    match template.render_record(tokenizer, &alone) {
        Ok(r) if ids.starts_with(&r.input_ids) => r.input_ids.len(),
        _ => 0,
    }
}

/// Splits an example longer than `max_len` into windows of at most `max_len` tokens.
///
/// The tokens after the first `prefix_len` (the system message) are cut into segments that each
/// end where an assistant turn ends (`turn_ends`): a segment is a turn with the context that
/// precedes it since the previous turn (the user message, the observation). Consecutive segments
/// are packed greedily into windows, each starting with the prefix, so every trained token keeps
/// the system message and its own turn's context, and is trained exactly once. A segment that
/// does not fit a window alone keeps its trained tokens and as much of the context right before
/// them as fits (context is cut from the left); trained tokens beyond the window are dropped
/// (the caller counts them). The prefix is left out when it would take over half a window.
/// Windows without trained tokens are left out.
pub fn split_windows(example: &Example, prefix_len: usize, turn_ends: &[usize], max_len: usize) -> Vec<Example> {
    let n = example.input_ids.len();
    let max_len = max_len.max(2);
    if n <= max_len {
        return vec![example.clone()];
    }
    let trained_in = |r: std::ops::Range<usize>| example.weights[r].iter().any(|&w| w > 0.0);
    let prefix_len =
        if prefix_len <= max_len / 2 && prefix_len < n && !trained_in(0..prefix_len) { prefix_len } else { 0 };
    let mut bounds: Vec<usize> = turn_ends.iter().copied().filter(|&e| e > prefix_len && e < n).collect();
    bounds.push(n);
    bounds.sort_unstable();
    bounds.dedup();
    let room = max_len - prefix_len;
    let mut windows = Vec::new();
    let mut emit = |ranges: &[std::ops::Range<usize>]| {
        let mut input_ids = Vec::with_capacity(max_len);
        let mut weights = Vec::with_capacity(max_len);
        for r in ranges {
            input_ids.extend_from_slice(&example.input_ids[r.clone()]);
            weights.extend_from_slice(&example.weights[r.clone()]);
        }
        let e = Example { input_ids, weights };
        if e.input_ids.len() >= 2 && e.trained_tokens() > 0 {
            windows.push(e);
        }
    };
    let mut start = prefix_len;
    let mut i = 0;
    while i < bounds.len() {
        let seg_end = bounds[i];
        if seg_end - start > room {
            // One segment longer than a window: keep its first trained token's context.
            let first = (start..seg_end).find(|&p| example.weights[p] > 0.0).unwrap_or(seg_end);
            let from = if seg_end - first < room { seg_end - room } else { first.saturating_sub(1).max(start) };
            emit(&[0..prefix_len, from..(from + room).min(seg_end)]);
            start = seg_end;
            i += 1;
            continue;
        }
        // Extend with whole segments while they fit.
        let mut end = seg_end;
        while i + 1 < bounds.len() && bounds[i + 1] - start <= room {
            i += 1;
            end = bounds[i];
        }
        emit(&[0..prefix_len, start..end]);
        start = end;
        i += 1;
    }
    windows
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
        return Err(TrainError::Data("empty batch".into()));
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

    /// A conversation: 4-token system prefix, then 3 turns of 3 context + 2 trained tokens.
    fn episode() -> (Example, Vec<usize>) {
        let mut ids: Vec<u32> = vec![1, 2, 3, 4];
        let mut w = vec![0.0; 4];
        let mut ends = Vec::new();
        for turn in 0..3u32 {
            ids.extend([10 + turn, 10 + turn, 10 + turn, 100 + turn, 100 + turn]);
            w.extend([0.0, 0.0, 0.0, 1.0, 1.0]);
            ends.push(ids.len());
        }
        (Example { input_ids: ids, weights: w }, ends)
    }

    #[test]
    fn long_examples_split_at_turns_with_the_system_prefix() {
        let (e, ends) = episode();
        assert_eq!(e.input_ids.len(), 19);
        assert_eq!(split_windows(&e, 4, &ends, 19), vec![e.clone()]);
        // Room for the prefix and two turns: windows [prefix, t0, t1] and [prefix, t2].
        let w = split_windows(&e, 4, &ends, 14);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].input_ids, e.input_ids[..14].to_vec());
        assert_eq!(w[1].input_ids, [&e.input_ids[..4], &e.input_ids[14..]].concat());
        assert_eq!(w.iter().map(Example::trained_tokens).sum::<usize>(), e.trained_tokens());
        for win in &w {
            assert!(win.input_ids.len() <= 14);
            assert_eq!(&win.input_ids[..4], &[1, 2, 3, 4]);
            assert_eq!(win.input_ids.len(), win.weights.len());
        }
        // One turn per window.
        let w = split_windows(&e, 4, &ends, 9);
        assert_eq!(w.len(), 3);
        assert_eq!(w.iter().map(Example::trained_tokens).sum::<usize>(), 6);
    }

    #[test]
    fn a_turn_longer_than_a_window_keeps_its_trained_tokens_and_nearest_context() {
        let (e, ends) = episode();
        // 4 + 5 > 8: each turn keeps the last 4 of its 5 tokens (2 context + 2 trained).
        let w = split_windows(&e, 4, &ends, 8);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].input_ids, vec![1, 2, 3, 4, 10, 10, 100, 100]);
        assert_eq!(w.iter().map(Example::trained_tokens).sum::<usize>(), 6);
        // No room for context and all trained tokens: the prefix (over half the window) goes,
        // and what does not fit is dropped, never more than a window.
        let w = split_windows(&e, 4, &ends, 2);
        assert!(w.iter().all(|x| x.input_ids.len() <= 2));
        assert_eq!(w.iter().map(Example::trained_tokens).sum::<usize>(), 3);
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
