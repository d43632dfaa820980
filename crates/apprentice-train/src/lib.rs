//! Training the student: the objectives of reference/iw-sft.md (`sft`, `iw-sft`, `sft-q`,
//! `iw-sft-q`), LoRA or full fine-tuning, AdamW with a cosine schedule, length-bucketed batches,
//! durable checkpoints with bit-for-bit resume, metrics, loss curves and the final export.

pub mod bench;
pub mod data;
pub mod error;
pub mod objective;
pub mod optim;
pub mod plot;
pub mod trainer;

pub use error::{Result, TrainError};
pub use objective::{Granularity, HelperPolicy, IwConfig, Objective, Reduction, WeightStats};
pub use trainer::{prepare_reference, train, TrainConfig, TrainOutcome, TrainingData};
