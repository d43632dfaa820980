//! Curation: from a function's recorded inferences and feedback to a weighted, reproducible
//! training dataset.
//!
//! A [`DatasetSpec`] names the function, a [`Selection`] over its inferences, an optional step
//! selection within the kept episodes, the variant whose templates render the examples (or none,
//! to replay what was sent), a [`Weighting`], the [`Packing`] and the hygiene settings.
//! [`Curator::curate`] loads the function's history from the store once, selects, builds
//! OpenAI-chat [`Example`]s, cleans, weights, packs each episode that is one growing conversation
//! into a single multi-turn example (per-message `weight` 1 on trained turns, 0 on context) and
//! splits them by episode; [`export`] turns them into JSONL with a content hash, so a rerun can be
//! checked byte for byte.

pub mod bench;
mod dataset;
mod example;
pub mod export;
mod history;
mod packing;
mod selection;
mod split;
mod weights;

use std::collections::BTreeMap;

use apprentice_core::config::Optimize;
use apprentice_core::{Config, MetricLevel};
use uuid::Uuid;

pub use dataset::{Curator, Dataset, DatasetSpec, Summary, TokenCount, WeightBin};
pub use example::Example;
pub use export::{content_hash, dataset_hash, to_jsonl, DatasetFile, Exported, DATASET_FILES};
pub use history::History;
pub use packing::Packing;
pub use selection::{Comparison, Selection};
pub use weights::Weighting;

/// What curation needs to know about a metric: where its feedback is attached, and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricInfo {
    pub level: MetricLevel,
    pub optimize: Optimize,
}

/// The metrics a selection or weighting may name.
pub type Metrics = BTreeMap<String, MetricInfo>;

/// The metrics declared in a configuration's `[metrics]`.
pub fn metrics_from_config(config: &Config) -> Metrics {
    config.metrics.iter().map(|(name, m)| (name.clone(), MetricInfo { level: m.level, optimize: m.optimize })).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CurateError {
    #[error(transparent)]
    Store(#[from] apprentice_store::StoreError),
    #[error("unknown metric `{0}`: it is not declared in [metrics] (or in the metric levels given)")]
    UnknownMetric(String),
    #[error("unknown function `{0}`: it is not in the configuration")]
    UnknownFunction(String),
    #[error("function `{0}` has no recorded inferences")]
    NoInferences(String),
    #[error("invalid selection: {0}")]
    InvalidSelection(String),
    #[error("invalid dataset spec: {0}")]
    InvalidSpec(String),
    /// A dataset spec file that cannot be read or does not parse; names the file, line and key.
    #[error("{file}{}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default(), if key.is_empty() { String::new() } else { format!(": `{key}`") })]
    SpecFile { file: std::path::PathBuf, line: Option<usize>, key: String, message: String },
    #[error("cannot re-render with variant `{variant}`: no templates were given to the curator")]
    NoTemplates { variant: String },
    #[error("inference {inference}: cannot re-render with variant `{variant}`: {source}")]
    Render {
        inference: Uuid,
        variant: String,
        #[source]
        source: apprentice_core::render::RenderError,
    },
    #[error("{}: {message}", path.display())]
    Io { path: std::path::PathBuf, message: String },
    #[error("inference {inference}: {message}")]
    Unsupported { inference: Uuid, message: String },
    #[error("inference {inference}: quality metric `{metric}` is {value}, but SFT(Q) weights must not be negative")]
    NegativeQuality { inference: Uuid, metric: String, value: f64 },
}
