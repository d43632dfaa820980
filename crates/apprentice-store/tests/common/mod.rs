//! Records and stores shared by the store's integration tests.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;

use apprentice_core::config::WriteMode;
use apprentice_core::{
    new_id, ContentBlock, FeedbackRecord, FeedbackValue, InferenceOutput, InferenceRecord, Input, InputMessage,
    JsonOutput, MetricLevel, RenderedBlock, RenderedMessage, RenderedRequest, Role, SystemInput, ToolCall,
    ToolDefinition, ToolResult, Usage,
};
use apprentice_store::{Record, SqliteStore};
use serde_json::json;
use tempfile::TempDir;
use uuid::Uuid;

/// A store in a fresh directory; keep the `TempDir` alive as long as the store.
pub async fn temp_store(mode: WriteMode) -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("apprentice.db"), mode).await.unwrap();
    (dir, store)
}

/// The smallest valid inference.
pub fn inference(function_name: &str, variant_name: &str, episode_id: Uuid) -> InferenceRecord {
    InferenceRecord {
        id: new_id(),
        function_name: function_name.into(),
        variant_name: variant_name.into(),
        episode_id,
        input: Input {
            system: None,
            messages: vec![InputMessage { role: Role::User, content: vec![ContentBlock::Text { text: "hi".into() }] }],
        },
        rendered: RenderedRequest {
            system: None,
            messages: vec![RenderedMessage {
                role: Role::User,
                content: vec![RenderedBlock::Text { text: "hi".into() }],
            }],
            tools: vec![],
        },
        output: InferenceOutput::Chat { content: vec![ContentBlock::Text { text: "hello".into() }] },
        model_name: "dummy::echo".into(),
        provider_name: "dummy".into(),
        usage: Usage { input_tokens: 1, output_tokens: 1 },
        latency_ms: 1.0,
        ttft_ms: None,
        cost: None,
        tags: BTreeMap::new(),
        params: json!({}),
        finish_reason: None,
        created_at: chrono::Utc::now(),
    }
}

/// An inference that uses every part of the record: template arguments, tool calls and results,
/// tools, tags, streaming timings and a cost.
pub fn rich_inference() -> InferenceRecord {
    let call = ToolCall { id: "call_1".into(), name: "move".into(), arguments: r#"{"dir": "left"}"#.into() };
    let result = ToolResult { id: "call_1".into(), name: "move".into(), result: "you see a wall".into() };
    let mut system = serde_json::Map::new();
    system.insert("mission".into(), json!("go to the red ball"));
    InferenceRecord {
        input: Input {
            system: Some(SystemInput::Arguments(system)),
            messages: vec![
                InputMessage {
                    role: Role::User,
                    content: vec![ContentBlock::Template {
                        name: "observation".into(),
                        arguments: json!({"grid": [[0, 1], [2, 3]], "carrying": null}),
                    }],
                },
                InputMessage { role: Role::Assistant, content: vec![ContentBlock::ToolCall(call.clone())] },
                InputMessage {
                    role: Role::User,
                    content: vec![
                        ContentBlock::ToolResult(result.clone()),
                        ContentBlock::RawText { value: "héllo \"quoted\" ✓".into() },
                    ],
                },
            ],
        },
        rendered: RenderedRequest {
            system: Some("You are an agent. Mission: go to the red ball".into()),
            messages: vec![
                RenderedMessage { role: Role::User, content: vec![RenderedBlock::Text { text: "grid ...".into() }] },
                RenderedMessage { role: Role::Assistant, content: vec![RenderedBlock::ToolCall(call)] },
                RenderedMessage { role: Role::User, content: vec![RenderedBlock::ToolResult(result)] },
            ],
            tools: vec![ToolDefinition {
                name: "move".into(),
                description: "Move one step".into(),
                parameters: json!({"type": "object", "properties": {"dir": {"type": "string"}}}),
                strict: true,
            }],
        },
        output: InferenceOutput::Chat {
            content: vec![
                ContentBlock::Text { text: "Going forward.".into() },
                ContentBlock::ToolCall(ToolCall {
                    id: "call_2".into(),
                    name: "move".into(),
                    arguments: "not json{".into(),
                }),
            ],
        },
        model_name: "openai::gpt-4.1-mini".into(),
        provider_name: "openai".into(),
        usage: Usage { input_tokens: 1234, output_tokens: u32::MAX },
        latency_ms: 812.25,
        ttft_ms: Some(97.5),
        cost: Some(0.000_123_4),
        tags: BTreeMap::from([("env".to_owned(), "babyai".to_owned()), ("split".to_owned(), "train".to_owned())]),
        params: json!({"temperature": 0.7, "max_tokens": 256, "seed": 42}),
        finish_reason: Some("tool_calls".into()),
        ..inference("babyai::act", "teacher", new_id())
    }
}

pub fn json_inference() -> InferenceRecord {
    InferenceRecord {
        output: InferenceOutput::Json(JsonOutput {
            raw: r#"{"action": "left"}"#.into(),
            parsed: Some(json!({"action": "left"})),
        }),
        cost: None,
        ..rich_inference()
    }
}

pub fn feedback(target_level: MetricLevel, target_id: Uuid, metric_name: &str, value: FeedbackValue) -> FeedbackRecord {
    FeedbackRecord {
        id: new_id(),
        metric_name: metric_name.into(),
        target_level,
        target_id,
        value,
        tags: BTreeMap::from([("source".to_owned(), "test".to_owned())]),
        created_at: chrono::Utc::now(),
    }
}

pub fn rec(inference: InferenceRecord) -> Record {
    Record::Inference(Box::new(inference))
}

pub fn fb(feedback: FeedbackRecord) -> Record {
    Record::Feedback(Box::new(feedback))
}
