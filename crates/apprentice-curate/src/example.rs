//! One training example in the OpenAI chat fine-tuning shape, built from a rendered request and
//! the output to learn. The conversion mirrors the gateway's OpenAI provider, so the model is
//! trained on the messages it will be sent.

use apprentice_core::{ContentBlock, InferenceOutput, RenderedBlock, RenderedMessage, Role, ToolDefinition};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::CurateError;

/// Texts of one message are joined as the gateway joins them when it sends the message.
const TEXT_JOINER: &str = "\n";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    /// OpenAI chat messages: system, user, assistant (with `tool_calls`), tool; the last one is the
    /// assistant turn to learn.
    pub messages: Vec<Value>,
    /// OpenAI tool definitions offered to the model.
    pub tools: Vec<Value>,
    pub weight: f64,
    pub episode_id: Uuid,
    /// The inference this example comes from; for a packed episode, its last one.
    pub inference_id: Uuid,
    /// The inferences whose outputs this example trains on, in order: its own, or a packed
    /// episode's (assistant turns with `"weight": 1`).
    pub inference_ids: Vec<Uuid>,
    /// The inference's `task` tag, if any.
    pub task: Option<String>,
    /// True when a demonstration replaced the model's output.
    pub demonstrated: bool,
}

pub(crate) fn openai_tools(tools: &[ToolDefinition]) -> Vec<Value> {
    tools
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict,
            }})
        })
        .collect()
}

pub(crate) fn openai_messages(
    inference: Uuid,
    system: Option<&str>,
    messages: &[RenderedMessage],
    output: &InferenceOutput,
) -> Result<Vec<Value>, CurateError> {
    let mut out = Vec::with_capacity(messages.len() + 2);
    if let Some(system) = system {
        out.push(json!({"role": "system", "content": system}));
    }
    for message in messages {
        push_message(&mut out, message);
    }
    out.push(output_message(inference, output)?);
    Ok(out)
}

/// Tool results become `tool` messages placed first, since OpenAI wants them right after the
/// assistant message whose calls they answer.
fn push_message(out: &mut Vec<Value>, message: &RenderedMessage) {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for block in &message.content {
        match block {
            RenderedBlock::Text { text } => texts.push(text.as_str()),
            RenderedBlock::ToolCall(call) => calls.push(tool_call(&call.id, &call.name, &call.arguments)),
            RenderedBlock::ToolResult(result) => {
                out.push(json!({"role": "tool", "tool_call_id": result.id, "content": result.result}))
            }
        }
    }
    let text = (!texts.is_empty()).then(|| texts.join(TEXT_JOINER));
    match message.role {
        Role::Assistant => {
            if text.is_some() || !calls.is_empty() {
                out.push(assistant(text, calls));
            }
        }
        Role::User => {
            // As the gateway does: stray tool calls in a user message are the assistant turn they must have been.
            if !calls.is_empty() {
                out.push(assistant(None, calls));
            }
            let only_tool_results = text.is_none() && !message.content.is_empty();
            if !only_tool_results {
                out.push(json!({"role": "user", "content": text.unwrap_or_default()}));
            }
        }
    }
}

fn output_message(inference: Uuid, output: &InferenceOutput) -> Result<Value, CurateError> {
    match output {
        InferenceOutput::Json(json) => Ok(assistant(Some(json.raw.clone()), Vec::new())),
        InferenceOutput::Chat { content } => {
            let mut texts = Vec::new();
            let mut calls = Vec::new();
            for block in content {
                match block {
                    ContentBlock::Text { text } => texts.push(text.as_str()),
                    ContentBlock::RawText { value } => texts.push(value.as_str()),
                    ContentBlock::ToolCall(call) => calls.push(tool_call(&call.id, &call.name, &call.arguments)),
                    ContentBlock::Template { .. } | ContentBlock::ToolResult(_) => {
                        return Err(CurateError::Unsupported {
                            inference,
                            message: "an output holds a template or tool-result block, which no assistant turn can"
                                .into(),
                        })
                    }
                }
            }
            let text = (!texts.is_empty()).then(|| texts.join(TEXT_JOINER));
            Ok(assistant(text, calls))
        }
    }
}

fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

fn assistant(text: Option<String>, calls: Vec<Value>) -> Value {
    if calls.is_empty() {
        json!({"role": "assistant", "content": text.unwrap_or_default()})
    } else {
        json!({"role": "assistant", "content": text, "tool_calls": calls})
    }
}
