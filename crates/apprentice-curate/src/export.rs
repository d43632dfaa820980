//! OpenAI chat fine-tuning JSONL, with or without a `weight` field, and a content hash of the
//! exact bytes. JSON objects are written with sorted keys (serde_json's default map), so the bytes
//! depend only on the examples and a rerun over the same history hashes the same.

use serde_json::{Map, Value};

use crate::example::Example;
use crate::CurateError;

/// One exported file: its bytes and their hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub jsonl: String,
    pub hash: String,
}

impl Exported {
    pub fn new(examples: &[Example], weighted: bool) -> Result<Self, CurateError> {
        let jsonl = to_jsonl(examples, weighted)?;
        let hash = content_hash(jsonl.as_bytes());
        Ok(Self { jsonl, hash })
    }
}

/// One line per example: `{"messages": [...], "tools": [...]}` (tools only when offered), plus
/// `"weight"` when `weighted`.
pub fn to_jsonl(examples: &[Example], weighted: bool) -> Result<String, CurateError> {
    let mut out = String::new();
    for example in examples {
        let mut line = Map::new();
        line.insert("messages".into(), Value::Array(example.messages.clone()));
        if !example.tools.is_empty() {
            line.insert("tools".into(), Value::Array(example.tools.clone()));
        }
        if weighted {
            line.insert("weight".into(), Value::from(example.weight));
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|e| CurateError::Unsupported {
            inference: example.inference_id,
            message: format!("cannot be written as JSON: {e}"),
        })?;
        out.push_str(&text);
        out.push('\n');
    }
    Ok(out)
}

/// `fnv1a64:` and 16 hex digits. Not cryptographic: it identifies a dataset's content, it does
/// not defend against someone forging one.
pub fn content_hash(bytes: &[u8]) -> String {
    let mut hash = Fnv1a::new();
    hash.write(bytes);
    format!("fnv1a64:{:016x}", hash.finish())
}

pub(crate) struct Fnv1a(u64);

impl Fnv1a {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(content_hash(b""), "fnv1a64:cbf29ce484222325");
        assert_eq!(content_hash(b"a"), "fnv1a64:af63dc4c8601ec8c");
    }
}
