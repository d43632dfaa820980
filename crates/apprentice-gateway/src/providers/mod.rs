//! Where tokens come from. A [`Provider`] speaks one upstream API; a [`ModelRouter`] tries a
//! model's providers in routing order and falls back to the next one when a provider fails.

use std::pin::Pin;

use apprentice_core::config::{JsonMode, ToolChoice};
use apprentice_core::record::RenderedRequest;
use apprentice_core::{ContentBlock, Usage};
use async_trait::async_trait;
use futures::Stream;
use serde_json::Value;

mod accumulate;
pub mod anthropic;
pub mod dummy;
mod http;
pub mod local;
pub mod openai;
mod router;
mod sse;

pub use accumulate::StreamAccumulator;
pub use anthropic::AnthropicProvider;
pub use dummy::DummyProvider;
pub use http::HttpSettings;
pub use local::LocalProvider;
pub use openai::OpenAiProvider;
pub use router::{build_provider, build_routers, AllProvidersFailed, ModelRouter, Routed};

/// Everything a provider needs for one call: the rendered request and the sampling parameters.
#[derive(Debug, Clone, Default)]
pub struct ModelRequest {
    pub rendered: RenderedRequest,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
    pub seed: Option<u64>,
    /// The episode the call belongs to: a local model continues the episode's cached sequence.
    pub episode_id: Option<uuid::Uuid>,
    /// For json functions: how to ask the provider for JSON, and the schema to follow.
    pub json_mode: Option<JsonMode>,
    pub output_schema: Option<Value>,
}

/// A finished (non-streamed) provider answer. Content holds only `Text` and `ToolCall` blocks.
#[derive(Debug, Clone)]
pub struct ProviderResponse {
    pub content: Vec<ContentBlock>,
    pub usage: Usage,
    pub finish_reason: Option<String>,
    /// Machine time the call used, when it is not its latency: a local model decoding several
    /// calls in one batch charges each its share of every step. A price per hour applies to it.
    pub compute_ms: Option<f64>,
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamChunk {
    pub text: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
    /// Usually only on the last chunk.
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
    /// See [`ProviderResponse::compute_ms`]; on the last chunk.
    pub compute_ms: Option<f64>,
}

/// A fragment of a streamed tool call; fragments with the same `index` concatenate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamChunk, ProviderError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider}: cannot reach upstream: {message}")]
    Transport { provider: String, message: String },
    #[error("{provider}: upstream answered {status}: {body}")]
    Status { provider: String, status: u16, body: String },
    #[error("{provider}: cannot understand upstream answer: {message}")]
    Protocol { provider: String, message: String },
    #[error("{provider}: {message}")]
    Config { provider: String, message: String },
    /// A model run in the gateway process could not serve the request (prompt too long for its
    /// context, template or generation failure).
    #[error("{provider}: {message}")]
    Local { provider: String, message: String },
    #[error("dummy provider `{provider}` is configured to fail")]
    Scripted { provider: String },
}

#[async_trait]
pub trait Provider: Send + Sync {
    async fn infer(&self, request: &ModelRequest) -> Result<ProviderResponse, ProviderError>;
    /// Starts a streamed answer. Errors before the first chunk are returned here, so the router can
    /// still fall back; errors after that end the stream.
    async fn infer_stream(&self, request: &ModelRequest) -> Result<ChunkStream, ProviderError>;
}
