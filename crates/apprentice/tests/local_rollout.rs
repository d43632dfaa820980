//! A BabyAI rollout whose policy is the real SmolLM2-135M-Instruct served in-process by the
//! gateway as `local::smollm2-135m` (from the model cache: `apprentice model fetch smollm2-135m`;
//! this test fails without it). The untrained model mostly fails the tasks; what is checked is that
//! the whole path runs and records: `env config` → `serve` → `rollout` → the store.

#[allow(dead_code)]
mod common;

use std::process::Command;

use apprentice_core::config::WriteMode;
use apprentice_core::{FeedbackValue, InferenceOutput};
use apprentice_store::{InferenceQuery, SqliteStore, Store};

const MODEL: &str = "local::smollm2-135m";
const EPISODES: u64 = 2;
const MAX_STEPS: u64 = 2;
const MAX_TOKENS: u32 = 16;

fn apprentice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apprentice")).args(args).output().expect("run apprentice")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn babyai_rollout_with_a_local_policy_is_recorded() {
    apprentice_model::resolve_model("smollm2-135m")
        .unwrap_or_else(|e| panic!("the SmolLM2 model is required by this test: {e}"));
    let max_tokens = MAX_TOKENS.to_string();
    let out = apprentice(&[
        "env",
        "config",
        "babyai",
        "--model",
        MODEL,
        "--variant",
        "student",
        "--max-tokens",
        &max_tokens,
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env_config = String::from_utf8(out.stdout).unwrap();
    assert!(env_config.contains(&format!("[models.\"{MODEL}\".providers.local]")), "{env_config}");

    let dir = tempfile::tempdir().unwrap();
    let config = format!("{env_config}\n[gateway]\nbind = \"127.0.0.1:0\"\n");
    let mut served = common::serve(dir.path(), &config);
    let summary_path = dir.path().join("rollout.json");
    let (episodes, max_steps) = (EPISODES.to_string(), MAX_STEPS.to_string());
    let out = apprentice(&[
        "rollout",
        "--env",
        "babyai",
        "--episodes",
        &episodes,
        "--max-steps",
        &max_steps,
        "--policy",
        "function::babyai::act",
        "--gateway",
        &served.url,
        "--json",
        summary_path.to_str().unwrap(),
    ]);
    // SIGKILL is safe: the store is durable, every acknowledged inference is committed.
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    assert!(out.status.success(), "rollout failed: {}", String::from_utf8_lossy(&out.stderr));

    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    let summary = summary["episodes"].as_array().unwrap();
    assert_eq!(summary.len() as u64, EPISODES);
    let store = SqliteStore::open(&served.db, WriteMode::Durable).await.unwrap();
    let mut total = 0;
    for episode in summary {
        let steps = episode["steps"].as_u64().unwrap();
        assert!((1..=MAX_STEPS).contains(&steps), "{episode}");
        let id = episode["episode_id"].as_str().unwrap().parse().unwrap();
        let records = store.inferences(&InferenceQuery { episode_id: Some(id), ..Default::default() }).await.unwrap();
        assert_eq!(records.len() as u64, steps, "one recorded inference per step of {episode}");
        for record in &records {
            assert_eq!(record.model_name, MODEL);
            assert_eq!((record.function_name.as_str(), record.variant_name.as_str()), ("babyai::act", "student"));
            assert_eq!(record.provider_name, "local");
            assert!(record.usage.input_tokens > 100, "the prompt is the whole BabyAI conversation");
            assert!((1..=MAX_TOKENS).contains(&record.usage.output_tokens), "{:?}", record.usage);
            assert!(matches!(&record.output, InferenceOutput::Chat { content } if !content.is_empty()));
            let feedback = store.feedback_for(record.id).await.unwrap();
            assert!(feedback.iter().any(|f| f.metric_name == "reward"), "step feedback: {feedback:?}");
        }
        total += records.len();
        let feedback = store.feedback_for(id).await.unwrap();
        let success = feedback.iter().find(|f| f.metric_name == "success").expect("episode success feedback");
        assert_eq!(success.value, FeedbackValue::Boolean(episode["success"].as_bool().unwrap()));
        assert!(feedback.iter().any(|f| f.metric_name == "return"), "episode return feedback: {feedback:?}");
    }
    assert_eq!(store.count_inferences().await.unwrap(), total as u64, "nothing else was recorded");
}
