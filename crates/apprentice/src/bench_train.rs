//! `apprentice bench train`: LoRA training tokens/s of the student (SmolLM2-135M, r=16 on all 7
//! projections, 4 × 256 tokens) next to PyTorch + transformers + peft on the same weights and
//! settings (`crates/apprentice-train/bench/train_torch.py`, run as a subprocess), as a ratio,
//! with each side's peak memory.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

const TORCH_SCRIPT: &str = include_str!("../../apprentice-train/bench/train_torch.py");

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Model: a model-cache name or a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// Training steps per side (the first is a warm-up, not timed).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Threads PyTorch may use (candle uses all cores).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Python for the baseline (default: $APPRENTICE_PYTHON, else python3).
    #[arg(long)]
    python: Option<String>,
    /// Our attention kernels to time, comma-separated: each gets a row (`fused,composed` compares
    /// the fused kernel with candle ops; longer --seq-len shows the memory it saves).
    #[arg(long, value_delimiter = ',', default_value = "fused")]
    attention: Vec<apprentice_model::AttentionKernel>,
    /// Skip the PyTorch baseline.
    #[arg(long)]
    no_baseline: bool,
    #[arg(long)]
    json: Option<PathBuf>,
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
}

/// Times one attention kernel in a child process of this binary, so that its peak memory is its
/// own: freed memory stays in this process's heap, and a later row would report the earlier peak.
fn kernel_in_own_process(
    args: &BenchTrainArgs,
    model: &std::path::Path,
    kernel: apprentice_model::AttentionKernel,
) -> Result<apprentice_train::bench::TrainBench> {
    let json = tempfile::NamedTempFile::new().context("cannot create a file for the child's results")?;
    let status = Command::new(std::env::current_exe().context("cannot find this executable")?)
        .args(["bench", "train", "--no-baseline", "--model", &model.display().to_string()])
        .args(["--batch", &args.batch.to_string(), "--seq-len", &args.seq_len.to_string()])
        .args(["--lora-rank", &args.lora_rank.to_string(), "--steps", &args.steps.to_string()])
        .args(["--attention", kernel.name(), "--json", &json.path().display().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run the {kernel} attention row"))?;
    anyhow::ensure!(status.success(), "the {kernel} attention row failed: {status}");
    let text = std::fs::read_to_string(json.path()).context("cannot read the child's results")?;
    let report: serde_json::Value = serde_json::from_str(&text).context("the child's results are not JSON")?;
    serde_json::from_value(report["apprentice"][0].clone()).context("the child's results have no `apprentice` row")
}

pub fn run(args: BenchTrainArgs) -> Result<()> {
    let path = PathBuf::from(&args.model);
    let model = if path.exists() {
        path
    } else {
        apprentice_model::resolve_model(&args.model)
            .with_context(|| format!("`{}` is not a cached model", args.model))?
    };
    eprintln!(
        "training {} with LoRA r={} on all projections, {} × {} tokens, {} steps per side…",
        model.display(),
        args.lora_rank,
        args.batch,
        args.seq_len,
        args.steps
    );
    // The baseline first: its memory is its own process's, and ours is measured after.
    let baseline: serde_json::Value = if args.no_baseline {
        serde_json::json!({ "error": "skipped (--no-baseline)" })
    } else {
        let python = args
            .python
            .clone()
            .or_else(|| std::env::var("APPRENTICE_PYTHON").ok().filter(|p| !p.is_empty()))
            .unwrap_or_else(|| "python3".into());
        let script = std::env::temp_dir().join(format!("apprentice-train-torch-{}.py", std::process::id()));
        std::fs::write(&script, TORCH_SCRIPT)?;
        let output = Command::new(&python)
            .arg(&script)
            .args(["--gguf", &model.display().to_string()])
            .args(["--batch", &args.batch.to_string(), "--seq-len", &args.seq_len.to_string()])
            .args(["--rank", &args.lora_rank.to_string(), "--steps", &args.steps.to_string()])
            .args(["--threads", &args.threads.to_string()])
            .output();
        let _ = std::fs::remove_file(&script);
        match output {
            Err(e) => serde_json::json!({ "error": format!("cannot run {python}: {e}") }),
            Ok(out) => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                match stdout.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
                    Some(v) => v,
                    None => serde_json::json!({
                        "error": format!("the baseline failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""))
                    }),
                }
            }
        }
    };
    let ours = match args.attention.as_slice() {
        [attention] => vec![apprentice_train::bench::train_throughput(
            &model,
            args.batch,
            args.seq_len,
            args.lora_rank,
            args.steps,
            *attention,
        )?],
        kernels => kernels.iter().map(|&kernel| kernel_in_own_process(&args, &model, kernel)).collect::<Result<_>>()?,
    };
    let Some(first) = ours.first() else {
        anyhow::bail!("--attention names no kernel");
    };

    println!("{:<34} {:>10} {:>10} {:>12}", "trainer", "tokens/s", "s/step", "peak memory");
    for row in &ours {
        println!(
            "{:<34} {:>10.1} {:>10.2} {:>12}",
            format!("apprentice (candle, f32, {} attn)", row.attention),
            row.tokens_per_s,
            row.s_per_step,
            gib(row.peak_rss_bytes)
        );
    }
    if let Some(composed) = ours.iter().find(|r| r.attention == apprentice_model::AttentionKernel::Composed) {
        for row in ours.iter().filter(|r| r.attention != composed.attention) {
            println!(
                "{} / composed attention: {:.2}× tokens/s, {} against {} peak memory",
                row.attention,
                row.tokens_per_s / composed.tokens_per_s,
                gib(row.peak_rss_bytes),
                gib(composed.peak_rss_bytes)
            );
        }
    }
    let theirs = baseline["tokens_per_s"].as_f64();
    match theirs {
        Some(t) => {
            let label = format!(
                "PyTorch {} + peft {}",
                baseline["torch"].as_str().unwrap_or("?"),
                baseline["peft"].as_str().unwrap_or("?")
            );
            println!(
                "{:<34} {:>10.1} {:>10.2} {:>12}",
                label,
                t,
                baseline["s_per_step"].as_f64().unwrap_or(f64::NAN),
                gib(baseline["peak_rss_bytes"].as_u64())
            );
            println!("ratio apprentice ({} attn) / PyTorch: {:.2}×", first.attention, first.tokens_per_s / t);
        }
        None => {
            println!("{:<34} {}", "PyTorch + transformers + peft", baseline["error"].as_str().unwrap_or("failed"));
            if let Some(install) = baseline["install"].as_str() {
                println!("  install: {install}");
            }
        }
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "model": model.display().to_string(),
            "apprentice": ours,
            "pytorch": baseline,
            "ratio": theirs.map(|t| first.tokens_per_s / t),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
