//! `apprentice train`: fine-tune the student on a curated dataset folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use apprentice_model::{resolve_model, ChatTemplate, Tokenizer};
use apprentice_train::data::load_jsonl;
use apprentice_train::trainer::{export_model, prepare_reference, train, LoraSpec, TrainConfig, TrainingData};
use apprentice_train::{Granularity, HelperPolicy, Objective};
use clap::Args;

#[derive(Args)]
pub struct TrainArgs {
    /// Dataset folder from `apprentice curate` (train.jsonl / train.weighted.jsonl / validation.jsonl).
    #[arg(long)]
    dataset: PathBuf,
    /// Base model: a model-cache name (smollm2-135m), a GGUF file or an HF folder.
    #[arg(long, default_value = "smollm2-135m")]
    base: String,
    /// sft, iw-sft, sft-q or iw-sft-q.
    #[arg(long)]
    objective: Option<Objective>,
    /// Run folder: checkpoints, metrics.jsonl, loss.png/svg, the exported model.
    #[arg(long)]
    out: PathBuf,
    /// TOML training spec (fields of TrainConfig); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    resume: bool,
    /// `cpu`, or `cuda` / `cuda:N` in a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// LoRA rank; 0 = full fine-tuning.
    #[arg(long)]
    lora_rank: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// Comma-separated target modules (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long)]
    lora_targets: Option<String>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    token_budget: Option<usize>,
    #[arg(long)]
    max_batch: Option<usize>,
    #[arg(long)]
    max_len: Option<usize>,
    /// Most examples packed behind one shared prefix (the system prompt and what else they begin
    /// with), each keeping exactly its own context; 1 turns it off.
    #[arg(long)]
    share_prefixes: Option<usize>,
    /// Attention kernel: `fused` (no [batch, heads, T, T] tensors; the CPU default) or
    /// `composed` (candle ops, the reference).
    #[arg(long)]
    attention: Option<apprentice_model::AttentionKernel>,
    #[arg(long)]
    eval_every: Option<usize>,
    #[arg(long)]
    checkpoint_every: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// iw-SFT temperature.
    #[arg(long)]
    iw_temperature: Option<f64>,
    /// iw-SFT weight clip.
    #[arg(long)]
    iw_w_max: Option<f64>,
    /// Normalise iw weights per batch (w_b / Σ w_b).
    #[arg(long, conflicts_with = "iw_self_normalize")]
    iw_normalize: bool,
    /// Self-normalise iw weights per batch (K · w_b / Σ w_b: they average 1, the step size stays
    /// SFT's).
    #[arg(long)]
    iw_self_normalize: bool,
    /// Per-token ratios clipped to [0.2, 1.8] instead of one weight per sequence.
    #[arg(long)]
    iw_token: bool,
    /// EMA helper policy with this decay (e.g. 0.9) instead of the current policy.
    #[arg(long)]
    iw_ema: Option<f64>,
    /// Use at most this many training examples (the first N lines).
    #[arg(long)]
    limit: Option<usize>,
    /// Stop after N steps with a checkpoint (resume later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Skip the final export.
    #[arg(long)]
    no_export: bool,
    /// Only compute the reference log-probs of an importance-weighted objective, cached in
    /// --out, where a later run with the same data and settings reuses them (e.g. on every core
    /// first, then trainings side by side on one core each).
    #[arg(long)]
    reference_only: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut config: TrainConfig = match &args.config {
        Some(path) => toml::from_str(&std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?)
            .with_context(|| format!("parsing {}", path.display()))?,
        None => TrainConfig::default(),
    };
    if let Some(o) = args.objective {
        config.objective = o;
    }
    match args.lora_rank {
        Some(0) => config.lora = None,
        Some(r) => config.lora.get_or_insert_with(LoraSpec::default).rank = r,
        None => {}
    }
    if let Some(spec) = config.lora.as_mut() {
        if let Some(a) = args.lora_alpha {
            spec.alpha = a;
        }
        if let Some(d) = args.lora_dropout {
            spec.dropout = d;
        }
        if let Some(t) = &args.lora_targets {
            spec.targets = t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
    }
    macro_rules! set {
        ($($field:ident),*) => { $( if let Some(v) = args.$field { config.$field = v; } )* };
    }
    set!(lr, epochs, grad_accum, token_budget, max_batch, max_len, share_prefixes, eval_every, checkpoint_every, seed);
    set!(attention);
    if args.max_steps.is_some() {
        config.max_steps = args.max_steps;
    }
    if args.stop_after.is_some() {
        config.stop_after = args.stop_after;
    }
    if let Some(t) = args.iw_temperature {
        config.iw.temperature = t;
    }
    if let Some(w) = args.iw_w_max {
        config.iw.w_max = w;
    }
    config.iw.normalize |= args.iw_normalize;
    config.iw.self_normalize |= args.iw_self_normalize;
    if args.iw_token {
        config.iw.granularity = Granularity::Token;
    }
    if let Some(decay) = args.iw_ema {
        config.iw.helper = HelperPolicy::Ema { decay };
    }

    let base = resolve_base(&args.base)?;
    let device = parse_device(&args.device)?;
    let loaded = apprentice_model::load(&base, &device).with_context(|| format!("loading {}", base.display()))?;
    let tokenizer = Tokenizer::from_path(&base).context("loading the tokenizer")?;
    let template = ChatTemplate::from_tokenizer(&tokenizer).context("the base model's chat template")?;
    let train_file = pick(&args.dataset, config.objective.quality_weighted())?;
    let (mut train_examples, load_stats) = load_jsonl(&train_file, &tokenizer, &template, config.max_len)?;
    if let Some(n) = args.limit {
        train_examples.truncate(n);
    }
    let validation_file = args.dataset.join("validation.jsonl");
    let (validation, validation_stats) = if validation_file.is_file() {
        load_jsonl(&validation_file, &tokenizer, &template, config.max_len)?
    } else {
        (Vec::new(), Default::default())
    };
    let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);
    let size = std::fs::metadata(&base).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "training {} on {} ({} lines → {} examples: {} lines over {} tokens split at turns, {} of {} trained \
         tokens dropped; {} validation) from {}, {}",
        config.objective.name(),
        train_file.display(),
        load_stats.lines,
        train_examples.len(),
        load_stats.split_lines,
        config.max_len,
        load_stats.dropped_trained_tokens,
        load_stats.trained_tokens,
        validation.len(),
        base.display(),
        config.lora.as_ref().map_or("full fine-tuning".to_string(), |l| format!("LoRA r={} alpha={}", l.rank, l.alpha)),
    );
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("train_config.toml"), toml::to_string_pretty(&config)?)?;
    std::fs::write(
        args.out.join("data.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "max_len": config.max_len,
            "train": load_stats,
            "validation": validation_stats,
            "limit": args.limit,
        }))?,
    )?;
    let data =
        TrainingData { train: train_examples, validation, pad_id, base_id: format!("{}:{size}", base.display()) };
    if args.reference_only {
        let examples = prepare_reference(&loaded, &data, &config, &args.out)?;
        eprintln!("reference log-probs of {examples} examples cached in {}", args.out.display());
        return Ok(());
    }
    let metadata = loaded.gguf_metadata.clone();
    let outcome = train(loaded, &data, &config, &args.out, args.resume)?;
    if let (Some(first), Some(last)) = (outcome.val_losses.first(), outcome.val_losses.last()) {
        eprintln!("validation loss {:.4} (step {}) → {:.4} (step {})", first.1, first.0, last.1, last.0);
    }
    eprintln!("{:.1} training tokens/s", outcome.tokens_per_s);
    if !outcome.finished {
        eprintln!("stopped after step {} of {}; continue with --resume", outcome.steps_done, outcome.total_steps);
        return Ok(());
    }
    if !args.no_export {
        let path = export_model(&outcome.model, metadata.as_ref(), &base, &args.out)?;
        eprintln!("exported the student to {} (serve it as local::{})", path.display(), path.display());
    }
    Ok(())
}

fn resolve_base(base: &str) -> Result<PathBuf> {
    let path = Path::new(base);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    resolve_model(base).with_context(|| format!("`{base}` is neither a path nor a cached model"))
}

/// train.weighted.jsonl for the -q objectives (when present), else train.jsonl.
fn pick(dataset: &Path, weighted: bool) -> Result<PathBuf> {
    let weighted_file = dataset.join("train.weighted.jsonl");
    let plain = dataset.join("train.jsonl");
    if weighted && weighted_file.is_file() {
        return Ok(weighted_file);
    }
    if plain.is_file() {
        return Ok(plain);
    }
    if weighted_file.is_file() {
        return Ok(weighted_file);
    }
    bail!("{} has neither train.jsonl nor train.weighted.jsonl", dataset.display())
}

/// `cpu`, `cuda` or `cuda:N`. Without the `cuda` feature candle reports that CUDA is not compiled
/// in, which names the fix.
pub fn parse_device(name: &str) -> Result<candle_core::Device> {
    let ordinal = match name {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device: expected cpu, cuda or cuda:N, got `{other}`"),
        },
    };
    candle_core::Device::new_cuda(ordinal).with_context(|| {
        format!("--device {name}: CUDA device {ordinal} is not usable (build with `cargo build --release --features cuda`; README, section CUDA)")
    })
}
