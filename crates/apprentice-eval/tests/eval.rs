//! Evaluation on a fixture store filled by real BabyAI rollouts, and the report built from it.

use std::sync::Arc;

use apprentice_core::config::WriteMode;
use apprentice_envs::babyai::BabyAi;
use apprentice_envs::rollout::Policy;
use apprentice_envs::Split;
use apprentice_eval::{evaluate, AdaptiveStopping, Contender, EvalOptions, Evaluation, Report, Threshold, TrainingRun};
use apprentice_store::{InferenceQuery, Recorder, SqliteStore, Store};

fn options(episodes: u64, stopping: Option<AdaptiveStopping>) -> EvalOptions {
    EvalOptions {
        run_id: "eval-test".into(),
        split: Split::Test,
        start_index: 0,
        episodes,
        concurrency: 2,
        seed: 3,
        stopping,
        batch: 10,
    }
}

fn contenders() -> Vec<Contender> {
    vec![
        Contender { name: "expert".into(), policy: Policy::Expert { epsilon: 0.0 }, price: None },
        Contender { name: "noisy".into(), policy: Policy::Expert { epsilon: 0.9 }, price: Some("free".into()) },
    ]
}

async fn run(
    dir: &std::path::Path,
    episodes: u64,
    stopping: Option<AdaptiveStopping>,
) -> (Arc<SqliteStore>, Evaluation) {
    let store = Arc::new(SqliteStore::open(&dir.join("eval.db"), WriteMode::Durable).await.unwrap());
    let recorder = Arc::new(Recorder::spawn(store.clone(), WriteMode::Durable, 4096, None));
    let evaluation =
        evaluate(BabyAi::new, &contenders(), &store, Some(recorder), &options(episodes, stopping), |_, _| {})
            .await
            .unwrap();
    (store, evaluation)
}

#[tokio::test]
async fn policies_play_the_same_tasks_tagged_with_the_run_and_are_compared_pairwise() {
    let dir = tempfile::tempdir().unwrap();
    let (store, evaluation) = run(dir.path(), 30, None).await;
    let [expert, noisy] = &evaluation.policies[..] else { panic!("two policies") };
    let tasks = |p: &apprentice_eval::PolicyEvaluation| p.episodes.iter().map(|e| e.task.clone()).collect::<Vec<_>>();
    assert_eq!(tasks(expert), tasks(noisy), "identical tasks");
    assert_eq!(expert.episodes.len(), 30);
    assert!(expert.episodes.iter().all(|e| e.steps as usize == e.step_latency_ms.len()), "one latency per step");

    // Every step is in the store, tagged with the run and the policy.
    let recorded = store.inferences(&InferenceQuery::default()).await.unwrap();
    let steps: u32 = evaluation.policies.iter().flat_map(|p| &p.episodes).map(|e| e.steps).sum();
    assert_eq!(recorded.len(), steps as usize);
    assert!(recorded.iter().all(|i| i.tags.get("eval_run").map(String::as_str) == Some("eval-test")));
    assert!(recorded.iter().any(|i| i.tags.get("policy").map(String::as_str) == Some("noisy")));

    let summaries = evaluation.summaries();
    assert_eq!(summaries[0].successes, expert.episodes.iter().filter(|e| e.success).count());
    assert!(summaries[0].success.estimate > summaries[1].success.estimate, "{summaries:?}");
    assert!(summaries[0].success.low <= summaries[0].success.estimate);
    let comparisons = evaluation.comparisons(None);
    assert_eq!(comparisons.len(), 1);
    let d = &comparisons[0].success_difference;
    assert_eq!((comparisons[0].a.as_str(), comparisons[0].b.as_str(), comparisons[0].tasks), ("noisy", "expert", 30));
    let expected = summaries[1].success.estimate - summaries[0].success.estimate;
    assert!((d.estimate - expected).abs() < 1e-12 && d.low < d.estimate && d.estimate < d.high, "{d:?}");
    assert!(d.low >= -1.0 && d.high <= 1.0, "a difference of rates stays in [-1, 1]: {d:?}");

    // --fail-below: the noisy policy fails a threshold the expert passes.
    let threshold: Threshold = "success=0.9".parse().unwrap();
    let failures = threshold.failures(&summaries);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].starts_with("noisy: success"), "{failures:?}");
    assert!("speed=1".parse::<Threshold>().unwrap_err().contains("unknown metric `speed`"));
}

#[tokio::test]
async fn adaptive_stopping_ends_a_policy_once_its_interval_is_narrow() {
    let dir = tempfile::tempdir().unwrap();
    // The expert succeeds on every task: after 30 episodes its interval is 0.11 wide.
    let (_, evaluation) = run(dir.path(), 60, Some(AdaptiveStopping { max_width: 0.15, min_episodes: 20 })).await;
    let expert = &evaluation.policies[0];
    assert!(expert.stopped_early);
    assert_eq!(expert.episodes.len(), 30, "20 of 20 is 0.16 wide, 30 of 30 is 0.11");
    assert_eq!(expert.episodes.len() % 10, 0, "checked after each batch of 10");
    // The paired comparison uses only the tasks both played.
    let c = &evaluation.comparisons(None)[0];
    assert_eq!(c.tasks, evaluation.policies.iter().map(|p| p.episodes.len()).min().unwrap());
}

#[tokio::test]
async fn adaptive_stopping_plays_the_same_tasks_in_the_same_order_at_any_concurrency() {
    let mut played = Vec::new();
    for concurrency in [1, 4] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("eval.db"), WriteMode::Durable).await.unwrap());
        let recorder = Arc::new(Recorder::spawn(store.clone(), WriteMode::Durable, 4096, None));
        // Batches of 7 do not line up with 4 episodes at once; the noisy policy's interval is
        // narrow enough only after some batches, at a count set by its (seeded) outcomes.
        let options = EvalOptions {
            concurrency,
            batch: 7,
            ..options(70, Some(AdaptiveStopping { max_width: 0.35, min_episodes: 10 }))
        };
        let contenders = vec![Contender { name: "noisy".into(), policy: Policy::Expert { epsilon: 0.6 }, price: None }];
        let evaluation = evaluate(BabyAi::new, &contenders, &store, Some(recorder), &options, |_, _| {}).await.unwrap();
        let noisy = &evaluation.policies[0];
        let episodes: Vec<(String, bool, u32)> =
            noisy.episodes.iter().map(|e| (e.task.clone(), e.success, e.steps)).collect();
        played.push((episodes, noisy.stopped_early));
    }
    let (episodes, stopped_early) = &played[0];
    assert!(*stopped_early && episodes.len() % 7 == 0, "{} episodes", episodes.len());
    let tasks: Vec<String> = (0..episodes.len()).map(|i| format!("test/{i}")).collect();
    assert_eq!(episodes.iter().map(|e| e.0.clone()).collect::<Vec<_>>(), tasks, "consecutive tasks, in order");
    assert_eq!(played[0], played[1], "concurrency 1 and 4 differ");
}

#[tokio::test]
async fn the_report_has_every_figure_of_the_table_and_its_plots() {
    let dir = tempfile::tempdir().unwrap();
    let (_, evaluation) = run(dir.path(), 20, None).await;
    let eval_dir = dir.path().join("eval");
    std::fs::create_dir_all(&eval_dir).unwrap();
    std::fs::write(eval_dir.join("evaluation.json"), serde_json::to_string(&evaluation).unwrap()).unwrap();
    // A training run folder as `apprentice train` leaves it.
    let train_dir = dir.path().join("iw-run");
    std::fs::create_dir_all(&train_dir).unwrap();
    std::fs::write(train_dir.join("train_config.toml"), "objective = \"iw-sft\"\n").unwrap();
    let metrics = (1..=4)
        .map(|s| {
            format!(
                r#"{{"step":{s},"loss":{},"val_loss":{},"weight_mean":1.0,"weight_min":0.5,"weight_max":1.5,"lr":0.1}}"#,
                2.0 / s as f64,
                if s % 2 == 0 { format!("{}", 1.5 / s as f64) } else { "null".into() }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(train_dir.join("metrics.jsonl"), metrics).unwrap();

    let report = Report::load(&[eval_dir.clone(), train_dir.clone()]).unwrap();
    let out = dir.path().join("report");
    let files = report.write(&out).unwrap();

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files.json).unwrap()).unwrap();
    let rows = json["evaluations"][0]["summaries"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, summary) in rows.iter().zip(evaluation.summaries()) {
        for field in [
            "episodes",
            "successes",
            "mean_return",
            "steps_per_episode",
            "input_tokens_per_episode",
            "output_tokens_per_episode",
            "latency_p50_ms",
            "latency_p95_ms",
            "wall_s",
            "cost_per_episode",
        ] {
            assert!(row.get(field).is_some(), "report.json lacks {field}");
        }
        assert_eq!(row["successes"].as_u64().unwrap() as usize, summary.successes);
        assert!((row["success"]["low"].as_f64().unwrap() - summary.success.low).abs() < 1e-12);
    }
    assert_eq!(json["training_runs"][0]["objective"], "iw-sft");

    let html = std::fs::read_to_string(&files.html).unwrap();
    for id in ["success", "success-vs-cost", "training", "weights-iw-run"] {
        assert!(html.contains(&format!("<figure id=\"{id}\"><svg")), "the page lacks the {id} plot");
        assert!(out.join(format!("{id}.svg")).is_file(), "{id}.svg");
    }
    assert!(!html.contains("src=\"http"), "self-contained");
    let markdown = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(markdown.contains("| expert | 20 |") && markdown.contains("noisy − expert"), "{markdown}");
    assert!(markdown.contains("validation loss 0.7500 → 0.3750"), "{markdown}");

    // A folder that is neither kind of run is named in the error.
    let err = Report::load(&[dir.path().join("nothing")]).unwrap_err().to_string();
    assert!(err.contains("nothing") && err.contains("neither an evaluation run"), "{err}");
    let run = TrainingRun::load(&train_dir).unwrap();
    assert_eq!(run.points.len(), 4);
}
