//! `apprentice bench serve`: K concurrent agent-like clients against a local model through the
//! gateway, next to llama.cpp single stream (a thin call into `apprentice_bench::serve`).

use std::path::PathBuf;

use anyhow::Context;
use apprentice_bench::serve::{run_serve_bench, write_json, LocalProviderSettings, ServeBenchOptions};

use crate::Mode;

#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// A model name from the cache, a GGUF path or an HF model folder.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Numbers of concurrent clients, measured in this order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    concurrency: Vec<usize>,
    /// Episodes every K plays (the same ones), shared out among its clients.
    #[arg(long, default_value_t = 16)]
    episodes: usize,
    /// Requests per episode; each appends the answer and a new observation.
    #[arg(long, default_value_t = 8)]
    turns: usize,
    /// Generated tokens per request at most.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// Turns each client plays before each K is measured, not counted.
    #[arg(long, default_value_t = 2)]
    warmup_turns: usize,
    /// Seeds the episodes' missions and observations.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// The provider's `threads` (llama.cpp runs on as many; default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// The provider's `max_context_tokens`.
    #[arg(long)]
    max_context_tokens: Option<usize>,
    /// The provider's `weights`: `q8_0` or `f32`.
    #[arg(long)]
    weights: Option<String>,
    /// The provider's `max_batch`.
    #[arg(long)]
    max_batch: Option<usize>,
    /// The provider's `prefill_chunk_tokens`.
    #[arg(long)]
    prefill_chunk_tokens: Option<usize>,
    /// The provider's `prefix_cache_mb`.
    #[arg(long)]
    prefix_cache_mb: Option<usize>,
    /// How the bench's temporary store acknowledges records.
    #[arg(long, value_enum, default_value_t = Mode::Async)]
    write_mode: Mode,
    /// Python for the llama.cpp baseline (default: $APPRENTICE_PYTHON, else python3).
    #[arg(long)]
    python: Option<String>,
    /// Measure ours only.
    #[arg(long)]
    no_baselines: bool,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(args: BenchServeArgs) -> anyhow::Result<()> {
    let python = std::env::var("APPRENTICE_PYTHON").ok().filter(|p| !p.is_empty());
    let options = ServeBenchOptions {
        model: args.model,
        concurrency: args.concurrency,
        episodes: args.episodes,
        turns: args.turns,
        max_tokens: args.max_tokens,
        warmup_turns: args.warmup_turns,
        seed: args.seed,
        provider: LocalProviderSettings {
            threads: args.threads,
            max_context_tokens: args.max_context_tokens,
            weights: args.weights,
            max_batch: args.max_batch,
            prefill_chunk_tokens: args.prefill_chunk_tokens,
            prefix_cache_mb: args.prefix_cache_mb,
        },
        write_mode: args.write_mode.into(),
        python: if args.no_baselines { None } else { Some(args.python.or(python).unwrap_or_else(|| "python3".into())) },
        progress: true,
    };
    let report = run_serve_bench(&options).await.context("bench serve")?;
    println!("{}", report.table());
    if let Some(path) = args.json {
        write_json(&report, &path)?;
    }
    Ok(())
}
