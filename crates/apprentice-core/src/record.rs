//! What the store keeps: one record per inference, one per piece of feedback.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::content::{ContentBlock, Input, Role, ToolCall, ToolResult};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// A tool offered to the model, in the provider-neutral shape (JSON-schema parameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDefinition {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub parameters: Value,
    #[serde(default)]
    pub strict: bool,
}

/// A message after rendering: only literal text, tool calls and tool results remain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderedMessage {
    pub role: Role,
    pub content: Vec<RenderedBlock>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RenderedBlock {
    Text { text: String },
    ToolCall(ToolCall),
    ToolResult(ToolResult),
}

/// The request exactly as sent to a provider (what the model saw), kept beside the structured input.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RenderedRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub messages: Vec<RenderedMessage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolDefinition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonOutput {
    /// The text the model produced.
    pub raw: String,
    /// The parsed value if `raw` is valid JSON that satisfies the function's output schema.
    pub parsed: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InferenceOutput {
    Chat { content: Vec<ContentBlock> },
    Json(JsonOutput),
}

/// One recorded LLM call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceRecord {
    pub id: Uuid,
    pub function_name: String,
    pub variant_name: String,
    pub episode_id: Uuid,
    /// The structured input as the application gave it.
    pub input: Input,
    /// The messages as sent to the model after templates were applied.
    pub rendered: RenderedRequest,
    pub output: InferenceOutput,
    pub model_name: String,
    pub provider_name: String,
    pub usage: Usage,
    pub latency_ms: f64,
    /// Time to first token, for streamed inferences.
    pub ttft_ms: Option<f64>,
    /// In the currency of the price table; `None` when the model has no price.
    pub cost: Option<f64>,
    pub tags: BTreeMap<String, String>,
    /// Sampling parameters actually used (temperature, max_tokens, seed, ...).
    pub params: Value,
    pub finish_reason: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricLevel {
    Inference,
    Episode,
}

impl MetricLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricLevel::Inference => "inference",
            MetricLevel::Episode => "episode",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum FeedbackValue {
    Boolean(bool),
    Float(f64),
    /// A corrected output that replaces the model's in curated datasets.
    Demonstration(InferenceOutput),
    Comment(String),
}

impl FeedbackValue {
    pub fn kind(&self) -> &'static str {
        match self {
            FeedbackValue::Boolean(_) => "boolean",
            FeedbackValue::Float(_) => "float",
            FeedbackValue::Demonstration(_) => "demonstration",
            FeedbackValue::Comment(_) => "comment",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRecord {
    pub id: Uuid,
    pub metric_name: String,
    pub target_level: MetricLevel,
    /// An inference id or an episode id, as `target_level` says.
    pub target_id: Uuid,
    pub value: FeedbackValue,
    pub tags: BTreeMap<String, String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A curated dataset as the store remembers it: what produced it and what it contained. A name
/// and version name one content for good, so a rerun is checked against it, never silently
/// replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub name: String,
    pub version: u32,
    pub function_name: String,
    /// The dataset spec (selection, weighting, split, packing) that produced it.
    pub query: Value,
    /// Over the hashes of its exported files; see `apprentice_curate::dataset_hash`.
    pub content_hash: String,
    pub train_examples: u64,
    pub validation_examples: u64,
    /// Per-file names, example counts, sizes and hashes.
    pub files: Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
}
