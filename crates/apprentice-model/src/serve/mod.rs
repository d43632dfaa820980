//! Serving many sequences at once on the CPU.
//!
//! - [`kernels`]: the matrix products of a decode step over compact weights (q8_0 or f32), one
//!   pass over the weights for every sequence of the batch, dispatched on the CPU's features at
//!   run time.
//! - [`engine`]: the llama-family forward pass over a ragged batch: every sequence brings its own
//!   KV cache and its own number of new tokens (one while decoding, a chunk while prefilling).
//! - [`scheduler`]: continuous batching: requests join the running batch between decode steps,
//!   leave when they finish, and leave their KV cache behind for the episode's next turn.

pub mod engine;
pub mod kernels;
pub mod scheduler;

pub use engine::{Chunk, EngineError, SequenceCache, ServingModel};
pub use kernels::{cpu_kernels, WeightFormat, WeightMatrix};
pub use scheduler::{Completion, EventSink, OnDone, Request, Scheduler, SchedulerConfig, SchedulerStats, Ticket};
