//! Shared vocabulary of apprentice: ids, structured inputs, content blocks, inference and feedback
//! records, the TOML configuration and its templates.
//!
//! Nothing here does I/O beyond reading configuration files; every other crate builds on these types.

pub mod config;
pub mod content;
pub mod ids;
pub mod record;
pub mod render;
pub mod templates;

pub use config::{Config, ConfigError};
pub use content::{ContentBlock, Input, InputMessage, Role, SystemInput, ToolCall, ToolResult};
pub use ids::new_id;
pub use record::{
    DatasetRecord, FeedbackRecord, FeedbackValue, InferenceOutput, InferenceRecord, JsonOutput, MetricLevel,
    RenderedBlock, RenderedMessage, RenderedRequest, ToolDefinition, Usage,
};
