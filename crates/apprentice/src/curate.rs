//! `apprentice curate`: a dataset spec in, training files and a summary out.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use apprentice_core::config::WriteMode;
use apprentice_core::Config;
use apprentice_curate::{Curator, Dataset, DatasetSpec, MetricInfo, Metrics};
use apprentice_envs::{make_env, EnvOptions};
use apprentice_store::SqliteStore;
use serde_json::json;

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
    /// Files go to OUT/NAME-vVERSION/.
    #[arg(long, default_value = "datasets")]
    out: PathBuf,
}

pub async fn run(args: CurateArgs) -> anyhow::Result<()> {
    let spec = DatasetSpec::load(&args.spec)?;
    let dataset = match (&args.config, &args.env) {
        (Some(config), None) => {
            let config = Config::load(config)?;
            let store = open(args.store.as_ref().unwrap_or(&config.store.path)).await?;
            Curator::from_config(&store, &config).curate(&spec).await?
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
            match (&spec.variant, function) {
                (Some(variant), Some(function)) => {
                    let templates = function.templates(variant)?;
                    let functions = BTreeMap::from([(function.name.clone(), function.config(&env.spec().tools)?)]);
                    Curator::new(&store, metrics).with_templates(&templates, &functions).curate(&spec).await?
                }
                _ => Curator::new(&store, metrics).curate(&spec).await?,
            }
        }
        _ => bail!("give exactly one of --config (a gateway config) or --env (a shipped env)"),
    };
    write(&args.out, &dataset)
}

async fn open(path: &std::path::Path) -> anyhow::Result<SqliteStore> {
    SqliteStore::open(path, WriteMode::Durable).await.with_context(|| format!("cannot open store {}", path.display()))
}

fn write(out: &std::path::Path, dataset: &Dataset) -> anyhow::Result<()> {
    let dir = out.join(format!("{}-v{}", dataset.spec.name, dataset.spec.version));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = serde_json::Map::new();
    for (name, examples) in [("train", &dataset.train), ("validation", &dataset.validation)] {
        for weighted in [false, true] {
            let exported = apprentice_curate::Exported::new(examples, weighted)?;
            let file = if weighted { format!("{name}.weighted.jsonl") } else { format!("{name}.jsonl") };
            std::fs::write(dir.join(&file), &exported.jsonl).with_context(|| format!("cannot write {file}"))?;
            files.insert(file, json!({"examples": examples.len(), "hash": exported.hash}));
        }
    }
    let summary = json!({"spec": dataset.spec, "summary": dataset.summary, "files": files});
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
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
    println!("written to {}", dir.display());
    Ok(())
}
