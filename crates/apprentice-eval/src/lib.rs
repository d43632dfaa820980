//! Evaluation of policies (the teacher, any gateway variant, a local student) on env tasks, the
//! statistics to compare them honestly, and the reports that show what a student saves.

pub mod curve;
pub mod env_eval;
pub mod replay;
pub mod report;
pub mod stats;
pub mod svg;

pub use env_eval::{
    compare, evaluate, Comparison, Contender, EpisodeResult, EvalError, EvalOptions, Evaluation, PolicyEvaluation,
    PolicySummary, Threshold,
};
pub use replay::{replay, Evaluator, ReplayError, ReplayItem, ReplayOptions, ReplayReport};
pub use report::{Report, ReportError, ReportFiles, TrainingRun};
pub use stats::{paired_difference, percentile, wilson, AdaptiveStopping, Interval, Z95};
