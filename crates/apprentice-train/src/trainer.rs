//! The training loop: LoRA or full fine-tuning under one of the four objectives, AdamW with a
//! cosine schedule, gradient accumulation and clipping, validation, durable checkpoints that a
//! resumed run continues from bit for bit, metrics JSONL, loss curves and the final export.
//!
//! Determinism: the batch order of each epoch is a shuffle seeded by (seed, epoch), the dropout
//! masks of each micro-batch by (seed, micro-batch index), and the optimizer state is plain data
//! in the checkpoint. So the step number alone positions a resumed run in the data, and a run
//! killed after a checkpoint and resumed ends with the same weights as one never interrupted.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use apprentice_model::llama::LoraConfig;
use apprentice_model::{AttentionKernel, Llama, LoadedModel, LoraState, PackedRows, LORA_TARGETS};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{batch_tensors, bucket_examples, epoch_order, share_prefixes, BatchTensors, Example};
use crate::error::{Result, TrainError};
use crate::objective::{coefficients, token_log_probs, BatchNumbers, HelperPolicy, IwConfig, Objective};
use crate::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWConfig};

/// A shared prefix shorter than this saves too little to pack examples behind it.
const MIN_SHARED_PREFIX: usize = 16;

/// LoRA settings of a run (see [`LoraConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Vec<String>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, dropout: 0.0, targets: LORA_TARGETS.map(String::from).to_vec() }
    }
}

/// A training run's settings; `Default` suits SmolLM2-135M with LoRA on a 2-core CPU (short
/// sequences, 4 × 256-token batches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub objective: Objective,
    pub iw: IwConfig,
    /// `None`: full fine-tuning.
    pub lora: Option<LoraSpec>,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub grad_accum: usize,
    /// Most tokens (rows × longest row) in one micro-batch.
    pub token_budget: usize,
    pub max_batch: usize,
    /// Longer examples are split at assistant turns into windows of at most `max_len` tokens
    /// that each start with the system message (see `data::split_windows`).
    pub max_len: usize,
    /// Most examples packed behind one shared prefix (`data::share_prefixes`); 1 turns it off.
    /// Every trained token keeps exactly its own context, so only the compute changes.
    pub share_prefixes: usize,
    /// How attention is computed: the fused kernel (no `[B, H, T, T]` tensors) or candle ops.
    pub attention: AttentionKernel,
    pub epochs: usize,
    /// Overrides `epochs` when set.
    pub max_steps: Option<usize>,
    /// Validation loss every N steps (and before the first and after the last); 0 = ends only.
    pub eval_every: usize,
    /// Checkpoint every N steps (and at the end); 0 = at the end only.
    pub checkpoint_every: usize,
    pub seed: u64,
    pub progress: bool,
    /// Stop after this many steps, with a checkpoint, as if killed there (for tests and
    /// time-boxed runs); `--resume` continues.
    pub stop_after: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Sft,
            iw: IwConfig::default(),
            lora: Some(LoraSpec::default()),
            lr: 3e-4,
            min_lr: 0.0,
            warmup_ratio: 0.05,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            grad_accum: 1,
            token_budget: 1024,
            max_batch: 8,
            max_len: 1024,
            share_prefixes: 4,
            attention: AttentionKernel::default(),
            epochs: 1,
            max_steps: None,
            eval_every: 25,
            checkpoint_every: 50,
            seed: 0,
            progress: true,
            stop_after: None,
        }
    }
}

/// Rendered examples and the id used to pad batches.
pub struct TrainingData {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub pad_id: u32,
    /// Identifies the starting model (e.g. its path and size): part of the reference cache's key.
    pub base_id: String,
}

/// What a run produced.
pub struct TrainOutcome {
    /// The trained model, LoRA merged (a plain model ready to save).
    pub model: Llama,
    /// Trainable tensors by name before merging (adapters, or all weights).
    pub trainable: Vec<(String, Tensor)>,
    pub steps_done: usize,
    pub total_steps: usize,
    /// False when `stop_after` ended the run early.
    pub finished: bool,
    /// (step, validation loss), the first at step 0 when the run started fresh.
    pub val_losses: Vec<(usize, f64)>,
    pub train_losses: Vec<(usize, f64)>,
    pub tokens_per_s: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    adam_t: u64,
    seed: u64,
    /// The next micro-batch the data stream will yield; derived from `step`, kept for humans.
    next_micro_batch: usize,
    config_hash: String,
    val_losses: Vec<(usize, f64)>,
}

#[derive(Debug, Serialize)]
struct MetricsLine {
    step: usize,
    epoch: f64,
    loss: f64,
    val_loss: Option<f64>,
    lr: f64,
    grad_norm: f64,
    weight_mean: f64,
    weight_min: f64,
    weight_max: f64,
    dropped: usize,
    tokens: usize,
    tokens_per_s: f64,
    elapsed_s: f64,
}

fn config_hash(config: &TrainConfig) -> String {
    // What changes the trajectory; `stop_after`, `progress` and `max_steps` extensions do not.
    let mut c = config.clone();
    c.stop_after = None;
    c.progress = false;
    let text = serde_json::to_string(&c).unwrap_or_default();
    format!("{:x}", Sha256::digest(text.as_bytes()))[..16].to_string()
}

/// `data` as the run trains on it: examples packed behind shared prefixes when configured.
fn packed(data: &TrainingData, config: &TrainConfig) -> TrainingData {
    let pack = |examples: &[Example]| {
        if config.share_prefixes > 1 {
            share_prefixes(examples.to_vec(), config.share_prefixes, config.max_len, MIN_SHARED_PREFIX)
        } else {
            examples.to_vec()
        }
    };
    TrainingData {
        train: pack(&data.train),
        validation: pack(&data.validation),
        pad_id: data.pad_id,
        base_id: data.base_id.clone(),
    }
}

/// Computes the reference log-probs an importance-weighted run of `config` needs and caches them
/// in `out`, where [`train`] with the same data and settings finds them. Lets a caller compute
/// them on every core before trainings that each get one (the demo does). The starting model is
/// `loaded` itself: LoRA adapters start at zero and change nothing.
pub fn prepare_reference(loaded: &LoadedModel, data: &TrainingData, config: &TrainConfig, out: &Path) -> Result<usize> {
    if !config.objective.importance_weighted() {
        return Err(TrainError::Config(format!("{} needs no reference log-probs", config.objective.name())));
    }
    std::fs::create_dir_all(out).map_err(TrainError::io("creating", out))?;
    let data = packed(data, config);
    let mut model = loaded.model.detached();
    model.set_attention_kernel(config.attention);
    Ok(reference_logprobs(&model, &data, config, out, false)?.len())
}

/// Trains `loaded` on `data` with `config`, writing checkpoints, metrics and plots under `out`.
/// With `resume`, continues from `out/checkpoint` (which must exist).
pub fn train(
    loaded: LoadedModel,
    data: &TrainingData,
    config: &TrainConfig,
    out: &Path,
    resume: bool,
) -> Result<TrainOutcome> {
    if data.train.is_empty() {
        return Err(TrainError::Data("no training examples".into()));
    }
    if config.grad_accum == 0 || config.max_batch == 0 || config.token_budget == 0 {
        return Err(TrainError::Config("grad_accum, max_batch and token_budget must be at least 1".into()));
    }
    std::fs::create_dir_all(out).map_err(TrainError::io("creating", out))?;
    let device = loaded.model.embed_tokens.embeddings().device().clone();
    let data = &packed(data, config);

    // The trainable model: frozen base + adapters in a fresh VarMap, or every weight.
    let (mut model, varmap, lora_state): (Llama, VarMap, Option<std::sync::Arc<LoraState>>) = match &config.lora {
        Some(spec) => {
            let mut model = loaded.model.detached();
            let varmap = VarMap::new();
            let lora = LoraConfig {
                rank: spec.rank,
                alpha: spec.alpha,
                dropout: spec.dropout,
                targets: spec.targets.clone(),
                seed: config.seed,
            };
            let state = model.add_lora(&lora, &varmap)?;
            (model, varmap, Some(state))
        }
        None => (loaded.model, loaded.varmap, None),
    };
    model.set_attention_kernel(config.attention);
    let mut named_vars: Vec<(String, Var)> =
        varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named_vars.sort_by(|a, b| a.0.cmp(&b.0));
    let vars: Vec<Var> = named_vars.iter().map(|(_, v)| v.clone()).collect();
    let sizes: Vec<usize> = vars.iter().map(|v| v.as_tensor().elem_count()).collect();
    let mut opt = AdamW::new(config.adamw, &sizes);
    let ema_decay = match (config.objective.importance_weighted(), config.iw.helper) {
        (true, HelperPolicy::Ema { decay }) => Some(decay),
        _ => None,
    };
    let mut ema: Option<Vec<Vec<f32>>> = match ema_decay {
        Some(_) => Some(vars.iter().map(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>()).collect::<Result<_, _>>()?),
        None => None,
    };

    let batches = bucket_examples(&data.train, config.token_budget, config.max_batch);
    let nb = batches.len();
    let total_steps = config.max_steps.unwrap_or_else(|| (config.epochs * nb).div_ceil(config.grad_accum)).max(1);
    let warmup = ((total_steps as f64) * config.warmup_ratio).round() as usize;
    let hash = config_hash(config);
    let checkpoint_dir = out.join("checkpoint");
    let metrics_path = out.join("metrics.jsonl");

    // Reference log-probs: the starting model's, once per example, cached on disk.
    let reference = if config.objective.importance_weighted() {
        Some(reference_logprobs(&model, data, config, out, resume)?)
    } else {
        None
    };

    let mut start_step = 0;
    let mut val_losses: Vec<(usize, f64)> = Vec::new();
    if resume {
        let state = load_checkpoint(&checkpoint_dir, &named_vars, &mut opt, ema.as_mut())?;
        if state.config_hash != hash {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint in {} was made with different settings",
                checkpoint_dir.display()
            )));
        }
        start_step = state.step;
        val_losses = state.val_losses;
        truncate_metrics(&metrics_path, start_step)?;
    } else {
        if metrics_path.exists() {
            std::fs::remove_file(&metrics_path).map_err(TrainError::io("removing", &metrics_path))?;
        }
        if !data.validation.is_empty() {
            val_losses.push((0, validation_loss(&model, &data.validation, config, data.pad_id, &lora_state)?));
        }
    }
    let mut metrics = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(TrainError::io("opening", &metrics_path))?;
    if !resume {
        // The starting model's validation loss, as step 0: the line every curve starts from.
        if let Some(&(_, v)) = val_losses.first() {
            let line = serde_json::json!({ "step": 0, "epoch": 0.0, "loss": null, "val_loss": v });
            writeln!(metrics, "{line}").map_err(TrainError::io("writing", &metrics_path))?;
        }
    }

    let bar = if config.progress {
        indicatif::ProgressBar::new(total_steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start_step as u64);

    let run_start = Instant::now();
    let mut total_tokens = 0usize;
    let mut train_losses = Vec::new();
    let mut order_cache: Option<(usize, Vec<usize>)> = None;
    let mut finished = true;
    let mut step = start_step;
    while step < total_steps {
        let step_start = Instant::now();
        if let Some(s) = &lora_state {
            s.set_training(true);
        }
        let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0f32; n]).collect();
        let mut step_loss = 0f64;
        let mut step_tokens = 0usize;
        let mut weight_values = Vec::new();
        let mut dropped = 0;
        for a in 0..config.grad_accum {
            let k = step * config.grad_accum + a;
            let epoch = k / nb;
            if order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
                order_cache = Some((epoch, epoch_order(nb, config.seed, epoch)));
            }
            let batch_index = order_cache.as_ref().expect("order").1[k % nb];
            let members = &batches[batch_index];
            let examples: Vec<&Example> = members.iter().map(|&i| &data.train[i]).collect();
            let bt = batch_tensors(&examples, data.pad_id, &device)?;
            step_tokens += bt.tokens;
            if let Some(s) = &lora_state {
                s.set_step_seed(config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ k as u64);
            }

            // An EMA helper runs before the training forward: it swaps the EMA values into the
            // variables, and the training graph must see the current ones.
            let positions = trained_positions(&bt.token_weights);
            if positions.is_empty() {
                continue;
            }
            let ema_helper = match (&ema, ema_decay) {
                (Some(ema), Some(_)) => Some(helper_with_values(&model, &vars, ema, &bt, &positions)?),
                _ => None,
            };
            let lp = selected_log_probs(&model, &bt, &positions)?;
            let (helper, reference_rows) = match &reference {
                Some(cache) => {
                    let helper = match ema_helper {
                        Some(h) => h,
                        None => scatter_rows(&bt, &positions, &lp.detach().to_vec1::<f32>()?),
                    };
                    let t = bt.token_weights[0].len();
                    let rows = members
                        .iter()
                        .map(|&i| {
                            let mut row = cache[i].clone();
                            row.resize(t, 0.0);
                            row
                        })
                        .collect::<Vec<_>>();
                    (Some(helper), Some(rows))
                }
                None => (None, None),
            };
            // The objective weighs sequences: a packed row counts as the sequences it holds.
            let sequences = BatchSequences::of(&bt);
            let coeffs = coefficients(
                config.objective,
                &config.iw,
                &BatchNumbers {
                    token_weights: &sequences.split(&bt.token_weights),
                    helper: helper.as_deref().map(|h| sequences.split(h)).as_deref(),
                    reference: reference_rows.as_deref().map(|r| sequences.split(r)).as_deref(),
                },
            )?;
            dropped += coeffs.stats.dropped;
            if coeffs.trained_tokens == 0 {
                continue;
            }
            weight_values.push(coeffs.stats);
            let c = sequences.merge(&coeffs.c);
            let c: Vec<f32> = positions.iter().map(|&(r, p)| c[r][p]).collect();
            let c = Tensor::from_vec(c, positions.len(), lp.device())?;
            let loss = ((&lp * c)?.sum_all()?.neg()? / config.grad_accum as f64)?;
            step_loss += loss.to_scalar::<f32>()? as f64;
            let grad_store = loss.backward()?;
            for (i, var) in vars.iter().enumerate() {
                if let Some(g) = grad_store.get(var.as_tensor()) {
                    let g = g.flatten_all()?.to_vec1::<f32>()?;
                    for (acc, x) in grads[i].iter_mut().zip(g) {
                        *acc += x;
                    }
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, config.max_grad_norm);
        let lr = cosine_lr(step, total_steps, warmup, config.lr, config.min_lr);
        opt.step(&vars, &grads, lr)?;
        if let (Some(ema), Some(decay)) = (ema.as_mut(), ema_decay) {
            for (i, var) in vars.iter().enumerate() {
                let current = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let d = decay as f32;
                for (e, c) in ema[i].iter_mut().zip(current) {
                    *e = d * *e + (1.0 - d) * c;
                }
            }
        }
        step += 1;
        total_tokens += step_tokens;
        train_losses.push((step, step_loss));

        let last = step == total_steps;
        let stop_here = config.stop_after == Some(step) && !last;
        let val_loss =
            if !data.validation.is_empty() && (last || (config.eval_every > 0 && step % config.eval_every == 0)) {
                let v = validation_loss(&model, &data.validation, config, data.pad_id, &lora_state)?;
                val_losses.push((step, v));
                Some(v)
            } else {
                None
            };
        let elapsed = step_start.elapsed().as_secs_f64();
        let (wmean, wmin, wmax) = if weight_values.is_empty() {
            (0.0, 0.0, 0.0)
        } else {
            let n = weight_values.len() as f64;
            (
                weight_values.iter().map(|s| s.mean).sum::<f64>() / n,
                weight_values.iter().map(|s| s.min).fold(f64::INFINITY, f64::min),
                weight_values.iter().map(|s| s.max).fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let line = MetricsLine {
            step,
            epoch: (step * config.grad_accum) as f64 / nb as f64,
            loss: step_loss,
            val_loss,
            lr,
            grad_norm,
            weight_mean: wmean,
            weight_min: wmin,
            weight_max: wmax,
            dropped,
            tokens: step_tokens,
            tokens_per_s: step_tokens as f64 / elapsed.max(1e-9),
            elapsed_s: run_start.elapsed().as_secs_f64(),
        };
        let text =
            serde_json::to_string(&line).map_err(|source| TrainError::Encode { path: metrics_path.clone(), source })?;
        writeln!(metrics, "{text}").and_then(|()| metrics.flush()).map_err(TrainError::io("writing", &metrics_path))?;
        bar.set_position(step as u64);
        bar.set_message(format!(
            "loss {:.4}{} w {:.2}/{:.2}/{:.2} {:.0} tok/s",
            step_loss,
            val_loss.map(|v| format!(" val {v:.4}")).unwrap_or_default(),
            wmean,
            wmin,
            wmax,
            line.tokens_per_s
        ));

        if last || stop_here || (config.checkpoint_every > 0 && step % config.checkpoint_every == 0) {
            let state = CheckpointState {
                step,
                adam_t: opt.t,
                seed: config.seed,
                next_micro_batch: step * config.grad_accum,
                config_hash: hash.clone(),
                val_losses: val_losses.clone(),
            };
            save_checkpoint(out, &named_vars, &opt, ema.as_deref(), &state)?;
        }
        if stop_here {
            finished = false;
            break;
        }
    }
    bar.finish();
    if let Some(s) = &lora_state {
        s.set_training(false);
    }
    let tokens_per_s = total_tokens as f64 / run_start.elapsed().as_secs_f64().max(1e-9);
    if finished {
        if let Err(e) = crate::plot::loss_curves(&metrics_path, out) {
            tracing::warn!("cannot draw the loss curves: {e:#}");
        }
    }
    let trainable: Vec<(String, Tensor)> =
        named_vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
    model.merge_lora()?;
    Ok(TrainOutcome {
        model: model.detached(),
        trainable,
        steps_done: step,
        total_steps,
        finished,
        val_losses,
        train_losses,
        tokens_per_s,
    })
}

/// The helper's log-probs computed with `values` swapped into `vars` (restored afterwards),
/// without gradient.
fn helper_with_values(
    model: &Llama,
    vars: &[Var],
    values: &[Vec<f32>],
    bt: &BatchTensors,
    positions: &[(usize, usize)],
) -> Result<Vec<Vec<f32>>> {
    let saved: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy()).collect::<Result<_, _>>()?;
    for (var, value) in vars.iter().zip(values) {
        var.set(&Tensor::from_vec(value.clone(), var.as_tensor().shape(), var.as_tensor().device())?)?;
    }
    let result = selected_log_probs(&model.detached(), bt, positions)
        .and_then(|lp| Ok(scatter_rows(bt, positions, &lp.to_vec1::<f32>()?)));
    for (var, value) in vars.iter().zip(&saved) {
        var.set(value)?;
    }
    result
}

/// The sequences of a batch: each plain row is one, each packed row holds one per segment after
/// its shared prefix. Per-row numbers split into per-sequence rows (zero outside the sequence)
/// and merge back.
struct BatchSequences {
    /// (row, segment); `None`: the whole row.
    sequences: Vec<(usize, Option<u32>)>,
    segments: Vec<Vec<u32>>,
}

impl BatchSequences {
    fn of(bt: &BatchTensors) -> Self {
        let segments = bt.target_segments();
        let mut sequences = Vec::new();
        for (row, row_segments) in segments.iter().enumerate() {
            let last = row_segments.iter().copied().filter(|&s| s != PackedRows::PADDING).max().unwrap_or(0);
            if last == 0 {
                sequences.push((row, None));
            } else {
                sequences.extend((1..=last).map(|s| (row, Some(s))));
            }
        }
        Self { sequences, segments }
    }

    fn split(&self, rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
        self.sequences
            .iter()
            .map(|&(row, segment)| match segment {
                None => rows[row].clone(),
                Some(s) => {
                    rows[row].iter().zip(&self.segments[row]).map(|(&v, &at)| if at == s { v } else { 0.0 }).collect()
                }
            })
            .collect()
    }

    fn merge(&self, split: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let mut rows: Vec<Vec<f32>> = self.segments.iter().map(|r| vec![0f32; r.len()]).collect();
        for (&(row, _), values) in self.sequences.iter().zip(split) {
            for (out, &v) in rows[row].iter_mut().zip(values) {
                *out += v;
            }
        }
        rows
    }
}

/// The (row, position) of every target that carries loss (weight > 0), row-major.
pub fn trained_positions(token_weights: &[Vec<f32>]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (r, row) in token_weights.iter().enumerate() {
        out.extend(row.iter().enumerate().filter(|(_, &w)| w > 0.0).map(|(p, _)| (r, p)));
    }
    out
}

/// log π(y) at `positions` only, `[N]`, differentiable: the hidden states of those positions are
/// gathered before the output projection, so the vocabulary-sized logits and their log-softmax
/// (fp32, via logsumexp) cover trained tokens, not every position of the batch.
pub fn selected_log_probs(model: &Llama, bt: &BatchTensors, positions: &[(usize, usize)]) -> Result<Tensor> {
    let (b, t) = bt.inputs.dims2()?;
    let device = bt.inputs.device();
    let flat: Vec<u32> = positions.iter().map(|&(r, p)| (r * t + p) as u32).collect();
    let index = Tensor::from_vec(flat, positions.len(), device)?;
    let hidden = match &bt.packed {
        Some(packed) => model.forward_hidden_packed(&bt.inputs, packed)?,
        None => model.forward_hidden(&bt.inputs)?,
    };
    let h = hidden.dim(2)?;
    let rows = hidden.reshape((b * t, h))?.index_select(&index, 0)?;
    let logits = model.project(&rows)?.unsqueeze(0)?;
    let targets = bt.targets.flatten_all()?.index_select(&index, 0)?.unsqueeze(0)?.contiguous()?;
    Ok(token_log_probs(&logits, &targets)?.squeeze(0)?)
}

/// `values` (one per position) as `[B][T]` rows, 0 elsewhere.
fn scatter_rows(bt: &BatchTensors, positions: &[(usize, usize)], values: &[f32]) -> Vec<Vec<f32>> {
    let mut rows: Vec<Vec<f32>> = bt.token_weights.iter().map(|r| vec![0f32; r.len()]).collect();
    for (&(r, p), &v) in positions.iter().zip(values) {
        rows[r][p] = v;
    }
    rows
}

/// Mean negative log-likelihood per trained token (binary mask) over `examples`.
pub fn validation_loss(
    model: &Llama,
    examples: &[Example],
    config: &TrainConfig,
    pad_id: u32,
    lora_state: &Option<std::sync::Arc<LoraState>>,
) -> Result<f64> {
    let was_training = lora_state.as_ref().is_some_and(|s| s.training());
    if let Some(s) = lora_state {
        s.set_training(false);
    }
    let frozen = model.detached();
    let device = model.embed_tokens.embeddings().device().clone();
    let mut total = 0f64;
    let mut count = 0usize;
    for batch in bucket_examples(examples, config.token_budget, config.max_batch) {
        let members: Vec<&Example> = batch.iter().map(|&i| &examples[i]).collect();
        let bt = batch_tensors(&members, pad_id, &device)?;
        let positions = trained_positions(&bt.token_weights);
        if positions.is_empty() {
            continue;
        }
        let lp = selected_log_probs(&frozen, &bt, &positions)?.to_vec1::<f32>()?;
        total -= lp.iter().map(|&l| l as f64).sum::<f64>();
        count += lp.len();
    }
    if let Some(s) = lora_state {
        s.set_training(was_training);
    }
    Ok(if count == 0 { f64::NAN } else { total / count as f64 })
}

#[derive(Serialize, Deserialize)]
struct ReferenceFile {
    key: String,
    logprobs: Vec<Vec<f32>>,
}

/// log q(y_t) of every target token of every training example under the starting model,
/// computed once and cached in `out/reference_logprobs.json` (keyed by the base model id and the
/// examples' tokens), so no second model is held while training.
fn reference_logprobs(
    model: &Llama,
    data: &TrainingData,
    config: &TrainConfig,
    out: &Path,
    resume: bool,
) -> Result<Vec<Vec<f32>>> {
    let mut hasher = Sha256::new();
    hasher.update(data.base_id.as_bytes());
    for e in &data.train {
        hasher.update((e.input_ids.len() as u64).to_le_bytes());
        for id in &e.input_ids {
            hasher.update(id.to_le_bytes());
        }
        for segment in e.layout.iter().flat_map(|l| &l.segments) {
            hasher.update(segment.to_le_bytes());
        }
    }
    let key = format!("{:x}", hasher.finalize());
    let path = out.join("reference_logprobs.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(file) = serde_json::from_str::<ReferenceFile>(&text) {
            if file.key == key && file.logprobs.len() == data.train.len() {
                return Ok(file.logprobs);
            }
        }
    }
    if resume {
        return Err(TrainError::Checkpoint(format!(
            "resuming an iw run needs the reference cache {} of its start",
            path.display()
        )));
    }
    let frozen = model.detached();
    let device = model.embed_tokens.embeddings().device().clone();
    let mut logprobs = vec![Vec::new(); data.train.len()];
    for batch in bucket_examples(&data.train, config.token_budget, config.max_batch) {
        let members: Vec<&Example> = batch.iter().map(|&i| &data.train[i]).collect();
        let bt = batch_tensors(&members, data.pad_id, &device)?;
        let positions = trained_positions(&bt.token_weights);
        let lp = if positions.is_empty() {
            Vec::new()
        } else {
            selected_log_probs(&frozen, &bt, &positions)?.to_vec1::<f32>()?
        };
        // Trained positions only (the weight formula reads no other); 0 elsewhere.
        for (&i, mut row) in batch.iter().zip(scatter_rows(&bt, &positions, &lp)) {
            row.truncate(data.train[i].input_ids.len() - 1);
            logprobs[i] = row;
        }
    }
    let text = serde_json::to_string(&ReferenceFile { key, logprobs })
        .map_err(|source| TrainError::Encode { path: path.clone(), source })?;
    write_atomic(&path, text.as_bytes())?;
    let file: ReferenceFile =
        serde_json::from_str(&text).map_err(|source| TrainError::JsonFile { path: path.clone(), source })?;
    Ok(file.logprobs)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(TrainError::io("creating", &tmp))?;
        f.write_all(bytes).and_then(|()| f.sync_all()).map_err(TrainError::io("writing", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(TrainError::io("replacing", path))?;
    Ok(())
}

/// Writes `out/checkpoint/` atomically: into `checkpoint.tmp`, then swapped in by renames, so a
/// kill at any moment leaves either the old or the new checkpoint whole.
fn save_checkpoint(
    out: &Path,
    vars: &[(String, Var)],
    opt: &AdamW,
    ema: Option<&[Vec<f32>]>,
    state: &CheckpointState,
) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let dir = out.join("checkpoint");
    let old = out.join("checkpoint.old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io("removing", &tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(TrainError::io("creating", &tmp))?;
    let mut trainable = HashMap::new();
    let mut optimizer = HashMap::new();
    for (i, (name, var)) in vars.iter().enumerate() {
        let t = var.as_tensor();
        trainable.insert(name.clone(), t.copy()?);
        let shape = t.shape().clone();
        optimizer.insert(format!("m.{name}"), Tensor::from_slice(&opt.m[i], &shape, &Device::Cpu)?);
        optimizer.insert(format!("v.{name}"), Tensor::from_slice(&opt.v[i], &shape, &Device::Cpu)?);
        if let Some(ema) = ema {
            optimizer.insert(format!("ema.{name}"), Tensor::from_slice(&ema[i], &shape, &Device::Cpu)?);
        }
    }
    for (tensors, name) in [(&trainable, "trainable.safetensors"), (&optimizer, "optimizer.safetensors")] {
        let path = tmp.join(name);
        candle_core::safetensors::save(tensors, &path).map_err(|source| TrainError::Tensors {
            action: "writing",
            path,
            source,
        })?;
    }
    let state_path = tmp.join("state.json");
    let text = serde_json::to_string_pretty(state)
        .map_err(|source| TrainError::Encode { path: state_path.clone(), source })?;
    std::fs::write(&state_path, text).map_err(TrainError::io("writing", &state_path))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(TrainError::io("removing", &old))?;
    }
    if dir.exists() {
        std::fs::rename(&dir, &old).map_err(TrainError::io("renaming", &dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(TrainError::io("renaming", &tmp))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(TrainError::io("removing", &old))?;
    }
    Ok(())
}

fn load_checkpoint(
    dir: &Path,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    ema: Option<&mut Vec<Vec<f32>>>,
) -> Result<CheckpointState> {
    let dir = if dir.exists() { dir.to_path_buf() } else { dir.with_file_name("checkpoint.old") };
    let state_path = dir.join("state.json");
    let text =
        std::fs::read_to_string(&state_path).map_err(|source| TrainError::NoCheckpoint { dir: dir.clone(), source })?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|source| TrainError::JsonFile { path: state_path, source })?;
    let load = |name: &str| -> Result<(PathBuf, HashMap<String, Tensor>)> {
        let path = dir.join(name);
        match candle_core::safetensors::load(&path, &Device::Cpu) {
            Ok(tensors) => Ok((path, tensors)),
            Err(source) => Err(TrainError::Tensors { action: "reading", path, source }),
        }
    };
    let trainable = load("trainable.safetensors")?;
    let optimizer = load("optimizer.safetensors")?;
    let get = |(path, map): &(PathBuf, HashMap<String, Tensor>), name: &str| -> Result<Tensor> {
        map.get(name)
            .cloned()
            .ok_or_else(|| TrainError::Checkpoint(format!("checkpoint {} lacks `{name}`", path.display())))
    };
    let mut ema = ema;
    for (i, (name, var)) in vars.iter().enumerate() {
        let t = get(&trainable, name)?;
        if t.shape() != var.as_tensor().shape() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint tensor `{name}` has shape {:?}, the model {:?}",
                t.dims(),
                var.as_tensor().dims()
            )));
        }
        var.set(&t.to_device(var.as_tensor().device())?)?;
        opt.m[i] = get(&optimizer, &format!("m.{name}"))?.flatten_all()?.to_vec1()?;
        opt.v[i] = get(&optimizer, &format!("v.{name}"))?.flatten_all()?.to_vec1()?;
        if let Some(ema) = ema.as_deref_mut() {
            ema[i] = get(&optimizer, &format!("ema.{name}"))?.flatten_all()?.to_vec1()?;
        }
    }
    opt.t = state.adam_t;
    Ok(state)
}

/// Keeps the metrics lines of steps up to `step` (those a resumed run does not redo).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(file) = File::open(path) else { return Ok(()) };
    let mut kept = String::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(TrainError::io("reading", path))?;
        let s =
            serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if s.is_some_and(|s| s as usize <= step) {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes())
}

/// Writes the trained model where the gateway's `local::` provider loads it: from a GGUF base, a
/// GGUF file (f32, carrying the base's tokenizer and template metadata); from an HF folder, a
/// folder with model.safetensors, config.json and the base's tokenizer files. Returns its path.
pub fn export_model(
    model: &Llama,
    loaded_metadata: Option<&apprentice_model::GgufMetadata>,
    base: &Path,
    out: &Path,
) -> Result<PathBuf> {
    if let Some(meta) = loaded_metadata {
        std::fs::create_dir_all(out).map_err(TrainError::io("creating", out))?;
        let path = out.join("model.gguf");
        apprentice_model::save_gguf(model, &path, apprentice_model::GgufDType::F32, Some(meta))?;
        return Ok(path);
    }
    let dir = out.join("model");
    apprentice_model::save_safetensors(model, &dir)?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let src = base.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name)).map_err(TrainError::io("copying", &src))?;
        }
    }
    Ok(dir)
}
