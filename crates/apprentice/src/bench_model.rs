//! `apprentice bench model`: prompt and decode tokens/s of the student model next to HF
//! transformers and llama.cpp on the same weights (a thin call into `apprentice_model::bench`).

use std::path::PathBuf;

use anyhow::Context;
use apprentice_model::bench::{run_model_bench, LlamaCppWeights, ModelBenchOptions};
use apprentice_model::cache::ModelCache;
use apprentice_model::serve::WeightFormat;

#[derive(clap::Args)]
pub struct BenchModelArgs {
    /// A model name from the cache or a GGUF path.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Greedy tokens decoded one at a time after the first.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Timed runs per implementation (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Threads for every implementation.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Python for the baselines (default: $APPRENTICE_PYTHON, else python3).
    #[arg(long)]
    python: Option<String>,
    /// Measure ours only.
    #[arg(long)]
    no_baselines: bool,
    /// Skip the transformers baseline.
    #[arg(long)]
    no_transformers: bool,
    /// llama.cpp rows: `source` (the GGUF itself, Q4_1 for SmolLM2), `f16`, `f32` (GGUFs written
    /// from our dequantised weights); empty for none.
    #[arg(long, value_delimiter = ',', default_value = "source,f16,f32")]
    llama_cpp: Vec<String>,
    /// Serving-engine rows (what local providers serve with), one per weight format: `q8_0`,
    /// `f32`; empty for none.
    #[arg(long, value_delimiter = ',', default_value = "q8_0,f32")]
    serving: Vec<String>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// candle reads its thread count from `RAYON_NUM_THREADS`, and rayon sizes its global pool from it
/// when the pool starts: set it before any thread exists.
///
/// candle 0.11 also runs elementwise ops on a pool of its own (`CANDLE_NUM_THREADS`, default the
/// same count) whose threads spin-wait; on 2 cores they spin against gemm's rayon threads, and
/// prefill ran 2.9x slower (`perf`: 57% of cycles in the pool's barrier and its idle workers).
/// Unless set, the benchmark runs elementwise ops on the calling thread (`CANDLE_NUM_THREADS=1`);
/// the report says which was used.
pub fn set_threads(args: &BenchModelArgs) {
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

pub fn run(args: BenchModelArgs) -> anyhow::Result<()> {
    let cache = ModelCache::from_env()?;
    let model = cache
        .resolve(&args.model)
        .with_context(|| format!("cannot find model `{}` (try `apprentice model fetch smollm2-135m`)", args.model))?;
    let llama_cpp = args
        .llama_cpp
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| LlamaCppWeights::parse(s).with_context(|| format!("unknown --llama-cpp weights `{s}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let serving = args
        .serving
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<WeightFormat>().map_err(anyhow::Error::msg).with_context(|| format!("--serving `{s}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let python = std::env::var("APPRENTICE_PYTHON").ok().filter(|p| !p.is_empty());
    let options = ModelBenchOptions {
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        repeats: args.repeats,
        threads: args.threads,
        python: if args.no_baselines { None } else { Some(args.python.or(python).unwrap_or_else(|| "python3".into())) },
        transformers: !args.no_transformers,
        llama_cpp,
        serving,
    };
    let report = run_model_bench(&model.path, &options)?;
    println!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
