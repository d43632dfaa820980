//! `apprentice report RUN...`: evaluation runs and the training runs behind them as one Markdown
//! summary, one JSON file with every figure of the table, and one self-contained HTML page with
//! the plots inline (also written as SVG files).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::env_eval::{Comparison, Evaluation, PolicySummary};
use crate::svg::{self, Point, Series};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {message}")]
    Run { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// One line of a training run's metrics.jsonl, as the report reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingPoint {
    pub step: u64,
    /// None on the step-0 line, which holds the starting model's validation loss only.
    pub loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub weight_mean: Option<f64>,
    pub weight_min: Option<f64>,
    pub weight_max: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRun {
    pub name: String,
    pub path: PathBuf,
    pub objective: Option<String>,
    pub points: Vec<TrainingPoint>,
}

impl TrainingRun {
    /// Reads `dir/metrics.jsonl` (and the objective from `dir/train_config.toml`, when there).
    pub fn load(dir: &Path) -> Result<Self, ReportError> {
        let metrics = dir.join("metrics.jsonl");
        let bad = |message: String| ReportError::Run { path: metrics.clone(), message };
        let text = std::fs::read_to_string(&metrics).map_err(|e| bad(e.to_string()))?;
        let mut points = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let point: TrainingPoint = serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
            points.push(point);
        }
        let objective = std::fs::read_to_string(dir.join("train_config.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| t.get("objective").and_then(|o| o.as_str().map(String::from)));
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Self { name, path: dir.to_path_buf(), objective, points })
    }

    pub fn first_val_loss(&self) -> Option<f64> {
        self.points.iter().find_map(|p| p.val_loss)
    }

    pub fn last_val_loss(&self) -> Option<f64> {
        self.points.iter().rev().find_map(|p| p.val_loss)
    }

    fn importance_weighted(&self) -> bool {
        self.objective.as_deref().is_some_and(|o| o.starts_with("iw"))
    }
}

/// An evaluation with its table rows and paired comparisons, as report.json holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSection {
    pub run_id: String,
    pub env: String,
    pub split: String,
    pub summaries: Vec<PolicySummary>,
    /// Every policy against the first one (the reference).
    pub comparisons: Vec<Comparison>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub evaluations: Vec<EvaluationSection>,
    pub training_runs: Vec<TrainingRun>,
}

/// What [`Report::write`] produced.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub markdown: PathBuf,
    pub json: PathBuf,
    pub html: PathBuf,
    pub plots: Vec<PathBuf>,
}

impl Report {
    pub fn new(evaluations: &[Evaluation], training_runs: Vec<TrainingRun>) -> Self {
        let evaluations = evaluations
            .iter()
            .map(|e| EvaluationSection {
                run_id: e.run_id.clone(),
                env: e.env.clone(),
                split: e.split.clone(),
                summaries: e.summaries(),
                comparisons: e.comparisons(None),
            })
            .collect();
        Self { created_at: chrono::Utc::now(), evaluations, training_runs }
    }

    /// Reads runs: a folder (or file) with `evaluation.json` is an evaluation run, a folder with
    /// `metrics.jsonl` a training run.
    pub fn load(runs: &[PathBuf]) -> Result<Self, ReportError> {
        let mut evaluations = Vec::new();
        let mut training = Vec::new();
        for run in runs {
            let evaluation_file = if run.is_file() { run.clone() } else { run.join("evaluation.json") };
            if evaluation_file.is_file() {
                let text = std::fs::read_to_string(&evaluation_file)
                    .map_err(|e| ReportError::Run { path: evaluation_file.clone(), message: e.to_string() })?;
                let evaluation: Evaluation = serde_json::from_str(&text)
                    .map_err(|e| ReportError::Run { path: evaluation_file.clone(), message: e.to_string() })?;
                evaluations.push(evaluation);
            } else if run.join("metrics.jsonl").is_file() {
                training.push(TrainingRun::load(run)?);
            } else {
                return Err(ReportError::Run {
                    path: run.clone(),
                    message: "neither an evaluation run (evaluation.json) nor a training run (metrics.jsonl)".into(),
                });
            }
        }
        Ok(Self::new(&evaluations, training))
    }

    /// The table of every evaluation, as printed and as in the Markdown file.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for section in &self.evaluations {
            let _ = writeln!(out, "Evaluation `{}`: {} {} split\n", section.run_id, section.env, section.split);
            out.push_str("| policy | episodes | success [95% CI] | mean return | steps/episode | input tokens/episode | output tokens/episode | latency p50 / p95 (ms/step) | cost/episode | cost/success | wall (s) |\n");
            out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for s in &section.summaries {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1}% [{:.1}, {:.1}] | {:.3} | {:.1} | {:.0} | {:.1} | {:.1} / {:.1} | {} | {} | {:.1} |",
                    s.name,
                    s.episodes,
                    100.0 * s.success.estimate,
                    100.0 * s.success.low,
                    100.0 * s.success.high,
                    s.mean_return,
                    s.steps_per_episode,
                    s.input_tokens_per_episode,
                    s.output_tokens_per_episode,
                    s.latency_p50_ms,
                    s.latency_p95_ms,
                    money(s.cost_per_episode),
                    s.cost_per_success.map_or("–".to_string(), money),
                    s.wall_s
                );
            }
            if !section.comparisons.is_empty() {
                out.push_str("\nPaired on identical tasks (success difference, 95% CI):\n\n");
                for c in &section.comparisons {
                    let d = &c.success_difference;
                    let _ = writeln!(
                        out,
                        "- {} − {}: {:+.1} points [{:+.1}, {:+.1}] over {} tasks",
                        c.a,
                        c.b,
                        100.0 * d.estimate,
                        100.0 * d.low,
                        100.0 * d.high,
                        c.tasks
                    );
                }
            }
            let prices: Vec<String> = section
                .summaries
                .iter()
                .map(|s| format!("- {}: {}", s.name, s.price.as_deref().unwrap_or("no price configured (cost 0)")))
                .collect();
            let _ = writeln!(out, "\nPrices used:\n\n{}\n", prices.join("\n"));
        }
        for run in &self.training_runs {
            let _ = writeln!(
                out,
                "Training run `{}` ({}): {} steps, validation loss {} → {}",
                run.name,
                run.objective.as_deref().unwrap_or("objective unknown"),
                run.points.last().map_or(0, |p| p.step),
                run.first_val_loss().map_or("–".into(), |v| format!("{v:.4}")),
                run.last_val_loss().map_or("–".into(), |v| format!("{v:.4}")),
            );
        }
        out
    }

    /// The plots as (file stem, SVG text).
    pub fn plots(&self) -> Vec<(String, String)> {
        let mut plots = Vec::new();
        for (i, section) in self.evaluations.iter().enumerate() {
            let suffix = if self.evaluations.len() > 1 { format!("-{}", i + 1) } else { String::new() };
            let success_points = |x: &dyn Fn(usize, &PolicySummary) -> f64| {
                section
                    .summaries
                    .iter()
                    .enumerate()
                    .map(|(j, s)| Point {
                        label: s.name.clone(),
                        x: x(j, s),
                        y: 100.0 * s.success.estimate,
                        y_low: Some(100.0 * s.success.low),
                        y_high: Some(100.0 * s.success.high),
                    })
                    .collect::<Vec<_>>()
            };
            plots.push((
                format!("success{suffix}"),
                svg::scatter(
                    &format!("Success on {} {} (95% CI)", section.env, section.split),
                    "policy (in table order)",
                    "success %",
                    &success_points(&|j, _| (j + 1) as f64),
                    true,
                ),
            ));
            plots.push((
                format!("success-vs-cost{suffix}"),
                svg::scatter(
                    "Success vs cost per episode",
                    "cost per episode",
                    "success %",
                    &success_points(&|_, s| s.cost_per_episode),
                    true,
                ),
            ));
        }
        if !self.training_runs.is_empty() {
            let mut series = Vec::new();
            for run in &self.training_runs {
                series.push(Series {
                    label: format!("{} train", run.name),
                    points: run.points.iter().filter_map(|p| p.loss.map(|l| (p.step as f64, l))).collect(),
                    dashed: true,
                });
                series.push(Series {
                    label: format!("{} validation", run.name),
                    points: run.points.iter().filter_map(|p| p.val_loss.map(|v| (p.step as f64, v))).collect(),
                    dashed: false,
                });
            }
            plots.push(("training".into(), svg::lines("Training curves", "step", "loss per trained token", &series)));
        }
        for run in self.training_runs.iter().filter(|r| r.importance_weighted()) {
            let pick = |f: fn(&TrainingPoint) -> Option<f64>| {
                run.points.iter().filter_map(|p| f(p).map(|v| (p.step as f64, v))).collect::<Vec<_>>()
            };
            let series = vec![
                Series { label: "mean".into(), points: pick(|p| p.weight_mean), dashed: false },
                Series { label: "min".into(), points: pick(|p| p.weight_min), dashed: true },
                Series { label: "max".into(), points: pick(|p| p.weight_max), dashed: true },
            ];
            plots.push((
                format!("weights-{}", run.name),
                svg::lines(&format!("iw-SFT weights: {}", run.name), "step", "importance weight", &series),
            ));
        }
        plots
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from("# apprentice report\n\n");
        out.push_str(&self.table());
        for (stem, _) in self.plots() {
            let _ = writeln!(out, "\n![{stem}]({stem}.svg)");
        }
        out
    }

    /// One page, no external resources: the table and every plot inline.
    pub fn html(&self) -> String {
        let mut out = String::from(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>apprentice report</title><style>\
             body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}\
             td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}\
             </style></head><body><h1>apprentice report</h1>",
        );
        for line in self.table().lines() {
            if line.starts_with("|---") {
                continue;
            }
            if let Some(row) = line.strip_prefix('|') {
                let header = row.contains("policy | episodes");
                let cells: Vec<String> = row
                    .trim_end_matches('|')
                    .split('|')
                    .map(|c| {
                        if header {
                            format!("<th>{}</th>", html_escape(c.trim()))
                        } else {
                            format!("<td>{}</td>", html_escape(c.trim()))
                        }
                    })
                    .collect();
                let _ = write!(out, "{}<tr>{}</tr>", if header { "<table>" } else { "" }, cells.concat());
            } else {
                if out.ends_with("</tr>") {
                    out.push_str("</table>");
                }
                if !line.trim().is_empty() {
                    let _ = write!(out, "<p>{}</p>", html_escape(line));
                }
            }
        }
        if out.ends_with("</tr>") {
            out.push_str("</table>");
        }
        for (stem, svg) in self.plots() {
            let _ = write!(out, "<figure id=\"{stem}\">{svg}</figure>");
        }
        out.push_str("</body></html>\n");
        out
    }

    /// Writes report.md, report.json, report.html and every plot as SVG into `dir`.
    pub fn write(&self, dir: &Path) -> Result<ReportFiles, ReportError> {
        let write = |name: &str, text: &str| -> Result<PathBuf, ReportError> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| ReportError::Write { path: path.clone(), source })?;
            Ok(path)
        };
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write { path: dir.to_path_buf(), source })?;
        let json = serde_json::to_string_pretty(self).expect("a report serializes");
        let mut plots = Vec::new();
        for (stem, svg) in self.plots() {
            plots.push(write(&format!("{stem}.svg"), &svg)?);
        }
        Ok(ReportFiles {
            markdown: write("report.md", &self.markdown())?,
            json: write("report.json", &json)?,
            html: write("report.html", &self.html())?,
            plots,
        })
    }
}

fn money(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 0.01 {
        format!("{v:.4}")
    } else {
        format!("{v:.2e}")
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
