//! `apprentice bench model` on the real SmolLM2 GGUF with tiny sizes: our own numbers are always
//! measured, and a baseline whose Python or package is missing becomes a row that says so, with
//! the pip command that installs it. Needs the cached model (`apprentice model fetch smollm2-135m`).

use std::path::{Path, PathBuf};

use apprentice_model::bench::{run_model_bench, LlamaCppWeights, ModelBenchOptions};
use apprentice_model::cache::resolve_model;
use apprentice_model::serve::WeightFormat;

fn smollm2() -> PathBuf {
    resolve_model("smollm2-135m")
        .unwrap_or_else(|e| panic!("the SmolLM2 model is required (apprentice model fetch smollm2-135m): {e}"))
}

fn tiny(python: Option<String>) -> ModelBenchOptions {
    ModelBenchOptions {
        prompt_tokens: 8,
        decode_tokens: 3,
        repeats: 1,
        threads: candle_core::utils::get_num_threads(),
        python,
        transformers: true,
        llama_cpp: vec![LlamaCppWeights::Source, LlamaCppWeights::F16],
        serving: vec![WeightFormat::Q8_0],
    }
}

/// A stand-in interpreter that answers like a baseline script without its packages.
fn fake_python_without_packages(dir: &Path) -> String {
    let path = dir.join("python-without-packages");
    std::fs::write(
        &path,
        "#!/bin/sh\necho '{\"error\": \"missing Python packages: torch\", \"missing\": [\"torch\"], \"install\": \"pip \
         install torch\"}'\nexit 3\n",
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    path.display().to_string()
}

#[test]
fn ours_is_measured_and_missing_baselines_say_how_to_install_them() {
    let dir = tempfile::tempdir().unwrap();
    let report = run_model_bench(&smollm2(), &tiny(Some(fake_python_without_packages(dir.path())))).unwrap();

    let ours = report.rows[0].measurement.as_ref().expect("our row is measured");
    assert_eq!(report.rows[0].label, "apprentice");
    assert_eq!(ours.tokens.len(), 4, "the first token from prefill, then 3 decoded");
    assert!(ours.prefill_tokens_per_s > 0.0 && ours.decode_tokens_per_s > 0.0);
    assert_eq!(report.prompt_ids.len(), 8);
    assert!(report.model_storage.starts_with("Q4_1"), "{}", report.model_storage);

    let labels: Vec<&str> = report.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["apprentice", "apprentice serve q8_0", "transformers", "llama.cpp Q4_1", "llama.cpp f16"]);
    let serving = report.rows[1].measurement.as_ref().expect("the serving engine is measured");
    assert_eq!(serving.tokens.len(), 4);
    assert!(serving.prefill_tokens_per_s > 0.0 && serving.decode_tokens_per_s > 0.0);
    assert!(report.rows[1].same_tokens_as_ours.is_some());
    assert!(report.targets.iter().any(|t| t.target.starts_with("apprentice serve q8_0")), "{:?}", report.targets);
    for row in &report.rows[2..] {
        assert!(row.measurement.is_none());
        let reason = row.unavailable.as_deref().unwrap();
        assert!(reason.contains("missing Python packages: torch"), "{reason}");
        assert!(reason.contains("install with: pip install torch"), "{reason}");
    }
    assert!(report.targets.iter().all(|t| t.ratio.is_none() && t.met.is_none()));
    assert!(!report.met());

    let table = report.table();
    assert!(table.contains("apprentice"), "{table}");
    assert!(table.contains("not measured:"), "{table}");
    assert!(table.contains("install with: pip install torch"), "{table}");
    assert!(table.contains("not measured"), "{table}");
    serde_json::to_string(&report).unwrap();
}

#[test]
fn a_missing_interpreter_is_reported_not_fatal() {
    let report = run_model_bench(&smollm2(), &tiny(Some("/nonexistent/python3".into()))).unwrap();
    assert!(report.rows[0].measurement.is_some() && report.rows[1].measurement.is_some());
    for row in &report.rows[2..] {
        let reason = row.unavailable.as_deref().unwrap();
        assert!(reason.contains("not found"), "{reason}");
    }
}

#[test]
fn a_thread_count_candle_does_not_use_is_refused() {
    let mut options = tiny(None);
    options.threads = candle_core::utils::get_num_threads() + 1;
    let error = run_model_bench(&smollm2(), &options).unwrap_err().to_string();
    assert!(error.contains("RAYON_NUM_THREADS"), "{error}");
}
