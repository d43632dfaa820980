//! The curation pipeline: load a function's history, select episodes and steps, build examples
//! (re-rendered or replayed, demonstrations replacing outputs), clean, cap, weight, pack episodes
//! into conversations, split by episode.

use std::collections::{BTreeMap, HashMap, HashSet};

use apprentice_core::config::FunctionConfig;
use apprentice_core::render::render_input;
use apprentice_core::templates::Templates;
use apprentice_core::{Config, InferenceOutput, MetricLevel};
use apprentice_store::{InferenceBody, InferenceHead, SqliteStore};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::example::{openai_messages, openai_tools, Example};
use crate::export::Exported;
use crate::history::History;
use crate::packing::{approx_tokens, mark_context_turns, pack, Packing};
use crate::selection::Selection;
use crate::split::in_validation;
use crate::weights::{assign, Weighting};
use crate::{metrics_from_config, CurateError, Metrics};

/// What to curate. Deserializable so it can come from TOML or the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub name: String,
    #[serde(default = "first_version")]
    pub version: u32,
    pub function: String,
    /// No selection keeps every inference of the function.
    #[serde(default)]
    pub selection: Option<Selection>,
    /// Re-render inputs with this variant's templates; without it, replay what was sent.
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub weighting: Weighting,
    /// Share of episodes held out for validation, in [0, 1].
    #[serde(default)]
    pub validation_fraction: f64,
    #[serde(default)]
    pub seed: u64,
    /// At most this many examples per task (tag `task`), the oldest first.
    #[serde(default)]
    pub max_per_task: Option<usize>,
    /// Whether an episode whose inferences extend one another becomes one multi-turn example.
    #[serde(default)]
    pub packing: Packing,
    /// Step-level curation within the selected episodes: a step failing it is not trained on (its
    /// example is dropped; in a packed episode its assistant turn stays as context with weight 0).
    #[serde(default)]
    pub steps: Option<Selection>,
}

impl DatasetSpec {
    /// Reads a dataset spec from a TOML file; errors name the file, the line and the key path.
    pub fn load(path: &std::path::Path) -> Result<Self, CurateError> {
        let error =
            |line, key: String, message: String| CurateError::SpecFile { file: path.to_path_buf(), line, key, message };
        let text =
            std::fs::read_to_string(path).map_err(|e| error(None, String::new(), format!("cannot read: {e}")))?;
        serde_path_to_error::deserialize::<_, DatasetSpec>(toml::Deserializer::new(&text)).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.span().map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            error(line, if key == "." { String::new() } else { key }, inner.message().to_string())
        })
    }
}

fn first_version() -> u32 {
    1
}

/// What each stage did, for the summary a user reads before training.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub inferences: usize,
    pub selected: usize,
    pub demonstrations: usize,
    pub dropped_invalid_json: usize,
    pub dropped_duplicates: usize,
    pub dropped_over_task_cap: usize,
    pub dropped_no_weight: usize,
    /// Selected steps that failed the `steps` selection: context only, or dropped.
    pub masked_steps: usize,
    /// Examples (train and validation) before and after packing episodes into conversations.
    pub examples_before_packing: usize,
    pub examples_after_packing: usize,
    pub packed_episodes: usize,
    /// Whitespace-separated words of all message contents, a stand-in for tokens, one example per
    /// inference against packed.
    pub approx_tokens_per_inference: usize,
    pub approx_tokens_packed: usize,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub train_episodes: usize,
    pub validation_episodes: usize,
    /// Examples per task (tag `task`; untagged examples under ""), train and validation.
    pub train_per_task: BTreeMap<String, usize>,
    pub validation_per_task: BTreeMap<String, usize>,
    /// Example weights of the train and validation examples together.
    pub weight_histogram: Vec<WeightBin>,
    /// Per exported file, tokens as the student model will see them, when a student was named
    /// (curation itself knows no tokenizer).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, TokenCount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenCount {
    /// The model whose tokenizer and chat template rendered the examples.
    pub model: String,
    pub tokens: usize,
    /// Tokens with a loss weight above 0.
    pub trained_tokens: usize,
}

/// Examples whose weight lies in `[from, to)`; the last bin includes `to`. With few distinct
/// weights (SFT, stratified SFT(Q)) every bin is one value and `from == to`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightBin {
    pub from: f64,
    pub to: f64,
    pub examples: usize,
}

const HISTOGRAM_BINS: usize = 10;

pub(crate) fn weight_histogram(weights: impl Iterator<Item = f64>) -> Vec<WeightBin> {
    let mut weights: Vec<f64> = weights.collect();
    if weights.is_empty() {
        return Vec::new();
    }
    weights.sort_by(f64::total_cmp);
    let mut distinct = weights.clone();
    distinct.dedup();
    if distinct.len() <= HISTOGRAM_BINS {
        return distinct
            .iter()
            .map(|&w| WeightBin { from: w, to: w, examples: weights.iter().filter(|&&x| x == w).count() })
            .collect();
    }
    let (lo, hi) = (weights[0], weights[weights.len() - 1]);
    let width = (hi - lo) / HISTOGRAM_BINS as f64;
    let mut bins: Vec<WeightBin> = (0..HISTOGRAM_BINS)
        .map(|i| WeightBin { from: lo + width * i as f64, to: lo + width * (i + 1) as f64, examples: 0 })
        .collect();
    bins[HISTOGRAM_BINS - 1].to = hi;
    for w in weights {
        let index = (((w - lo) / width) as usize).min(HISTOGRAM_BINS - 1);
        bins[index].examples += 1;
    }
    bins
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub spec: DatasetSpec,
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub summary: Summary,
}

impl Dataset {
    pub fn export_train(&self, weighted: bool) -> Result<Exported, CurateError> {
        Exported::new(&self.train, weighted)
    }

    pub fn export_validation(&self, weighted: bool) -> Result<Exported, CurateError> {
        Exported::new(&self.validation, weighted)
    }
}

/// One inference's contribution, before duplicates and task caps are applied.
enum Built {
    InvalidJson,
    Example(Box<Example>, [u8; 32]),
}

/// Curates from one store. Built from a [`Config`] (metric levels, templates, functions), or from
/// explicit metric levels when there is no configuration at hand (then only replay is possible
/// unless templates are added with [`Curator::with_templates`]).
pub struct Curator<'a> {
    store: &'a SqliteStore,
    metrics: Metrics,
    templates: Option<&'a Templates>,
    functions: Option<&'a BTreeMap<String, FunctionConfig>>,
}

impl<'a> Curator<'a> {
    pub fn new(store: &'a SqliteStore, metrics: Metrics) -> Self {
        Self { store, metrics, templates: None, functions: None }
    }

    pub fn from_config(store: &'a SqliteStore, config: &'a Config) -> Self {
        Self {
            store,
            metrics: metrics_from_config(config),
            templates: Some(&config.templates),
            functions: Some(&config.functions),
        }
    }

    pub fn with_templates(mut self, templates: &'a Templates, functions: &'a BTreeMap<String, FunctionConfig>) -> Self {
        self.templates = Some(templates);
        self.functions = Some(functions);
        self
    }

    pub async fn curate(&self, spec: &DatasetSpec) -> Result<Dataset, CurateError> {
        if !(0.0..=1.0).contains(&spec.validation_fraction) {
            return Err(CurateError::InvalidSpec(format!(
                "validation_fraction must be in [0, 1], got {}",
                spec.validation_fraction
            )));
        }
        let function = match self.functions {
            Some(functions) => {
                Some(functions.get(&spec.function).ok_or_else(|| CurateError::UnknownFunction(spec.function.clone()))?)
            }
            None => None,
        };
        if let Some(metric) = spec.weighting.metric() {
            let info = self.metrics.get(metric).ok_or_else(|| CurateError::UnknownMetric(metric.to_owned()))?;
            if matches!(spec.weighting, Weighting::Stratified { .. }) && info.level != MetricLevel::Episode {
                return Err(CurateError::InvalidSpec(format!(
                    "stratified weighting ranks episodes by an episode-level metric; `{metric}` is inference-level"
                )));
            }
        }
        let mut metrics: Vec<String> = Vec::new();
        for name in spec.selection.iter().chain(&spec.steps).flat_map(Selection::metrics) {
            if !metrics.contains(&name) {
                metrics.push(name);
            }
        }
        metrics.extend(spec.weighting.metric().map(str::to_owned));
        let started = std::time::Instant::now();
        let history = History::load(self.store, &spec.function, &metrics).await?;
        tracing::debug!(inferences = history.heads.len(), elapsed = ?started.elapsed(), "history loaded");
        let mask = match &spec.selection {
            Some(selection) => selection.evaluate(&history, &self.metrics)?,
            None => vec![true; history.heads.len()],
        };
        let step_mask = match &spec.steps {
            Some(steps) => steps.evaluate(&history, &self.metrics)?,
            None => vec![true; history.heads.len()],
        };
        let mut summary = Summary { inferences: history.heads.len(), ..Default::default() };

        // A step failing `steps` is not trained on; a later step's prompt still holds its output,
        // so packing keeps it as context.
        let mut trained = Vec::new();
        for ((head, keep), step_ok) in history.heads.iter().zip(&mask).zip(&step_mask) {
            if *keep {
                summary.selected += 1;
                if *step_ok {
                    trained.push(head);
                } else {
                    summary.masked_steps += 1;
                }
            }
        }
        let ids: Vec<Uuid> = trained.iter().map(|h| h.id).collect();
        let bodies = self.store.inference_bodies(&spec.function, &ids, spec.variant.is_some()).await?;
        tracing::debug!(selected = ids.len(), elapsed = ?started.elapsed(), "selected contents loaded");
        let heads: HashMap<Uuid, &InferenceHead> = trained.iter().map(|h| (h.id, *h)).collect();

        // Building an example (render, convert, serialize its identity) is independent per
        // inference, so it runs on every core; dropping duplicates and capping tasks depend on
        // order and run after, oldest first.
        let built: Vec<Result<Built, CurateError>> = bodies
            .par_iter()
            .filter_map(|body| heads.get(&body.id).map(|head| (head, body)))
            .map(|(head, body)| {
                let demonstration = history.demonstration(body.id);
                let output = demonstration.unwrap_or(&body.output);
                // An output that failed its schema would teach the model to fail it too.
                if matches!(output, InferenceOutput::Json(json) if json.parsed.is_none()) {
                    return Ok(Built::InvalidJson);
                }
                let example = self.example(spec, function, head, body, output, demonstration.is_some())?;
                // The serialized messages and tools identify an example; their sha256 stands for
                // them, so a million examples need no million strings to compare.
                let mut key = Sha256::new();
                serde_json::to_writer(&mut key, &(&example.messages, &example.tools)).map_err(|e| {
                    CurateError::Unsupported { inference: body.id, message: format!("cannot be written as JSON: {e}") }
                })?;
                Ok(Built::Example(Box::new(example), key.finalize().into()))
            })
            .collect();
        drop(bodies);

        let mut examples = Vec::new();
        let mut seen = HashSet::new();
        let mut per_task: HashMap<Option<String>, usize> = HashMap::new();
        for built in built {
            let (example, key) = match built? {
                Built::InvalidJson => {
                    summary.dropped_invalid_json += 1;
                    continue;
                }
                Built::Example(example, key) => (*example, key),
            };
            // The first (oldest) copy stays.
            if !seen.insert(key) {
                summary.dropped_duplicates += 1;
                continue;
            }
            if let Some(cap) = spec.max_per_task {
                let count = per_task.entry(example.task.clone()).or_default();
                if *count >= cap {
                    summary.dropped_over_task_cap += 1;
                    continue;
                }
                *count += 1;
            }
            summary.demonstrations += usize::from(example.demonstrated);
            examples.push(example);
        }
        drop(seen);

        summary.dropped_no_weight = assign(&spec.weighting, &mut examples, |example| {
            let Some(metric) = spec.weighting.metric() else { return Some(1.0) };
            let info = self.metrics.get(metric)?;
            let target = match info.level {
                MetricLevel::Inference => example.inference_id,
                MetricLevel::Episode => example.episode_id,
            };
            history.scalar(metric, target).map(|s| s.number())
        })?;

        tracing::debug!(examples = examples.len(), elapsed = ?started.elapsed(), "examples built and weighted");
        summary.examples_before_packing = examples.len();
        summary.approx_tokens_per_inference = approx_tokens(&examples);
        if spec.packing == Packing::Auto {
            let packed = pack(examples);
            examples = packed.examples;
            summary.packed_episodes = packed.episodes;
        }
        for example in &mut examples {
            mark_context_turns(example);
        }
        summary.examples_after_packing = examples.len();
        summary.approx_tokens_packed = approx_tokens(&examples);

        tracing::debug!(examples = examples.len(), elapsed = ?started.elapsed(), "packed");
        let (validation, train): (Vec<Example>, Vec<Example>) =
            examples.into_iter().partition(|e| in_validation(spec.seed, e.episode_id, spec.validation_fraction));
        let episodes = |examples: &[Example]| examples.iter().map(|e| e.episode_id).collect::<HashSet<_>>().len();
        summary.train_examples = train.len();
        summary.validation_examples = validation.len();
        summary.train_episodes = episodes(&train);
        summary.validation_episodes = episodes(&validation);
        let per_task = |examples: &[Example]| {
            let mut counts = BTreeMap::new();
            for example in examples {
                *counts.entry(example.task.clone().unwrap_or_default()).or_default() += 1;
            }
            counts
        };
        summary.train_per_task = per_task(&train);
        summary.validation_per_task = per_task(&validation);
        summary.weight_histogram = weight_histogram(train.iter().chain(&validation).map(|e| e.weight));
        Ok(Dataset { spec: spec.clone(), train, validation, summary })
    }

    fn example(
        &self,
        spec: &DatasetSpec,
        function: Option<&FunctionConfig>,
        head: &InferenceHead,
        body: &InferenceBody,
        output: &InferenceOutput,
        demonstrated: bool,
    ) -> Result<Example, CurateError> {
        let rendered = match &spec.variant {
            None => None,
            Some(variant) => {
                let templates = self.templates.ok_or_else(|| CurateError::NoTemplates { variant: variant.clone() })?;
                let input = body.input.as_ref().ok_or_else(|| CurateError::Unsupported {
                    inference: body.id,
                    message: "its structured input was not loaded".into(),
                })?;
                let rendered = render_input(templates, &spec.function, function, variant, input)
                    .map_err(|source| CurateError::Render { inference: body.id, variant: variant.clone(), source })?;
                Some(rendered)
            }
        };
        let request = rendered.as_ref().unwrap_or(&body.rendered);
        let messages = openai_messages(body.id, request.system.as_deref(), &request.messages, output)?;
        Ok(Example {
            messages,
            // Re-rendering does not choose tools; the ones offered when the call was made stay.
            tools: openai_tools(&body.rendered.tools),
            weight: 1.0,
            episode_id: head.episode_id,
            inference_id: head.id,
            inference_ids: vec![head.id],
            task: head.tags.get("task").cloned(),
            demonstrated,
        })
    }
}
