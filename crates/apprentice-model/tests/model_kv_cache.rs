//! Incremental decoding with the KV cache computes what a full forward pass computes, for single
//! sequences, chunked prompts, and batches whose rows are padded to a common length.

mod model_support;

use apprentice_model::config::ModelConfig;
use apprentice_model::llama::KvCache;
use candle_core::{Device, IndexOp, Tensor};
use model_support::{ids, max_abs_diff, random_model, tiny_llama, tiny_qwen2};

/// f32 sums taken in a different order (other matmul shapes, extra zero-weight keys) differ in
/// the last bits; logits here are O(1).
const TOLERANCE: f32 = 1e-4;

const SEQUENCE: [u32; 12] = [1, 17, 42, 8, 95, 3, 3, 60, 21, 7, 88, 30];

fn check_incremental_equals_full(config: &ModelConfig, chunks: &[usize]) {
    let model = random_model(config, 11).model;
    let full = model.forward(&ids(&[&SEQUENCE])).unwrap();

    let mut cache = KvCache::new(config, 1);
    let mut start = 0;
    for &len in chunks {
        let chunk = &SEQUENCE[start..start + len];
        let logits = model.forward_cached(&ids(&[chunk]), None, &mut cache).unwrap();
        let expected = full.i((.., start..start + len, ..)).unwrap();
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff < TOLERANCE, "chunk at {start}..{}: max abs diff {diff}", start + len);
        start += len;
    }
    assert_eq!(cache.len(), start);
    assert_eq!(cache.positions(), [start]);
}

#[test]
fn incremental_decode_equals_full_forward_llama() {
    check_incremental_equals_full(&tiny_llama(true), &[5, 1, 1, 1, 1, 1, 1, 1]);
}

#[test]
fn incremental_decode_equals_full_forward_qwen2() {
    check_incremental_equals_full(&tiny_qwen2(), &[4, 1, 1, 1, 1, 1, 1, 1, 1]);
}

#[test]
fn chunked_prefill_equals_full_forward() {
    check_incremental_equals_full(&tiny_llama(false), &[3, 4, 1, 4]);
}

/// Three rows of different lengths, left-padded: each row's logits at its real positions equal
/// the logits of the row alone, both for the masked full forward and for a cached prefill
/// followed by cached single-token steps.
fn check_padded_batch(config: &ModelConfig) {
    let model = random_model(config, 5).model;
    let rows: [&[u32]; 3] = [&SEQUENCE[..7], &SEQUENCE[2..5], &SEQUENCE[1..6]];
    let continuation: [[u32; 3]; 3] = [[9, 10, 11], [12, 13, 14], [15, 16, 17]];
    let width = 7;

    let mut padded = Vec::new();
    let mut mask = Vec::new();
    for row in rows {
        let pad = width - row.len();
        padded.extend(std::iter::repeat_n(0u32, pad).chain(row.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1u32, row.len())));
    }
    let padded = Tensor::from_vec(padded, (3, width), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (3, width), &Device::Cpu).unwrap();

    let masked = model.forward_masked(&padded, &mask).unwrap();
    let mut cache = KvCache::new(config, 3);
    let prefill = model.forward_cached(&padded, Some(&mask), &mut cache).unwrap();
    let mut steps = Vec::new();
    for step in 0..3 {
        let next: Vec<u32> = continuation.iter().map(|c| c[step]).collect();
        let next = Tensor::from_vec(next, (3, 1), &Device::Cpu).unwrap();
        steps.push(model.forward_cached(&next, None, &mut cache).unwrap());
    }

    for (r, row) in rows.iter().enumerate() {
        let pad = width - row.len();
        let mut whole: Vec<u32> = row.to_vec();
        whole.extend(continuation[r]);
        let alone = model.forward(&ids(&[&whole])).unwrap();
        let expected = alone.i((.., ..row.len(), ..)).unwrap();
        for (what, logits) in [("masked forward", &masked), ("cached prefill", &prefill)] {
            let got = logits.i((r..r + 1, pad.., ..)).unwrap();
            let diff = max_abs_diff(&got, &expected);
            assert!(diff < TOLERANCE, "row {r}, {what}: max abs diff {diff}");
        }
        for (step, logits) in steps.iter().enumerate() {
            let got = logits.i((r..r + 1, .., ..)).unwrap();
            let expected = alone.i((.., row.len() + step..row.len() + step + 1, ..)).unwrap();
            let diff = max_abs_diff(&got, &expected);
            assert!(diff < TOLERANCE, "row {r}, cached step {step}: max abs diff {diff}");
        }
    }
    assert_eq!(cache.positions(), [10, 6, 8]);
}

#[test]
fn left_padded_batch_equals_rows_alone_llama() {
    check_padded_batch(&tiny_llama(true));
}

#[test]
fn left_padded_batch_equals_rows_alone_qwen2() {
    check_padded_batch(&tiny_qwen2());
}

/// Right padding (the training layout) needs no mask for the real positions; with a mask the
/// real positions are unchanged too.
#[test]
fn right_padded_batch_equals_rows_alone() {
    let config = tiny_llama(false);
    let model = random_model(&config, 9).model;
    let short = &SEQUENCE[..5];
    let padded = ids(&[&SEQUENCE[..8], &[short, &[0, 0, 0][..]].concat()]);
    let mask = Tensor::new(&[[1u8; 8], [1, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let alone = model.forward(&ids(&[short])).unwrap();
    for logits in [model.forward(&padded).unwrap(), model.forward_masked(&padded, &mask).unwrap()] {
        let diff = max_abs_diff(&logits.i((1..2, ..5, ..)).unwrap(), &alone);
        assert!(diff < TOLERANCE, "max abs diff {diff}");
    }
}

#[test]
fn mismatched_inputs_are_errors() {
    let config = tiny_llama(true);
    let model = random_model(&config, 1).model;
    let mut cache = KvCache::new(&config, 2);
    let err = model.forward_cached(&ids(&[&[1, 2, 3]]), None, &mut cache).unwrap_err();
    assert!(err.to_string().contains("cache holds 2 rows"), "{err}");
    let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu).unwrap();
    let err = model.forward_masked(&ids(&[&[1, 2, 3]]), &mask).unwrap_err();
    assert!(err.to_string().contains("attention_mask shape"), "{err}");
    let err = model.forward(&ids(&[&[1, 96]])).unwrap_err();
    assert!(err.to_string().contains("token id 96"), "{err}");
    let err = model.forward(&Tensor::new(&[[0.5f32]], &Device::Cpu).unwrap()).unwrap_err();
    assert!(err.to_string().contains("integer ids"), "{err}");
}
