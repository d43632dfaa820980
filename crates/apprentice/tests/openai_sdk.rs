//! The official `openai` Python package talks to the gateway unmodified, streaming and not, and
//! every call it makes is recorded. `.ci/run` installs the package; without it this test fails.

mod common;

use apprentice_core::config::WriteMode;
use apprentice_core::{ContentBlock, InferenceOutput};
use apprentice_store::{InferenceQuery, SqliteStore, Store};
use serde_json::Value;

fn python() -> String {
    std::env::var("APPRENTICE_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_calls_are_recorded() {
    let check = std::process::Command::new(python()).args(["-c", "import openai"]).output().expect("run python");
    assert!(
        check.status.success(),
        "the `openai` Python package is required (pip install openai; .ci/run installs it): {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let mut served = common::serve(dir.path(), &common::config("durable"));
    let episode = apprentice_core::new_id();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_sdk.py");
    let url = served.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python()).args([script, &url, &episode.to_string()]).output()
    })
    .await
    .unwrap()
    .expect("run the SDK script");
    served.child.kill().ok();
    served.child.wait().ok();
    assert!(output.status.success(), "SDK script failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).expect("script prints JSON");

    assert_eq!(seen["plain_text"], "You see a red ball.");
    assert_eq!(seen["streamed_text"], "You see a blue key.");
    assert_eq!(seen["direct_text"], "ping");
    assert_eq!(seen["error_status"], 404);
    assert!(seen["plain_usage"].as_u64().unwrap() > 0);
    assert!(seen["streamed_usage"].as_u64().unwrap() > 0, "the final stream chunk carries usage: {seen}");

    let store = SqliteStore::open(&served.db, WriteMode::Durable).await.unwrap();
    let episode_calls =
        store.inferences(&InferenceQuery { episode_id: Some(episode), ..Default::default() }).await.unwrap();
    assert_eq!(episode_calls.len(), 2, "both SDK calls of the episode are recorded");
    let plain = &episode_calls[0];
    assert_eq!(plain.id.to_string(), seen["plain_id"].as_str().unwrap());
    assert_eq!(plain.tags.get("client").map(String::as_str), Some("openai-python"));
    match &plain.input.messages[0].content[0] {
        ContentBlock::Template { arguments, .. } => assert_eq!(arguments["observation"], "a red ball"),
        other => panic!("structured arguments not kept: {other:?}"),
    }
    let streamed = &episode_calls[1];
    assert_eq!(streamed.id.to_string(), seen["streamed_id"].as_str().unwrap());
    assert_eq!(
        streamed.output,
        InferenceOutput::Chat { content: vec![ContentBlock::Text { text: "You see a blue key.".into() }] }
    );
    assert!(streamed.ttft_ms.is_some());
    assert_eq!(
        store.count_inferences().await.unwrap(),
        3,
        "plain + streamed + direct; the failed call is not recorded"
    );
}
