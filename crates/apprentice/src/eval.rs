//! `apprentice eval` (policies on env tasks) and `apprentice report` (runs as Markdown, JSON, HTML).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use apprentice_core::config::WriteMode;
use apprentice_core::Config;
use apprentice_envs::rollout::Policy;
use apprentice_envs::{make_env, EnvOptions, Split};
use apprentice_eval::{AdaptiveStopping, Contender, EvalOptions, Evaluation, Report, Threshold};
use apprentice_gateway::{Gateway, RunningGateway};
use apprentice_store::{Recorder, SqliteStore, Store};
use clap::Args;

use crate::envs::{EnvArgs, DEFAULT_CONCURRENCY};
use crate::progress::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where function policies are served and steps recorded: the same flags for `eval` and `replay`.
#[derive(Args)]
pub struct GatewayArgs {
    /// Gateway config: a gateway is started from it in this process (so local models run here),
    /// and every call lands in its store.
    #[arg(long)]
    config: Option<PathBuf>,
    /// ...or a running gateway (then --store must be that gateway's store).
    #[arg(long, conflicts_with = "config")]
    gateway: Option<String>,
    #[arg(long, default_value = "apprentice.db")]
    store: PathBuf,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    env: EnvArgs,
    #[arg(long, default_value = "test")]
    split: String,
    /// Tasks per policy (the same tasks for every policy), or the most with --max-width.
    #[arg(long, default_value_t = 50)]
    episodes: u64,
    #[arg(long, default_value_t = 0)]
    start_index: u64,
    /// A policy as NAME=SPEC, SPEC being `expert[?epsilon=E]` or `function::NAME[/VARIANT]`; repeat
    /// for each. The first is the reference of the paired comparisons.
    #[arg(long = "policy", required = true)]
    policies: Vec<String>,
    #[command(flatten)]
    served: GatewayArgs,
    /// Episodes played at once per policy; the default is a local model's default batch (remote
    /// APIs and experts gain from concurrency too). Results do not depend on it: the same tasks are
    /// played in the same order, every step seeded from (--seed, task, step).
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Seeds noisy experts and the sampling seed sent with each gateway step.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tags every step (`eval_run`); default: eval-<UTC time>.
    #[arg(long)]
    run_id: Option<String>,
    /// Where evaluation.json and the report go; default: evals/<run id>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Adaptive stopping: stop a policy once its 95% success interval is at most this wide.
    #[arg(long)]
    max_width: Option<f64>,
    #[arg(long, default_value_t = 20)]
    min_episodes: usize,
    /// Episodes between adaptive-stopping checks.
    #[arg(long, default_value_t = 10)]
    batch: u64,
    /// Exit with status 1 when any policy is below, e.g. `success=0.8` (metrics: success,
    /// success_low, mean_return). Repeatable.
    #[arg(long = "fail-below")]
    fail_below: Vec<Threshold>,
}

#[derive(Args)]
pub struct ReplayArgs {
    /// The function whose recorded calls are replayed.
    #[arg(long)]
    function: String,
    /// Only calls recorded by this variant.
    #[arg(long)]
    from_variant: Option<String>,
    /// The candidate variant: each call's structured input is rendered with its templates.
    #[arg(long)]
    variant: String,
    /// exact, regex:PATTERN, json-field:/POINTER, tool-call or judge:FUNCTION; repeatable.
    #[arg(long = "evaluator", required = true)]
    evaluators: Vec<String>,
    #[command(flatten)]
    served: GatewayArgs,
    #[arg(long)]
    limit: Option<u64>,
    #[arg(long)]
    run_id: Option<String>,
    /// Also write every item and the means as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Evaluation runs (folders with evaluation.json) and training runs (folders with metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    #[arg(long, default_value = "report")]
    out: PathBuf,
}

#[derive(Args)]
pub struct CurveArgs {
    /// The curve's description (TOML: title, x_label, [[points]] with series, x, evaluation,
    /// policy, teacher); evaluation paths are relative to it.
    spec: PathBuf,
    /// Folder for curve.md, curve.json and curve.svg.
    #[arg(long, default_value = "curve")]
    out: PathBuf,
}

/// The outcome the binary turns into an exit status.
pub enum Verdict {
    Passed,
    Failed(Vec<String>),
}

pub async fn run_eval(args: EvalArgs) -> Result<Verdict> {
    let split: Split = args.split.parse()?;
    let env_options = args.env.options()?;
    let run_id = args.run_id.clone().unwrap_or_else(|| format!("eval-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S")));
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("evals").join(&run_id));

    let config = args.served.config.as_deref().map(Config::load).transpose()?;
    let Served { server, url, store, recorder } = serve(config.as_ref(), &args.served).await?;
    let contenders =
        args.policies.iter().map(|p| contender(p, url.as_deref(), config.as_ref())).collect::<Result<Vec<_>>>()?;

    let options = EvalOptions {
        run_id: run_id.clone(),
        split,
        start_index: args.start_index,
        episodes: args.episodes,
        concurrency: args.concurrency,
        seed: args.seed,
        stopping: args.max_width.map(|max_width| AdaptiveStopping { max_width, min_episodes: args.min_episodes }),
        batch: args.batch,
    };
    let evaluation =
        evaluate_with_progress(&args.env.env, env_options, &contenders, &store, recorder.clone(), &options).await?;
    recorder.shutdown().await?;
    if let Some(server) = server {
        server.shutdown().await?;
    }
    let report = write_evaluation(&evaluation, &out)?;
    print!("{}", report.table());
    println!("evaluation and report: {}", out.display());

    let failures: Vec<String> =
        args.fail_below.iter().flat_map(|t| t.failures(&report.evaluations[0].summaries)).collect();
    Ok(if failures.is_empty() { Verdict::Passed } else { Verdict::Failed(failures) })
}

/// The gateway a command talks to (started here from a config, or already running at a URL) and
/// the store it records into, with a recorder for steps recorded directly (the expert's).
struct Served {
    server: Option<RunningGateway>,
    url: Option<String>,
    store: Arc<SqliteStore>,
    recorder: Arc<Recorder>,
}

/// `config` is `args.config` loaded (the caller needs it too).
async fn serve(config: Option<&Config>, args: &GatewayArgs) -> Result<Served> {
    let (store_path, mode) = match config {
        Some(c) => (c.store.path.clone(), c.store.write_mode),
        None => (args.store.clone(), WriteMode::Durable),
    };
    // The gateway (when started here) opens the store first: it runs the migrations.
    let server = match config {
        Some(c) => Some(RunningGateway::start(Gateway::open(c.clone()).await?, "127.0.0.1:0".parse()?).await?),
        None => None,
    };
    let url = server
        .as_ref()
        .map(RunningGateway::url)
        .or(args.gateway.as_deref().map(|u| u.trim_end_matches('/').to_string()));
    let store = Arc::new(
        SqliteStore::open(&store_path, mode)
            .await
            .with_context(|| format!("cannot open store {}", store_path.display()))?,
    );
    let recorder = Arc::new(Recorder::spawn(store.clone() as Arc<dyn Store>, mode, 10_000, None));
    Ok(Served { server, url, store, recorder })
}

/// Plays every contender with one progress bar each.
async fn evaluate_with_progress(
    env: &str,
    env_options: EnvOptions,
    contenders: &[Contender],
    store: &SqliteStore,
    recorder: Arc<Recorder>,
    options: &EvalOptions,
) -> Result<Evaluation> {
    let bars = MultiProgress::new();
    let progress: Vec<Progress> =
        contenders.iter().map(|c| Progress::new(&c.name, options.episodes, "episodes", Some(&bars))).collect();
    let env_name = env.to_string();
    let make = move || make_env(&env_name, env_options).expect("env name and options checked by the caller");
    let on_episode = |name: &str, _: &apprentice_envs::rollout::EpisodeSummary| {
        if let Some(i) = contenders.iter().position(|c| c.name == name) {
            progress[i].inc();
        }
    };
    let evaluation = apprentice_eval::evaluate(make, contenders, store, Some(recorder), options, on_episode).await?;
    for bar in &progress {
        bar.finish();
    }
    Ok(evaluation)
}

/// Writes `evaluation.json` and the report of it into `out`.
fn write_evaluation(evaluation: &Evaluation, out: &Path) -> Result<Report> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("evaluation.json");
    std::fs::write(&path, serde_json::to_string_pretty(evaluation)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let report = Report::new(std::slice::from_ref(evaluation), Vec::new());
    report.write(out)?;
    Ok(report)
}

/// `NAME=SPEC` → a contender, priced from the config when its variant's model has a price.
fn contender(arg: &str, gateway: Option<&str>, config: Option<&Config>) -> Result<Contender> {
    let Some((name, spec)) = arg.split_once('=') else {
        bail!("--policy `{arg}`: expected NAME=SPEC, e.g. teacher=expert?epsilon=0.5 or student=function::babyai::act/sft");
    };
    if spec.starts_with("expert") {
        return Ok(Contender {
            name: name.into(),
            policy: Policy::expert(spec)?,
            price: Some("free (scripted)".into()),
        });
    }
    let url = gateway.with_context(|| format!("--policy {name}: a function policy needs --config or --gateway"))?;
    let policy = Policy::gateway(url, spec)?;
    let price = match (&policy, config) {
        (Policy::Gateway { function_name, variant_name, .. }, Some(config)) => {
            let function = config.functions.get(function_name);
            let variants: Vec<&apprentice_core::config::VariantConfig> = match (function, variant_name) {
                (Some(f), Some(v)) => f.variants.get(v).into_iter().collect(),
                (Some(f), None) => f.variants.values().collect(),
                (None, _) => bail!("--policy {name}: the config has no function `{function_name}`"),
            };
            let mut prices: Vec<String> = variants
                .iter()
                .map(|v| match config.models.get(&v.model).and_then(|m| m.price) {
                    Some(price) => format!("{}: {}", v.model, price.describe()),
                    None => format!("{}: no price configured", v.model),
                })
                .collect();
            prices.dedup();
            Some(prices.join("; "))
        }
        _ => None,
    };
    Ok(Contender { name: name.into(), policy, price })
}

pub fn run_report(args: ReportArgs) -> Result<()> {
    let report = Report::load(&args.runs)?;
    let files = report.write(&args.out)?;
    print!("{}", report.table());
    println!("report: {} (also {}, {})", files.html.display(), files.markdown.display(), files.json.display());
    Ok(())
}

pub fn run_curve(args: CurveArgs) -> Result<()> {
    let curve = apprentice_eval::curve::Curve::load(&args.spec)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let table = curve.table();
    for (name, text) in
        [("curve.md", table.clone()), ("curve.json", serde_json::to_string_pretty(&curve)?), ("curve.svg", curve.svg())]
    {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{table}");
    println!("curve: {} (also curve.json, curve.svg)", args.out.join("curve.md").display());
    Ok(())
}

pub async fn run_replay(args: ReplayArgs) -> Result<()> {
    let evaluators =
        args.evaluators.iter().map(|e| e.parse::<apprentice_eval::Evaluator>()).collect::<Result<Vec<_>, _>>()?;
    let config = args.served.config.as_deref().map(Config::load).transpose()?;
    let Served { server, url, store, recorder } = serve(config.as_ref(), &args.served).await?;
    let url = url.context("replay needs --config or --gateway")?;
    let options = apprentice_eval::ReplayOptions {
        run_id: args.run_id.clone().unwrap_or_else(|| format!("replay-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S"))),
        function: args.function.clone(),
        source_variant: args.from_variant.clone(),
        candidate_variant: args.variant.clone(),
        limit: args.limit,
    };
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {pos} calls replayed ({elapsed})")?);
    let report = apprentice_eval::replay(&store, &recorder, &url, &options, &evaluators, |_| bar.inc(1)).await?;
    bar.finish();
    recorder.shutdown().await?;
    if let Some(server) = server {
        server.shutdown().await?;
    }
    println!(
        "replay `{}`: {} calls of {} with variant {}",
        report.run_id,
        report.items.len(),
        report.function,
        report.candidate_variant
    );
    let demonstrated = report.items.iter().filter(|i| i.demonstrated).count();
    println!("references: {} recorded outputs, {demonstrated} demonstrations", report.items.len() - demonstrated);
    for (metric, mean) in &report.means {
        println!("{metric:<32} {mean:.4}");
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
