//! `apprentice rollout` and `apprentice env ...`: thin calls into apprentice-envs.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use apprentice_core::config::WriteMode;
use apprentice_core::{Config, ContentBlock, InputMessage};
use apprentice_envs::rollout::{rollout, Policy, RolloutOptions};
use apprentice_envs::{make_env, Env, EnvOptions, Split, TaskId, VariantParams};
use apprentice_store::{Recorder, SqliteStore, Store};
use indicatif::{ProgressBar, ProgressStyle};

use crate::progress::Progress;

/// Episodes played at once by `rollout` and `eval` unless `--concurrency` says otherwise: a local
/// model decodes up to 8 concurrent calls in one batch (its default batch cap), and remote APIs and
/// experts gain from overlapping calls too. Results do not depend on it.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// Which env, and how its tasks are made: the same flags for `rollout` and `eval`.
#[derive(clap::Args)]
pub struct EnvArgs {
    #[arg(long, default_value = "babyai")]
    pub env: String,
    /// Extra objects per task (BabyAI's harder variant).
    #[arg(long, default_value_t = 0)]
    pub distractors: usize,
    /// End each episode (truncated) after at most this many steps.
    #[arg(long)]
    pub max_steps: Option<u32>,
}

impl EnvArgs {
    /// The env's options, checked by making the env once.
    pub fn options(&self) -> anyhow::Result<EnvOptions> {
        let options = EnvOptions { distractors: self.distractors, max_steps: self.max_steps };
        make_env(&self.env, options)?;
        Ok(options)
    }
}

#[derive(clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    env: EnvArgs,
    #[arg(long, default_value = "train")]
    split: String,
    #[arg(long, default_value_t = 100)]
    episodes: u64,
    /// First task index; episodes play consecutive tasks from here.
    #[arg(long, default_value_t = 0)]
    start_index: u64,
    /// `expert`, `expert?epsilon=0.3`, or `function::NAME[/VARIANT]` served by `--gateway`.
    #[arg(long, default_value = "expert")]
    policy: String,
    /// The gateway serving function policies, e.g. http://127.0.0.1:3000.
    #[arg(long)]
    gateway: Option<String>,
    /// Where expert steps are recorded: the store of this config...
    #[arg(long)]
    config: Option<PathBuf>,
    /// ...or this SQLite file.
    #[arg(long, default_value = "apprentice.db")]
    store: PathBuf,
    /// Episodes played at once; the default is a local model's default batch (remote APIs and
    /// experts gain from concurrency too). Results do not depend on it: every step is seeded from
    /// (--seed, task, step).
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Seeds the noisy expert's random actions and the sampling seed sent with each gateway step.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write every episode's summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
pub enum EnvCommand {
    /// Play a task yourself in the terminal and see exactly what the model sees.
    Play {
        env: String,
        #[arg(long, default_value = "train/0")]
        task: String,
        #[arg(long, default_value_t = 0)]
        distractors: usize,
        /// Also print the whole map (which the model never sees).
        #[arg(long)]
        show_map: bool,
    },
    /// Print the gateway configuration (functions, templates, schemas, metrics) for an env.
    Config {
        env: String,
        /// The model that serves the env's functions: add its [models.NAME] section yourself, except
        /// for `local::NAME` (a cached model, GGUF file or HF folder served in the gateway), whose
        /// section is printed too.
        #[arg(long, default_value = "teacher")]
        model: String,
        #[arg(long, default_value = "teacher")]
        variant: String,
        /// Sets the variant's `max_tokens` (keeps a small local model's answers short).
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Sets the variant's `temperature`.
        #[arg(long)]
        temperature: Option<f64>,
        /// Sets the variant's `top_p` (nucleus sampling).
        #[arg(long)]
        top_p: Option<f64>,
        /// The prompt style: `full` (the benchmark's instructions and the whole conversation) or
        /// one of the env's others, e.g. babyai's `compact` for a small student.
        #[arg(long, default_value = apprentice_envs::FULL_PROMPT)]
        prompt: String,
    },
}

pub async fn run_rollout(args: RolloutArgs) -> anyhow::Result<()> {
    let split: Split = args.split.parse()?;
    let env_options = args.env.options()?;
    let policy = if args.policy.starts_with("expert") {
        Policy::expert(&args.policy)?
    } else {
        let url = args.gateway.as_deref().context("a function policy needs --gateway URL")?;
        Policy::gateway(url, &args.policy)?
    };
    let recorder = match policy {
        Policy::Expert { .. } => {
            let (path, mode) = match &args.config {
                Some(config) => {
                    let config = Config::load(config)?;
                    (config.store.path, config.store.write_mode)
                }
                None => (args.store.clone(), WriteMode::Durable),
            };
            let store: Arc<dyn Store> = Arc::new(
                SqliteStore::open(&path, mode)
                    .await
                    .with_context(|| format!("cannot open store {}", path.display()))?,
            );
            Some(Arc::new(Recorder::spawn(store, mode, 10_000, None)))
        }
        Policy::Gateway { .. } => None,
    };
    let options = RolloutOptions {
        split,
        start_index: args.start_index,
        episodes: args.episodes,
        concurrency: args.concurrency,
        seed: args.seed,
        tags: Default::default(),
    };
    let bar = Progress::new(&args.policy, args.episodes, "episodes", None);
    let env_name = args.env.env.clone();
    let make = move || make_env(&env_name, env_options).expect("env name and options checked above");
    let summary = rollout(make, &policy, recorder.clone(), &options, |_| bar.inc()).await?;
    bar.finish();
    if let Some(recorder) = recorder {
        recorder.shutdown().await?;
    }
    println!("{}", summary.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

pub fn run_env(command: EnvCommand) -> anyhow::Result<()> {
    match command {
        EnvCommand::Config { env, model, variant, max_tokens, temperature, top_p, prompt } => {
            if model.starts_with("local::") && max_tokens.is_none() {
                eprintln!(
                    "note: a local model generates until it ends its turn or fills its context; \
                     --max-tokens bounds each answer (an untrained student can ramble for minutes on a CPU)"
                );
            }
            let params = VariantParams { temperature, top_p, max_tokens, prompt: Some(prompt) };
            print!("{}", make_env(&env, EnvOptions::default())?.spec().gateway_config_with(&model, &variant, &params)?);
            Ok(())
        }
        EnvCommand::Play { env, task, distractors, show_map } => {
            play(&env, task.parse()?, EnvOptions { distractors, ..EnvOptions::default() }, show_map)
        }
    }
}

/// Shows the rendered prompt exactly as a model would receive it, reads an answer, steps the env.
fn play(env_name: &str, task: TaskId, options: EnvOptions, show_map: bool) -> anyhow::Result<()> {
    let mut env = make_env(env_name, options)?;
    let function = env.spec().functions.first().cloned().context("the env declares no function")?;
    let mut observation = env.reset(task)?;
    let rendered = function.render("play", &observation.input)?;
    println!("== task {task} ==\n\n[system]\n{}\n", rendered.system.unwrap_or_default());
    let stdin = std::io::stdin();
    let mut steps = 0;
    loop {
        if show_map {
            match env.render_map() {
                Some(map) => println!("{map}"),
                None => bail!("env `{env_name}` has no map view"),
            }
        }
        if let Some(last) = observation.input.messages.last() {
            print_user(&function, &observation.input.system, last)?;
        }
        print!("your answer> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        let outcome = env.step(&[ContentBlock::Text { text: line.trim().to_string() }])?;
        steps += 1;
        for (metric, value) in &outcome.feedback.inference {
            println!("  {metric}: {value:?}");
        }
        if outcome.terminated || outcome.truncated {
            for (metric, value) in &outcome.feedback.episode {
                println!("  episode {metric}: {value:?}");
            }
            println!(
                "episode over after {steps} steps ({})",
                if outcome.terminated { "terminated" } else { "truncated" }
            );
            return Ok(());
        }
        observation = outcome.observation;
    }
}

fn print_user(
    function: &apprentice_envs::FunctionSpec,
    system: &Option<apprentice_core::SystemInput>,
    message: &InputMessage,
) -> anyhow::Result<()> {
    let input = apprentice_core::Input { system: system.clone(), messages: vec![message.clone()] };
    let rendered = function.render("play", &input)?;
    for block in rendered.messages.iter().flat_map(|m| &m.content) {
        match block {
            apprentice_core::RenderedBlock::Text { text } => println!("[user]\n{text}\n"),
            other => bail!("unexpected block in an observation: {other:?}"),
        }
    }
    Ok(())
}

/// `apprentice bench expert`: the family × ε table, with a progress bar over its cells.
pub fn bench_expert(
    episodes: u64,
    epsilons: &[f64],
    distractors: usize,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use apprentice_envs::babyai::expert_eval::{evaluate_expert, stats_table};
    use apprentice_envs::babyai::tasks::{Family, TaskConfig};
    let config = TaskConfig { distractors };
    let bar = ProgressBar::new((Family::ALL.len() * epsilons.len()) as u64)
        .with_style(ProgressStyle::with_template("[{bar:30}] {pos}/{len} family × ε cells")?.progress_chars("=> "));
    let mut rows = Vec::new();
    for family in Family::ALL {
        for &epsilon in epsilons {
            rows.push(evaluate_expert(family, episodes, epsilon, &config)?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!("{episodes} test episodes per cell, {distractors} distractors\n\n{}", stats_table(&rows));
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
