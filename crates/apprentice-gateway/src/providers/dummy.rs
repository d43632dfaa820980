//! A deterministic, offline provider for tests and demos: the same request always gets the same
//! answer, streamed or not, and usage is a word count so tests can predict it.

use apprentice_core::config::{DummyBehavior, ToolChoice};
use apprentice_core::record::{RenderedBlock, RenderedRequest};
use apprentice_core::{ContentBlock, Role, ToolCall, Usage};
use async_trait::async_trait;

use super::openai::TEXT_JOINER;
use super::{ChunkStream, ModelRequest, Provider, ProviderError, ProviderResponse, StreamChunk, ToolCallDelta};

/// The id of the tool call the `tool_call` behaviour makes.
pub const DUMMY_CALL_ID: &str = "call_0";

#[derive(Debug, Clone)]
pub struct DummyProvider {
    name: String,
    behavior: DummyBehavior,
    content: Option<String>,
}

/// What the dummy answers, before it is packaged as a response or a stream.
enum Reply {
    Text(String),
    Call(ToolCall),
}

impl DummyProvider {
    pub fn new(name: impl Into<String>, behavior: DummyBehavior, content: Option<String>) -> Self {
        Self { name: name.into(), behavior, content }
    }

    fn reply(&self, request: &ModelRequest) -> Result<Reply, ProviderError> {
        let content = self.content.as_deref();
        Ok(match self.behavior {
            DummyBehavior::Echo => Reply::Text(echo(&request.rendered)),
            DummyBehavior::Fixed => Reply::Text(content.unwrap_or("dummy").to_string()),
            DummyBehavior::Json => Reply::Text(content.unwrap_or("{}").to_string()),
            DummyBehavior::ToolCall => match request.rendered.tools.first() {
                // A real model offered no tools, or told not to use them, answers in text: here,
                // the echo, which keeps multi-turn tests moving.
                Some(tool) if request.tool_choice != ToolChoice::None => Reply::Call(ToolCall {
                    id: DUMMY_CALL_ID.to_string(),
                    name: tool.name.clone(),
                    arguments: content.unwrap_or("{}").to_string(),
                }),
                _ => Reply::Text(echo(&request.rendered)),
            },
            DummyBehavior::Error => return Err(ProviderError::Scripted { provider: self.name.clone() }),
        })
    }

    fn answer(&self, request: &ModelRequest) -> Result<(Reply, Usage), ProviderError> {
        let reply = self.reply(request)?;
        let output_tokens = match &reply {
            Reply::Text(text) => words(text),
            Reply::Call(call) => words(&call.name) + words(&call.arguments),
        };
        Ok((reply, Usage { input_tokens: input_words(&request.rendered), output_tokens }))
    }
}

#[async_trait]
impl Provider for DummyProvider {
    async fn infer(&self, request: &ModelRequest) -> Result<ProviderResponse, ProviderError> {
        let (reply, usage) = self.answer(request)?;
        let (content, finish_reason) = match reply {
            Reply::Text(text) if text.is_empty() => (Vec::new(), "stop"),
            Reply::Text(text) => (vec![ContentBlock::Text { text }], "stop"),
            Reply::Call(call) => (vec![ContentBlock::ToolCall(call)], "tool_calls"),
        };
        Ok(ProviderResponse { content, usage, finish_reason: Some(finish_reason.to_string()), compute_ms: None })
    }

    async fn infer_stream(&self, request: &ModelRequest) -> Result<ChunkStream, ProviderError> {
        let (reply, usage) = self.answer(request)?;
        let (mut chunks, finish_reason) = match reply {
            Reply::Text(text) => {
                let chunks = split_words(&text)
                    .into_iter()
                    .map(|piece| StreamChunk { text: Some(piece.to_string()), ..StreamChunk::default() })
                    .collect::<Vec<_>>();
                (chunks, "stop")
            }
            Reply::Call(call) => {
                let delta =
                    ToolCallDelta { index: 0, id: Some(call.id), name: Some(call.name), arguments: call.arguments };
                (vec![StreamChunk { tool_calls: vec![delta], ..StreamChunk::default() }], "tool_calls")
            }
        };
        chunks.push(StreamChunk {
            usage: Some(usage),
            finish_reason: Some(finish_reason.to_string()),
            ..StreamChunk::default()
        });
        Ok(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok))))
    }
}

/// The last user message's text; if it has none, its tool results (what an agent loop sends back).
fn echo(rendered: &RenderedRequest) -> String {
    let Some(message) = rendered.messages.iter().rev().find(|m| m.role == Role::User) else {
        return String::new();
    };
    let texts: Vec<&str> = message
        .content
        .iter()
        .filter_map(|block| match block {
            RenderedBlock::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    if !texts.is_empty() {
        return texts.join(TEXT_JOINER);
    }
    let results: Vec<&str> = message
        .content
        .iter()
        .filter_map(|block| match block {
            RenderedBlock::ToolResult(result) => Some(result.result.as_str()),
            _ => None,
        })
        .collect();
    results.join(TEXT_JOINER)
}

fn words(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// Words of the system prompt and of every block: text, tool call name and arguments, tool result.
fn input_words(rendered: &RenderedRequest) -> u32 {
    let system = rendered.system.as_deref().map_or(0, words);
    let blocks = rendered.messages.iter().flat_map(|m| &m.content).map(|block| match block {
        RenderedBlock::Text { text } => words(text),
        RenderedBlock::ToolCall(call) => words(&call.name) + words(&call.arguments),
        RenderedBlock::ToolResult(result) => words(&result.result),
    });
    blocks.fold(system, u32::saturating_add)
}

/// Splits text into pieces of one word each, whitespace kept (leading whitespace with the first
/// piece, trailing whitespace with its word), so the pieces concatenate back to `text`.
fn split_words(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut seen_word = false;
    let mut in_space = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            in_space = true;
        } else {
            if in_space && seen_word {
                pieces.push(&text[start..i]);
                start = i;
            }
            in_space = false;
            seen_word = true;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_keeps_every_character() {
        for text in ["", "one", "  lead and  trail  ", "a\nb\tc", "héllo wörld ", "   "] {
            let pieces = split_words(text);
            assert_eq!(pieces.concat(), text);
            assert_eq!(pieces.len(), (words(text) as usize).max(usize::from(!text.is_empty())), "{text:?}");
        }
        assert_eq!(split_words(" a  b c"), vec![" a  ", "b ", "c"]);
    }
}
