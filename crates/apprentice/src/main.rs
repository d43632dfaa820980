//! The `apprentice` command line: each command is a thin call into a library crate.

mod bench_model;
mod bench_serve;
mod bench_train;
mod curate;
mod demo;
mod envs;
mod eval;
mod model;
mod progress;
mod train;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use apprentice_core::config::WriteMode;
use apprentice_core::Config;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "apprentice",
    version,
    about = "Record an expensive model's work, curate it, and train a small model that does the job"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway: native and OpenAI-compatible APIs, every call recorded.
    Serve {
        #[arg(long, default_value = "apprentice.toml")]
        config: PathBuf,
        /// Overrides `[gateway] bind` from the config.
        #[arg(long)]
        bind: Option<SocketAddr>,
    },
    /// Check a configuration file and exit.
    Check {
        #[arg(long, default_value = "apprentice.toml")]
        config: PathBuf,
    },
    /// Run the main job end to end on embedded defaults.
    Demo(demo::DemoArgs),
    /// Play tasks of an env with a policy (the expert, noisy or not, or a function served by a
    /// gateway) and record every step with its feedback.
    Rollout(envs::RolloutArgs),
    /// Select, weight and split recorded inferences into a reproducible training dataset.
    Curate(curate::CurateArgs),
    /// Agentic environments: play one yourself, or print the gateway config for one.
    Env {
        #[command(subcommand)]
        command: envs::EnvCommand,
    },
    /// Student base models: fetch into the model cache, list, resolve.
    Model(model::ModelArgs),
    /// Fine-tune the student on a curated dataset: sft, iw-sft, sft-q, iw-sft-q; LoRA or full.
    Train(train::TrainArgs),
    /// Play the same env tasks with several policies (teacher, students, any variant) and compare
    /// success, tokens, latency and cost; exit status 1 under a --fail-below threshold.
    Eval(eval::EvalArgs),
    /// Re-run recorded calls' structured inputs with a candidate variant and score its outputs
    /// against the recorded (or demonstrated) ones; scores are stored as feedback.
    Replay(eval::ReplayArgs),
    /// Evaluation and training runs as a Markdown summary, a JSON file and an HTML page with plots.
    Report(eval::ReportArgs),
    /// A learning curve: students' test success against what they were trained on, each point
    /// paired with the teacher in its evaluation run (table, JSON and SVG).
    Curve(eval::CurveArgs),
    /// Benchmarks; each prints a table and can write JSON.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// The BabyAI expert's success and return per task family and ε, on the test split.
    Expert {
        #[arg(long, default_value_t = 1000)]
        episodes: u64,
        #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.3,0.5")]
        epsilons: Vec<f64>,
        #[arg(long, default_value_t = 0)]
        distractors: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Curation over a large synthetic history: fill a store, curate by an episode metric, export.
    Curate(curate::BenchCurateArgs),
    /// Prompt and decode tokens/s of the student model next to transformers and llama.cpp.
    Model(bench_model::BenchModelArgs),
    /// LoRA training tokens/s of the student next to PyTorch + transformers + peft, and peak memory.
    Train(bench_train::BenchTrainArgs),
    /// K concurrent agent-like clients against a local model through the gateway: aggregate
    /// tokens/s, requests/s and latency per K, next to llama.cpp single stream.
    Serve(bench_serve::BenchServeArgs),
    /// Latency the gateway adds (p50/p99) against a loopback upstream, direct vs through the gateway.
    Gateway {
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
        #[arg(long, default_value_t = 2.0)]
        warmup_s: f64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, value_enum, default_value_t = Mode::Durable)]
        write_mode: Mode,
        /// Also measure the OpenAI-compatible endpoint.
        #[arg(long)]
        openai_api: bool,
        /// Write the report as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Durable,
    Async,
}

impl From<Mode> for WriteMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Durable => WriteMode::Durable,
            Mode::Async => WriteMode::Async,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo prints its own stage log; its stages are child processes that log as usual.
    let default_filter = if matches!(cli.command, Command::Demo(_)) { "error" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APPRENTICE_LOG").unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if matches!(
        cli.command,
        Command::Curate(_) | Command::Train(_) | Command::Bench { bench: Bench::Curate(_) | Bench::Train(_) }
    ) {
        keep_freed_memory();
    }
    if matches!(
        cli.command,
        Command::Train(_) | Command::Demo(_) | Command::Bench { bench: Bench::Train(_) | Bench::Serve(_) }
    ) {
        elementwise_ops_on_the_calling_thread();
    }
    if let Command::Bench { bench: Bench::Model(args) } = &cli.command {
        bench_model::set_threads(args);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(cli.command))
}

/// Curation builds and frees gigabytes of small objects in a few seconds; mimalloc's default of
/// handing freed memory back to the OS after 10 ms made the kernel (page faults, madvise) half of
/// `bench curate`'s time (7.5 s of 12.7 s CPU). A batch command exits soon anyway, so it keeps it.
fn keep_freed_memory() {
    // mimalloc 2's `mi_option_purge_delay` (mimalloc.h); -1 never purges.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a process-wide allocator option; valid at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// candle runs elementwise ops on its own worker pool, whose workers spin for a while after each
/// op; during training they spin while rayon's threads do the matmuls, and on 2 cores that took
/// 13% of a LoRA step (perf). One thread for elementwise work measured 5% more tokens/s
/// (`bench train`: 217 vs 206). A user's own `CANDLE_NUM_THREADS` wins.
fn elementwise_ops_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called at startup before the async runtime or any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, bind } => {
            let config = Config::load(&config)?;
            let gateway = apprentice_gateway::Gateway::open(config).await?;
            apprentice_gateway::serve(gateway, bind, |addr| {
                tracing::info!("apprentice gateway listening on http://{addr}");
                // Scripts (and tests) wait for this line on stdout.
                println!("listening on {addr}");
            })
            .await?;
            Ok(())
        }
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            println!(
                "{}: ok ({} functions, {} models, {} metrics, {} tools)",
                config.display(),
                loaded.functions.len(),
                loaded.models.len(),
                loaded.metrics.len(),
                loaded.tools.len()
            );
            Ok(())
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Rollout(args) => envs::run_rollout(args).await,
        Command::Curate(args) => curate::run(args).await,
        Command::Env { command } => envs::run_env(command),
        Command::Model(args) => model::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => match eval::run_eval(args).await? {
            eval::Verdict::Passed => Ok(()),
            eval::Verdict::Failed(failures) => {
                for failure in &failures {
                    eprintln!("below threshold: {failure}");
                }
                std::process::exit(1);
            }
        },
        Command::Replay(args) => eval::run_replay(args).await,
        Command::Report(args) => eval::run_report(args),
        Command::Curve(args) => eval::run_curve(args),
        Command::Bench { bench: Bench::Expert { episodes, epsilons, distractors, json } } => {
            envs::bench_expert(episodes, &epsilons, distractors, json.as_deref())
        }
        Command::Bench { bench: Bench::Curate(args) } => curate::bench(args).await,
        Command::Bench { bench: Bench::Model(args) } => bench_model::run(args),
        Command::Bench { bench: Bench::Train(args) } => bench_train::run(args),
        Command::Bench { bench: Bench::Serve(args) } => bench_serve::run(args).await,
        Command::Bench {
            bench: Bench::Gateway { rate, duration_s, warmup_s, connections, write_mode, openai_api, json },
        } => {
            let store_dir = tempfile::tempdir().context("cannot create a scratch folder for the bench store")?;
            let options = apprentice_gateway::bench::BenchOptions {
                rate,
                duration: Duration::from_secs_f64(duration_s),
                warmup: Duration::from_secs_f64(warmup_s),
                connections,
                write_mode: write_mode.into(),
                store_dir: store_dir.path().to_path_buf(),
                openai_api,
            };
            let report = apprentice_gateway::bench::run_gateway_bench(&options).await?;
            println!("{}", report.table());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}
