//! Curation over a store filled by the BabyAI noisy expert (ε = 0.5, so some episodes fail), plus
//! synthetic feedback and records where the rollout cannot produce the case.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use apprentice_core::config::WriteMode;
use apprentice_core::{
    new_id, ContentBlock, FeedbackRecord, FeedbackValue, InferenceOutput, InferenceRecord, JsonOutput, MetricLevel,
};
use apprentice_curate::{
    content_hash, Comparison, CurateError, Curator, DatasetSpec, MetricInfo, Metrics, Packing, Selection, Weighting,
};
use apprentice_envs::babyai::{BabyAi, FUNCTION_NAME};
use apprentice_envs::rollout::{rollout, Policy, RolloutOptions, RolloutSummary};
use apprentice_envs::{Env, Split};
use apprentice_store::{InferenceQuery, Record, Recorder, SqliteStore, Store};
use serde_json::json;

const EPISODES: u64 = 40;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    rollout: RolloutSummary,
    inferences: Vec<InferenceRecord>,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("c.db"), WriteMode::Durable).await.unwrap());
        let recorder = Arc::new(Recorder::spawn(store.clone(), WriteMode::Durable, 4096, None));
        let options = RolloutOptions {
            split: Split::Train,
            start_index: 0,
            episodes: EPISODES,
            concurrency: 4,
            seed: 5,
            tags: Default::default(),
        };
        let rollout =
            rollout(BabyAi::new, &Policy::Expert { epsilon: 0.5 }, Some(recorder), &options, |_| {}).await.unwrap();
        let failures = rollout.episodes.iter().filter(|e| !e.success).count();
        assert!(failures > 0 && failures < rollout.episodes.len(), "{}", rollout.table());
        let inferences = store
            .inferences(&InferenceQuery { function_name: Some(FUNCTION_NAME.into()), ..Default::default() })
            .await
            .unwrap();
        Fixture { _dir: dir, store, rollout, inferences }
    }

    fn curator(&self) -> Curator<'_> {
        Curator::new(&self.store, babyai_metrics())
    }

    async fn write(&self, records: Vec<Record>) {
        self.store.write_batch(&records).await.unwrap();
    }

    fn steps_of(&self, episodes: impl Fn(&apprentice_envs::rollout::EpisodeSummary) -> bool) -> usize {
        self.rollout.episodes.iter().filter(|e| episodes(e)).map(|e| e.steps as usize).sum()
    }
}

fn babyai_metrics() -> Metrics {
    BabyAi::new()
        .spec()
        .metrics
        .iter()
        .map(|m| (m.name.clone(), MetricInfo { level: m.level, optimize: m.optimize }))
        .collect()
}

/// One example per inference, as most tests count them; the packing tests ask for `auto`.
fn spec(selection: Option<Selection>) -> DatasetSpec {
    serde_json::from_value::<DatasetSpec>(json!({"name": "t", "function": FUNCTION_NAME}))
        .map(|mut s| {
            s.selection = selection;
            s.packing = Packing::PerInference;
            s
        })
        .unwrap()
}

fn packed_spec(selection: Option<Selection>) -> DatasetSpec {
    let s =
        serde_json::from_value::<DatasetSpec>(json!({"name": "t", "function": FUNCTION_NAME, "selection": selection}))
            .unwrap();
    assert_eq!(s.packing, Packing::Auto, "the default");
    s
}

/// A message without its `weight` key, to compare packed context with per-inference prompts.
fn unweighted(message: &serde_json::Value) -> serde_json::Value {
    let mut message = message.clone();
    message.as_object_mut().unwrap().remove("weight");
    message
}

/// Positions and weights of a packed example's assistant turns.
fn assistant_turns(example: &apprentice_curate::Example) -> Vec<(usize, u64)> {
    example
        .messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m["role"] == "assistant")
        .map(|(i, m)| (i, m["weight"].as_u64().expect("every assistant turn of a packed example is weighted")))
        .collect()
}

fn boolean(metric: &str, value: bool) -> Selection {
    Selection::BooleanMetric { metric: metric.into(), value }
}

fn feedback(level: MetricLevel, target: uuid::Uuid, metric: &str, value: FeedbackValue) -> Record {
    Record::Feedback(Box::new(FeedbackRecord {
        id: new_id(),
        metric_name: metric.into(),
        target_level: level,
        target_id: target,
        value,
        tags: BTreeMap::new(),
        created_at: chrono::Utc::now(),
    }))
}

fn ids(examples: &[apprentice_curate::Example]) -> BTreeSet<uuid::Uuid> {
    examples.iter().map(|e| e.inference_id).collect()
}

fn last_assistant_text(example: &apprentice_curate::Example) -> &str {
    let last = example.messages.last().unwrap();
    assert_eq!(last["role"], "assistant");
    last["content"].as_str().unwrap()
}

#[tokio::test]
async fn no_selection_keeps_every_step_as_a_replayed_example() {
    let f = Fixture::new().await;
    let dataset = f.curator().curate(&spec(None)).await.unwrap();
    assert_eq!(dataset.summary.inferences, f.inferences.len());
    assert_eq!(dataset.train.len() + dataset.summary.dropped_duplicates, f.inferences.len());
    let first = dataset.train.iter().find(|e| e.inference_id == f.inferences[0].id).unwrap();
    assert_eq!(first.messages[0]["role"], "system");
    assert_eq!(first.messages[0]["content"].as_str(), f.inferences[0].rendered.system.as_deref());
    assert!(dataset.train.iter().all(|e| e.weight == 1.0 && e.task.is_some()));
}

#[tokio::test]
async fn episode_level_boolean_metric_keeps_whole_successful_episodes() {
    let f = Fixture::new().await;
    let dataset = f.curator().curate(&spec(Some(boolean("success", true)))).await.unwrap();
    assert_eq!(dataset.summary.selected, f.steps_of(|e| e.success));
    let mut per_episode: HashMap<uuid::Uuid, usize> = HashMap::new();
    for e in &dataset.train {
        *per_episode.entry(e.episode_id).or_default() += 1;
    }
    let successes: HashMap<_, _> = f.rollout.episodes.iter().map(|e| (e.episode_id, e)).collect();
    for (episode, count) in per_episode {
        assert!(successes[&episode].success);
        assert!(count <= successes[&episode].steps as usize);
    }
    let failed = f.curator().curate(&spec(Some(boolean("success", false)))).await.unwrap();
    assert_eq!(failed.summary.selected, f.steps_of(|e| !e.success));
}

#[tokio::test]
async fn inference_level_float_metric_compares_each_step() {
    let f = Fixture::new().await;
    let selection = Selection::FloatMetric { metric: "reward".into(), op: Comparison::Gt, threshold: 0.0 };
    let dataset = f.curator().curate(&spec(Some(selection))).await.unwrap();
    let mut expected = BTreeSet::new();
    for i in &f.inferences {
        let fb = f.store.feedback_for(i.id).await.unwrap();
        if fb.iter().any(|f| f.metric_name == "reward" && matches!(f.value, FeedbackValue::Float(r) if r > 0.0)) {
            expected.insert(i.id);
        }
    }
    assert!(!expected.is_empty());
    assert_eq!(dataset.summary.selected, expected.len());
    assert!(ids(&dataset.train).is_subset(&expected));
}

#[tokio::test]
async fn tag_variant_and_time_range_filters() {
    let f = Fixture::new().await;
    let task = f.rollout.episodes[3].task.clone();
    let by_tag =
        f.curator().curate(&spec(Some(Selection::Tag { key: "task".into(), value: task.clone() }))).await.unwrap();
    assert_eq!(by_tag.summary.selected, f.rollout.episodes[3].steps as usize);
    assert!(by_tag.train.iter().all(|e| e.task.as_deref() == Some(task.as_str())));

    let variant = f.inferences[0].variant_name.clone();
    let same = f.curator().curate(&spec(Some(Selection::Variant { name: variant }))).await.unwrap();
    assert_eq!(same.summary.selected, f.inferences.len());
    let other = f.curator().curate(&spec(Some(Selection::Variant { name: "nope".into() }))).await.unwrap();
    assert_eq!(other.summary.selected, 0);
    assert!(other.train.is_empty());

    let mut times: Vec<_> = f.inferences.iter().map(|i| i.created_at).collect();
    times.sort();
    let middle = times[times.len() / 2];
    let before = f.curator().curate(&spec(Some(Selection::TimeRange { from: None, to: Some(middle) }))).await.unwrap();
    let after = f.curator().curate(&spec(Some(Selection::TimeRange { from: Some(middle), to: None }))).await.unwrap();
    assert_eq!(before.summary.selected, times.iter().filter(|t| **t < middle).count());
    assert_eq!(before.summary.selected + after.summary.selected, f.inferences.len());
}

#[tokio::test]
async fn and_or_not_combine_leaves() {
    let f = Fixture::new().await;
    let progress = boolean("progress", true);
    let success = boolean("success", true);
    let count = |selection: Selection| {
        let curator = f.curator();
        async move { curator.curate(&spec(Some(selection))).await.unwrap().summary.selected }
    };
    let both = count(Selection::And { of: vec![success.clone(), progress.clone()] }).await;
    let either = count(Selection::Or { of: vec![success.clone(), progress.clone()] }).await;
    let s = count(success.clone()).await;
    let p = count(progress.clone()).await;
    assert_eq!(s + p, both + either, "inclusion–exclusion");
    let success_without_progress =
        count(Selection::And { of: vec![success.clone(), Selection::Not { of: Box::new(progress) }] }).await;
    assert_eq!(success_without_progress, s - both);
    assert!(both > 0 && both < s);
}

#[tokio::test]
async fn top_episodes_by_return_overall_and_per_task() {
    let f = Fixture::new().await;
    let top = |k: Option<usize>, percentile: Option<f64>, per_task: bool| Selection::TopEpisodes {
        metric: "return".into(),
        k,
        percentile,
        per_task,
    };
    let dataset = f.curator().curate(&spec(Some(top(Some(5), None, false)))).await.unwrap();
    let kept: BTreeSet<_> = dataset.train.iter().map(|e| e.episode_id).collect();
    let mut ranked: Vec<_> = f.rollout.episodes.iter().collect();
    ranked.sort_by(|a, b| b.episode_return.total_cmp(&a.episode_return).then(a.episode_id.cmp(&b.episode_id)));
    let best: BTreeSet<_> = ranked.iter().take(5).map(|e| e.episode_id).collect();
    assert_eq!(dataset.summary.selected, ranked.iter().take(5).map(|e| e.steps as usize).sum::<usize>());
    assert!(kept.is_subset(&best));

    let quarter = f.curator().curate(&spec(Some(top(None, Some(25.0), false)))).await.unwrap();
    let expected: usize = ranked.iter().take(EPISODES as usize / 4).map(|e| e.steps as usize).sum();
    assert_eq!(quarter.summary.selected, expected);

    // Every BabyAI task here is played once, so the best episode of each task is every episode.
    let per_task = f.curator().curate(&spec(Some(top(Some(1), None, true)))).await.unwrap();
    assert_eq!(per_task.summary.selected, f.inferences.len());

    let bad = f.curator().curate(&spec(Some(top(Some(1), Some(10.0), false)))).await.unwrap_err();
    assert!(matches!(bad, CurateError::InvalidSelection(_)), "{bad}");
    let inference_level =
        Selection::TopEpisodes { metric: "reward".into(), k: Some(1), percentile: None, per_task: false };
    let bad = f.curator().curate(&spec(Some(inference_level))).await.unwrap_err();
    assert!(bad.to_string().contains("inference-level"), "{bad}");
}

#[tokio::test]
async fn demonstrations_replace_outputs_and_invalid_json_is_dropped() {
    let f = Fixture::new().await;
    let targets: Vec<_> = f.inferences.iter().take(3).map(|i| i.id).collect();
    let demo = |text: &str| {
        FeedbackValue::Demonstration(InferenceOutput::Chat { content: vec![ContentBlock::Text { text: text.into() }] })
    };
    let mut records = vec![
        feedback(MetricLevel::Inference, targets[0], "demonstration", demo("an older answer")),
        feedback(MetricLevel::Inference, targets[0], "demonstration", demo("the corrected answer")),
        feedback(MetricLevel::Inference, targets[1], "demonstration", demo("another")),
    ];
    // A demonstration that failed its schema drops the example rather than teaching the failure.
    records.push(feedback(
        MetricLevel::Inference,
        targets[2],
        "demonstration",
        FeedbackValue::Demonstration(InferenceOutput::Json(JsonOutput { raw: "{oops".into(), parsed: None })),
    ));
    f.write(records).await;
    let dataset = f.curator().curate(&spec(None)).await.unwrap();
    let by_id: HashMap<_, _> = dataset.train.iter().map(|e| (e.inference_id, e)).collect();
    assert_eq!(last_assistant_text(by_id[&targets[0]]), "the corrected answer");
    assert!(by_id[&targets[0]].demonstrated);
    assert_eq!(last_assistant_text(by_id[&targets[1]]), "another");
    assert!(!by_id.contains_key(&targets[2]));
    assert_eq!(dataset.summary.demonstrations, 2);
    assert_eq!(dataset.summary.dropped_invalid_json, 1);
}

#[tokio::test]
async fn exact_duplicates_are_dropped_keeping_the_oldest() {
    let f = Fixture::new().await;
    let original = f.inferences[0].clone();
    let copy = InferenceRecord { id: new_id(), ..original.clone() };
    f.write(vec![Record::Inference(Box::new(copy.clone()))]).await;
    let dataset = f.curator().curate(&spec(None)).await.unwrap();
    let kept = ids(&dataset.train);
    assert!(kept.contains(&original.id) && !kept.contains(&copy.id));
    assert!(dataset.summary.dropped_duplicates >= 1);
}

#[tokio::test]
async fn rerendering_with_another_variants_templates_changes_the_prompt() {
    let f = Fixture::new().await;
    let env = BabyAi::new();
    let mut function = env.spec().functions[0].clone();
    let functions: BTreeMap<_, _> = [(function.name.clone(), function.config(&env.spec().tools).unwrap())].into();
    let original = function.templates("same").unwrap();
    function.system_template = format!("ALTERNATIVE SYSTEM. {}", function.system_template);
    function.user_template = format!("ALT USER: {}", function.user_template);
    let alternative = function.templates("alt").unwrap();

    let replayed = f.curator().curate(&spec(None)).await.unwrap();
    let mut same_spec = spec(None);
    same_spec.variant = Some("same".into());
    let same = f.curator().with_templates(&original, &functions).curate(&same_spec).await.unwrap();
    assert_eq!(same.train, replayed.train, "the env's own templates reproduce what was sent");

    let mut alt_spec = spec(None);
    alt_spec.variant = Some("alt".into());
    let alt = f.curator().with_templates(&alternative, &functions).curate(&alt_spec).await.unwrap();
    assert_eq!(alt.train.len(), replayed.train.len());
    for (a, r) in alt.train.iter().zip(&replayed.train) {
        assert_eq!(a.inference_id, r.inference_id);
        assert!(a.messages[0]["content"].as_str().unwrap().starts_with("ALTERNATIVE SYSTEM. "));
        assert!(a.messages[1]["content"].as_str().unwrap().starts_with("ALT USER: "));
        assert_eq!(a.messages.last(), r.messages.last(), "the output is not re-rendered");
    }

    // A variant without templates is a render error naming the inference, not a panic.
    let mut missing = spec(None);
    missing.variant = Some("missing".into());
    let err = f.curator().with_templates(&alternative, &functions).curate(&missing).await.unwrap_err();
    assert!(matches!(err, CurateError::Render { .. }), "{err}");
    let err = f.curator().curate(&alt_spec).await.unwrap_err();
    assert!(matches!(err, CurateError::NoTemplates { .. }), "{err}");
}

#[tokio::test]
async fn split_is_by_episode_and_seeded() {
    let f = Fixture::new().await;
    let mut s = spec(None);
    s.validation_fraction = 0.25;
    s.seed = 42;
    let dataset = f.curator().curate(&s).await.unwrap();
    let train: HashSet<_> = dataset.train.iter().map(|e| e.episode_id).collect();
    let validation: HashSet<_> = dataset.validation.iter().map(|e| e.episode_id).collect();
    assert!(train.is_disjoint(&validation), "no episode on both sides");
    assert!(!train.is_empty() && !validation.is_empty());
    assert_eq!(train.len() + validation.len(), EPISODES as usize);
    assert_eq!(dataset.summary.validation_episodes, validation.len());

    let again = f.curator().curate(&s).await.unwrap();
    assert_eq!(ids(&again.validation), ids(&dataset.validation));
    s.seed = 43;
    let reseeded = f.curator().curate(&s).await.unwrap();
    assert_ne!(ids(&reseeded.validation), ids(&dataset.validation));
}

#[tokio::test]
async fn sft_q_weights_follow_the_return_with_mean_one() {
    let f = Fixture::new().await;
    let mut s = spec(None);
    s.weighting = Weighting::SftQ { metric: "return".into() };
    let dataset = f.curator().curate(&s).await.unwrap();
    let examples = &dataset.train;
    let mean = examples.iter().map(|e| e.weight).sum::<f64>() / examples.len() as f64;
    assert!((mean - 1.0).abs() < 1e-9, "{mean}");
    let returns: HashMap<_, _> = f.rollout.episodes.iter().map(|e| (e.episode_id, e.episode_return)).collect();
    // Failed episodes have return 0 and carry no weight: they are dropped.
    assert!(examples.iter().all(|e| returns[&e.episode_id] > 0.0));
    assert_eq!(dataset.summary.dropped_no_weight, f.steps_of(|e| e.episode_return <= 0.0));
    let ratio = examples[0].weight / returns[&examples[0].episode_id];
    assert!(examples.iter().all(|e| (e.weight / returns[&e.episode_id] - ratio).abs() < 1e-9), "proportional");
}

#[tokio::test]
async fn max_per_task_caps_examples() {
    let f = Fixture::new().await;
    let mut s = spec(None);
    s.max_per_task = Some(2);
    let dataset = f.curator().curate(&s).await.unwrap();
    let mut per_task: HashMap<_, usize> = HashMap::new();
    for e in &dataset.train {
        *per_task.entry(e.task.clone()).or_default() += 1;
    }
    assert!(per_task.values().all(|n| *n <= 2));
    assert_eq!(per_task.len(), EPISODES as usize);
    assert!(dataset.summary.dropped_over_task_cap > 0);
}

#[tokio::test]
async fn two_runs_export_the_same_bytes_and_hash() {
    let f = Fixture::new().await;
    let selection: Selection = serde_json::from_value(json!({
        "type": "or",
        "of": [
            {"type": "boolean_metric", "metric": "success", "value": true},
            {"type": "float_metric", "metric": "reward", "op": "gte", "threshold": 0.5}
        ]
    }))
    .unwrap();
    let mut s = spec(Some(selection));
    s.weighting = Weighting::SftQ { metric: "return".into() };
    s.validation_fraction = 0.2;
    let one = f.curator().curate(&s).await.unwrap();
    let two = f.curator().curate(&s).await.unwrap();
    for weighted in [false, true] {
        let (a, b) = (one.export_train(weighted).unwrap(), two.export_train(weighted).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.hash, content_hash(a.jsonl.as_bytes()));
        assert_eq!(a.jsonl.lines().count(), one.train.len());
        for line in a.jsonl.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(value["messages"].is_array());
            assert_eq!(value.get("weight").is_some(), weighted);
        }
        assert_eq!(one.export_validation(weighted).unwrap(), two.export_validation(weighted).unwrap());
    }
    assert_ne!(one.export_train(false).unwrap().hash, one.export_train(true).unwrap().hash);
}

#[tokio::test]
async fn unknown_metric_and_function_are_clear_errors() {
    let f = Fixture::new().await;
    let err = f.curator().curate(&spec(Some(boolean("succes", true)))).await.unwrap_err();
    assert!(matches!(&err, CurateError::UnknownMetric(m) if m == "succes"), "{err}");
    assert!(err.to_string().contains("`succes`"));
    let nested = Selection::Not {
        of: Box::new(Selection::FloatMetric { metric: "nope".into(), op: Comparison::Lt, threshold: 1.0 }),
    };
    assert!(matches!(f.curator().curate(&spec(Some(nested))).await, Err(CurateError::UnknownMetric(_))));
    let mut s = spec(None);
    s.weighting = Weighting::SftQ { metric: "quality".into() };
    assert!(matches!(f.curator().curate(&s).await, Err(CurateError::UnknownMetric(_))));

    let mut s = spec(None);
    s.function = "babyai::nope".into();
    let err = f.curator().curate(&s).await.unwrap_err();
    assert!(matches!(err, CurateError::NoInferences(_)), "{err}");
    let functions = BTreeMap::new();
    let templates = apprentice_core::templates::Templates::new();
    let err = f.curator().with_templates(&templates, &functions).curate(&spec(None)).await.unwrap_err();
    assert!(err.to_string().contains("unknown function `babyai::act`"), "{err}");
}

#[test]
fn selections_and_specs_deserialize_and_reject_unknown_fields() {
    let spec: DatasetSpec = serde_json::from_value(json!({
        "name": "babyai-good", "function": "babyai::act", "variant": "v2",
        "weighting": {"type": "sft-q", "metric": "return"},
        "selection": {"type": "and", "of": [
            {"type": "top_episodes", "metric": "return", "percentile": 10.0, "per_task": true},
            {"type": "not", "of": {"type": "tag", "key": "split", "value": "test"}},
            {"type": "time_range", "from": "2026-01-01T00:00:00Z"}
        ]}
    }))
    .unwrap();
    assert_eq!(spec.version, 1);
    assert!(matches!(spec.selection, Some(Selection::And { ref of }) if of.len() == 3));
    let err = serde_json::from_value::<Selection>(json!({"type": "boolean_metric", "metric": "x", "vlaue": true}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("vlaue"), "{err}");
    let err = serde_json::from_value::<Selection>(json!({"type": "regex", "x": 1})).unwrap_err().to_string();
    assert!(err.contains("regex"), "{err}");
}

#[tokio::test]
async fn top_episodes_per_task_keeps_the_best_of_each_task() {
    let f = Fixture::new().await;
    // Play the same tasks again with other noise, so every task has two episodes.
    let recorder = Arc::new(Recorder::spawn(f.store.clone(), WriteMode::Durable, 4096, None));
    let options = RolloutOptions {
        split: Split::Train,
        start_index: 0,
        episodes: EPISODES,
        concurrency: 4,
        seed: 99,
        tags: Default::default(),
    };
    let second =
        rollout(BabyAi::new, &Policy::Expert { epsilon: 0.5 }, Some(recorder), &options, |_| {}).await.unwrap();
    let mut by_task: BTreeMap<&str, Vec<&apprentice_envs::rollout::EpisodeSummary>> = BTreeMap::new();
    for e in f.rollout.episodes.iter().chain(&second.episodes) {
        by_task.entry(e.task.as_str()).or_default().push(e);
    }
    assert!(by_task.values().all(|episodes| episodes.len() == 2));
    let best: BTreeSet<_> = by_task
        .values()
        .map(|episodes| {
            let mut episodes = episodes.clone();
            episodes
                .sort_by(|a, b| b.episode_return.total_cmp(&a.episode_return).then(a.episode_id.cmp(&b.episode_id)));
            episodes[0].episode_id
        })
        .collect();
    let selection = Selection::TopEpisodes { metric: "return".into(), k: Some(1), percentile: None, per_task: true };
    let dataset = f.curator().curate(&spec(Some(selection))).await.unwrap();
    let kept: BTreeSet<_> = dataset.train.iter().map(|e| e.episode_id).collect();
    assert_eq!(kept, best);
}

#[tokio::test]
async fn a_config_gives_metric_levels_functions_and_templates() {
    let f = Fixture::new().await;
    let env_config = BabyAi::new().spec().gateway_config("llm", "student").unwrap();
    let text = format!("{env_config}\n[models.llm]\nrouting = [\"d\"]\n[models.llm.providers.d]\ntype = \"dummy\"\n");
    let dir = tempfile::tempdir().unwrap();
    let config = apprentice_core::Config::parse(&text, "env.toml".as_ref(), dir.path()).unwrap();
    let curator = Curator::from_config(&f.store, &config);

    let mut s = spec(Some(boolean("success", true)));
    s.variant = Some("student".into());
    let rerendered = curator.curate(&s).await.unwrap();
    s.variant = None;
    let replayed = curator.curate(&s).await.unwrap();
    assert_eq!(rerendered.summary.selected, f.steps_of(|e| e.success), "episode level read from [metrics]");
    assert_eq!(rerendered.train, replayed.train, "the config's templates are the env's");

    s.function = "babyai::other".into();
    let err = curator.curate(&s).await.unwrap_err();
    assert!(matches!(err, CurateError::UnknownFunction(_)), "{err}");
}

#[tokio::test]
async fn packed_episodes_train_the_same_turns_in_the_same_context() {
    let f = Fixture::new().await;
    let per = f.curator().curate(&spec(None)).await.unwrap();
    let packed = f.curator().curate(&packed_spec(None)).await.unwrap();
    let by_id: HashMap<_, _> = per.train.iter().map(|e| (e.inference_id, e)).collect();
    let mut per_episode: HashMap<uuid::Uuid, usize> = HashMap::new();
    for e in &per.train {
        *per_episode.entry(e.episode_id).or_default() += 1;
    }
    let multi = per_episode.values().filter(|n| **n >= 2).count();
    assert!(multi > 0);
    assert_eq!(packed.summary.packed_episodes, multi, "every BabyAI episode is a conversation");
    assert_eq!(packed.train.len(), per_episode.len());
    assert_eq!(packed.summary.examples_before_packing, per.train.len());
    assert_eq!(packed.summary.examples_after_packing, packed.train.len());
    assert_eq!(per.summary.examples_before_packing, per.summary.examples_after_packing);
    assert_eq!(per.summary.approx_tokens_per_inference, per.summary.approx_tokens_packed);
    assert_eq!(packed.summary.approx_tokens_per_inference, per.summary.approx_tokens_per_inference);
    assert!(packed.summary.approx_tokens_packed * 2 < packed.summary.approx_tokens_per_inference);

    let mut trained = BTreeSet::new();
    for example in &packed.train {
        let turns = assistant_turns(example);
        let learned: Vec<usize> = turns.iter().filter(|(_, w)| *w == 1).map(|(i, _)| *i).collect();
        assert_eq!(learned.len(), example.inference_ids.len());
        assert_eq!(learned.len(), turns.len(), "no step was left out, so no turn is context only");
        for (position, id) in learned.iter().zip(&example.inference_ids) {
            let single = by_id[id];
            let prompt: Vec<_> = single.messages[..single.messages.len() - 1].iter().map(unweighted).collect();
            let context: Vec<_> = example.messages[..*position].iter().map(unweighted).collect();
            assert_eq!(context, prompt, "the context before the turn is its own prompt");
            assert_eq!(unweighted(&example.messages[*position]), unweighted(single.messages.last().unwrap()));
            assert!(trained.insert(*id), "each inference is trained once");
        }
        assert_eq!(example.inference_id, *example.inference_ids.last().unwrap());
    }
    assert_eq!(trained, ids(&per.train));

    let exported = packed.export_train(false).unwrap();
    let first: serde_json::Value = serde_json::from_str(exported.jsonl.lines().next().unwrap()).unwrap();
    let weights: Vec<_> = first["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "assistant")
        .map(|m| &m["weight"])
        .collect();
    assert!(!weights.is_empty() && weights.iter().all(|w| **w == json!(1)));
}

#[tokio::test]
async fn an_episode_whose_prompts_do_not_extend_stays_one_example_per_inference() {
    let f = Fixture::new().await;
    let long = f.rollout.episodes.iter().find(|e| e.steps >= 3).unwrap();
    let first = f.inferences.iter().find(|i| i.episode_id == long.episode_id).unwrap();
    // The next step was sent the model's answer, not the demonstration, so the episode is no conversation.
    let demo = InferenceOutput::Chat { content: vec![ContentBlock::Text { text: "a better answer".into() }] };
    f.write(vec![feedback(MetricLevel::Inference, first.id, "demonstration", FeedbackValue::Demonstration(demo))])
        .await;
    let packed = f.curator().curate(&packed_spec(None)).await.unwrap();
    let of_long: Vec<_> = packed.train.iter().filter(|e| e.episode_id == long.episode_id).collect();
    assert_eq!(of_long.len(), long.steps as usize);
    assert!(of_long.iter().all(|e| e.inference_ids == [e.inference_id]));
    // Unpacked, each example trains on its own output only: earlier assistant turns are context.
    for example in &of_long {
        let assistants = example.messages.iter().filter(|m| m["role"] == "assistant").count();
        if assistants >= 2 {
            let last = example.messages.len() - 1;
            let turns = assistant_turns(example);
            assert!(turns.iter().all(|(i, w)| *w == u64::from(*i == last)), "{turns:?}");
        } else {
            assert!(example.messages.iter().all(|m| m.get("weight").is_none()), "a single turn needs no weight key");
        }
    }
    assert_eq!(packed.train.len(), EPISODES as usize - 1 + long.steps as usize);
    assert_eq!(packed.summary.packed_episodes, EPISODES as usize - 1);
}

#[tokio::test]
async fn steps_without_progress_are_context_with_weight_zero_or_dropped() {
    let f = Fixture::new().await;
    let mut progress = HashMap::new();
    for i in &f.inferences {
        let value = f.store.feedback_for(i.id).await.unwrap().iter().find_map(|fb| match fb.value {
            FeedbackValue::Boolean(b) if fb.metric_name == "progress" => Some(b),
            _ => None,
        });
        progress.insert(i.id, value.unwrap());
    }
    let mut s = packed_spec(Some(boolean("success", true)));
    s.steps = Some(boolean("progress", true));
    let packed = f.curator().curate(&s).await.unwrap();
    let selected = f.steps_of(|e| e.success);
    let masked = f
        .inferences
        .iter()
        .filter(|i| !progress[&i.id] && f.rollout.episodes.iter().any(|e| e.episode_id == i.episode_id && e.success))
        .count();
    assert!(masked > 0);
    assert_eq!(packed.summary.selected, selected);
    assert_eq!(packed.summary.masked_steps, masked);

    let mut zero_turns = 0;
    for example in packed.train.iter().filter(|e| e.inference_ids.len() >= 2) {
        let steps: Vec<_> = f.inferences.iter().filter(|i| i.episode_id == example.episode_id).collect();
        let turns = assistant_turns(example);
        assert!(turns.len() <= steps.len());
        for ((_, weight), step) in turns.iter().zip(&steps) {
            assert_eq!(*weight == 1, progress[&step.id], "weight 1 exactly on the steps with progress");
            zero_turns += usize::from(*weight == 0);
        }
    }
    assert!(zero_turns > 0);

    s.packing = Packing::PerInference;
    let per = f.curator().curate(&s).await.unwrap();
    assert_eq!(per.train.len() + per.summary.dropped_duplicates, selected - masked);
    assert!(per.train.iter().all(|e| progress[&e.inference_id]));
    assert_eq!(per.summary.masked_steps, masked);
}

#[tokio::test]
async fn stratified_sft_q_keeps_the_top_decile_of_episodes_in_three_bands() {
    let f = Fixture::new().await;
    let mut s = spec(None);
    s.weighting = Weighting::Stratified { metric: "return".into() };
    let dataset = f.curator().curate(&s).await.unwrap();
    let mut returns: Vec<f64> = f.rollout.episodes.iter().map(|e| e.episode_return).collect();
    returns.sort_by(f64::total_cmp);
    // numpy.percentile's default, as the reference code uses.
    let percentile = |p: f64| {
        let rank = p / 100.0 * (returns.len() - 1) as f64;
        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
        returns[lo] + (returns[hi] - returns[lo]) * (rank - lo as f64)
    };
    let band = |r: f64| {
        if r >= percentile(98.0) {
            3.0
        } else if r >= percentile(95.0) {
            2.0
        } else if r >= percentile(90.0) {
            1.0
        } else {
            0.0
        }
    };
    let returns_of: HashMap<_, _> = f.rollout.episodes.iter().map(|e| (e.episode_id, e.episode_return)).collect();
    let kept: BTreeSet<_> = dataset.train.iter().map(|e| e.episode_id).collect();
    let expected: BTreeSet<_> =
        f.rollout.episodes.iter().filter(|e| band(e.episode_return) > 0.0).map(|e| e.episode_id).collect();
    assert_eq!(kept, expected);
    assert!(expected.len() >= EPISODES as usize / 10 && expected.len() < EPISODES as usize / 2);
    let unit = dataset.train[0].weight / band(returns_of[&dataset.train[0].episode_id]);
    for e in &dataset.train {
        assert!((e.weight - unit * band(returns_of[&e.episode_id])).abs() < 1e-9, "weights 3:2:1 by band");
    }
    let bands: BTreeSet<u8> = dataset.train.iter().map(|e| band(returns_of[&e.episode_id]) as u8).collect();
    assert_eq!(bands, [1, 2, 3].into(), "40 distinct-enough returns fill every band");
    let mean = dataset.train.iter().map(|e| e.weight).sum::<f64>() / dataset.train.len() as f64;
    assert!((mean - 1.0).abs() < 1e-9, "{mean}");
    assert_eq!(dataset.summary.dropped_no_weight, f.steps_of(|e| band(e.episode_return) == 0.0));

    s.weighting = Weighting::Stratified { metric: "reward".into() };
    let err = f.curator().curate(&s).await.unwrap_err();
    assert!(matches!(&err, CurateError::InvalidSpec(m) if m.contains("inference-level")), "{err}");
    let parsed: Weighting = serde_json::from_value(json!({"type": "stratified", "metric": "return"})).unwrap();
    assert_eq!(parsed, Weighting::Stratified { metric: "return".into() });
}

#[tokio::test]
async fn packing_keeps_episode_weights_and_falls_back_when_steps_weigh_differently() {
    let f = Fixture::new().await;
    let mut s = packed_spec(None);
    s.weighting = Weighting::SftQ { metric: "return".into() };
    let packed = f.curator().curate(&s).await.unwrap();
    let returns: HashMap<_, _> = f.rollout.episodes.iter().map(|e| (e.episode_id, e.episode_return)).collect();
    assert_eq!(packed.train.len(), f.rollout.episodes.iter().filter(|e| e.episode_return > 0.0).count());
    let ratio = packed.train[0].weight / returns[&packed.train[0].episode_id];
    assert!(packed.train.iter().all(|e| (e.weight / returns[&e.episode_id] - ratio).abs() < 1e-9));

    // Inference-level weights that differ within an episode cannot share one example weight.
    let episode = f.rollout.episodes.iter().find(|e| e.success && e.steps >= 2 && e.episode_return != 0.5).unwrap();
    let first = f.inferences.iter().find(|i| i.episode_id == episode.episode_id).unwrap();
    f.write(vec![feedback(MetricLevel::Inference, first.id, "reward", FeedbackValue::Float(0.5))]).await;
    s.weighting = Weighting::SftQ { metric: "reward".into() };
    let by_reward = f.curator().curate(&s).await.unwrap();
    let of_episode: Vec<_> = by_reward.train.iter().filter(|e| e.episode_id == episode.episode_id).collect();
    assert_eq!(of_episode.len(), 2, "the first step and the rewarded last one");
    assert_ne!(of_episode[0].weight, of_episode[1].weight);
    assert!(of_episode.iter().all(|e| e.inference_ids.len() == 1));
    assert_eq!(by_reward.summary.packed_episodes, 0);
}

#[test]
fn packing_and_steps_come_from_a_spec_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spec.toml");
    let text = "name = \"n\"\nfunction = \"f\"\npacking = \"per_inference\"\n\
                [steps]\ntype = \"boolean_metric\"\nmetric = \"progress\"\nvalue = true\n";
    std::fs::write(&path, text).unwrap();
    let spec = DatasetSpec::load(&path).unwrap();
    assert_eq!(spec.packing, Packing::PerInference);
    assert_eq!(spec.steps, Some(boolean("progress", true)));
    std::fs::write(&path, "name = \"n\"\nfunction = \"f\"\npacking = \"episodes\"\n").unwrap();
    let err = DatasetSpec::load(&path).unwrap_err().to_string();
    assert!(err.contains("packing") && err.contains(":3"), "{err}");
}
