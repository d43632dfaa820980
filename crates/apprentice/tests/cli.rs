//! The binary refuses a bad configuration at start-up, naming the file, the key and the problem.

use std::process::Command;

fn apprentice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apprentice")).args(args).output().expect("run apprentice")
}

#[test]
fn bad_config_stops_serve_and_check_with_file_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apprentice.toml");
    std::fs::write(
        &path,
        r#"
[models.m]
routing = ["d"]
[models.m.providers.d]
type = "dummy"

[functions.f]
[functions.f.variants.v]
model = "missing"
"#,
    )
    .unwrap();
    let path = path.to_str().unwrap();
    for command in ["serve", "check"] {
        let out = apprentice(&[command, "--config", path]);
        assert!(!out.status.success(), "{command} accepted a bad config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(path), "{command}: no file in {stderr}");
        assert!(stderr.contains("functions.f.variants.v.model"), "{command}: no key in {stderr}");
        assert!(stderr.contains("model `missing`"), "{command}: no problem in {stderr}");
    }
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apprentice.toml");
    std::fs::write(&path, "[models.m]\nrouting = [\"d\"]\n[models.m.providers.d]\ntype = \"dummy\"\n").unwrap();
    let out = apprentice(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (0 functions, 1 models"));
}

#[test]
fn missing_config_file_is_named() {
    let out = apprentice(&["check", "--config", "/nonexistent/apprentice.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/apprentice.toml") && stderr.contains("cannot read config"), "{stderr}");
}

#[test]
fn env_play_shows_the_prompt_and_steps_on_typed_answers() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_apprentice"))
        .args(["env", "play", "babyai", "--task", "train/17"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start env play");
    child.stdin.take().unwrap().write_all(b"turn left\nwhat do I do?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("== task train/17 ==") && stdout.contains("Your mission: open the purple door"),
        "{stdout}"
    );
    assert!(stdout.contains("Step 0. You see:") && stdout.contains("Step 2."), "two answers, two steps: {stdout}");
    assert!(stdout.contains("could not understand"), "an unparseable answer is explained: {stdout}");
}

#[test]
fn rollout_records_expert_episodes_into_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let json = dir.path().join("r.json");
    let out = apprentice(&[
        "rollout",
        "--episodes",
        "10",
        "--policy",
        "expert?epsilon=0.1",
        "--store",
        db.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("expert?epsilon=0.1"));
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let steps: u64 = summary["episodes"].as_array().unwrap().iter().map(|e| e["steps"].as_u64().unwrap()).sum();
    let recorded = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use apprentice_store::Store;
        let store =
            apprentice_store::SqliteStore::open(&db, apprentice_core::config::WriteMode::Durable).await.unwrap();
        store.count_inferences().await.unwrap()
    });
    assert_eq!(recorded, steps, "one recorded inference per step");
    assert!(steps >= 10);
}

#[test]
fn curate_turns_a_rollout_into_identical_datasets_and_names_bad_spec_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let db = db.to_str().unwrap();
    let out = apprentice(&["rollout", "--episodes", "20", "--policy", "expert?epsilon=0.5", "--store", db]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        "name = \"ok\"\nfunction = \"babyai::act\"\nvalidation_fraction = 0.25\n\n[selection]\ntype = \"boolean_metric\"\nmetric = \"success\"\nvalue = true\n",
    )
    .unwrap();
    let mut summaries = Vec::new();
    for run in ["a", "b"] {
        let out_dir = dir.path().join(run);
        let out = apprentice(&[
            "curate",
            "--spec",
            spec.to_str().unwrap(),
            "--env",
            "babyai",
            "--store",
            db,
            "--out",
            out_dir.to_str().unwrap(),
            "--student",
            "smollm2-135m",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let expected = if run == "a" { "recorded in the store" } else { "identical to the recorded one" };
        assert!(stdout.contains(expected), "{stdout}");
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out_dir.join("ok-v1/summary.json")).unwrap()).unwrap();
        let train = std::fs::read_to_string(out_dir.join("ok-v1/train.jsonl")).unwrap();
        assert_eq!(train.lines().count() as u64, summary["summary"]["train_examples"].as_u64().unwrap());
        assert!(train.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["messages"].is_array()));
        let tokens = &summary["summary"]["tokens"]["train.jsonl"];
        assert!(tokens["trained_tokens"].as_u64().unwrap() > 0, "{summary}");
        assert!(tokens["tokens"].as_u64().unwrap() > tokens["trained_tokens"].as_u64().unwrap(), "{summary}");
        summaries.push((summary["files"].clone(), summary["content_hash"].clone()));
    }
    assert_eq!(summaries[0], summaries[1], "a rerun gives the same files and hashes");

    // The same name and version over a grown store is refused, and says what to do.
    let out = apprentice(&["rollout", "--episodes", "3", "--start-index", "20", "--store", db]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out_dir = dir.path().join("c");
    let out = apprentice(&[
        "curate",
        "--spec",
        spec.to_str().unwrap(),
        "--env",
        "babyai",
        "--store",
        db,
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ok v1") && stderr.contains("new version"), "{stderr}");
    assert!(!out_dir.join("ok-v1").exists(), "nothing is written for a refused dataset");

    std::fs::write(&spec, "name = \"bad\"\nfunction = \"babyai::act\"\n\n[weighting]\ntype = \"sft_q\"\n").unwrap();
    let out = apprentice(&["curate", "--spec", spec.to_str().unwrap(), "--env", "babyai", "--store", db]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.toml:5") && stderr.contains("weighting.type") && stderr.contains("sft_q"),
        "{stderr}"
    );
}
