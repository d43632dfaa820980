//! The training loop closes: `apprentice train` LoRA-tunes the real SmolLM2-135M-Instruct (from the
//! model cache: `apprentice model fetch smollm2-135m`; this test fails without it) for two steps on
//! a handful of short examples, exports the student, the export loads with
//! `apprentice_model::load` + `Tokenizer::from_path`, and the gateway serves it as a `local` model
//! through `/v1/chat/completions`.

#[allow(dead_code)]
mod common;

use std::process::Command;

use serde_json::json;

fn example(question: &str, answer: &str) -> String {
    json!({"messages": [
        {"role": "system", "content": "Answer with one colour."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_student_is_exported_and_answers_through_the_gateway() {
    apprentice_model::resolve_model("smollm2-135m")
        .unwrap_or_else(|e| panic!("the SmolLM2 model is required by this test: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("dataset");
    std::fs::create_dir_all(&dataset).unwrap();
    let train = [("The sky?", "blue"), ("Grass?", "green"), ("Snow?", "white"), ("Blood?", "red")]
        .map(|(q, a)| example(q, a))
        .join("\n");
    std::fs::write(dataset.join("train.jsonl"), train + "\n").unwrap();
    std::fs::write(dataset.join("validation.jsonl"), example("The sea?", "blue") + "\n").unwrap();
    let run = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_apprentice"))
        .args(["train", "--dataset"])
        .arg(&dataset)
        .args(["--base", "smollm2-135m", "--objective", "sft", "--out"])
        .arg(&run)
        .args(["--max-steps", "2", "--max-len", "64", "--max-batch", "2", "--lr", "1e-3"])
        .output()
        .expect("run apprentice train");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("0 of"), "no trained token dropped: {stderr}");
    let exported = run.join("model.gguf");
    assert!(exported.is_file(), "{stderr}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    // Step 0 (the base model's validation loss), then one line per step.
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(metrics.starts_with(r#"{"step":0,"#), "{metrics}");

    // The export is a model the loader and tokenizer read, with LoRA merged (plain weights).
    let loaded = apprentice_model::load(&exported, &candle_core::Device::Cpu).expect("load the export");
    let tokenizer = apprentice_model::Tokenizer::from_path(&exported).expect("the export's tokenizer");
    assert!(!tokenizer.encode("blue", false).unwrap().is_empty());
    drop(loaded);

    let config = format!(
        r#"
[gateway]
bind = "127.0.0.1:0"

[store]
path = "apprentice.db"

[models."local::student"]
routing = ["local"]
[models."local::student".providers.local]
type = "local"
model = "{}"
"#,
        exported.display()
    );
    let mut served = common::serve(dir.path(), &config);
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/chat/completions", served.url))
        .json(&json!({
            "model": "local::student",
            "messages": [
                {"role": "system", "content": "Answer with one colour."},
                {"role": "user", "content": "The sky?"},
            ],
            "temperature": 0,
            "max_tokens": 4,
        }))
        .send()
        .await
        .expect("ask the student");
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap();
    let _ = served.child.kill();
    let _ = served.child.wait();
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!text.trim().is_empty(), "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{answer}");
}
