//! Training throughput on a fixed workload: LoRA on every projection, micro-batches of
//! `batch × seq_len` tokens of synthetic ids, every position trained (a language-modelling step,
//! the same work PyTorch + peft does in `bench/train_torch.py`). What `apprentice bench train`
//! prints.

use std::path::Path;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use apprentice_model::AttentionKernel;

use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::trainer::{train, LoraSpec, TrainConfig, TrainingData};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainBench {
    pub attention: AttentionKernel,
    pub batch: usize,
    pub seq_len: usize,
    pub lora_rank: usize,
    pub steps: usize,
    /// Steps timed (the first, warm-up step excluded).
    pub timed_steps: usize,
    pub tokens_per_s: f64,
    pub s_per_step: f64,
    /// Peak resident memory of this process (VmHWM), bytes; model loading included.
    pub peak_rss_bytes: Option<u64>,
}

/// The synthetic batch: `batch` rows of `seq_len` ids below `vocab`, all trained.
pub fn synthetic_examples(batch: usize, seq_len: usize, vocab: usize, seed: u64) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..batch)
        .map(|_| {
            // seq_len inputs and seq_len targets: seq_len + 1 ids.
            let input_ids: Vec<u32> = (0..=seq_len).map(|_| rng.gen_range(0..vocab as u32)).collect();
            let weights = vec![1.0; input_ids.len()];
            Example::new(input_ids, weights)
        })
        .collect()
}

/// Runs `steps` LoRA steps of `batch × seq_len` on the model at `base`; tokens/s over the steps
/// after the first.
pub fn train_throughput(
    base: &Path,
    batch: usize,
    seq_len: usize,
    lora_rank: usize,
    steps: usize,
    attention: AttentionKernel,
) -> Result<TrainBench> {
    let device = candle_core::Device::Cpu;
    let loaded = apprentice_model::load(base, &device)?;
    let vocab = loaded.config.vocab_size;
    let data = TrainingData {
        train: synthetic_examples(batch, seq_len, vocab, 0),
        validation: Vec::new(),
        pad_id: 0,
        base_id: "bench".into(),
    };
    let config = TrainConfig {
        lora: Some(LoraSpec { rank: lora_rank, alpha: 2.0 * lora_rank as f64, ..LoraSpec::default() }),
        token_budget: batch * (seq_len + 1),
        max_batch: batch,
        max_len: seq_len + 1,
        max_steps: Some(steps.max(2)),
        eval_every: 0,
        checkpoint_every: 0,
        progress: false,
        attention,
        ..TrainConfig::default()
    };
    let out = std::env::temp_dir().join(format!("apprentice-bench-train-{}", std::process::id()));
    let result = train(loaded, &data, &config, &out, false);
    let metrics_path = out.join("metrics.jsonl");
    let metrics = std::fs::read_to_string(&metrics_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out);
    let outcome = result?;
    let mut tokens = 0f64;
    let mut seconds = 0f64;
    let mut timed = 0;
    // The first step is the warm-up, left out of the timing.
    for (i, line) in metrics.lines().enumerate().skip(1) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|source| TrainError::Json {
            path: metrics_path.clone(),
            line: i + 1,
            source,
        })?;
        let t = v["tokens"].as_f64().unwrap_or(0.0);
        let rate = v["tokens_per_s"].as_f64().unwrap_or(0.0);
        if rate > 0.0 {
            tokens += t;
            seconds += t / rate;
            timed += 1;
        }
    }
    let (tokens_per_s, s_per_step) =
        if timed > 0 { (tokens / seconds, seconds / timed as f64) } else { (outcome.tokens_per_s, f64::NAN) };
    Ok(TrainBench {
        attention,
        batch,
        seq_len,
        lora_rank,
        steps: outcome.steps_done,
        timed_steps: timed,
        tokens_per_s,
        s_per_step,
        peak_rss_bytes: peak_rss(),
    })
}

/// VmHWM of this process (Linux), bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
