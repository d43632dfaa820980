//! `apprentice curate`: a dataset spec in, training files and a summary out.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use apprentice_core::config::WriteMode;
use apprentice_core::Config;
use apprentice_curate::{Curator, Dataset, DatasetSpec, MetricInfo, Metrics, TokenCount};
use apprentice_envs::{make_env, EnvOptions};
use apprentice_store::{DatasetWrite, SqliteStore, Store};

#[derive(clap::Args)]
pub struct CurateArgs {
    /// The dataset spec (TOML): name, version, function, selection, variant, weighting,
    /// validation_fraction, seed, max_per_task.
    #[arg(long)]
    spec: PathBuf,
    /// Take metrics, functions and templates from this gateway config (and its store)...
    #[arg(long)]
    config: Option<PathBuf>,
    /// ...or from a shipped env (`babyai`), for stores filled by `apprentice rollout`.
    #[arg(long)]
    env: Option<String>,
    /// The store to read; defaults to the config's.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Count tokens as this student model (a cached name, a GGUF or an HF folder) will see them:
    /// its tokenizer and chat template, with the loss mask.
    #[arg(long)]
    student: Option<String>,
    /// Files go to OUT/NAME-vVERSION/.
    #[arg(long, default_value = "datasets")]
    out: PathBuf,
}

pub async fn run(args: CurateArgs) -> anyhow::Result<()> {
    let spec = DatasetSpec::load(&args.spec)?;
    match (&args.config, &args.env) {
        (Some(config), None) => {
            let config = Config::load(config)?;
            let store = open(args.store.as_ref().unwrap_or(&config.store.path)).await?;
            let dataset = Curator::from_config(&store, &config).curate(&spec).await?;
            save(&store, &args, dataset).await
        }
        (None, Some(env)) => {
            let store = open(args.store.as_ref().context("with --env, name the store with --store")?).await?;
            let env = make_env(env, EnvOptions::default())?;
            let metrics: Metrics = env
                .spec()
                .metrics
                .iter()
                .map(|m| (m.name.clone(), MetricInfo { level: m.level, optimize: m.optimize }))
                .collect();
            let function = env.spec().functions.iter().find(|f| f.name == spec.function).cloned();
            let dataset = match (&spec.variant, function) {
                (Some(variant), Some(function)) => {
                    let templates = function.templates(variant)?;
                    let functions = BTreeMap::from([(function.name.clone(), function.config(&env.spec().tools)?)]);
                    Curator::new(&store, metrics).with_templates(&templates, &functions).curate(&spec).await?
                }
                _ => Curator::new(&store, metrics).curate(&spec).await?,
            };
            save(&store, &args, dataset).await
        }
        _ => bail!("give exactly one of --config (a gateway config) or --env (a shipped env)"),
    }
}

async fn open(path: &std::path::Path) -> anyhow::Result<SqliteStore> {
    SqliteStore::open(path, WriteMode::Durable).await.with_context(|| format!("cannot open store {}", path.display()))
}

/// Records the dataset in the store (refused if its name and version already hold other content),
/// then writes the files, so files on disk always match a record.
async fn save(store: &SqliteStore, args: &CurateArgs, mut dataset: Dataset) -> anyhow::Result<()> {
    let exported = dataset.export()?;
    if let Some(student) = &args.student {
        dataset.summary.tokens = count_tokens(student, &exported)?;
    }
    let dataset = &dataset;
    let out = &args.out;
    let files: Vec<_> = exported.iter().map(|(file, _)| file.clone()).collect();
    let record = dataset.record(&files)?;
    let status = match store.record_dataset(&record).await? {
        DatasetWrite::Created => "recorded in the store".to_owned(),
        DatasetWrite::Unchanged(existing) => format!(
            "identical to the recorded one of {} (same spec, same content)",
            existing.created_at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    };
    let dir = out.join(format!("{}-v{}", dataset.spec.name, dataset.spec.version));
    dataset.write_exported(&dir, exported)?;
    print_summary(dataset, &record.content_hash, &status);
    println!("written to {}", dir.display());
    Ok(())
}

fn count_tokens(
    student: &str,
    exported: &[(apprentice_curate::DatasetFile, String)],
) -> anyhow::Result<BTreeMap<String, TokenCount>> {
    let path = apprentice_model::resolve_model(student)?;
    let tokenizer = apprentice_model::Tokenizer::from_path(&path)?;
    let template = apprentice_model::ChatTemplate::from_tokenizer(&tokenizer)?;
    let mut counts = BTreeMap::new();
    for (file, jsonl) in exported {
        let mut count = TokenCount { model: student.to_owned(), tokens: 0, trained_tokens: 0 };
        for (index, line) in jsonl.lines().enumerate() {
            let record: serde_json::Value = serde_json::from_str(line)?;
            let rendered = template
                .render_record(&tokenizer, &record)
                .with_context(|| format!("{} line {}: cannot render for {student}", file.file, index + 1))?;
            count.tokens += rendered.input_ids.len();
            count.trained_tokens += rendered.trained_tokens();
        }
        counts.insert(file.file.clone(), count);
    }
    Ok(counts)
}

fn print_summary(dataset: &Dataset, content_hash: &str, status: &str) {
    let s = &dataset.summary;
    println!("dataset {} v{} from function `{}`", dataset.spec.name, dataset.spec.version, dataset.spec.function);
    println!("{:<28} {:>10}", "inferences read", s.inferences);
    println!("{:<28} {:>10}", "selected", s.selected);
    println!("{:<28} {:>10}", "outputs from demonstrations", s.demonstrations);
    println!("{:<28} {:>10}", "dropped: invalid json", s.dropped_invalid_json);
    println!("{:<28} {:>10}", "dropped: duplicates", s.dropped_duplicates);
    println!("{:<28} {:>10}", "dropped: over task cap", s.dropped_over_task_cap);
    println!("{:<28} {:>10}", "dropped: no quality weight", s.dropped_no_weight);
    println!("{:<28} {:>10}", "steps kept as context only", s.masked_steps);
    println!(
        "{:<28} {:>10} -> {} ({} episodes packed; ~{} -> ~{} words of text)",
        "examples before -> after packing",
        s.examples_before_packing,
        s.examples_after_packing,
        s.packed_episodes,
        s.approx_tokens_per_inference,
        s.approx_tokens_packed
    );
    println!("{:<28} {:>10} ({} episodes)", "train examples", s.train_examples, s.train_episodes);
    println!("{:<28} {:>10} ({} episodes)", "validation examples", s.validation_examples, s.validation_episodes);
    let bins: Vec<String> = s
        .weight_histogram
        .iter()
        .map(|b| {
            if b.from == b.to {
                format!("{:.3}: {}", b.from, b.examples)
            } else {
                format!("[{:.3}, {:.3}): {}", b.from, b.to, b.examples)
            }
        })
        .collect();
    println!("{:<28} {}", "example weights", bins.join(", "));
    for (file, count) in &s.tokens {
        println!(
            "{:<28} {} tokens, {} trained ({})",
            format!("tokens: {file}"),
            count.tokens,
            count.trained_tokens,
            count.model
        );
    }
    println!("{:<28} {}", "content hash", content_hash);
    println!("{:<28} {}", "store", status);
}

#[derive(clap::Args)]
pub struct BenchCurateArgs {
    #[arg(long, default_value_t = 50_000)]
    episodes: usize,
    #[arg(long, default_value_t = 20)]
    steps_per_episode: usize,
    /// Keep the filled store here and reuse it on the next run (filled only when it is empty).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn bench(args: BenchCurateArgs) -> anyhow::Result<()> {
    use apprentice_curate::bench::{fill_store, run_curate_bench, CurateBenchOptions};
    let scratch = tempfile::tempdir().context("cannot create a scratch folder for the bench")?;
    let store_path = args.store.clone().unwrap_or_else(|| scratch.path().join("bench.db"));
    let store = SqliteStore::open(&store_path, WriteMode::Async).await?;
    let filled = store.count_inferences().await? > 0;
    let options =
        CurateBenchOptions { episodes: args.episodes, steps_per_episode: args.steps_per_episode, ..Default::default() };
    let progress = indicatif::ProgressBar::new(options.episodes as u64).with_style(
        indicatif::ProgressStyle::with_template("filling the store {bar:40} {pos}/{len} episodes ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    if !filled {
        fill_store(&store, &options, |episodes| progress.set_position(episodes as u64)).await?;
    }
    progress.finish_and_clear();
    let fill = started.elapsed();
    let report = run_curate_bench(&store, &store_path, &options, fill, &scratch.path().join("out")).await?;
    println!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
