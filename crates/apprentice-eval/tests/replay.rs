//! Replay evaluation through a real gateway (dummy providers): recorded calls re-rendered for a
//! candidate variant, scored against the recorded output or a demonstration, scores stored.

use std::sync::Arc;

use apprentice_core::{Config, FeedbackValue};
use apprentice_eval::{replay, Evaluator, ReplayOptions};
use apprentice_gateway::{Gateway, RunningGateway};
use apprentice_store::{Recorder, SqliteStore, Store};
use serde_json::{json, Value};

const CONFIG: &str = r#"
[models.teacher]
routing = ["d"]
[models.teacher.providers.d]
type = "dummy"
behavior = "fixed"
content = "go forward"

[models.echo]
routing = ["d"]
[models.echo.providers.d]
type = "dummy"
behavior = "echo"

[models.grader]
routing = ["d"]
[models.grader.providers.d]
type = "dummy"
behavior = "fixed"
content = "yes"

[functions.act]
type = "chat"
[functions.act.user_schema]
type = "object"
required = ["observation"]
[functions.act.variants.teacher]
model = "teacher"
user_template = "You see {{ observation }}. Your action?"
[functions.act.variants.twin]
model = "teacher"
user_template = "Observation: {{ observation }}"
[functions.act.variants.parrot]
model = "echo"
user_template = "{{ observation }}"

[functions.grade]
type = "chat"
[functions.grade.variants.only]
model = "grader"
user_template = "Candidate: {{ candidate }}\nReference: {{ reference }}\nSame action?"
"#;

async fn post(client: &reqwest::Client, url: &str, body: Value) -> Value {
    let response = client.post(url).json(&body).send().await.unwrap();
    assert!(response.status().is_success());
    response.json().await.unwrap()
}

#[tokio::test]
async fn recorded_calls_are_replayed_for_a_candidate_and_scored_into_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::parse(CONFIG, std::path::Path::new("<test>"), dir.path()).unwrap();
    config.store.path = dir.path().join("replay.db");
    let server = RunningGateway::start(Gateway::open(config.clone()).await.unwrap(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = server.url();
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for observation in ["a key", "a ball", "a box"] {
        let body = json!({"function_name": "act", "variant_name": "teacher",
            "input": {"messages": [{"role": "user", "content": {"observation": observation}}]}});
        ids.push(post(&client, &format!("{url}/inference"), body).await["inference_id"].as_str().unwrap().to_string());
    }
    // A person corrected the second call: the demonstration, not the recorded output, is the reference.
    post(
        &client,
        &format!("{url}/feedback"),
        json!({"metric_name": "demonstration", "inference_id": ids[1], "value": "turn left"}),
    )
    .await;

    let store = Arc::new(SqliteStore::open(&config.store.path, config.store.write_mode).await.unwrap());
    let recorder = Recorder::spawn(store.clone(), config.store.write_mode, 1024, None);
    let evaluators: Vec<Evaluator> =
        ["exact", "regex:^(go forward|turn left)$", "judge:grade"].iter().map(|s| s.parse().unwrap()).collect();
    let options = |candidate: &str| ReplayOptions {
        run_id: format!("replay-{candidate}"),
        function: "act".into(),
        source_variant: Some("teacher".into()),
        candidate_variant: candidate.into(),
        limit: None,
    };

    // Another template, same model: the same answers, except against the demonstration.
    let twin = replay(&store, &recorder, &url, &options("twin"), &evaluators, |_| {}).await.unwrap();
    assert_eq!(twin.items.len(), 3);
    let exact: Vec<f64> = twin.items.iter().map(|i| i.scores["replay_exact"]).collect();
    assert_eq!(exact, [1.0, 0.0, 1.0]);
    assert!(twin.items[1].demonstrated && !twin.items[0].demonstrated);
    assert!((twin.means["replay_exact"] - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(twin.means["replay_judge_grade"], 1.0);

    // The candidate really ran with its own templates: the echo model repeats its rendered prompt.
    let parrot = replay(&store, &recorder, &url, &options("parrot"), &evaluators, |_| {}).await.unwrap();
    assert_eq!(parrot.means["replay_exact"], 0.0);
    assert_eq!(parrot.means["replay_regex"], 0.0);
    let candidate = store.inference(parrot.items[0].candidate).await.unwrap().unwrap();
    assert_eq!(apprentice_eval::replay::text(&candidate.output), "a key");
    assert_eq!(candidate.variant_name, "parrot");
    assert_eq!(candidate.tags["eval_run"], "replay-parrot");
    assert_eq!(candidate.tags["replay_of"], ids[0]);

    // Scores are stored as feedback on the candidate's inference, tagged with the run.
    let feedback = store.feedback_for(parrot.items[0].candidate).await.unwrap();
    let exact = feedback.iter().find(|f| f.metric_name == "replay_exact").expect("stored score");
    assert_eq!(exact.value, FeedbackValue::Float(0.0));
    assert_eq!(exact.tags["eval_run"], "replay-parrot");
    // Replays are not replayed: a third run still sees the three recorded calls.
    let any_variant = ReplayOptions { source_variant: None, ..options("twin") };
    let again = replay(&store, &recorder, &url, &any_variant, &evaluators[..1], |_| {}).await.unwrap();
    assert_eq!(again.items.len(), 3);
    server.shutdown().await.unwrap();
}
