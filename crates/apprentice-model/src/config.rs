//! The shape of a llama-family model (Llama/SmolLM2 and Qwen2), read from an HF `config.json` or
//! from GGUF metadata (`llama.*` / `qwen2.*` keys), and written back to both.
//!
//! Every error names the field and the file it came from, so a user with a broken or unsupported
//! checkpoint knows what to fix without reading this code.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::{json, Value as Json};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {source_name}: {error}")]
    Io { source_name: String, error: std::io::Error },
    #[error("{source_name} is not valid JSON: {error}")]
    Json { source_name: String, error: serde_json::Error },
    #[error("{source_name}: missing field `{field}`")]
    Missing { source_name: String, field: String },
    #[error("{source_name}: invalid field `{field}`: {reason}")]
    Invalid { source_name: String, field: String, reason: String },
    #[error("{source_name}: unsupported model: {reason}")]
    Unsupported { source_name: String, reason: String },
}

/// Which member of the llama family; decides the GGUF key prefix, whether q/k/v carry biases in
/// HF checkpoints, and whether llama.cpp permuted the Q/K rows in a GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama, SmolLM, Mistral-without-sliding-window: `model_type: "llama"`.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q/k/v projections.
    Qwen2,
}

impl Architecture {
    /// The name used by HF `model_type` and by GGUF `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// The HF `architectures[0]` class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Some(Architecture::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// The output projection reuses `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (always true for Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Ids that end generation; HF configs give one or a list.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks the relations between fields that the model code relies on.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            field: field.to_string(),
            reason,
        };
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be positive".into()));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        // Rotary embeddings rotate pairs of dimensions.
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", format!("{} is odd", self.head_dim)));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(invalid("rms_norm_eps", format!("{} is not a positive number", self.rms_norm_eps)));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(invalid("rope_theta", format!("{} is not a positive number", self.rope_theta)));
        }
        Ok(())
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Io { source_name: source_name.clone(), error })?;
        Self::from_hf_json(&text, &source_name)
    }

    /// Parses the text of an HF `config.json`; `source_name` only appears in errors.
    pub fn from_hf_json(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let json: Json = serde_json::from_str(text)
            .map_err(|error| ConfigError::Json { source_name: source_name.to_string(), error })?;
        let fields = HfFields { json: &json, source_name };

        let architecture = match json.get("model_type").and_then(Json::as_str) {
            Some(name) => Architecture::from_name(name).ok_or_else(|| ConfigError::Unsupported {
                source_name: source_name.to_string(),
                reason: format!("model_type `{name}` (supported: llama, qwen2)"),
            })?,
            None => {
                let class = json
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(Json::as_str)
                    .ok_or_else(|| fields.missing("model_type"))?;
                Architecture::from_name(class).ok_or_else(|| ConfigError::Unsupported {
                    source_name: source_name.to_string(),
                    reason: format!("architecture `{class}` (supported: LlamaForCausalLM, Qwen2ForCausalLM)"),
                })?
            }
        };

        if !fields.is_null_or_absent("rope_scaling") {
            return Err(fields.unsupported("rope_scaling is set; only plain rotary embeddings are implemented"));
        }
        if fields.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(fields.unsupported("mlp_bias = true"));
        }
        if fields.opt_bool("use_sliding_window")?.unwrap_or(false) {
            return Err(fields.unsupported("use_sliding_window = true"));
        }
        if let Some(act) = json.get("hidden_act").and_then(Json::as_str) {
            if act != "silu" {
                return Err(fields.unsupported(&format!("hidden_act `{act}` (only silu)")));
            }
        }
        let attention_bias = match architecture {
            // Qwen2 has q/k/v biases by construction; its config has no field for it.
            Architecture::Qwen2 => true,
            Architecture::Llama => {
                // HF llama puts the bias on o_proj too, which this model does not have.
                if fields.opt_bool("attention_bias")?.unwrap_or(false) {
                    return Err(fields.unsupported("llama with attention_bias = true"));
                }
                false
            }
        };

        let hidden_size = fields.usize("hidden_size")?;
        let num_attention_heads = fields.usize("num_attention_heads")?;
        let head_dim = match fields.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(fields.invalid(
                        "num_attention_heads",
                        format!(
                            "{num_attention_heads} does not divide hidden_size {hidden_size} and head_dim is absent"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let eos_token_ids = match json.get("eos_token_id") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(items)) => items
                .iter()
                .map(|v| json_u32(v).ok_or_else(|| fields.invalid("eos_token_id", format!("{v} is not a token id"))))
                .collect::<Result<_, _>>()?,
            Some(v) => {
                vec![json_u32(v).ok_or_else(|| fields.invalid("eos_token_id", format!("{v} is not a token id")))?]
            }
        };
        let bos_token_id = match json.get("bos_token_id") {
            None | Some(Json::Null) => None,
            Some(v) => {
                Some(json_u32(v).ok_or_else(|| fields.invalid("bos_token_id", format!("{v} is not a token id")))?)
            }
        };

        let config = ModelConfig {
            architecture,
            vocab_size: fields.usize("vocab_size")?,
            hidden_size,
            intermediate_size: fields.usize("intermediate_size")?,
            num_hidden_layers: fields.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: fields.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: fields.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: fields.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            max_position_embeddings: fields.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: fields.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias,
            bos_token_id,
            eos_token_ids,
        };
        config.validate(source_name)?;
        Ok(config)
    }

    /// An HF `config.json` that transformers and our own loader both read back to this config.
    pub fn to_hf_json(&self) -> Json {
        let eos = match self.eos_token_ids.as_slice() {
            [] => Json::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut config = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        });
        if self.architecture == Architecture::Llama {
            config["attention_bias"] = json!(false);
            config["mlp_bias"] = json!(false);
        }
        config
    }

    /// Reads the model shape from GGUF metadata. The tensor table settles what metadata often
    /// leaves out: the vocabulary size (`token_embd.weight` rows), tied embeddings (no
    /// `output.weight`) and q/k/v biases (`blk.0.attn_q.bias`).
    pub fn from_gguf(content: &gguf_file::Content, source_name: &str) -> Result<Self, ConfigError> {
        let md = GgufFields { metadata: &content.metadata, source_name };
        let arch_name = md.string("general.architecture")?;
        let architecture = Architecture::from_name(arch_name).ok_or_else(|| ConfigError::Unsupported {
            source_name: source_name.to_string(),
            reason: format!("general.architecture `{arch_name}` (supported: llama, qwen2)"),
        })?;
        let a = architecture.name();
        let key = |suffix: &str| format!("{a}.{suffix}");

        if md.opt_usize(&key("expert_count"))?.unwrap_or(0) > 1 {
            return Err(md.unsupported("mixture-of-experts models"));
        }
        if let Some(kind) = content.metadata.get(&key("rope.scaling.type")) {
            let kind = kind.to_string().map(String::as_str).unwrap_or("?");
            if kind != "none" {
                return Err(md.unsupported(&format!("{a}.rope.scaling.type `{kind}`")));
            }
        }

        let hidden_size = md.usize(&key("embedding_length"))?;
        let num_attention_heads = md.usize(&key("attention.head_count"))?;
        let head_dim = match md.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_attention_heads.max(1),
        };
        if let Some(rope_dim) = md.opt_usize(&key("rope.dimension_count"))? {
            if rope_dim != head_dim {
                return Err(md.unsupported(&format!("partial rotary embeddings ({rope_dim} of {head_dim} dimensions)")));
            }
        }

        let embd = content.tensor_infos.get("token_embd.weight").ok_or_else(|| ConfigError::Missing {
            source_name: source_name.to_string(),
            field: "tensor token_embd.weight".into(),
        })?;
        let vocab_size = match md.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => embd.shape.dims().first().copied().unwrap_or(0),
        };
        let eos_token_ids = md.opt_usize("tokenizer.ggml.eos_token_id")?.map(|id| vec![id as u32]).unwrap_or_default();

        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: md.usize(&key("feed_forward_length"))?,
            num_hidden_layers: md.usize(&key("block_count"))?,
            num_attention_heads,
            num_key_value_heads: md.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: md.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: md.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            max_position_embeddings: md.opt_usize(&key("context_length"))?.unwrap_or(2048),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: md.opt_usize("tokenizer.ggml.bos_token_id")?.map(|id| id as u32),
            eos_token_ids,
        };
        config.validate(source_name)?;
        Ok(config)
    }

    /// The architecture keys of GGUF metadata (`general.architecture`, `llama.*` or `qwen2.*`),
    /// as llama.cpp and our loader read them. Tokenizer keys are not included.
    pub fn to_gguf_metadata(&self) -> Vec<(String, gguf_file::Value)> {
        use gguf_file::Value as V;
        let a = self.architecture.name();
        let u32_of = |v: usize| V::U32(u32::try_from(v).unwrap_or(u32::MAX));
        vec![
            ("general.architecture".into(), V::String(a.into())),
            (format!("{a}.vocab_size"), u32_of(self.vocab_size)),
            (format!("{a}.context_length"), u32_of(self.max_position_embeddings)),
            (format!("{a}.embedding_length"), u32_of(self.hidden_size)),
            (format!("{a}.feed_forward_length"), u32_of(self.intermediate_size)),
            (format!("{a}.block_count"), u32_of(self.num_hidden_layers)),
            (format!("{a}.attention.head_count"), u32_of(self.num_attention_heads)),
            (format!("{a}.attention.head_count_kv"), u32_of(self.num_key_value_heads)),
            (format!("{a}.attention.key_length"), u32_of(self.head_dim)),
            (format!("{a}.attention.value_length"), u32_of(self.head_dim)),
            (format!("{a}.rope.dimension_count"), u32_of(self.head_dim)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), V::F32(self.rms_norm_eps as f32)),
            (format!("{a}.rope.freq_base"), V::F32(self.rope_theta as f32)),
        ]
    }
}

fn json_u32(v: &Json) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

struct HfFields<'a> {
    json: &'a Json,
    source_name: &'a str,
}

impl HfFields<'_> {
    fn missing(&self, field: &str) -> ConfigError {
        ConfigError::Missing { source_name: self.source_name.to_string(), field: field.to_string() }
    }

    fn invalid(&self, field: &str, reason: String) -> ConfigError {
        ConfigError::Invalid { source_name: self.source_name.to_string(), field: field.to_string(), reason }
    }

    fn unsupported(&self, reason: &str) -> ConfigError {
        ConfigError::Unsupported { source_name: self.source_name.to_string(), reason: reason.to_string() }
    }

    fn is_null_or_absent(&self, field: &str) -> bool {
        matches!(self.json.get(field), None | Some(Json::Null))
    }

    fn usize(&self, field: &str) -> Result<usize, ConfigError> {
        self.opt_usize(field)?.ok_or_else(|| self.missing(field))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        match self.json.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("{v} is not a non-negative integer"))),
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>, ConfigError> {
        match self.json.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.invalid(field, format!("{v} is not a number"))),
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>, ConfigError> {
        match self.json.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.invalid(field, format!("{v} is not a boolean"))),
        }
    }
}

struct GgufFields<'a> {
    metadata: &'a HashMap<String, gguf_file::Value>,
    source_name: &'a str,
}

impl GgufFields<'_> {
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing { source_name: self.source_name.to_string(), field: key.to_string() }
    }

    fn invalid(&self, key: &str, reason: String) -> ConfigError {
        ConfigError::Invalid { source_name: self.source_name.to_string(), field: key.to_string(), reason }
    }

    fn unsupported(&self, reason: &str) -> ConfigError {
        ConfigError::Unsupported { source_name: self.source_name.to_string(), reason: reason.to_string() }
    }

    fn string(&self, key: &str) -> Result<&str, ConfigError> {
        match self.metadata.get(key) {
            None => Err(self.missing(key)),
            Some(gguf_file::Value::String(s)) => Ok(s),
            Some(v) => Err(self.invalid(key, format!("expected a string, found {:?}", v.value_type()))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => gguf_usize(v)
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a non-negative integer, found {v:?}"))),
        }
    }

    fn f64(&self, key: &str) -> Result<f64, ConfigError> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        use gguf_file::Value as V;
        let value = match self.metadata.get(key) {
            None => return Ok(None),
            // GGUF stores these as f32; going through the shortest decimal form turns 1e-5f32 back
            // into 1e-5 rather than 9.99999974e-6, so configs compare equal after a round trip.
            Some(V::F32(x)) => format!("{x}").parse::<f64>().unwrap_or(*x as f64),
            Some(V::F64(x)) => *x,
            Some(v) => match gguf_usize(v) {
                Some(n) => n as f64,
                None => return Err(self.invalid(key, format!("expected a number, found {v:?}"))),
            },
        };
        Ok(Some(value))
    }
}

/// Integer metadata comes as any of GGUF's integer types depending on the writer.
fn gguf_usize(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    let n: i128 = match v {
        V::U8(x) => (*x).into(),
        V::I8(x) => (*x).into(),
        V::U16(x) => (*x).into(),
        V::I16(x) => (*x).into(),
        V::U32(x) => (*x).into(),
        V::I32(x) => (*x).into(),
        V::U64(x) => (*x).into(),
        V::I64(x) => (*x).into(),
        _ => return None,
    };
    usize::try_from(n).ok()
}
