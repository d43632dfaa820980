//! `apprentice bench serve` on the real SmolLM2-135M-Instruct from the model cache (fetched by
//! `apprentice model fetch smollm2-135m`; these tests fail, not skip, without it): K = 1 and 2 with
//! a handful of short episodes, the llama.cpp baseline made to find its package missing. Nothing
//! here asserts a speed; the figures are checked for presence and consistency only.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use apprentice_bench::serve::{run_llama_cpp, run_serve_bench, ServeBenchOptions};
use apprentice_core::config::WriteMode;

/// A Python that finds `llama_cpp` unimportable: `python3` with a `llama_cpp` module first on its
/// path that raises ImportError, as on a machine without llama-cpp-python.
fn python_without_llama_cpp(dir: &Path) -> PathBuf {
    let modules = dir.join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::write(modules.join("llama_cpp.py"), "raise ImportError('hidden by the test')\n").unwrap();
    let python = dir.join("python-without-llama-cpp");
    std::fs::write(&python, format!("#!/bin/sh\nPYTHONPATH={} exec python3 \"$@\"\n", modules.display())).unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    python
}

fn python3_available() -> bool {
    std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_serve_measures_every_k_and_notes_a_missing_llama_cpp() {
    apprentice_model::resolve_model("smollm2-135m").unwrap_or_else(|e| {
        panic!("this test needs SmolLM2-135M-Instruct: `apprentice model fetch smollm2-135m` ({e})")
    });
    let dir = tempfile::tempdir().unwrap();
    let options = ServeBenchOptions {
        concurrency: vec![1, 2],
        episodes: 2,
        turns: 3,
        warmup_turns: 1,
        write_mode: WriteMode::Async,
        python: Some(python_without_llama_cpp(dir.path()).display().to_string()),
        progress: false,
        ..ServeBenchOptions::default()
    };
    let report = run_serve_bench(&options).await.expect("the bench runs");
    let table = report.table();
    println!("{table}");

    assert_eq!(report.rows.len(), 2);
    for (row, k) in report.rows.iter().zip([1, 2]) {
        assert_eq!(row.concurrency, k);
        assert_eq!(row.implementation, "apprentice");
        assert_eq!((row.requests, row.errors), (6, 0), "K={k}: every turn of every episode answered");
        // Every answer counts its tokens: between 1 and max_tokens each, and the total is the
        // requests times the per-request counts.
        assert!(
            row.completion_tokens_min >= 1 && row.completion_tokens_max <= u64::from(options.max_tokens),
            "{row:?}"
        );
        assert!(row.generated_tokens >= row.requests * row.completion_tokens_min, "{row:?}");
        assert!(row.generated_tokens <= row.requests * row.completion_tokens_max, "{row:?}");
        if row.completion_tokens_min == row.completion_tokens_max {
            assert_eq!(row.generated_tokens, row.requests * row.completion_tokens_max);
        }
        // Prompts grow from about 70 tokens by an observation and an answer a turn.
        assert!(row.prompt_tokens > row.requests * 50, "{row:?}");
        assert!(row.wall_s > 0.0, "{row:?}");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        assert!(close(row.generated_tokens_per_s, row.generated_tokens as f64 / row.wall_s), "{row:?}");
        assert!(close(row.prompt_tokens_per_s, row.prompt_tokens as f64 / row.wall_s), "{row:?}");
        assert!(close(row.requests_per_s, row.requests as f64 / row.wall_s), "{row:?}");
        assert!(row.p50_ms > 0.0 && row.p50_ms <= row.p95_ms && row.p95_ms <= row.max_ms, "{row:?}");
        // No request can take longer than the whole phase.
        assert!(row.max_ms <= row.wall_s * 1e3 * 1.001 + 1.0, "{row:?}");
        assert!(
            table.contains(&format!("{:>10} {:>9.1}", row.generated_tokens, row.generated_tokens_per_s)),
            "{table}"
        );
    }
    assert_eq!(report.first_error, None);
    // Warm-up (1 + 2 turns) and the measured turns, each recorded.
    assert_eq!(report.gateway_requests, 3 + 12);
    assert_eq!(report.recorded, report.gateway_requests);
    assert!(report.first_turn_prompt_tokens > 40.0 && report.last_turn_prompt_tokens > report.first_turn_prompt_tokens);

    // The prompt ids made for llama.cpp are the prompts the gateway ran.
    assert_eq!(report.prompt_check.prompts, 6);
    assert_eq!(report.prompt_check.same_length, 6, "{:?}", report.prompt_check.first_difference);

    // llama.cpp: not measured, and the note says what to install; the bench went on.
    let llama = &report.llama_cpp;
    assert!(llama.measurement.is_none());
    let note = llama.unavailable.as_deref().expect("a note says why llama.cpp is missing");
    if python3_available() {
        assert!(note.contains("llama-cpp-python") && note.contains("pip install"), "{note}");
    }
    assert!(table.contains("llama.cpp: not measured: "), "{table}");
    assert_eq!(report.targets.len(), 2);
    assert!(report.targets.iter().all(|t| t.ratio.is_none()), "no K=8 and no llama.cpp: nothing to compare");

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["options"]["write_mode"], "async");
    assert_eq!(json["rows"][1]["concurrency"], 2);
    assert!(json["llama_cpp"]["unavailable"].is_string());
}

#[test]
fn a_missing_interpreter_is_a_row_note() {
    let dir = tempfile::tempdir().unwrap();
    let episodes = dir.path().join("episodes.json");
    std::fs::write(&episodes, r#"{"episodes": [[[1, 2, 3]]], "max_tokens": 4, "stop_token_ids": [2]}"#).unwrap();
    let row = run_llama_cpp(
        "/nonexistent/python3",
        dir.path(),
        Path::new("/nonexistent/model.gguf"),
        "Q4_1 x1",
        &episodes,
        2,
        0,
    );
    assert!(row.measurement.is_none());
    assert!(row.unavailable.as_deref().unwrap().contains("not found"), "{row:?}");
}
