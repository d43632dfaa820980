//! OpenAI chat fine-tuning JSONL, with or without a `weight` field, a content hash of the exact
//! bytes, and the dataset folder `apprentice curate` writes. Objects are built field by field in a
//! fixed order, so the bytes depend only on the examples and a rerun over the same history hashes
//! the same.

use std::path::Path;

use apprentice_core::DatasetRecord;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::dataset::Dataset;
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
    let bodies = line_bodies(examples)?;
    Ok(join_lines(examples, &bodies, weighted))
}

/// Each example's line without its closing brace, serialized once for both the plain and the
/// weighted file, on every core.
fn line_bodies(examples: &[Example]) -> Result<Vec<String>, CurateError> {
    examples
        .par_iter()
        .map(|example| {
            let line = Line { messages: &example.messages, tools: &example.tools };
            let mut text = serde_json::to_string(&line).map_err(|e| CurateError::Unsupported {
                inference: example.inference_id,
                message: format!("cannot be written as JSON: {e}"),
            })?;
            text.pop();
            Ok(text)
        })
        .collect()
}

/// An exported line without its weight, borrowing the example's messages and tools.
#[derive(Serialize)]
struct Line<'a> {
    messages: &'a [Value],
    #[serde(skip_serializing_if = "<[Value]>::is_empty")]
    tools: &'a [Value],
}

fn join_lines(examples: &[Example], bodies: &[String], weighted: bool) -> String {
    let mut out = String::with_capacity(bodies.iter().map(|b| b.len() + 24).sum());
    for (example, body) in examples.iter().zip(bodies) {
        out.push_str(body);
        if weighted {
            out.push_str(",\"weight\":");
            out.push_str(&Value::from(example.weight).to_string());
        }
        out.push_str("}\n");
    }
    out
}

/// `sha256:` and 64 hex digits of `bytes`.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in digest {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// A file of a written dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatasetFile {
    pub file: String,
    pub examples: usize,
    pub bytes: usize,
    pub hash: String,
}

/// The four files a dataset is exported as, in a fixed order.
pub const DATASET_FILES: [(&str, bool); 4] = [
    ("train.jsonl", false),
    ("train.weighted.jsonl", true),
    ("validation.jsonl", false),
    ("validation.weighted.jsonl", true),
];

impl Dataset {
    /// Exports the four JSONL files, in memory, with their hashes.
    pub fn export(&self) -> Result<Vec<(DatasetFile, String)>, CurateError> {
        let train = line_bodies(&self.train)?;
        let validation = line_bodies(&self.validation)?;
        DATASET_FILES
            .par_iter()
            .map(|(file, weighted)| {
                let (examples, bodies) =
                    if file.starts_with("train") { (&self.train, &train) } else { (&self.validation, &validation) };
                let jsonl = join_lines(examples, bodies, *weighted);
                let meta = DatasetFile {
                    file: (*file).to_owned(),
                    examples: examples.len(),
                    bytes: jsonl.len(),
                    hash: content_hash(jsonl.as_bytes()),
                };
                Ok((meta, jsonl))
            })
            .collect()
    }

    /// Exports and writes the JSONL files and `summary.json` (spec, summary, files) into `dir`.
    pub fn write_files(&self, dir: &Path) -> Result<Vec<DatasetFile>, CurateError> {
        self.write_exported(dir, self.export()?)
    }

    /// Writes what [`Dataset::export`] made, and `summary.json`, into `dir`.
    pub fn write_exported(
        &self,
        dir: &Path,
        exported: Vec<(DatasetFile, String)>,
    ) -> Result<Vec<DatasetFile>, CurateError> {
        let io = |path: &Path, e: std::io::Error| CurateError::Io { path: path.to_path_buf(), message: e.to_string() };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut files = Vec::new();
        for (meta, jsonl) in exported {
            let path = dir.join(&meta.file);
            std::fs::write(&path, jsonl).map_err(|e| io(&path, e))?;
            files.push(meta);
        }
        let summary = json!({
            "name": self.spec.name,
            "version": self.spec.version,
            "content_hash": dataset_hash(&files),
            "spec": self.spec,
            "summary": self.summary,
            "files": files,
        });
        let path = dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).map_err(|e| CurateError::InvalidSpec(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        Ok(files)
    }
}

impl Dataset {
    /// The store's record of this dataset, once exported as `files`.
    pub fn record(&self, files: &[DatasetFile]) -> Result<DatasetRecord, CurateError> {
        Ok(DatasetRecord {
            name: self.spec.name.clone(),
            version: self.spec.version,
            function_name: self.spec.function.clone(),
            query: serde_json::to_value(&self.spec).map_err(|e| CurateError::InvalidSpec(e.to_string()))?,
            content_hash: dataset_hash(files),
            train_examples: self.train.len() as u64,
            validation_examples: self.validation.len() as u64,
            files: serde_json::to_value(files).map_err(|e| CurateError::InvalidSpec(e.to_string()))?,
            created_at: chrono::Utc::now(),
        })
    }
}

/// One hash for a whole dataset: over the names and hashes of its files, in their fixed order.
pub fn dataset_hash(files: &[DatasetFile]) -> String {
    let mut text = String::new();
    for file in files {
        text.push_str(&format!("{} {}\n", file.hash, file.file));
    }
    content_hash(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_sha256() {
        assert_eq!(content_hash(b"abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
