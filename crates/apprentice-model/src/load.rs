//! Loading a model from a GGUF file or an HF folder (config.json + *.safetensors) into trainable
//! f32 variables with HF names.
//!
//! GGUF tensors are dequantised to f32 whatever their storage type. llama.cpp's converter
//! permutes the Q/K projection rows of llama-architecture models for its interleaved rotary
//! layout; loading undoes that permutation so the model always uses HF's half-split layout.
//! Qwen2 GGUFs are stored unpermuted (llama.cpp runs them with the half-split "neox" rotary).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::config::{Architecture, ConfigError, ModelConfig};
use crate::llama::{Llama, LlamaError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{}: {error}", path.display())]
    Format { path: PathBuf, error: candle_core::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{source_name}: missing tensor `{name}`")]
    MissingTensor { source_name: String, name: String },
    #[error("{source_name}: tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch { source_name: String, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{source_name}: unexpected tensor `{name}` ({reason})")]
    UnexpectedTensor { source_name: String, name: String, reason: String },
    #[error("{}: no *.safetensors files", path.display())]
    NoWeights { path: PathBuf },
    #[error("{}: neither a GGUF file nor a folder with config.json", path.display())]
    UnknownFormat { path: PathBuf },
    #[error("building the model: {0}")]
    Model(#[from] LlamaError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A loaded model: the module, the variables it computes with (train them through the
/// `VarMap`), and where it came from.
pub struct LoadedModel {
    pub model: Llama,
    pub varmap: VarMap,
    pub config: ModelConfig,
    /// All metadata of the GGUF it was loaded from (tokenizer keys included); `None` otherwise.
    pub gguf_metadata: Option<GgufMetadata>,
}

/// The key/value metadata of a GGUF file, read without its tensors.
#[derive(Debug, Clone, Default)]
pub struct GgufMetadata {
    pub entries: HashMap<String, gguf_file::Value>,
}

impl GgufMetadata {
    /// Reads only the header of the GGUF at `path`.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let mut reader = open(path)?;
        let content =
            gguf_file::Content::read(&mut reader).map_err(|error| LoadError::Format { path: path.into(), error })?;
        Ok(Self { entries: content.metadata })
    }

    pub fn get(&self, key: &str) -> Option<&gguf_file::Value> {
        self.entries.get(key)
    }

    pub fn string(&self, key: &str) -> Option<&str> {
        match self.entries.get(key) {
            Some(gguf_file::Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// A string array such as `tokenizer.ggml.tokens` or `tokenizer.ggml.merges`; `None` if absent
    /// or if any element is not a string.
    pub fn strings(&self, key: &str) -> Option<Vec<&str>> {
        match self.entries.get(key) {
            Some(gguf_file::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    gguf_file::Value::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// An integer entry of any GGUF integer type that fits in `u32` (token ids, counts).
    pub fn u32(&self, key: &str) -> Option<u32> {
        use gguf_file::Value as V;
        match self.entries.get(key)? {
            V::U8(x) => Some((*x).into()),
            V::U16(x) => Some((*x).into()),
            V::U32(x) => Some(*x),
            V::U64(x) => u32::try_from(*x).ok(),
            V::I8(x) => u32::try_from(*x).ok(),
            V::I16(x) => u32::try_from(*x).ok(),
            V::I32(x) => u32::try_from(*x).ok(),
            V::I64(x) => u32::try_from(*x).ok(),
            _ => None,
        }
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.entries.get(key) {
            Some(gguf_file::Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// Entries that describe the tokenizer and the model rather than the tensor layout:
    /// `tokenizer.*` and descriptive `general.*` keys, sorted by key. What a saved GGUF copies
    /// from its source to stay self-contained.
    pub fn carried_entries(&self) -> Vec<(String, gguf_file::Value)> {
        const LAYOUT_KEYS: [&str; 4] =
            ["general.architecture", "general.alignment", "general.file_type", "general.quantization_version"];
        let mut entries: Vec<_> = self
            .entries
            .iter()
            .filter(|(k, _)| {
                (k.starts_with("tokenizer.") || k.starts_with("general.")) && !LAYOUT_KEYS.contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
    }
}

/// Loads `path`: a `.gguf` file, or a folder with `config.json` and safetensors weights.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        load_hf_folder(path, device)
    } else if path.is_file() {
        load_gguf(path, device)
    } else {
        Err(LoadError::UnknownFormat { path: path.into() })
    }
}

/// Loads a GGUF file, dequantising every tensor to f32 and un-permuting llama Q/K rows.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    let source_name = path.display().to_string();
    let format_error = |error| LoadError::Format { path: path.into(), error };
    let mut reader = open(path)?;
    let content = gguf_file::Content::read(&mut reader).map_err(format_error)?;
    let config = ModelConfig::from_gguf(&content, &source_name)?;

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for gguf_name in names {
        let hf = hf_name(gguf_name).ok_or_else(|| LoadError::UnexpectedTensor {
            source_name: source_name.clone(),
            name: gguf_name.clone(),
            reason: "not part of a llama/qwen2 model this loader understands".into(),
        })?;
        let tensor = content
            .tensor(&mut reader, gguf_name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(format_error)?;
        let tensor = match (config.architecture, qk_heads(&hf, &config)) {
            (Architecture::Llama, Some(heads)) => unpermute_qk(&tensor, heads)?,
            _ => tensor,
        };
        tensors.insert(hf, tensor);
    }
    let mut loaded = from_tensors(&config, tensors, device, &source_name)?;
    loaded.gguf_metadata = Some(GgufMetadata { entries: content.metadata });
    Ok(loaded)
}

/// Loads an HF folder: `config.json` and either `model.safetensors.index.json` with its shards
/// or every `*.safetensors` file in the folder.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(LoadError::UnknownFormat { path: dir.into() });
    }
    let config = ModelConfig::from_hf_file(&config_path)?;
    let source_name = dir.display().to_string();

    let mut tensors = HashMap::new();
    for file in safetensors_files(dir)? {
        let shard = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|error| LoadError::Format { path: file.clone(), error })?;
        for (name, tensor) in shard {
            if tensors.contains_key(&name) {
                return Err(LoadError::UnexpectedTensor {
                    source_name: file.display().to_string(),
                    name,
                    reason: "also present in another shard".into(),
                });
            }
            // Checkpoints from older transformers versions carry this buffer; it is recomputed.
            if name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            tensors.insert(name, tensor.to_dtype(DType::F32)?);
        }
    }
    // Some tied checkpoints store the output projection anyway; HF overwrites it with the
    // embedding, and so do we by ignoring it.
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    from_tensors(&config, tensors, device, &source_name)
}

/// Builds a model from f32 tensors with HF names, after checking that they are exactly the
/// model's parameters with the shapes `config` implies. Each tensor becomes a trainable `Var`.
pub fn from_tensors(
    config: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
    device: &Device,
    source_name: &str,
) -> Result<LoadedModel, LoadError> {
    let varmap = VarMap::new();
    {
        let mut vars = varmap
            .data()
            .lock()
            .map_err(|_| LoadError::Candle(candle_core::Error::Msg("variable map lock poisoned by a panic".into())))?;
        for (name, expected) in Llama::parameter_shapes(config) {
            let tensor = tensors
                .remove(&name)
                .ok_or_else(|| LoadError::MissingTensor { source_name: source_name.into(), name: name.clone() })?;
            if tensor.dims() != expected.as_slice() {
                return Err(LoadError::ShapeMismatch {
                    source_name: source_name.into(),
                    name,
                    expected,
                    found: tensor.dims().to_vec(),
                });
            }
            let tensor = tensor.to_dtype(DType::F32)?.to_device(device)?;
            vars.insert(name, Var::from_tensor(&tensor)?);
        }
    }
    // Sorted so that the error names the same tensor every run.
    let leftover: BTreeMap<_, _> = tensors.into_iter().collect();
    if let Some(name) = leftover.into_keys().next() {
        return Err(LoadError::UnexpectedTensor {
            source_name: source_name.into(),
            name,
            reason: "not a parameter of the model the config describes".into(),
        });
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = Llama::new(config, vb)?;
    Ok(LoadedModel { model, varmap, config: config.clone(), gguf_metadata: None })
}

fn open(path: &Path) -> Result<BufReader<File>, LoadError> {
    File::open(path).map(BufReader::new).map_err(|error| LoadError::Io { path: path.into(), error })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text =
            std::fs::read_to_string(&index_path).map_err(|error| LoadError::Io { path: index_path.clone(), error })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|error| ConfigError::Json { source_name: index_path.display().to_string(), error })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ConfigError::Missing {
            source_name: index_path.display().to_string(),
            field: "weight_map".into(),
        })?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let entries = std::fs::read_dir(dir).map_err(|error| LoadError::Io { path: dir.into(), error })?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|error| LoadError::Io { path: dir.into(), error })?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(LoadError::NoWeights { path: dir.into() });
    }
    files.sort();
    Ok(files)
}

/// Per-block tensors: GGUF suffix after `blk.N.`, HF suffix after `model.layers.N.`.
const BLOCK_NAMES: [(&str, &str); 13] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    // Not a parameter of our model: mapped so that loading names it in a clear error.
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The HF name of a GGUF tensor name (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = BLOCK_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The GGUF name of an HF tensor name; the inverse of `hf_name`.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf_name) {
        return Some(g.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = BLOCK_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The number of heads whose rows llama.cpp permutes in this tensor, if it is a Q or K projection.
pub(crate) fn qk_heads(hf_name: &str, config: &ModelConfig) -> Option<usize> {
    let suffix = hf_name.rsplit_once(".self_attn.")?.1;
    if suffix.starts_with("q_proj.") {
        Some(config.num_attention_heads)
    } else if suffix.starts_with("k_proj.") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// llama.cpp's `permute` from convert_hf_to_gguf.py: within each head, the rows `[first half;
/// second half]` become interleaved pairs `(i, i + head_dim/2)`. Works on weights and biases.
pub(crate) fn permute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest = w.elem_count() / rows;
    w.reshape((heads, 2, rows / heads / 2, rest))?.transpose(1, 2)?.reshape(dims)
}

/// The inverse of `permute_qk`: interleaved rotary pairs back to HF's half-split rows.
pub(crate) fn unpermute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest = w.elem_count() / rows;
    w.reshape((heads, rows / heads / 2, 2, rest))?.transpose(1, 2)?.reshape(dims)
}
