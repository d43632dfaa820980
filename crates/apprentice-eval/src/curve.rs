//! Learning curves: a student's test success against what it was trained on (teacher episodes,
//! epochs, ...), each point read from an evaluation run and paired there with the teacher, so a
//! user sees how much history it takes to reach the teacher.
//!
//! A curve is described in TOML:
//!
//! ```toml
//! title = "SFT students against teacher episodes"
//! x_label = "teacher episodes"
//! [[points]]
//! series = "SFT, 1 epoch"
//! x = 500
//! evaluation = "evals/d500"        # a folder with evaluation.json, or the file
//! policy = "d500-e1"
//! teacher = "teacher"              # the default
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::stats::{paired_difference, wilson, Interval, Z95};
use crate::svg::{lines, Series};
use crate::Evaluation;

#[derive(Debug, thiserror::Error)]
pub enum CurveError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid curve description")]
    Spec {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path} is not an evaluation.json")]
    Evaluation {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("point {index} ({series} at x = {x}): {reason}")]
    Point { index: usize, series: String, x: f64, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurveSpec {
    pub title: String,
    pub x_label: String,
    pub points: Vec<PointSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSpec {
    pub series: String,
    pub x: f64,
    pub evaluation: PathBuf,
    pub policy: String,
    #[serde(default = "default_teacher")]
    pub teacher: String,
}

fn default_teacher() -> String {
    "teacher".into()
}

/// One measured point: the student's success and the paired difference to the teacher on the
/// same tasks.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub series: String,
    pub x: f64,
    pub evaluation: String,
    pub policy: String,
    pub tasks: usize,
    pub successes: usize,
    pub success: Interval,
    pub teacher_successes: usize,
    /// Student − teacher, per task, in points of success rate.
    pub paired_difference: Interval,
}

#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub title: String,
    pub x_label: String,
    pub points: Vec<CurvePoint>,
}

impl Curve {
    /// Reads the description at `path`; evaluation paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Self, CurveError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CurveError::Read { path: path.into(), source })
        };
        let spec: CurveSpec =
            toml::from_str(&read(path)?).map_err(|source| CurveError::Spec { path: path.into(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut points = Vec::with_capacity(spec.points.len());
        for (index, p) in spec.points.iter().enumerate() {
            let mut file = base.join(&p.evaluation);
            if file.is_dir() {
                file = file.join("evaluation.json");
            }
            let evaluation: Evaluation = serde_json::from_str(&read(&file)?)
                .map_err(|source| CurveError::Evaluation { path: file.clone(), source })?;
            let point = measure(&evaluation, p).map_err(|reason| CurveError::Point {
                index,
                series: p.series.clone(),
                x: p.x,
                reason,
            })?;
            points.push(CurvePoint { evaluation: file.display().to_string(), ..point });
        }
        Ok(Curve { title: spec.title, x_label: spec.x_label, points })
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "| series | {} | student success [95% CI] | teacher | student − teacher, paired [95% CI] |\n|---|---:|---:|---:|---:|\n",
            self.x_label
        );
        for p in &self.points {
            out.push_str(&format!(
                "| {} | {} | {}/{}: {:.1}% [{:.1}, {:.1}] | {}/{} | {:+.1} [{:+.1}, {:+.1}] |\n",
                p.series,
                p.x,
                p.successes,
                p.tasks,
                100.0 * p.success.estimate,
                100.0 * p.success.low,
                100.0 * p.success.high,
                p.teacher_successes,
                p.tasks,
                100.0 * p.paired_difference.estimate,
                100.0 * p.paired_difference.low,
                100.0 * p.paired_difference.high,
            ));
        }
        out
    }

    /// Success (%) against x, one line per series, and the teacher's success on each point's
    /// tasks dashed.
    pub fn svg(&self) -> String {
        let mut by_series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        let mut teacher = Vec::new();
        for p in &self.points {
            by_series.entry(&p.series).or_default().push((p.x, 100.0 * p.success.estimate));
            teacher.push((p.x, 100.0 * p.teacher_successes as f64 / p.tasks.max(1) as f64));
        }
        let mut series: Vec<Series> = by_series
            .into_iter()
            .map(|(label, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { label: label.to_string(), points, dashed: false }
            })
            .collect();
        teacher.sort_by(|a, b| a.0.total_cmp(&b.0));
        teacher.dedup_by(|a, b| a.0 == b.0);
        series.push(Series { label: "teacher (same tasks)".into(), points: teacher, dashed: true });
        lines(&self.title, &self.x_label, "test success (%)", &series)
    }
}

fn measure(evaluation: &Evaluation, spec: &PointSpec) -> Result<CurvePoint, String> {
    let find = |name: &str| {
        evaluation.policies.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<&str> = evaluation.policies.iter().map(|p| p.name.as_str()).collect();
            format!("no policy `{name}` in the evaluation (it has {})", names.join(", "))
        })
    };
    let (student, teacher) = (find(&spec.policy)?, find(&spec.teacher)?);
    let teacher_by_task: BTreeMap<&str, bool> = teacher.episodes.iter().map(|e| (e.task.as_str(), e.success)).collect();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for episode in &student.episodes {
        let Some(&t) = teacher_by_task.get(episode.task.as_str()) else {
            return Err(format!("task {} was not played by the teacher", episode.task));
        };
        a.push(f64::from(u8::from(episode.success)));
        b.push(f64::from(u8::from(t)));
    }
    let successes = a.iter().filter(|&&s| s > 0.0).count();
    Ok(CurvePoint {
        series: spec.series.clone(),
        x: spec.x,
        evaluation: String::new(),
        policy: spec.policy.clone(),
        tasks: a.len(),
        successes,
        success: wilson(successes, a.len(), Z95),
        teacher_successes: b.iter().filter(|&&s| s > 0.0).count(),
        paired_difference: paired_difference(&a, &b, Z95)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluation(dir: &Path) -> PathBuf {
        let episodes = |wins: &[bool]| {
            wins.iter()
                .enumerate()
                .map(|(i, &success)| {
                    serde_json::json!({
                        "task": format!("test/{i}"), "episode_id": uuid::Uuid::now_v7(), "success": success,
                        "episode_return": 0.0, "steps": 1, "truncated": false, "input_tokens": 0,
                        "output_tokens": 0, "cost": 0.0, "step_latency_ms": [1.0]
                    })
                })
                .collect::<Vec<_>>()
        };
        let policy = |name: &str, wins: &[bool]| {
            serde_json::json!({ "name": name, "policy": name, "price": null, "episodes": episodes(wins),
                                "wall_s": 1.0, "stopped_early": false })
        };
        let value = serde_json::json!({
            "run_id": "r", "env": "babyai", "split": "test", "created_at": "2026-12-03T00:00:00Z",
            "policies": [policy("teacher", &[true, true, true, false]), policy("student", &[true, false, false, true])]
        });
        let folder = dir.join("eval");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("evaluation.json"), value.to_string()).unwrap();
        folder
    }

    #[test]
    fn points_pair_the_student_with_the_teacher_on_the_same_tasks() {
        let dir = tempfile::tempdir().unwrap();
        evaluation(dir.path());
        let spec = dir.path().join("curve.toml");
        std::fs::write(
            &spec,
            "title = \"t\"\nx_label = \"teacher episodes\"\n[[points]]\nseries = \"SFT\"\nx = 180\nevaluation = \"eval\"\npolicy = \"student\"\n",
        )
        .unwrap();
        let curve = Curve::load(&spec).unwrap();
        let p = &curve.points[0];
        assert_eq!((p.tasks, p.successes, p.teacher_successes), (4, 2, 3));
        assert!((p.paired_difference.estimate + 0.25).abs() < 1e-12);
        assert!(curve.table().contains("| SFT | 180 | 2/4: 50.0%"), "{}", curve.table());
        assert!(curve.svg().starts_with("<svg"));

        std::fs::write(
            &spec,
            "title = \"t\"\nx_label = \"x\"\n[[points]]\nseries = \"SFT\"\nx = 1\nevaluation = \"eval\"\npolicy = \"nobody\"\n",
        )
        .unwrap();
        let error = Curve::load(&spec).unwrap_err().to_string();
        assert!(error.contains("point 0 (SFT at x = 1): no policy `nobody`"), "{error}");
        assert!(error.contains("teacher, student"), "{error}");
    }
}
