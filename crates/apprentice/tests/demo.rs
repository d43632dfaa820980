//! `apprentice demo --quick` end to end on the real SmolLM2-135M (fetched by `.ci/run`): every
//! stage runs, and the report holds the four policies of the same test tasks.

use std::process::Command;

#[test]
fn the_quick_demo_runs_every_stage_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_apprentice"))
        .args(["demo", "--quick", "--data"])
        .arg(&data)
        .output()
        .expect("run apprentice demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for stage in
        ["roll out the teacher", "curate", "train the sft student", "train the iw-sft student", "evaluate", "report"]
    {
        assert!(stdout.contains(stage), "stage `{stage}` missing:\n{stdout}");
    }

    // The teacher's recorded conversations were re-rendered in the students' compact style: each
    // training example is the mission, one observation and the action.
    let train = std::fs::read_to_string(data.join("datasets/babyai-demo-v1/train.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(train.lines().next().unwrap()).unwrap();
    let roles: Vec<&str> = first["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant"], "{first}");
    assert!(first["messages"][0]["content"].as_str().unwrap().starts_with("Mission: "), "{first}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("report/report.json")).unwrap()).unwrap();
    let rows = report["evaluations"][0]["summaries"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["teacher", "base", "sft", "iw-sft"]);
    for row in rows {
        assert_eq!(row["episodes"], 4, "{row}");
    }
    // The students are local models: they spend tokens and measured compute, priced per hour.
    for row in &rows[1..] {
        assert!(row["input_tokens_per_episode"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["cost_per_episode"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["price"].as_str().unwrap().contains("per hour"), "{row}");
    }
    assert_eq!(report["training_runs"].as_array().unwrap().len(), 2);
    let html = std::fs::read_to_string(data.join("report/report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("teacher"));
    // Every stage can be rerun alone from the commands the demo ran.
    let commands = std::fs::read_to_string(data.join("commands.sh")).unwrap();
    assert!(commands.contains("apprentice train --dataset") && commands.contains("apprentice eval --config"));
    assert!(data.join("apprentice.db").is_file() && data.join("runs/iw-sft/model.gguf").is_file());
}
