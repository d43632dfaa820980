//! Rendering a structured input into the messages a model is sent, with one variant's templates.
//!
//! The gateway renders every live call this way, and recorded inputs can be rendered again later
//! with any other variant's templates, which is what keeping inputs structured is for.

use serde_json::Value;

use crate::config::FunctionConfig;
use crate::content::{ContentBlock, Input, InputMessage, Role, SystemInput};
use crate::record::{RenderedBlock, RenderedMessage, RenderedRequest};
use crate::templates::Templates;

/// Why an input cannot be rendered: `field` is its JSON path inside the input, e.g.
/// `input.messages[0].content[1]`; `kind` is a stable machine-readable name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RenderError {
    pub kind: &'static str,
    pub field: String,
    pub message: String,
}

impl RenderError {
    fn new(kind: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { kind, field: field.into(), message: message.into() }
    }
}

/// Applies the variant's templates to the structured input, validating arguments against the
/// function's schemas first. Errors name the input field that is wrong.
pub fn render_input(
    templates: &Templates,
    function_name: &str,
    function: Option<&FunctionConfig>,
    variant: &str,
    input: &Input,
) -> Result<RenderedRequest, RenderError> {
    let system = match &input.system {
        None => None,
        Some(SystemInput::Text(text)) => {
            if function.is_some_and(|f| f.system_schema.is_some()) {
                return Err(RenderError::new(
                    "invalid_input",
                    "input.system",
                    format!(
                        "function `{function_name}` has a system_schema: give system arguments as an object, not text"
                    ),
                ));
            }
            Some(text.clone())
        }
        Some(SystemInput::Arguments(arguments)) => {
            let arguments = Value::Object(arguments.clone());
            if let Some(schema) = function.and_then(|f| f.system_schema.as_ref()) {
                schema.validate(&arguments).map_err(|e| RenderError::new("invalid_arguments", "input.system", e))?;
            }
            if !templates.has(function_name, variant, "system") {
                return Err(RenderError::new(
                    "invalid_input",
                    "input.system",
                    format!("variant `{variant}` has no system template to render these arguments with"),
                ));
            }
            Some(
                templates
                    .render(function_name, variant, "system", &arguments)
                    .map_err(|e| RenderError::new("template_error", "input.system", e))?,
            )
        }
    };

    let history_turns = function.and_then(|f| f.variants.get(variant)).and_then(|v| v.history_turns);
    let first = history_turns.map_or(0, |turns| first_message_of_last_turns(&input.messages, turns));
    let mut messages = Vec::with_capacity(input.messages.len() - first);
    for (i, message) in input.messages.iter().enumerate().skip(first) {
        let mut content = Vec::with_capacity(message.content.len());
        for (j, block) in message.content.iter().enumerate() {
            let field = || format!("input.messages[{i}].content[{j}]");
            let rendered = match block {
                ContentBlock::Text { text } => {
                    if function.is_some_and(|f| f.schema_for(message.role.as_str()).is_some()) {
                        return Err(RenderError::new(
                            "invalid_input",
                            field(),
                            format!(
                                "function `{function_name}` has a {}_schema: give template arguments, not text",
                                message.role.as_str()
                            ),
                        ));
                    }
                    RenderedBlock::Text { text: text.clone() }
                }
                ContentBlock::RawText { value } => RenderedBlock::Text { text: value.clone() },
                ContentBlock::Template { name, arguments } => {
                    let name = message.template_name(name);
                    if let Some(schema) = function.and_then(|f| f.schema_for(name)) {
                        schema.validate(arguments).map_err(|e| RenderError::new("invalid_arguments", field(), e))?;
                    }
                    if function.is_none() || !templates.has(function_name, variant, name) {
                        return Err(RenderError::new(
                            "invalid_input",
                            field(),
                            format!("variant `{variant}` has no `{name}` template"),
                        ));
                    }
                    let text = templates
                        .render(function_name, variant, name, arguments)
                        .map_err(|e| RenderError::new("template_error", field(), e))?;
                    RenderedBlock::Text { text }
                }
                ContentBlock::ToolCall(call) => RenderedBlock::ToolCall(call.clone()),
                ContentBlock::ToolResult(result) => RenderedBlock::ToolResult(result.clone()),
            };
            content.push(rendered);
        }
        messages.push(RenderedMessage { role: message.role, content });
    }
    Ok(RenderedRequest { system, messages, tools: Vec::new() })
}

/// The index of the first message of the last `turns` turns. A turn starts at a user message
/// that is not only tool results, so a tool call is never cut from its result.
fn first_message_of_last_turns(messages: &[InputMessage], turns: usize) -> usize {
    let starts_turn =
        |m: &InputMessage| m.role == Role::User && m.content.iter().any(|b| !matches!(b, ContentBlock::ToolResult(_)));
    messages.iter().enumerate().rev().filter(|(_, m)| starts_turn(m)).nth(turns.saturating_sub(1)).map_or(0, |(i, _)| i)
}
