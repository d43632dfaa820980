//! `apprentice demo`: the whole curated-behaviour-cloning loop on BabyAI in one command.
//!
//! Each stage is the command a user would run, started as a child process of this binary and
//! printed before it runs, so every stage can be inspected and rerun alone (the commands are also
//! written to `DATA/commands.sh`): fetch the student base model, roll out the teacher on the train
//! split, curate its successful episodes, train an SFT and an iw-SFT student, evaluate base model,
//! teacher and both students on the same test tasks, and write the report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use apprentice_envs::{make_env, EnvOptions, VariantParams};
use serde::Serialize;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Folder for the store, datasets, runs, evaluation and report (replaced on each run).
    #[arg(long, default_value = "apprentice-data")]
    data: PathBuf,
    /// Smaller numbers, same stages: under 5 minutes on a 2-core CPU.
    #[arg(long)]
    quick: bool,
    /// `cpu`, or `cuda` for a build with `--features cuda`: larger numbers, students trained on the GPU.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The noisy expert's ε (probability of a random action); 0.5 with 24-step episodes succeeds
    /// on about two thirds of the train tasks.
    #[arg(long, default_value_t = 0.5)]
    epsilon: f64,
    /// Train tasks the teacher plays, whose good steps train the students (default: 1,000 on the
    /// CPU, 2,000 with CUDA, 24 with --quick). The learning curve in the README says what each
    /// buys: 2,000 also pass on held-out tasks, at twice the training time.
    #[arg(long)]
    train_tasks: Option<u64>,
    /// How the students are prompted: `compact` (the mission, the action names and the current
    /// observation only) or `full` (the benchmark's instructions and the whole conversation). The
    /// teacher's recorded calls are re-rendered in this style for training.
    #[arg(long, default_value = apprentice_envs::babyai::COMPACT_PROMPT)]
    prompt: String,
    /// A real teacher instead of the noisy expert: the name of a variant of `babyai::act` in
    /// --teacher-config (e.g. made with `apprentice env config babyai --model teacher --variant
    /// teacher` plus the model's section; use absolute paths in it). The demo serves it from a
    /// copy of that config whose store is the demo's.
    #[arg(long, requires = "teacher_config")]
    teacher: Option<String>,
    #[arg(long)]
    teacher_config: Option<PathBuf>,
    /// Price per hour of the machine that runs the students (their cost is measured compute time
    /// at this price).
    #[arg(long, default_value_t = 0.10)]
    student_price_per_hour: f64,
}

/// The numbers one demo size runs with.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    train_episodes: u64,
    test_episodes: u64,
    max_steps: u32,
    train_args: Vec<String>,
}

impl Plan {
    fn new(quick: bool, device: &str) -> Self {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if quick {
            Plan {
                train_episodes: 24,
                test_episodes: 4,
                max_steps: 12,
                train_args: args(&["--max-steps", "4", "--lr", "1e-3", "--eval-every", "0", "--checkpoint-every", "0"]),
            }
        } else if device.starts_with("cuda") {
            Plan {
                // The learning curve's recipe that passed on both test sets (2,000 tasks, 1
                // epoch); a GPU affords it.
                train_episodes: 2000,
                test_episodes: 200,
                max_steps: 24,
                train_args: args(&["--epochs", "1", "--lr", "5e-4", "--grad-accum", "1", "--eval-every", "50"]),
            }
        } else {
            Plan {
                // From the learning curve (README, Demo): 1 epoch on 1,000 teacher tasks is the
                // least compute measured at the teacher's success (69 of 100 against 66); 500
                // tasks reached 60 and 180 tasks 30.
                train_episodes: 1000,
                // Judged on 100 tasks, paired with the teacher: fewer cannot separate the two.
                test_episodes: 100,
                max_steps: 24,
                train_args: args(&["--epochs", "1", "--lr", "5e-4", "--grad-accum", "1", "--eval-every", "0"]),
            }
        }
    }
}

#[derive(Serialize)]
struct StageTime {
    stage: String,
    command: String,
    seconds: f64,
}

struct Stages {
    exe: PathBuf,
    script: String,
    times: Vec<StageTime>,
}

impl Stages {
    /// Runs `apprentice ARGS` as a stage, its output shown as it comes.
    fn run(&mut self, stage: &str, args: &[String]) -> Result<()> {
        let shown = format!("apprentice {}", args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "));
        println!("\n== {stage} ==\n$ {shown}");
        self.script.push_str(&format!("# {stage}\n{shown}\n"));
        let started = Instant::now();
        let status = Command::new(&self.exe)
            .args(args)
            .status()
            .with_context(|| format!("cannot start stage `{stage}` ({})", self.exe.display()))?;
        if !status.success() {
            bail!("stage `{stage}` failed ({status}); rerun it alone with:\n  {shown}");
        }
        let seconds = started.elapsed().as_secs_f64();
        println!("({stage}: {seconds:.1} s)");
        self.times.push(StageTime { stage: stage.into(), command: shown, seconds });
        Ok(())
    }
}

/// A stage run beside others: its output goes to `log`, its progress is read from `metrics`.
struct ParallelStage {
    stage: String,
    args: Vec<String>,
    log: PathBuf,
    metrics: PathBuf,
}

impl Stages {
    /// Runs `stages` at once, the machine's cores split between them: a LoRA training of a 135M
    /// model does not keep two threads busy, so two side by side on one core each finish well
    /// before two one after the other on both cores (README, Demo).
    fn run_parallel(&mut self, title: &str, stages: Vec<ParallelStage>) -> Result<()> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / stages.len().max(1)).max(1).to_string();
        println!("\n== {title} ==");
        let bars = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        let started = Instant::now();
        let mut running = Vec::new();
        for stage in stages {
            let shown =
                format!("apprentice {}", stage.args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "));
            println!("$ {shown} > {} 2>&1", stage.log.display());
            self.script.push_str(&format!("# {} (run beside the others)\n{shown}\n", stage.stage));
            let log =
                std::fs::File::create(&stage.log).with_context(|| format!("cannot create {}", stage.log.display()))?;
            let child = Command::new(&self.exe)
                .args(&stage.args)
                .env("RAYON_NUM_THREADS", &threads)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start stage `{}` ({})", stage.stage, self.exe.display()))?;
            let bar = bars
                .add(indicatif::ProgressBar::new_spinner().with_style(style.clone()).with_prefix(stage.stage.clone()));
            bar.enable_steady_tick(std::time::Duration::from_millis(250));
            running.push((stage, shown, child, bar, None::<f64>));
        }
        let mut ticker = crate::progress::PlainTicker::new();
        while running.iter().any(|(_, _, _, _, done)| done.is_none()) {
            if ticker.due() {
                for (stage, _, _, bar, done) in &running {
                    let status = if done.is_some() { "done".to_string() } else { training_progress(&stage.metrics) };
                    eprintln!("[{:.0} s] {}: {status}", bar.elapsed().as_secs_f64(), stage.stage);
                }
            }
            let mut failed = None;
            for (stage, shown, child, bar, done) in running.iter_mut().filter(|r| r.4.is_none()) {
                match child.try_wait()? {
                    Some(status) if !status.success() => {
                        failed = Some(format!(
                            "stage `{}` failed ({status}); its log: {}\nrerun it alone with:\n  {shown}",
                            stage.stage,
                            stage.log.display()
                        ));
                        break;
                    }
                    Some(_) => {
                        let seconds = started.elapsed().as_secs_f64();
                        bar.finish_with_message(format!("done in {seconds:.1} s"));
                        *done = Some(seconds);
                    }
                    None => bar.set_message(training_progress(&stage.metrics)),
                }
            }
            if let Some(message) = failed {
                // The others' results would be of no use to the stages that follow.
                for (_, _, child, _, _) in &mut running {
                    child.kill().ok();
                    child.wait().ok();
                }
                bars.clear().ok();
                bail!(message);
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        for (stage, shown, _, _, done) in running {
            let seconds = done.unwrap_or_default();
            println!("({}: {seconds:.1} s)", stage.stage);
            self.times.push(StageTime { stage: stage.stage, command: shown, seconds });
        }
        Ok(())
    }
}

/// "step S, epoch E, loss L" from the newest line of a training run's metrics.jsonl.
fn training_progress(metrics: &Path) -> String {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    let Some(last) = text.lines().rev().find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok()) else {
        return "starting".into();
    };
    let number = |key: &str| last.get(key).and_then(serde_json::Value::as_f64);
    match (number("step"), number("epoch"), number("loss")) {
        (Some(step), Some(epoch), Some(loss)) => format!("step {step}, epoch {epoch:.2}, loss {loss:.3}"),
        _ => "validation loss of the base model".into(),
    }
}

fn shell_quote(arg: &str) -> String {
    if arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c)) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let mut plan = Plan::new(args.quick, &args.device);
    if let Some(tasks) = args.train_tasks {
        plan.train_episodes = tasks;
    }
    // A misspelt style should fail now, not after the rollout.
    for function in &make_env("babyai", EnvOptions::default())?.spec().functions {
        function.style(&args.prompt)?;
    }
    let data = &args.data;
    if data.exists() {
        std::fs::remove_dir_all(data).with_context(|| format!("cannot clear {}", data.display()))?;
    }
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let data = data.canonicalize()?;
    let store = data.join("apprentice.db");
    let mut stages = Stages {
        exe: std::env::current_exe().context("cannot find this executable")?,
        script: String::new(),
        times: Vec::new(),
    };
    println!(
        "apprentice demo{}: teacher on {} BabyAI train tasks, students trained from SmolLM2-135M with the {} prompt, {} test tasks per policy, episodes of at most {} steps; everything under {}",
        if args.quick { " --quick" } else { "" },
        plan.train_episodes,
        args.prompt,
        plan.test_episodes,
        plan.max_steps,
        data.display()
    );
    let s = |v: &str| v.to_string();

    stages.run("fetch the student base model", &[s("model"), s("fetch"), s("smollm2-135m")])?;

    let max_steps = plan.max_steps.to_string();
    let teacher_policy = match &args.teacher {
        Some(variant) => format!("function::babyai::act/{variant}"),
        None => format!("expert?epsilon={}", args.epsilon),
    };
    // The teacher's config, recording into the demo's store.
    let teacher_table = match &args.teacher_config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut table: toml::Table =
                text.parse().with_context(|| format!("{} is not valid TOML", path.display()))?;
            table.insert("store".into(), store_table(&store).into());
            let copy = data.join("teacher.toml");
            std::fs::write(&copy, toml::to_string(&table)?)?;
            Some((copy, table))
        }
        None => None,
    };
    let mut rollout = vec![
        s("rollout"),
        s("--env"),
        s("babyai"),
        s("--split"),
        s("train"),
        s("--episodes"),
        plan.train_episodes.to_string(),
        s("--max-steps"),
        max_steps.clone(),
        s("--policy"),
        teacher_policy.clone(),
        s("--json"),
        path_arg(&data.join("teacher-rollout.json")),
    ];
    match &teacher_table {
        Some((config, _)) => rollout.extend([s("--config"), path_arg(config)]),
        None => rollout.extend([s("--store"), path_arg(&store)]),
    }
    stages.run("roll out the teacher on the train split", &rollout)?;

    // The students' variants (the base model's too) exist before they are trained: curation
    // renders the teacher's calls with their templates, evaluation serves them.
    let runs = data.join("runs");
    let gateway_config = data.join("gateway.toml");
    let base_model =
        apprentice_model::cache::resolve_model("smollm2-135m").context("the base model is not in the cache")?;
    let config = gateway_config_for(
        teacher_table.map(|(_, table)| table).unwrap_or_default(),
        &store,
        &[
            ("base", base_model.as_path()),
            ("sft", &runs.join("sft").join("model.gguf")),
            ("iw-sft", &runs.join("iw-sft").join("model.gguf")),
        ],
        &args.prompt,
        args.student_price_per_hour,
    )?;
    std::fs::write(&gateway_config, config).with_context(|| format!("cannot write {}", gateway_config.display()))?;

    let spec = data.join("curate.toml");
    std::fs::write(&spec, CURATE_SPEC).with_context(|| format!("cannot write {}", spec.display()))?;
    let datasets = data.join("datasets");
    stages.run(
        "curate its good steps in successful episodes, rendered as the students are prompted",
        &[
            s("curate"),
            s("--spec"),
            path_arg(&spec),
            s("--config"),
            path_arg(&gateway_config),
            s("--out"),
            path_arg(&datasets),
            s("--student"),
            s("smollm2-135m"),
        ],
    )?;
    let dataset = datasets.join("babyai-demo-v1");

    std::fs::create_dir_all(&runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let mut trainings = Vec::new();
    for (objective, name) in [("sft", "sft"), ("iw-sft", "iw-sft")] {
        let mut train = vec![
            s("train"),
            s("--dataset"),
            path_arg(&dataset),
            s("--base"),
            s("smollm2-135m"),
            s("--objective"),
            s(objective),
            s("--out"),
            path_arg(&runs.join(name)),
            s("--device"),
            args.device.clone(),
        ];
        train.extend(plan.train_args.iter().cloned());
        if objective == "iw-sft" {
            // The base model gives the students' answer format a low probability, so every raw
            // weight would sit at the clip (SFT at 16 times the learning rate, which collapses);
            // self-normalised weights keep only their ratios.
            // A weight clip far above the spread and a temperature of 0.5 keep them informative:
            // measured with the clip at 16, the weights of 145 of 166 batches all sat at it.
            train.extend([s("--iw-self-normalize"), s("--iw-temperature"), s("0.5"), s("--iw-w-max"), s("1000")]);
        }
        if objective == "iw-sft" {
            // Its reference log-probs on every core first, so that the two trainings side by side
            // (one core each) take about the same time instead of iw-SFT running on alone.
            let mut reference = train.clone();
            reference.push(s("--reference-only"));
            stages.run("compute iw-sft's reference log-probs on every core", &reference)?;
        }
        trainings.push(ParallelStage {
            stage: format!("train the {name} student"),
            args: train,
            log: runs.join(format!("{name}.log")),
            metrics: runs.join(name).join("metrics.jsonl"),
        });
    }
    stages.run_parallel("train the sft and iw-sft students side by side", trainings)?;

    let evaluation = data.join("eval");
    stages.run(
        "evaluate teacher, base model and both students on the same test tasks",
        &[
            s("eval"),
            s("--config"),
            path_arg(&gateway_config),
            s("--env"),
            s("babyai"),
            s("--split"),
            s("test"),
            s("--episodes"),
            plan.test_episodes.to_string(),
            s("--max-steps"),
            max_steps,
            // The students' calls of concurrent episodes are decoded in one batch.
            s("--concurrency"),
            crate::envs::DEFAULT_CONCURRENCY.to_string(),
            s("--run-id"),
            s("demo"),
            s("--policy"),
            format!("teacher={teacher_policy}"),
            s("--policy"),
            s("base=function::babyai::act/base"),
            s("--policy"),
            s("sft=function::babyai::act/sft"),
            s("--policy"),
            s("iw-sft=function::babyai::act/iw-sft"),
            s("--out"),
            path_arg(&evaluation),
        ],
    )?;
    let report = data.join("report");
    stages.run(
        "write the report",
        &[
            s("report"),
            path_arg(&evaluation),
            path_arg(&runs.join("sft")),
            path_arg(&runs.join("iw-sft")),
            s("--out"),
            path_arg(&report),
        ],
    )?;

    let total = started.elapsed().as_secs_f64();
    std::fs::write(data.join("commands.sh"), format!("#!/bin/sh\nset -e\n{}", stages.script))?;
    let summary = serde_json::json!({ "plan": plan, "stages": stages.times, "total_s": total });
    std::fs::write(data.join("demo.json"), serde_json::to_string_pretty(&summary)?)?;
    println!("\n== stage times ==");
    for t in &stages.times {
        println!("{:>8.1} s  {}", t.seconds, t.stage);
    }
    println!(
        "{total:>8.1} s  total\n\nreport: {}\ncommands to rerun any stage: {}",
        report.join("report.html").display(),
        data.join("commands.sh").display()
    );
    Ok(())
}

/// Curates the teacher's successful episodes and trains only their steps that made progress, so
/// the noisy expert's random detours are not imitated (in the `full` style, which packs an episode
/// as one conversation, they stay as context with weight 0). The calls are rendered with the
/// `base` variant's templates: the students' prompt style.
const CURATE_SPEC: &str = r#"name = "babyai-demo"
version = 1
function = "babyai::act"
variant = "base"
validation_fraction = 0.1
seed = 7
packing = "auto"

[selection]
type = "boolean_metric"
metric = "success"
value = true

[steps]
type = "boolean_metric"
metric = "progress"
value = true

[weighting]
type = "sft"
"#;

fn store_table(store: &Path) -> toml::Table {
    let mut table = toml::Table::new();
    table.insert("path".into(), store.display().to_string().into());
    table.insert("write_mode".into(), "durable".into());
    table
}

/// `teacher` (a gateway config, possibly empty) plus one variant of `babyai::act` per student
/// model in the `prompt` style, each a local model priced per hour of measured compute, recording
/// into `store`.
fn gateway_config_for(
    teacher: toml::Table,
    store: &Path,
    students: &[(&str, &Path)],
    prompt: &str,
    price_per_hour: f64,
) -> Result<String> {
    let env = make_env("babyai", EnvOptions::default())?;
    // An action is two or three tokens and its end: a short cap keeps an untrained model from
    // rambling. Students sample at temperature 1: a student that sees only the current observation
    // and decodes greedily repeats itself where the view does not change (measured: 6 of 28 test
    // tasks greedy against 12 of the same at temperature 1, README, Demo).
    let params =
        VariantParams { temperature: Some(1.0), top_p: None, max_tokens: Some(4), prompt: Some(prompt.to_string()) };
    let mut config = teacher;
    for (name, model_path) in students {
        let text = env.spec().gateway_config_with(name, name, &params)?;
        let table: toml::Table = text.parse().context("the env's gateway config")?;
        merge(&mut config, table);
        let model: toml::Table = format!(
            "routing = [\"local\"]\nprice = {{ per_hour = {price_per_hour} }}\n[providers.local]\ntype = \"local\"\nmodel = {}\n",
            toml::Value::String(model_path.display().to_string())
        )
        .parse()
        .context("a student's model section")?;
        let models = config.entry("models").or_insert_with(|| toml::Table::new().into());
        if let Some(models) = models.as_table_mut() {
            models.insert(name.to_string(), model.into());
        }
    }
    config.insert("store".into(), store_table(store).into());
    Ok(toml::to_string(&config)?)
}

/// Merges `other` into `into`, table by table.
fn merge(into: &mut toml::Table, other: toml::Table) {
    for (key, value) in other {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}
