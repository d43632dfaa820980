//! Training data: dataset JSONL rendered with the student's chat template into token ids and
//! per-token loss weights, length-bucketed batches under a token budget, a seeded batch order.

use std::path::Path;

use apprentice_model::{ChatTemplate, PackedRows, Tokenizer};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::error::{Result, TrainError};

/// One rendered example: ids and, per token, its loss weight (message weight × example weight;
/// 0 = context only). An example made by [`share_prefixes`] packs several sequences behind their
/// common prefix and says where each token sits in its own sequence (`layout`).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub weights: Vec<f32>,
    pub layout: Option<PrefixLayout>,
}

/// Per token of a packed example: its position in its own sequence, and its segment (0: the
/// shared prefix; `i ≥ 1`: the rest of the `i`-th sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixLayout {
    pub positions: Vec<usize>,
    pub segments: Vec<u32>,
}

impl Example {
    pub fn new(input_ids: Vec<u32>, weights: Vec<f32>) -> Self {
        Self { input_ids, weights, layout: None }
    }

    pub fn trained_tokens(&self) -> usize {
        self.weights.iter().skip(1).filter(|&&w| w > 0.0).count()
    }

    /// How many sequences (examples as rendered) this example holds.
    pub fn sequences(&self) -> usize {
        self.layout.as_ref().and_then(|l| l.segments.iter().max()).map_or(1, |&s| s as usize)
    }

    /// The index of the first trained token, if any.
    fn first_trained(&self) -> Option<usize> {
        self.weights.iter().position(|&w| w > 0.0)
    }
}

/// Packs consecutive examples that begin with the same tokens (the system prompt, tools, the
/// mission: everything before their first trained token that they have in common) into one
/// example that holds that prefix once, followed by the rest of each. Each rest is laid out as if
/// it directly followed the prefix (its positions continue the prefix's, and it attends to the
/// prefix and to itself only), so every trained token is computed in exactly the context it has
/// alone, for fewer tokens of compute.
///
/// A group holds at most `max_sequences` examples and `max_len` tokens; a prefix shorter than
/// `min_shared` tokens is not worth a group. Examples that find no partner are kept as they are.
pub fn share_prefixes(examples: Vec<Example>, max_sequences: usize, max_len: usize, min_shared: usize) -> Vec<Example> {
    // The longest prefix an example may share: its rest must start before its first trained
    // token, so that no trained token is predicted across a segment boundary.
    let shareable = |e: &Example| e.first_trained().map_or(e.input_ids.len() - 1, |p| p.saturating_sub(1));
    let mut out = Vec::with_capacity(examples.len());
    let mut group: Vec<Example> = Vec::new();
    let mut shared = 0;
    for example in examples {
        if example.layout.is_some() || example.input_ids.len() < 2 {
            out.extend(pack_group(std::mem::take(&mut group), shared));
            out.push(example);
            continue;
        }
        if let Some(first) = group.first() {
            let common = first.input_ids[..shared]
                .iter()
                .zip(&example.input_ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(shareable(&example));
            let packed_len = common + group.iter().chain([&example]).map(|e| e.input_ids.len() - common).sum::<usize>();
            if group.len() < max_sequences && common >= min_shared && packed_len <= max_len {
                shared = common;
                group.push(example);
                continue;
            }
            out.extend(pack_group(std::mem::take(&mut group), shared));
        }
        shared = shareable(&example);
        group.push(example);
    }
    out.extend(pack_group(group, shared));
    out
}

/// `group` as one packed example behind its first `shared` tokens (alone: unchanged).
fn pack_group(mut group: Vec<Example>, shared: usize) -> Option<Example> {
    if group.len() <= 1 {
        return group.pop();
    }
    let len = shared + group.iter().map(|e| e.input_ids.len() - shared).sum::<usize>();
    let mut input_ids = Vec::with_capacity(len);
    let mut weights = Vec::with_capacity(len);
    let mut positions = Vec::with_capacity(len);
    let mut segments = Vec::with_capacity(len);
    input_ids.extend_from_slice(&group[0].input_ids[..shared]);
    weights.extend_from_slice(&group[0].weights[..shared]);
    positions.extend(0..shared);
    segments.extend(std::iter::repeat(0).take(shared));
    for (i, e) in group.iter().enumerate() {
        let n = e.input_ids.len();
        input_ids.extend_from_slice(&e.input_ids[shared..]);
        weights.extend_from_slice(&e.weights[shared..]);
        positions.extend(shared..n);
        segments.extend(std::iter::repeat(i as u32 + 1).take(n - shared));
    }
    Some(Example { input_ids, weights, layout: Some(PrefixLayout { positions, segments }) })
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
        let whole = Example::new(rendered.input_ids, rendered.weights);
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
        let e = Example::new(input_ids, weights);
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
    bucket_sequences(lengths, &vec![1; lengths.len()], token_budget, max_batch)
}

/// [`bucket_batches`] over examples, `max_batch` counting the sequences packed examples hold, so
/// a batch carries about as many sequences packed as unpacked.
pub fn bucket_examples(examples: &[Example], token_budget: usize, max_batch: usize) -> Vec<Vec<usize>> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    let sequences: Vec<usize> = examples.iter().map(Example::sequences).collect();
    bucket_sequences(&lengths, &sequences, token_budget, max_batch)
}

fn bucket_sequences(lengths: &[usize], sequences: &[usize], token_budget: usize, max_batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_sequences = 0;
    for i in order {
        let longest = current.iter().map(|&j| lengths[j]).max().unwrap_or(0).max(lengths[i]);
        if !current.is_empty()
            && ((current.len() + 1) * longest > token_budget || current_sequences + sequences[i] > max_batch.max(1))
        {
            batches.push(std::mem::take(&mut current));
            current_sequences = 0;
        }
        current.push(i);
        current_sequences += sequences[i];
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
/// with `pad_id` and weight 0 (causal attention: padding never reaches real positions). When a
/// row is a packed example, `packed` lays out every row (plain rows as one sequence).
pub struct BatchTensors {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub token_weights: Vec<Vec<f32>>,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
    pub packed: Option<PackedRows>,
}

impl BatchTensors {
    /// The segment of each target, per row and position: a packed row's trained targets belong
    /// to the segment of the token that predicts them; a plain row is all segment 0.
    pub fn target_segments(&self) -> Vec<Vec<u32>> {
        match &self.packed {
            Some(packed) => packed.segments.clone(),
            None => self.token_weights.iter().map(|row| vec![0; row.len()]).collect(),
        }
    }
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
    let packed = examples.iter().any(|e| e.layout.is_some()).then(|| {
        let mut rows = PackedRows::default();
        for e in examples {
            let n = e.input_ids.len() - 1;
            let (mut positions, mut segments) = match &e.layout {
                Some(layout) => (layout.positions[..n].to_vec(), layout.segments[..n].to_vec()),
                None => ((0..n).collect(), vec![0; n]),
            };
            positions.resize(t, 0);
            segments.resize(t, PackedRows::PADDING);
            rows.positions.push(positions);
            rows.segments.push(segments);
        }
        rows
    });
    let b = examples.len();
    Ok(BatchTensors {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        token_weights,
        tokens,
        packed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shared` tokens of prompt, then `own` more, then a 2-token answer whose first token is `a`.
    fn step(shared: usize, own: &[u32], a: u32) -> Example {
        let mut ids: Vec<u32> = (0..shared as u32).collect();
        ids.extend_from_slice(own);
        let mut weights = vec![0.0; ids.len()];
        ids.extend([a, 99]);
        weights.extend([1.0, 1.0]);
        Example::new(ids, weights)
    }

    #[test]
    fn shared_prefixes_stop_before_the_first_trained_token() {
        // Identical prompts: the shared part must still end before the answers.
        let same = vec![step(20, &[], 50), step(20, &[], 50), step(20, &[], 51)];
        let packed = share_prefixes(same.clone(), 4, 1024, 16);
        assert_eq!(packed.len(), 1);
        let layout = packed[0].layout.as_ref().unwrap();
        assert_eq!(layout.segments.iter().filter(|&&s| s == 0).count(), 19);
        for (slot, &segment) in layout.segments.iter().enumerate() {
            if slot > 0 && segment != layout.segments[slot - 1] {
                assert_eq!(packed[0].weights[slot], 0.0, "a segment starts with a trained token at {slot}");
            }
        }
        assert_eq!(packed[0].trained_tokens(), 6);
        assert_eq!(packed[0].sequences(), 3);
    }

    #[test]
    fn shared_prefixes_respect_group_size_length_and_minimum() {
        let examples: Vec<Example> = (0..5).map(|i| step(20, &[i, i], 50)).collect();
        let sizes = |v: &[Example]| v.iter().map(Example::sequences).collect::<Vec<_>>();
        assert_eq!(sizes(&share_prefixes(examples.clone(), 2, 1024, 16)), [2, 2, 1]);
        // 20 + 2 × 4 = 28 tokens fit, 20 + 3 × 4 = 32 do not.
        assert_eq!(sizes(&share_prefixes(examples.clone(), 8, 31, 16)), [2, 2, 1]);
        // Too short a prefix to be worth it: left alone.
        assert_eq!(share_prefixes(examples.clone(), 8, 1024, 21), examples);
        // A different prefix starts a new group.
        let mut mixed = examples.clone();
        mixed.insert(2, step(3, &[7; 18], 50));
        assert_eq!(sizes(&share_prefixes(mixed, 8, 1024, 16)), [2, 1, 3]);
    }

    #[test]
    fn buckets_count_the_sequences_of_packed_examples() {
        let examples: Vec<Example> = (0..8).map(|i| step(20, &[i], 50)).collect();
        let packed = share_prefixes(examples, 4, 1024, 16);
        assert_eq!(bucket_examples(&packed, 10_000, 4), vec![vec![0], vec![1]]);
        assert_eq!(bucket_examples(&packed, 10_000, 8), vec![vec![0, 1]]);
    }

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
        (Example::new(ids, w), ends)
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
