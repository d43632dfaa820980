//! `apprentice bench model`: prompt (prefill) and decode tokens/s of our candle model, next to HF
//! transformers (PyTorch, CPU) and llama.cpp (`llama-cpp-python`) on the same GGUF and exactly the
//! same prompt token ids, as ratios from one run.
//!
//! Every implementation does the same two things, timed the same way: prefill is one forward of
//! the prompt from an empty KV cache up to the first greedy token (logits of the last position
//! only); decode is `decode_tokens` further greedy tokens, one forward of one token each, with the
//! KV cache. Each is run `repeats` times after a short warm-up and reported as the median.
//!
//! What each side computes with differs and the report says so: ours dequantises the GGUF to f32
//! at load; transformers dequantises it to fp32 torch tensors; llama.cpp computes in the file's
//! own storage type (quantised kernels for Q4_1), so llama.cpp is also run on f16 and f32 GGUFs
//! that we write from our dequantised weights — the like-for-like comparison.
//!
//! The baselines are Python scripts shipped in `crates/apprentice-model/bench/` and embedded in the
//! binary; they run as subprocesses. A missing Python or package becomes a row that says what is
//! missing and the pip command that installs it; our own numbers are always measured.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use crate::generate::{generate, generate_stream, GenerateError, GenerateOptions, StreamEvent};
use crate::llama::Llama;
use crate::load::{load, LoadError};
use crate::save::{save_gguf, GgufDType, SaveError};
use crate::serve::{Chunk, EngineError, ServingModel, WeightFormat};
use crate::tokenizer::{read_gguf_content, Tokenizer, TokenizerError};

/// The transformers baseline, shipped as `crates/apprentice-model/bench/baseline_transformers.py`.
pub const TRANSFORMERS_SCRIPT: &str = include_str!("../bench/baseline_transformers.py");
/// The llama.cpp baseline, shipped as `crates/apprentice-model/bench/baseline_llama_cpp.py`.
pub const LLAMA_CPP_SCRIPT: &str = include_str!("../bench/baseline_llama_cpp.py");

/// Exit status with which a baseline script says that a Python package is missing.
const MISSING_PACKAGE_EXIT: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ModelBenchError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error("writing a GGUF for llama.cpp: {0}")]
    Save(#[from] SaveError),
    #[error("the serving engine failed: {0}")]
    Engine(#[from] EngineError),
    #[error("{context}: {error}")]
    Io { context: String, error: std::io::Error },
    #[error("invalid benchmark options: {0}")]
    Options(String),
}

/// The GGUF a llama.cpp row runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LlamaCppWeights {
    /// The benchmarked GGUF itself, in its own storage type (Q4_1 for the default student).
    Source,
    /// An f16 GGUF written from our dequantised weights.
    F16,
    /// An f32 GGUF written from our dequantised weights: the same values ours computes with.
    F32,
}

impl LlamaCppWeights {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "source" | "q4_1" | "file" => Some(Self::Source),
            "f16" => Some(Self::F16),
            "f32" => Some(Self::F32),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchOptions {
    /// Prompt length in tokens (the same ids for every implementation).
    pub prompt_tokens: usize,
    /// Greedy tokens decoded after the first one, each timed as one single-token forward.
    pub decode_tokens: usize,
    /// Timed runs per implementation; the median is reported.
    pub repeats: usize,
    /// Threads for every implementation. Ours follows candle's `RAYON_NUM_THREADS`, which must
    /// already say this (set it before any thread pool starts; the CLI does).
    pub threads: usize,
    /// Python interpreter for the baselines; `None` measures ours only.
    pub python: Option<String>,
    pub transformers: bool,
    /// llama.cpp rows, in order.
    pub llama_cpp: Vec<LlamaCppWeights>,
    /// Rows of the serving engine (what local providers serve with), one per weight format.
    pub serving: Vec<WeightFormat>,
}

impl Default for ModelBenchOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 128,
            decode_tokens: 128,
            repeats: 3,
            threads: 2,
            python: Some("python3".into()),
            transformers: true,
            llama_cpp: vec![LlamaCppWeights::Source, LlamaCppWeights::F16, LlamaCppWeights::F32],
            serving: vec![WeightFormat::Q8_0, WeightFormat::F32],
        }
    }
}

/// One implementation's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Library versions as the implementation reports them.
    pub version: String,
    pub threads: usize,
    pub load_s: f64,
    /// Seconds per timed run.
    pub prefill_s: Vec<f64>,
    pub decode_s: Vec<f64>,
    /// Prompt tokens over the median prefill time.
    pub prefill_tokens_per_s: f64,
    /// Decode tokens over the median decode time.
    pub decode_tokens_per_s: f64,
    /// The greedy tokens of the last run: the first from prefill, then the decoded ones.
    pub tokens: Vec<u32>,
}

impl Measurement {
    /// Our own rows' measurement from their timed runs: rates over the medians.
    fn of_runs(
        version: String,
        options: &ModelBenchOptions,
        load_s: f64,
        prompt_tokens: usize,
        prefill_s: Vec<f64>,
        decode_s: Vec<f64>,
        tokens: Vec<u32>,
    ) -> Self {
        Measurement {
            version,
            threads: options.threads,
            load_s,
            prefill_tokens_per_s: prompt_tokens as f64 / median(&prefill_s),
            decode_tokens_per_s: options.decode_tokens as f64 / median(&decode_s),
            prefill_s,
            decode_s,
            tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// Short name: `apprentice`, `transformers`, `llama.cpp Q4_1`, ...
    pub label: String,
    /// What it computes with.
    pub computes_with: String,
    /// The weights file it ran.
    pub weights: String,
    pub measurement: Option<Measurement>,
    /// Why there is no measurement (a missing package names the pip command that installs it).
    pub unavailable: Option<String>,
    /// How many leading greedy tokens equal ours.
    pub same_tokens_as_ours: Option<usize>,
}

impl BenchRow {
    fn unavailable(label: &str, computes_with: &str, weights: &Path, reason: String) -> Self {
        Self {
            label: label.into(),
            computes_with: computes_with.into(),
            weights: weights.display().to_string(),
            measurement: None,
            unavailable: Some(reason),
            same_tokens_as_ours: None,
        }
    }
}

/// A target of issue 5: our decode speed over a baseline's, at least `required`.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub baseline: String,
    pub required_ratio: f64,
    /// Our decode tokens/s over the baseline's; `None` when the baseline was not measured.
    pub ratio: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchReport {
    pub machine: String,
    /// `/proc/loadavg` before and after the run: other work on the machine skews every number,
    /// llama.cpp's and torch's spinning OpenMP threads most of all.
    pub load_average_before: Option<String>,
    pub load_average_after: Option<String>,
    pub model: String,
    /// Storage types of the GGUF's tensors, e.g. `Q4_1 ×210, F32 ×61, Q8_0 ×1`.
    pub model_storage: String,
    pub options: ModelBenchOptions,
    pub prompt_ids: Vec<u32>,
    /// Ours first, then the baselines.
    pub rows: Vec<BenchRow>,
    pub targets: Vec<TargetCheck>,
}

/// A plain English paragraph; its tokens are repeated up to the prompt length.
const PROMPT_TEXT: &str = "The apprentice watched the old carpenter plane a board until the shavings curled \
like ribbons. Every morning he swept the workshop, sharpened the chisels and listened. Measure twice, the \
carpenter said, and cut once; the wood remembers every mistake. By winter the apprentice could join two \
boards so closely that light did not pass between them, and by spring he was building chairs of his own.";

/// `n` prompt token ids: the tokens of a fixed paragraph, repeated.
pub fn prompt_ids(tokenizer: &Tokenizer, n: usize) -> Result<Vec<u32>, ModelBenchError> {
    let ids = tokenizer.encode(PROMPT_TEXT, false)?;
    if ids.is_empty() {
        return Err(ModelBenchError::Options("the prompt text encodes to no tokens".into()));
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

/// Runs the benchmark on the GGUF at `model_path`: ours, then the baselines the options ask for.
pub fn run_model_bench(model_path: &Path, options: &ModelBenchOptions) -> Result<ModelBenchReport, ModelBenchError> {
    if options.prompt_tokens == 0 || options.decode_tokens == 0 || options.repeats == 0 {
        return Err(ModelBenchError::Options("prompt tokens, decode tokens and repeats must be at least 1".into()));
    }
    let candle_threads = candle_core::utils::get_num_threads();
    if candle_threads != options.threads {
        return Err(ModelBenchError::Options(format!(
            "candle runs on {candle_threads} threads, the benchmark asks for {}: set RAYON_NUM_THREADS={} before \
             the process starts any thread pool",
            options.threads, options.threads
        )));
    }
    let model_storage = storage_types(model_path)?;
    let load_average_before = load_average();

    tracing::info!("loading {}", model_path.display());
    let started = Instant::now();
    let loaded = load(model_path, &Device::Cpu)?;
    let load_s = started.elapsed().as_secs_f64();
    let tokenizer = Tokenizer::from_path(model_path)?;
    let prompt = prompt_ids(&tokenizer, options.prompt_tokens)?;

    tracing::info!("measuring apprentice (candle, f32)");
    let ours = measure_ours(&loaded.model, &prompt, options, load_s)?;
    let ours_tokens = ours.tokens.clone();
    let mut rows = vec![BenchRow {
        label: "apprentice".into(),
        computes_with: format!(
            "f32, dequantised from the GGUF at load (candle: matmuls on {} threads, elementwise ops on {})",
            options.threads,
            candle_elementwise_threads()
        ),
        weights: model_path.display().to_string(),
        measurement: Some(ours),
        unavailable: None,
        same_tokens_as_ours: Some(ours_tokens.len()),
    }];

    for &format in &options.serving {
        tracing::info!("measuring the serving engine ({format})");
        let started = Instant::now();
        let serving = ServingModel::from_llama(&loaded.model, format)?;
        let measurement = measure_serving(&serving, &prompt, options, load_s + started.elapsed().as_secs_f64())?;
        rows.push(BenchRow {
            label: serving_label(format),
            computes_with: format!(
                "the serving engine (local providers): {format} projections, f32 activations, {} kernels, {} threads",
                crate::serve::cpu_kernels(),
                options.threads
            ),
            weights: model_path.display().to_string(),
            measurement: Some(measurement),
            unavailable: None,
            same_tokens_as_ours: None,
        });
    }

    let scratch = tempfile::tempdir().map_err(|error| io("creating a scratch folder", error))?;
    if let Some(python) = &options.python {
        if options.transformers {
            tracing::info!("measuring transformers");
            let script = write_script(scratch.path(), "baseline_transformers.py", TRANSFORMERS_SCRIPT)?;
            rows.push(run_baseline(
                python,
                &script,
                "transformers",
                "fp32, dequantised from the GGUF by transformers (torch, CPU)",
                model_path,
                &prompt,
                options,
                &[],
            ));
        }
        let script = write_script(scratch.path(), "baseline_llama_cpp.py", LLAMA_CPP_SCRIPT)?;
        let mut llama_cpp_missing: Option<String> = None;
        for &weights in &options.llama_cpp {
            let (label, computes_with) = match weights {
                LlamaCppWeights::Source => {
                    (format!("llama.cpp {}", main_storage(&model_storage)), format!("{model_storage}, natively"))
                }
                LlamaCppWeights::F16 => ("llama.cpp f16".to_string(), "f16 GGUF written from our f32 weights".into()),
                LlamaCppWeights::F32 => ("llama.cpp f32".to_string(), "f32 GGUF written from our f32 weights".into()),
            };
            let path = match weights {
                LlamaCppWeights::Source => model_path.to_path_buf(),
                LlamaCppWeights::F16 | LlamaCppWeights::F32 => scratch.path().join(format!("{label}.gguf")),
            };
            if let Some(reason) = &llama_cpp_missing {
                rows.push(BenchRow::unavailable(&label, &computes_with, &path, reason.clone()));
                continue;
            }
            if weights != LlamaCppWeights::Source {
                let dtype = if weights == LlamaCppWeights::F16 { GgufDType::F16 } else { GgufDType::F32 };
                tracing::info!("writing {}", path.display());
                save_gguf(&loaded.model, &path, dtype, loaded.gguf_metadata.as_ref())?;
            }
            tracing::info!("measuring {label}");
            let row = run_baseline(
                python,
                &script,
                &label,
                &computes_with,
                &path,
                &prompt,
                options,
                &["--runs".into(), computes_with.clone()],
            );
            if weights != LlamaCppWeights::Source {
                let _ = std::fs::remove_file(&path);
            }
            if row.measurement.is_none() {
                // The same package is missing for every llama.cpp row: don't write GGUFs for nothing.
                llama_cpp_missing = row.unavailable.clone();
            }
            rows.push(row);
        }
    } else {
        let reason = "baselines not run (--no-baselines)".to_string();
        if options.transformers {
            rows.push(BenchRow::unavailable("transformers", "fp32 (torch, CPU)", model_path, reason.clone()));
        }
        for &weights in &options.llama_cpp {
            let label = match weights {
                LlamaCppWeights::Source => format!("llama.cpp {}", main_storage(&model_storage)),
                LlamaCppWeights::F16 => "llama.cpp f16".into(),
                LlamaCppWeights::F32 => "llama.cpp f32".into(),
            };
            rows.push(BenchRow::unavailable(&label, "-", model_path, reason.clone()));
        }
    }

    for row in rows.iter_mut().skip(1) {
        row.same_tokens_as_ours = row.measurement.as_ref().map(|m| common_prefix(&m.tokens, &ours_tokens));
    }
    let targets = targets(&rows);
    Ok(ModelBenchReport {
        machine: machine_description(),
        load_average_before,
        load_average_after: load_average(),
        model: model_path.display().to_string(),
        model_storage,
        options: options.clone(),
        prompt_ids: prompt,
        rows,
        targets,
    })
}

/// Our prefill and decode, through `generate_stream` as a caller uses it: greedy, no stop tokens,
/// `1 + decode_tokens` tokens. Prefill ends at the first token's event; decode spans the rest.
fn measure_ours(
    model: &Llama,
    prompt: &[u32],
    options: &ModelBenchOptions,
    load_s: f64,
) -> Result<Measurement, ModelBenchError> {
    let warm_up = prompt[..prompt.len().min(16)].to_vec();
    generate(model, &[warm_up], &GenerateOptions::greedy(5), None)?;

    let generate_options = GenerateOptions::greedy(options.decode_tokens + 1);
    let (mut prefill_s, mut decode_s, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..options.repeats {
        let mut at = Vec::with_capacity(options.decode_tokens + 1);
        let started = Instant::now();
        let generations = generate_stream(model, &[prompt.to_vec()], &generate_options, None, |event| {
            if let StreamEvent::Token { .. } = event {
                at.push(Instant::now());
            }
            ControlFlow::Continue(())
        })?;
        let (Some(first), Some(last)) = (at.first(), at.last()) else {
            return Err(ModelBenchError::Options("generation produced no tokens".into()));
        };
        if at.len() != options.decode_tokens + 1 {
            return Err(ModelBenchError::Options(format!(
                "generation stopped after {} of {} tokens",
                at.len(),
                options.decode_tokens + 1
            )));
        }
        prefill_s.push((*first - started).as_secs_f64());
        decode_s.push((*last - *first).as_secs_f64());
        tokens = generations.into_iter().next().map(|g| g.tokens).unwrap_or_default();
    }
    let version = format!("apprentice-model {} (candle 0.11)", env!("CARGO_PKG_VERSION"));
    Ok(Measurement::of_runs(version, options, load_s, prompt.len(), prefill_s, decode_s, tokens))
}

/// The row label of the serving engine on `format` weights.
fn serving_label(format: WeightFormat) -> String {
    format!("apprentice serve {format}")
}

/// The serving engine timed like every row: prefill is one step over the whole prompt from an
/// empty cache, up to the first greedy token; decode is one single-token step per further token.
fn measure_serving(
    model: &ServingModel,
    prompt: &[u32],
    options: &ModelBenchOptions,
    load_s: f64,
) -> Result<Measurement, ModelBenchError> {
    let argmax = |logits: &[f32]| {
        logits
            .iter()
            .enumerate()
            .fold((0u32, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i as u32, v) } else { best })
            .0
    };
    let step = |cache: &mut crate::serve::SequenceCache, tokens: &[u32]| -> Result<u32, ModelBenchError> {
        let mut chunks = [Chunk { cache, tokens, logits: true }];
        let logits = model.forward(&mut chunks)?.pop().flatten();
        logits.map(|l| argmax(&l)).ok_or_else(|| ModelBenchError::Options("the engine returned no logits".into()))
    };
    let mut warm_up = model.new_cache();
    step(&mut warm_up, &prompt[..prompt.len().min(16)])?;

    let (mut prefill_s, mut decode_s, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..options.repeats {
        let mut cache = model.new_cache();
        let started = Instant::now();
        let mut run = vec![step(&mut cache, prompt)?];
        let first = Instant::now();
        while run.len() < options.decode_tokens + 1 {
            let last = run[run.len() - 1];
            run.push(step(&mut cache, &[last])?);
        }
        decode_s.push(first.elapsed().as_secs_f64());
        prefill_s.push((first - started).as_secs_f64());
        tokens = run;
    }
    let version = format!("apprentice-model {} (serving engine, {})", env!("CARGO_PKG_VERSION"), model.format());
    Ok(Measurement::of_runs(version, options, load_s, prompt.len(), prefill_s, decode_s, tokens))
}

/// What a baseline script prints: a measurement, or why it could not make one.
#[derive(Debug, serde::Deserialize)]
struct ScriptOutput {
    error: Option<String>,
    install: Option<String>,
    version: Option<String>,
    threads: Option<usize>,
    load_s: Option<f64>,
    prefill_s: Option<Vec<f64>>,
    decode_s: Option<Vec<f64>>,
    prefill_tokens_per_s: Option<f64>,
    decode_tokens_per_s: Option<f64>,
    tokens: Option<Vec<u32>>,
}

#[allow(clippy::too_many_arguments)]
fn run_baseline(
    python: &str,
    script: &Path,
    label: &str,
    computes_with: &str,
    weights: &Path,
    prompt: &[u32],
    options: &ModelBenchOptions,
    extra_args: &[String],
) -> BenchRow {
    let prompt_json = serde_json::to_string(prompt).unwrap_or_default();
    let output = Command::new(python)
        .arg(script)
        .arg("--gguf")
        .arg(weights)
        .arg("--prompt-ids")
        .arg(&prompt_json)
        .arg("--decode-tokens")
        .arg(options.decode_tokens.to_string())
        .arg("--repeats")
        .arg(options.repeats.to_string())
        .arg("--threads")
        .arg(options.threads.to_string())
        .args(extra_args)
        .env("OMP_NUM_THREADS", options.threads.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("TQDM_DISABLE", "1")
        .output();
    let unavailable = |reason: String| BenchRow::unavailable(label, computes_with, weights, reason);
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return unavailable(format!("Python interpreter `{python}` not found (set APPRENTICE_PYTHON or --python)"))
        }
        Err(e) => return unavailable(format!("cannot run `{python}`: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .and_then(|line| serde_json::from_str::<ScriptOutput>(line).ok());
    let stderr_tail = || {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    };
    let Some(parsed) = parsed else {
        return unavailable(format!("{} failed ({}): {}", script.display(), output.status, stderr_tail()));
    };
    if let Some(error) = parsed.error {
        let install = parsed.install.map(|i| format!("; install with: {i}")).unwrap_or_default();
        let code = output.status.code().filter(|&c| c != MISSING_PACKAGE_EXIT);
        let status = code.map(|c| format!(" (exit {c})")).unwrap_or_default();
        return unavailable(format!("{error}{status}{install}"));
    }
    match (parsed.prefill_tokens_per_s, parsed.decode_tokens_per_s) {
        (Some(prefill), Some(decode)) => BenchRow {
            label: label.into(),
            computes_with: computes_with.into(),
            weights: weights.display().to_string(),
            measurement: Some(Measurement {
                version: parsed.version.unwrap_or_default(),
                threads: parsed.threads.unwrap_or(options.threads),
                load_s: parsed.load_s.unwrap_or(f64::NAN),
                prefill_s: parsed.prefill_s.unwrap_or_default(),
                decode_s: parsed.decode_s.unwrap_or_default(),
                prefill_tokens_per_s: prefill,
                decode_tokens_per_s: decode,
                tokens: parsed.tokens.unwrap_or_default(),
            }),
            unavailable: None,
            same_tokens_as_ours: None,
        },
        _ => unavailable(format!("{} printed no tokens/s: {}", script.display(), stderr_tail())),
    }
}

/// Issue 5's targets on decode for the candle row: at least as fast as transformers, within 2× of
/// llama.cpp; issue 13's for each serving-engine row: at least 0.75× llama.cpp on the source file.
fn targets(rows: &[BenchRow]) -> Vec<TargetCheck> {
    let check = |ours: &BenchRow, theirs: &BenchRow, target: String, required: f64| {
        let ratio = match (&ours.measurement, &theirs.measurement) {
            (Some(o), Some(t)) => Some(o.decode_tokens_per_s / t.decode_tokens_per_s),
            _ => None,
        };
        TargetCheck {
            target,
            baseline: theirs.label.clone(),
            required_ratio: required,
            ratio,
            met: ratio.map(|r| r >= required),
        }
    };
    let Some(candle) = rows.first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for row in rows.iter().skip(1) {
        if row.label == "transformers" {
            out.push(check(candle, row, "decode at least as fast as transformers".into(), 1.0));
        } else if row.label.starts_with("llama.cpp") {
            out.push(check(candle, row, format!("decode within 2x of {}", row.label), 0.5));
        }
    }
    let llama_cpp_source = rows
        .iter()
        .find(|r| r.label.starts_with("llama.cpp") && !r.label.ends_with(" f16") && !r.label.ends_with(" f32"));
    if let Some(baseline) = llama_cpp_source {
        for row in rows.iter().filter(|r| r.label.starts_with("apprentice serve")) {
            out.push(check(row, baseline, format!("{}: decode >= 0.75x {}", row.label, baseline.label), 0.75));
        }
    }
    out
}

impl ModelBenchReport {
    /// All targets measured and met.
    pub fn met(&self) -> bool {
        !self.targets.is_empty() && self.targets.iter().all(|t| t.met == Some(true))
    }

    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        out.push_str(&format!("model: {} ({})\n", self.model, self.model_storage));
        out.push_str(&format!("machine: {}; every implementation on {} threads\n", self.machine, o.threads));
        if let (Some(before), Some(after)) = (&self.load_average_before, &self.load_average_after) {
            out.push_str(&format!(
                "load average before {before}, after {after} (other work on the machine slows every row)\n"
            ));
        }
        out.push_str(&format!(
            "prompt {} tokens (the same ids everywhere), then 1 + {} greedy tokens with a KV cache; median of {} \
             runs after a warm-up\n\n",
            o.prompt_tokens, o.decode_tokens, o.repeats
        ));
        let ours = self.rows.first().and_then(|r| r.measurement.as_ref());
        out.push_str(&format!(
            "{:<22} {:>13} {:>12} {:>15} {:>14} {:>12}  {}\n",
            "implementation",
            "prefill tok/s",
            "decode tok/s",
            "ours/it prefill",
            "ours/it decode",
            "same tokens",
            "computes with"
        ));
        for row in &self.rows {
            match &row.measurement {
                Some(m) => {
                    let ratio = |ours: Option<f64>, theirs: f64| match ours {
                        Some(o) if theirs > 0.0 => format!("{:.2}x", o / theirs),
                        _ => "-".into(),
                    };
                    out.push_str(&format!(
                        "{:<22} {:>13.1} {:>12.1} {:>15} {:>14} {:>12}  {}\n",
                        row.label,
                        m.prefill_tokens_per_s,
                        m.decode_tokens_per_s,
                        ratio(ours.map(|o| o.prefill_tokens_per_s), m.prefill_tokens_per_s),
                        ratio(ours.map(|o| o.decode_tokens_per_s), m.decode_tokens_per_s),
                        row.same_tokens_as_ours.map_or("-".into(), |n| format!("{n}/{}", m.tokens.len())),
                        row.computes_with
                    ));
                }
                None => out.push_str(&format!(
                    "{:<22} {:>13} {:>12} {:>15} {:>14} {:>12}  {}\n",
                    row.label, "-", "-", "-", "-", "-", row.computes_with
                )),
            }
        }
        let unavailable: Vec<&BenchRow> = self.rows.iter().filter(|r| r.unavailable.is_some()).collect();
        if !unavailable.is_empty() {
            out.push_str("\nnot measured:\n");
            for row in unavailable {
                out.push_str(&format!("  {}: {}\n", row.label, row.unavailable.as_deref().unwrap_or_default()));
            }
        }
        out.push_str("\nversions:\n");
        for row in &self.rows {
            if let Some(m) = &row.measurement {
                out.push_str(&format!("  {:<22} {} (load {:.1} s)\n", row.label, m.version, m.load_s));
            }
        }
        if !self.targets.is_empty() {
            out.push_str("\ntargets (our decode tokens/s over theirs; `ours/it` above is the candle row's):\n");
            for t in &self.targets {
                let verdict = match (t.ratio, t.met) {
                    (Some(r), Some(true)) => format!("{r:.2}x, met (needs >= {:.2}x)", t.required_ratio),
                    (Some(r), _) => format!("{r:.2}x, MISSED (needs >= {:.2}x)", t.required_ratio),
                    (None, _) => "not measured".into(),
                };
                out.push_str(&format!("  {:<56} {verdict}\n", t.target));
            }
        }
        out
    }
}

fn write_script(dir: &Path, name: &str, text: &str) -> Result<PathBuf, ModelBenchError> {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).map_err(|e| io(&format!("writing {}", path.display()), e))?;
    file.write_all(text.as_bytes()).map_err(|e| io(&format!("writing {}", path.display()), e))?;
    Ok(path)
}

fn io(context: &str, error: std::io::Error) -> ModelBenchError {
    ModelBenchError::Io { context: context.into(), error }
}

/// Storage types of the GGUF's tensors, most common first: `Q4_1 ×210, F32 ×61, Q8_0 ×1`.
fn storage_types(path: &Path) -> Result<String, ModelBenchError> {
    if !path.is_file() {
        return Ok("HF folder".into());
    }
    let content = read_gguf_content(path)?;
    let mut counts: Vec<(String, usize)> = Vec::new();
    for info in content.tensor_infos.values() {
        let name = format!("{:?}", info.ggml_dtype);
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(counts.iter().map(|(n, c)| format!("{n} x{c}")).collect::<Vec<_>>().join(", "))
}

/// The most common storage type in a `storage_types` description.
fn main_storage(storage: &str) -> String {
    storage.split(' ').next().unwrap_or("GGUF").to_string()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// How many threads candle 0.11 runs elementwise ops on: its own spin-waiting pool, sized by
/// `CANDLE_NUM_THREADS`, else like rayon's.
fn candle_elementwise_threads() -> String {
    match std::env::var("CANDLE_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0) {
        Some(n) => format!("{n} (CANDLE_NUM_THREADS)"),
        None => format!("{} (candle's default)", candle_core::utils::get_num_threads()),
    }
}

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// CPU model and core count, from /proc/cpuinfo where there is one.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn common_prefix_counts_leading_equal_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }

    #[test]
    fn llama_cpp_weights_parse() {
        assert_eq!(LlamaCppWeights::parse("Q4_1"), Some(LlamaCppWeights::Source));
        assert_eq!(LlamaCppWeights::parse("f16"), Some(LlamaCppWeights::F16));
        assert_eq!(LlamaCppWeights::parse("bf16"), None);
    }
}
