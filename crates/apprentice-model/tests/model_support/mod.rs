//! Tiny random llama-family models for the model tests: deterministic from a seed, with weights
//! large enough that logits differ clearly between tokens.
#![allow(dead_code)]

use std::collections::HashMap;

use apprentice_model::config::{Architecture, ModelConfig};
use apprentice_model::llama::Llama;
use apprentice_model::load::{from_tensors, LoadedModel};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Two layers, grouped-query attention (4 query heads share 2 KV heads); row lengths are
/// multiples of 32 so that every matrix quantises to q8_0.
pub fn tiny_llama(tied: bool) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: tied,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Qwen2 shape: q/k/v biases, untied output projection, no GQA sharing of 1.
pub fn tiny_qwen2() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        attention_bias: true,
        tie_word_embeddings: false,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        ..tiny_llama(false)
    }
}

/// Deterministic random parameters: matrices and embeddings uniform in ±0.15 (±1.0 for
/// embeddings), norm weights around 1, biases small but non-zero.
pub fn random_tensors(config: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in Llama::parameter_shapes(config) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + rng.gen_range(-0.2..0.2)).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect()
        } else if name.contains("embed_tokens") {
            (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
        } else {
            (0..n).map(|_| rng.gen_range(-0.15..0.15)).collect()
        };
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor"));
    }
    tensors
}

pub fn random_model(config: &ModelConfig, seed: u64) -> LoadedModel {
    from_tensors(config, random_tensors(config, seed), &Device::Cpu, "random model").expect("random model")
}

pub fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).expect("ids")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flatten")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
