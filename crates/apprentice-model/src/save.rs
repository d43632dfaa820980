//! Saving a model as an HF folder (config.json + model.safetensors, HF names, f32) or as a GGUF
//! file (f32, f16 or q8_0) that our loader and llama.cpp both read.
//!
//! GGUF output follows llama.cpp's converter: llama-architecture Q/K rows are permuted back to
//! the interleaved rotary layout, one-dimensional tensors (norms, biases) stay f32, and the
//! architecture metadata is written from the config. Tokenizer metadata cannot be made up here:
//! pass the source GGUF's metadata to copy it, so that the saved file is self-contained.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use crate::config::Architecture;
use crate::llama::Llama;
use crate::load::{gguf_name, permute_qk, qk_heads, GgufMetadata};

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot write {}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("writing {}: {error}", path.display())]
    Tensor { path: PathBuf, error: candle_core::Error },
    #[error("tensor `{name}` has no GGUF name")]
    NoGgufName { name: String },
}

/// Storage type of the matrices in a saved GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDType {
    F32,
    F16,
    /// 8-bit blocks of 32 with one f16 scale. Matrices whose rows are not a multiple of 32 long
    /// fall back to f16.
    Q8_0,
}

impl GgufDType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufDType::F32 => GgmlDType::F32,
            GgufDType::F16 => GgmlDType::F16,
            GgufDType::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufDType::F32 => 0,
            GgufDType::F16 => 1,
            GgufDType::Q8_0 => 7,
        }
    }
}

/// Writes `dir/model.safetensors` (f32, HF names; a tied output projection is not stored) and
/// `dir/config.json`, creating `dir` if needed.
pub fn save_safetensors(model: &Llama, dir: &Path) -> Result<(), SaveError> {
    std::fs::create_dir_all(dir).map_err(|error| SaveError::Io { path: dir.into(), error })?;
    let weights_path = dir.join("model.safetensors");
    write_atomically(&weights_path, |tmp| write_safetensors(tmp, &model.named_tensors()))?;

    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&model.config().to_hf_json()).unwrap_or_default();
    write_atomically(&config_path, |tmp| {
        std::fs::write(tmp, text + "\n").map_err(|error| SaveError::Io { path: tmp.into(), error })
    })
}

/// The safetensors layout (u64 header length, JSON header, raw little-endian data), written by
/// hand for the `"format": "pt"` metadata that transformers' `from_pretrained` checks and
/// candle's writer does not set; tensors are streamed one at a time.
fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), SaveError> {
    let tensor_error = |error| SaveError::Tensor { path: path.into(), error };
    let io_error = |error| SaveError::Io { path: path.into(), error };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, tensor) in tensors {
        let bytes = tensor.elem_count() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": tensor.dims(), "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    // The data that follows starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = File::create(path).map_err(io_error)?;
    let mut writer = BufWriter::new(file);
    writer.write_all(&(header.len() as u64).to_le_bytes()).map_err(io_error)?;
    writer.write_all(&header).map_err(io_error)?;
    for (_, tensor) in tensors {
        let values = tensor
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(tensor_error)?;
        for chunk in values.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            writer.write_all(&bytes).map_err(io_error)?;
        }
    }
    writer.flush().map_err(io_error)
}

/// Writes a GGUF file at `path`. `source` is the metadata of the GGUF the model was loaded from,
/// if any: its tokenizer and descriptive `general.*` entries are copied.
pub fn save_gguf(model: &Llama, path: &Path, dtype: GgufDType, source: Option<&GgufMetadata>) -> Result<(), SaveError> {
    let config = model.config();
    let tensor_error = |error| SaveError::Tensor { path: path.into(), error };

    let mut metadata = config.to_gguf_metadata();
    metadata.push(("general.file_type".into(), gguf_file::Value::U32(dtype.file_type())));
    if dtype == GgufDType::Q8_0 {
        metadata.push(("general.quantization_version".into(), gguf_file::Value::U32(2)));
    }
    let carried = source.map(GgufMetadata::carried_entries).unwrap_or_default();
    let has = |key: &str| carried.iter().any(|(k, _)| k == key);
    if !has("general.name") {
        metadata.push(("general.name".into(), gguf_file::Value::String("apprentice student".into())));
    }
    // Without a source tokenizer, at least keep the special ids the config knows.
    if let (Some(bos), false) = (config.bos_token_id, has("tokenizer.ggml.bos_token_id")) {
        metadata.push(("tokenizer.ggml.bos_token_id".into(), gguf_file::Value::U32(bos)));
    }
    if let (Some(&eos), false) = (config.eos_token_ids.first(), has("tokenizer.ggml.eos_token_id")) {
        metadata.push(("tokenizer.ggml.eos_token_id".into(), gguf_file::Value::U32(eos)));
    }
    metadata.extend(carried);

    let mut tensors = Vec::new();
    for (name, tensor) in model.named_tensors() {
        let gguf = gguf_name(&name).ok_or_else(|| SaveError::NoGgufName { name: name.clone() })?;
        let mut tensor =
            tensor.to_device(&candle_core::Device::Cpu).and_then(|t| t.to_dtype(DType::F32)).map_err(tensor_error)?;
        if let (Architecture::Llama, Some(heads)) = (config.architecture, qk_heads(&name, config)) {
            tensor = permute_qk(&tensor, heads).map_err(tensor_error)?;
        }
        let storage = storage_type(&tensor, dtype);
        let q = QTensor::quantize(&tensor.contiguous().map_err(tensor_error)?, storage).map_err(tensor_error)?;
        tensors.push((gguf, q));
    }

    let metadata_refs: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_atomically(path, |tmp| {
        let file = File::create(tmp).map_err(|error| SaveError::Io { path: tmp.into(), error })?;
        let mut writer = BufWriter::new(file);
        gguf_file::write(&mut writer, &metadata_refs, &tensor_refs).map_err(tensor_error)?;
        writer.flush().map_err(|error| SaveError::Io { path: tmp.into(), error })
    })
}

/// Norms and biases stay f32 as llama.cpp keeps them; a matrix whose rows do not split into
/// whole quantisation blocks falls back to f16.
fn storage_type(tensor: &Tensor, dtype: GgufDType) -> GgmlDType {
    let dims = tensor.dims();
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let ggml = dtype.ggml();
    let row = dims[dims.len() - 1];
    if !row.is_multiple_of(ggml.block_size()) {
        GgmlDType::F16
    } else {
        ggml
    }
}

/// Writes through a temporary file beside `path` and renames it, so a crash never leaves a
/// half-written model under the final name.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<(), SaveError>) -> Result<(), SaveError> {
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|error| SaveError::Io { path: path.into(), error })
}
