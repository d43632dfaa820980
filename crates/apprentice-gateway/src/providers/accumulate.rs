//! Reassembles a streamed answer into the response a non-streamed call would have given, so that
//! streamed inferences are recorded like the others.

use std::collections::BTreeMap;

use apprentice_core::{ContentBlock, ToolCall, Usage};

use super::{ProviderResponse, StreamChunk};

#[derive(Debug, Clone, Default)]
pub struct StreamAccumulator {
    text: String,
    /// By delta index, so calls come out in the order the model numbered them.
    tool_calls: BTreeMap<usize, PartialCall>,
    usage: Option<Usage>,
    finish_reason: Option<String>,
    compute_ms: Option<f64>,
}

#[derive(Debug, Clone, Default)]
struct PartialCall {
    id: Option<String>,
    name: Option<String>,
    arguments: String,
}

impl StreamAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, chunk: &StreamChunk) {
        if let Some(text) = &chunk.text {
            self.text.push_str(text);
        }
        for delta in &chunk.tool_calls {
            let call = self.tool_calls.entry(delta.index).or_default();
            // Ids and names arrive once, though some servers repeat them on every fragment:
            // replacing (not appending) handles both.
            if let Some(id) = delta.id.as_ref().filter(|id| !id.is_empty()) {
                call.id = Some(id.clone());
            }
            if let Some(name) = delta.name.as_ref().filter(|name| !name.is_empty()) {
                call.name = Some(name.clone());
            }
            call.arguments.push_str(&delta.arguments);
        }
        // Usage is usually sent once, at the end; if sent more often, the last count is the total.
        if chunk.compute_ms.is_some() {
            self.compute_ms = chunk.compute_ms;
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        if chunk.finish_reason.is_some() {
            self.finish_reason.clone_from(&chunk.finish_reason);
        }
    }

    /// Whether any content (text or tool call) has arrived yet.
    pub fn has_content(&self) -> bool {
        !self.text.is_empty() || !self.tool_calls.is_empty()
    }

    /// The answer so far: text first (if any), then tool calls by index. A call whose id never
    /// arrived gets `call_{index}`, as the non-streamed providers do.
    pub fn finish(self) -> ProviderResponse {
        let mut content = Vec::with_capacity(self.tool_calls.len() + 1);
        if !self.text.is_empty() {
            content.push(ContentBlock::Text { text: self.text });
        }
        for (index, call) in self.tool_calls {
            content.push(ContentBlock::ToolCall(ToolCall {
                id: call.id.unwrap_or_else(|| format!("call_{index}")),
                name: call.name.unwrap_or_default(),
                arguments: call.arguments,
            }));
        }
        ProviderResponse {
            content,
            usage: self.usage.unwrap_or_default(),
            finish_reason: self.finish_reason,
            compute_ms: self.compute_ms,
        }
    }
}
