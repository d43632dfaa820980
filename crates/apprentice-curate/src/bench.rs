//! `apprentice bench curate`: how long curation takes over a large history.
//!
//! The store is filled with synthetic agent traffic shaped like one BabyAI step per inference (a
//! system message with the mission, one user message with the observation, a one-word action),
//! grouped into episodes with an episode-level `success` and an inference-level `progress`. The
//! timed part is what `apprentice curate` does: curate by the episode metric and export the train
//! and validation files, with and without weights.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use apprentice_core::config::Optimize;
use apprentice_core::content::{InputMessage, Role, SystemInput};
use apprentice_core::{
    new_id, ContentBlock, FeedbackRecord, FeedbackValue, InferenceOutput, InferenceRecord, Input, MetricLevel,
    RenderedBlock, RenderedMessage, RenderedRequest, Usage,
};
use apprentice_store::{Record, SqliteStore, Store};
use serde::Serialize;
use serde_json::json;

use crate::{CurateError, Curator, DatasetSpec, MetricInfo, Metrics, Selection};

pub const BENCH_FUNCTION: &str = "bench::act";

#[derive(Debug, Clone, Serialize)]
pub struct CurateBenchOptions {
    pub episodes: usize,
    pub steps_per_episode: usize,
    /// Share of episodes whose `success` is true.
    pub success_rate: f64,
    pub seed: u64,
}

impl Default for CurateBenchOptions {
    fn default() -> Self {
        Self { episodes: 50_000, steps_per_episode: 20, success_rate: 0.6, seed: 7 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CurateBenchReport {
    pub options: CurateBenchOptions,
    pub inferences: usize,
    pub store_bytes: u64,
    pub fill_s: f64,
    pub curate_s: f64,
    pub export_s: f64,
    pub total_s: f64,
    pub selected: usize,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub exported_bytes: usize,
    pub target_s: f64,
}

impl CurateBenchReport {
    pub fn met(&self) -> bool {
        self.total_s < self.target_s
    }

    pub fn table(&self) -> String {
        let rate =
            |s: f64| if s > 0.0 { format!("{:.0} inferences/s", self.inferences as f64 / s) } else { "-".into() };
        let mut out = String::new();
        out.push_str(&format!(
            "history: {} inferences in {} episodes ({} steps each), store {:.0} MB, filled in {:.1} s\n",
            self.inferences,
            self.options.episodes,
            self.options.steps_per_episode,
            self.store_bytes as f64 / 1e6,
            self.fill_s
        ));
        out.push_str(&format!("{:<34} {:>9} {:>24}\n", "phase", "seconds", "throughput"));
        out.push_str(&format!(
            "{:<34} {:>9.2} {:>24}\n",
            "load, select, build, weight, split",
            self.curate_s,
            rate(self.curate_s)
        ));
        out.push_str(&format!(
            "{:<34} {:>9.2} {:>24}\n",
            "export 4 JSONL files + hashes",
            self.export_s,
            format!("{:.0} MB/s", self.exported_bytes as f64 / 1e6 / self.export_s.max(1e-9))
        ));
        out.push_str(&format!("{:<34} {:>9.2} {:>24}\n", "total", self.total_s, rate(self.total_s)));
        out.push_str(&format!(
            "selected {} (success = true), train {} / validation {} examples, {:.0} MB written\n",
            self.selected,
            self.train_examples,
            self.validation_examples,
            self.exported_bytes as f64 / 1e6
        ));
        out.push_str(&format!(
            "target: total under {:.0} s -> {}\n",
            self.target_s,
            if self.met() { "met" } else { "MISSED" }
        ));
        out
    }
}

/// The metrics the synthetic history carries.
pub fn bench_metrics() -> Metrics {
    Metrics::from([
        ("success".to_owned(), MetricInfo { level: MetricLevel::Episode, optimize: Optimize::Max }),
        ("progress".to_owned(), MetricInfo { level: MetricLevel::Inference, optimize: Optimize::Max }),
    ])
}

/// Writes the synthetic history into `store`, in transactions of a few thousand records;
/// `on_episodes` is told how many episodes are written so far.
pub async fn fill_store(
    store: &SqliteStore,
    options: &CurateBenchOptions,
    mut on_episodes: impl FnMut(usize),
) -> Result<(), CurateError> {
    let mut rng = options.seed ^ 0x9e37_79b9_7f4a_7c15;
    let actions = ["forward", "left", "right", "pickup", "drop", "toggle", "done"];
    let mut batch = Vec::new();
    for episode in 0..options.episodes {
        let episode_id = new_id();
        let task = format!("family{}/{}", episode % 5, episode);
        let mission = format!(
            "go to the {} {}",
            ["red", "green", "blue", "purple"][episode % 4],
            ["ball", "key", "box"][episode % 3]
        );
        for step in 0..options.steps_per_episode {
            let observation = format!(
                "step {step}: you see a wall {} steps forward, a {} key {} steps left and {} steps forward, \
                 and a grey door {} steps right. You carry nothing.",
                next(&mut rng) % 6,
                ["red", "green", "blue"][(next(&mut rng) % 3) as usize],
                next(&mut rng) % 4,
                next(&mut rng) % 5,
                next(&mut rng) % 7,
            );
            let action = actions[(next(&mut rng) % actions.len() as u64) as usize];
            let inference = synthetic_inference(episode_id, &task, &mission, &observation, action);
            batch.push(Record::Feedback(Box::new(FeedbackRecord {
                id: new_id(),
                metric_name: "progress".into(),
                target_level: MetricLevel::Inference,
                target_id: inference.id,
                value: FeedbackValue::Float((next(&mut rng) % 3) as f64 - 1.0),
                tags: BTreeMap::new(),
                created_at: chrono::Utc::now(),
            })));
            batch.insert(batch.len() - 1, Record::Inference(Box::new(inference)));
        }
        let success = (next(&mut rng) % 10_000) as f64 / 10_000.0 < options.success_rate;
        batch.push(Record::Feedback(Box::new(FeedbackRecord {
            id: new_id(),
            metric_name: "success".into(),
            target_level: MetricLevel::Episode,
            target_id: episode_id,
            value: FeedbackValue::Boolean(success),
            tags: BTreeMap::new(),
            created_at: chrono::Utc::now(),
        })));
        if batch.len() >= 20_000 {
            store.write_batch(&batch).await?;
            batch.clear();
            on_episodes(episode + 1);
        }
    }
    store.write_batch(&batch).await?;
    // A store at rest has its WAL checkpointed; timing reads against a 1.5 GB WAL would measure
    // the bulk load, not curation.
    store.checkpoint().await?;
    on_episodes(options.episodes);
    Ok(())
}

fn synthetic_inference(
    episode_id: uuid::Uuid,
    task: &str,
    mission: &str,
    observation: &str,
    action: &str,
) -> InferenceRecord {
    let system_text = format!(
        "You are an agent in a grid world. Your mission: {mission}. Answer with exactly one action: \
         forward, left, right, pickup, drop, toggle or done."
    );
    InferenceRecord {
        id: new_id(),
        function_name: BENCH_FUNCTION.into(),
        variant_name: "teacher".into(),
        episode_id,
        input: Input {
            system: Some(SystemInput::Arguments(json!({"mission": mission}).as_object().cloned().unwrap_or_default())),
            messages: vec![InputMessage {
                role: Role::User,
                content: vec![ContentBlock::Template {
                    name: "user".into(),
                    arguments: json!({"observation": observation}),
                }],
            }],
        },
        rendered: RenderedRequest {
            system: Some(system_text),
            messages: vec![RenderedMessage {
                role: Role::User,
                content: vec![RenderedBlock::Text { text: observation.to_owned() }],
            }],
            tools: Vec::new(),
        },
        output: InferenceOutput::Chat { content: vec![ContentBlock::Text { text: action.to_owned() }] },
        model_name: "openai::gpt-4.1".into(),
        provider_name: "openai".into(),
        usage: Usage { input_tokens: 90, output_tokens: 1 },
        latency_ms: 420.0,
        ttft_ms: None,
        cost: Some(0.000_19),
        tags: BTreeMap::from([("task".to_owned(), task.to_owned())]),
        params: json!({"temperature": 0.7}),
        finish_reason: Some("stop".into()),
        created_at: chrono::Utc::now(),
    }
}

/// SplitMix64: the bench history is the same for the same seed.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Curates the filled store by `success = true` and exports into `out`; returns the report.
pub async fn run_curate_bench(
    store: &SqliteStore,
    store_path: &Path,
    options: &CurateBenchOptions,
    fill: Duration,
    out: &Path,
) -> Result<CurateBenchReport, CurateError> {
    let spec = DatasetSpec {
        name: "bench".into(),
        version: 1,
        function: BENCH_FUNCTION.into(),
        selection: Some(Selection::BooleanMetric { metric: "success".into(), value: true }),
        variant: None,
        weighting: Default::default(),
        validation_fraction: 0.1,
        seed: 0,
        max_per_task: None,
        packing: Default::default(),
        steps: None,
    };
    let started = Instant::now();
    let dataset = Curator::new(store, bench_metrics()).curate(&spec).await?;
    let curated = Instant::now();
    let files = dataset.write_files(out)?;
    let exported = Instant::now();
    let store_bytes = ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", store_path.display())).ok())
        .map(|m| m.len())
        .sum();
    Ok(CurateBenchReport {
        options: options.clone(),
        inferences: dataset.summary.inferences,
        store_bytes,
        fill_s: fill.as_secs_f64(),
        curate_s: (curated - started).as_secs_f64(),
        export_s: (exported - curated).as_secs_f64(),
        total_s: (exported - started).as_secs_f64(),
        selected: dataset.summary.selected,
        train_examples: dataset.summary.train_examples,
        validation_examples: dataset.summary.validation_examples,
        exported_bytes: files.iter().map(|f| f.bytes).sum(),
        target_s: 10.0,
    })
}
