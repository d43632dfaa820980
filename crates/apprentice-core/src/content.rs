//! The structured input of an inference, as the application gives it.
//!
//! Inputs are kept as given: template arguments stay arguments, so a stored call can later be
//! re-rendered with another variant's templates. Rendering happens in [`crate::templates`].

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A tool call made by a model. `arguments` is the JSON text exactly as the model produced it,
/// which may not be valid JSON; it is kept so training sees what the teacher really wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    #[serde(deserialize_with = "arguments_as_text")]
    pub arguments: String,
}

/// The result of running a tool, sent back to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolResult {
    pub id: String,
    pub name: String,
    pub result: String,
}

/// One block of message content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentBlock {
    /// Literal text, sent as is.
    Text {
        text: String,
    },
    /// Arguments for one of the variant's templates (`user`, `assistant`, `system` or a named one).
    Template {
        name: String,
        arguments: Value,
    },
    ToolCall(ToolCall),
    ToolResult(ToolResult),
    /// Text that bypasses templates even where the function has a schema.
    RawText {
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputMessage {
    pub role: Role,
    #[serde(deserialize_with = "content_shorthand")]
    pub content: Vec<ContentBlock>,
}

/// The system part of an input: literal text, or arguments for the variant's system template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SystemInput {
    Text(String),
    Arguments(serde_json::Map<String, Value>),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemInput>,
    #[serde(default)]
    pub messages: Vec<InputMessage>,
}

/// Tool-call arguments may arrive as JSON text (OpenAI style) or as an object; both are stored as text.
fn arguments_as_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        other => Ok(other.to_string()),
    }
}

/// `content` may be a string (one text block), an object (arguments for the role's template) or a
/// list of blocks, the three shapes users of LLM gateways write.
fn content_shorthand<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ContentBlock>, D::Error> {
    let raw = Value::deserialize(d)?;
    match raw {
        Value::String(text) => Ok(vec![ContentBlock::Text { text }]),
        // Parsed as a typed list (not untagged) so a bad block gets a precise message.
        Value::Array(_) => serde_json::from_value::<Vec<ContentBlock>>(raw)
            .map_err(|e| serde::de::Error::custom(format!("invalid content block: {e}"))),
        Value::Object(arguments) => {
            Ok(vec![ContentBlock::Template { name: String::new(), arguments: Value::Object(arguments) }])
        }
        _ => Err(serde::de::Error::custom(
            "content must be a string, an object of template arguments or a list of content blocks",
        )),
    }
}

impl InputMessage {
    /// Template blocks written as a bare object carry an empty name: they belong to the role's template.
    pub fn template_name<'a>(&self, name: &'a str) -> &'a str {
        if name.is_empty() {
            self.role.as_str()
        } else {
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_accepts_the_three_shapes() {
        let input: Input = serde_json::from_value(json!({
            "system": {"mission": "go to the red ball"},
            "messages": [
                {"role": "user", "content": "hello"},
                {"role": "user", "content": {"observation": "a wall"}},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "turn left"},
                    {"type": "tool_call", "id": "c1", "name": "move", "arguments": {"dir": "left"}}
                ]},
                {"role": "user", "content": [{"type": "tool_result", "id": "c1", "name": "move", "result": "ok"}]}
            ]
        }))
        .unwrap();
        assert!(matches!(input.system, Some(SystemInput::Arguments(_))));
        assert_eq!(input.messages[0].content, vec![ContentBlock::Text { text: "hello".into() }]);
        match &input.messages[1].content[0] {
            ContentBlock::Template { name, arguments } => {
                assert_eq!(input.messages[1].template_name(name), "user");
                assert_eq!(arguments["observation"], "a wall");
            }
            other => panic!("expected template block, got {other:?}"),
        }
        match &input.messages[2].content[1] {
            ContentBlock::ToolCall(call) => assert_eq!(call.arguments, r#"{"dir":"left"}"#),
            other => panic!("expected tool call, got {other:?}"),
        }
    }

    #[test]
    fn unknown_block_type_is_rejected_with_its_name() {
        let err = serde_json::from_value::<Input>(json!({
            "messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]
        }))
        .unwrap_err()
        .to_string();
        assert!(err.contains("image"), "{err}");
    }

    #[test]
    fn roundtrip_keeps_structure() {
        let input = Input {
            system: Some(SystemInput::Text("be brief".into())),
            messages: vec![InputMessage {
                role: Role::User,
                content: vec![ContentBlock::Template { name: "user".into(), arguments: json!({"x": 1}) }],
            }],
        };
        let back: Input = serde_json::from_str(&serde_json::to_string(&input).unwrap()).unwrap();
        assert_eq!(back, input);
    }
}
