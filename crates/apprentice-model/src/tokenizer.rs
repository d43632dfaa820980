//! The student's tokenizer: an HF `tokenizers::Tokenizer` loaded from an HF folder's
//! tokenizer.json, or built from a GGUF file's `tokenizer.ggml.*` metadata with the
//! pre-tokenizer the model really uses.
//!
//! GGUF files name their pre-tokenizer (`tokenizer.ggml.pre`); the supported ones, and what they
//! become (the same components as the models' own tokenizer.json):
//!
//! | `tokenizer.ggml.pre`              | normalizer | pre-tokenizer                                                     |
//! |-----------------------------------|------------|-------------------------------------------------------------------|
//! | `smollm`, `starcoder`, `refact`   | none       | Sequence[Digits(individual), ByteLevel(add_prefix_space=false, GPT-2 regex)] |
//! | `gpt-2`                           | none       | ByteLevel(add_prefix_space=false, GPT-2 regex)                    |
//! | `qwen2`                           | NFC        | Sequence[Split(Qwen2 regex, isolated), ByteLevel(no regex)]       |
//! | `llama-bpe`, `llama3`, `smaug-bpe`| none       | Sequence[Split(Llama-3 regex, isolated), ByteLevel(no regex)], BPE ignore_merges |
//!
//! Only `tokenizer.ggml.model = gpt2` (byte-level BPE) is supported. Control tokens
//! (`token_type` 3) become special added tokens, so `<|im_start|>` in a text is one token;
//! user-defined tokens (`token_type` 4) become ordinary added tokens. The decoder is ByteLevel.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// The GPT-2 pre-tokenizer regex (what ByteLevel's `use_regex` applies).
pub const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex (single digits).
pub const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex (digits in runs of up to three).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values this module builds.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] =
    &["smollm", "starcoder", "refact", "gpt-2", "qwen2", "llama-bpe", "llama3", "smaug-bpe"];

/// GGUF token types (llama.cpp's `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load the tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("cannot read GGUF metadata from {path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("GGUF metadata has no `{key}`, which a tokenizer needs")]
    MissingMetadata { key: String },
    #[error("GGUF metadata `{key}` should be {expected}, found {found}")]
    MetadataType { key: String, expected: &'static str, found: String },
    #[error("GGUF tokenizer model `{model}` is not supported (only `gpt2`, byte-level BPE)")]
    UnsupportedModel { model: String },
    #[error("GGUF pre-tokenizer `{pre}` is not supported (supported: {supported})")]
    UnsupportedPre { pre: String, supported: String },
    #[error("GGUF merge #{index} `{merge}` is not two tokens separated by one space")]
    BadMerge { index: usize, merge: String },
    #[error("GGUF `{key}` has {found} entries but there are {expected} tokens")]
    LengthMismatch { key: String, expected: usize, found: usize },
    #[error("token id {id} (`{key}`) is outside the vocabulary of {vocab} tokens")]
    IdOutOfRange { key: String, id: u32, vocab: usize },
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
    #[error("cannot encode a text of {chars} characters starting {start:?}: {message}")]
    Encode { chars: usize, start: String, message: String },
    #[error("cannot decode {count} token ids: {message}")]
    Decode { count: usize, message: String },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    UnknownId { id: u32, vocab: usize },
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// A token's `(start, end)` byte range in the encoded text.
pub type ByteRange = (usize, usize);

/// The pre-tokenization families [`SUPPORTED_PRE_TOKENIZERS`] map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// Digits split one by one, then ByteLevel with the GPT-2 regex (SmolLM, StarCoder).
    SmolLm,
    /// ByteLevel with the GPT-2 regex.
    Gpt2,
    /// NFC, then the Qwen2 regex, then ByteLevel without regex.
    Qwen2,
    /// The Llama-3 regex, then ByteLevel without regex; BPE ignores merges for whole-vocab words.
    Llama3,
}

impl PreTokenizerKind {
    /// The kind for a `tokenizer.ggml.pre` value.
    pub fn from_gguf_pre(pre: &str) -> Result<Self> {
        match pre {
            "smollm" | "starcoder" | "refact" => Ok(Self::SmolLm),
            "gpt-2" => Ok(Self::Gpt2),
            "qwen2" => Ok(Self::Qwen2),
            "llama-bpe" | "llama3" | "smaug-bpe" => Ok(Self::Llama3),
            other => Err(TokenizerError::UnsupportedPre {
                pre: other.to_string(),
                supported: SUPPORTED_PRE_TOKENIZERS.join(", "),
            }),
        }
    }
}

/// A GGUF file's tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizerSpec {
    pub model: String,
    /// `tokenizer.ggml.pre`; absent in old files (treated as `gpt-2`).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    /// One per token; absent means all normal.
    pub token_types: Vec<i32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    pub chat_template: Option<String>,
}

fn type_name(value: &gguf_file::Value) -> String {
    match value {
        gguf_file::Value::Array(items) => format!("an array of {} values", items.len()),
        gguf_file::Value::String(_) => "a string".to_string(),
        gguf_file::Value::Bool(_) => "a bool".to_string(),
        gguf_file::Value::F32(_) | gguf_file::Value::F64(_) => "a float".to_string(),
        _ => "an integer".to_string(),
    }
}

fn as_i64(value: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match value {
        V::U8(v) => *v as i64,
        V::I8(v) => *v as i64,
        V::U16(v) => *v as i64,
        V::I16(v) => *v as i64,
        V::U32(v) => *v as i64,
        V::I32(v) => *v as i64,
        V::U64(v) => i64::try_from(*v).ok()?,
        V::I64(v) => *v,
        _ => return None,
    })
}

impl GgufTokenizerSpec {
    /// Reads the spec from GGUF metadata.
    pub fn from_metadata(metadata: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        let get = |key: &str| metadata.get(key);
        let require = |key: &str| get(key).ok_or_else(|| TokenizerError::MissingMetadata { key: key.to_string() });
        let string = |key: &str, value: &gguf_file::Value| match value {
            gguf_file::Value::String(s) => Ok(s.clone()),
            other => {
                Err(TokenizerError::MetadataType { key: key.into(), expected: "a string", found: type_name(other) })
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            match require(key)? {
                gguf_file::Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        gguf_file::Value::String(s) => Ok(s.clone()),
                        other => Err(TokenizerError::MetadataType {
                            key: format!("{key}[{i}]"),
                            expected: "a string",
                            found: type_name(other),
                        }),
                    })
                    .collect(),
                other => Err(TokenizerError::MetadataType {
                    key: key.into(),
                    expected: "an array of strings",
                    found: type_name(other),
                }),
            }
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match get(key) {
                None => Ok(None),
                Some(value) => match as_i64(value) {
                    Some(v) if v >= 0 && v <= u32::MAX as i64 => Ok(Some(v as u32)),
                    // llama.cpp writes -1 for "none".
                    Some(_) => Ok(None),
                    None => Err(TokenizerError::MetadataType {
                        key: key.into(),
                        expected: "an integer",
                        found: type_name(value),
                    }),
                },
            }
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            match get(key) {
                None => Ok(None),
                Some(gguf_file::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => {
                    Err(TokenizerError::MetadataType { key: key.into(), expected: "a bool", found: type_name(other) })
                }
            }
        };

        let model = string("tokenizer.ggml.model", require("tokenizer.ggml.model")?)?;
        let pre = get("tokenizer.ggml.pre").map(|v| string("tokenizer.ggml.pre", v)).transpose()?;
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = if get("tokenizer.ggml.merges").is_some() { strings("tokenizer.ggml.merges")? } else { vec![] };
        let token_types = match get("tokenizer.ggml.token_type") {
            None => vec![],
            Some(gguf_file::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    as_i64(item).map(|v| v as i32).ok_or_else(|| TokenizerError::MetadataType {
                        key: format!("tokenizer.ggml.token_type[{i}]"),
                        expected: "an integer",
                        found: type_name(item),
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(TokenizerError::MetadataType {
                    key: "tokenizer.ggml.token_type".into(),
                    expected: "an array of integers",
                    found: type_name(other),
                })
            }
        };
        let chat_template = get("tokenizer.chat_template").map(|v| string("tokenizer.chat_template", v)).transpose()?;
        Ok(Self {
            model,
            pre,
            tokens,
            merges,
            token_types,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            padding_token_id: id("tokenizer.ggml.padding_token_id")?,
            unknown_token_id: id("tokenizer.ggml.unknown_token_id")?,
            add_bos_token: flag("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            add_eos_token: flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            chat_template,
        })
    }

    /// Reads the spec from a GGUF file (metadata only; tensors are not read).
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let content = read_gguf_content(path)?;
        Self::from_metadata(&content.metadata)
    }

    /// The pre-tokenizer kind; an absent `tokenizer.ggml.pre` means `gpt-2`.
    pub fn pre_tokenizer_kind(&self) -> Result<PreTokenizerKind> {
        PreTokenizerKind::from_gguf_pre(self.pre.as_deref().unwrap_or("gpt-2"))
    }
}

/// Reads a GGUF file's header and metadata.
pub fn read_gguf_content(path: &Path) -> Result<gguf_file::Content> {
    let file = std::fs::File::open(path)
        .map_err(|e| TokenizerError::Gguf { path: path.to_path_buf(), message: e.to_string() })?;
    let mut reader = std::io::BufReader::new(file);
    gguf_file::Content::read(&mut reader)
        .map_err(|e| TokenizerError::Gguf { path: path.to_path_buf(), message: e.to_string() })
}

/// How `encode(.., add_special = true)` adds special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Specials {
    /// The tokenizer.json post-processor does it.
    PostProcessor,
    /// GGUF `add_bos_token` / `add_eos_token`.
    Manual { add_bos: bool, add_eos: bool },
}

/// A tokenizer with its special tokens and (when the source has one) its chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer without post-processor: offsets exactly as the pre-tokenizer split.
    plain: tokenizers::Tokenizer,
    specials: Specials,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    special_ids: HashSet<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos_token())
            .field("eos", &self.eos_token())
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A token as tokenizer_config.json writes it: a string or `{"content": ...}`.
fn config_token(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    fn assemble(
        inner: tokenizers::Tokenizer,
        specials: Specials,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
        chat_template: Option<String>,
    ) -> Self {
        let mut plain = inner.clone();
        plain.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let special_ids =
            inner.get_added_tokens_decoder().iter().filter(|(_, token)| token.special).map(|(id, _)| *id).collect();
        Self { inner, plain, specials, bos, eos, pad, unk: None, special_ids, chat_template }
    }

    /// The tokenizer of a model: an HF folder's, or a GGUF file's.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_hf_folder(path)
        } else {
            Self::from_gguf(path)
        }
    }

    /// Loads a tokenizer.json; no bos/eos/template (see [`Tokenizer::from_hf_folder`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self::assemble(inner, Specials::PostProcessor, None, None, None, None))
    }

    /// Loads an HF model folder: tokenizer.json, plus bos/eos/pad tokens and the chat template
    /// from tokenizer_config.json (and a chat_template.jinja file, which newer folders use).
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let mut tokenizer = Self::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Load { path: config_path.clone(), message: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(TokenizerError::Load { path: config_path, message: e.to_string() }),
        };
        let id_of = |key: &str| config_token(config.get(key)).and_then(|t| tokenizer.token_to_id(&t));
        let (bos, eos, pad, unk) = (id_of("bos_token"), id_of("eos_token"), id_of("pad_token"), id_of("unk_token"));
        (tokenizer.bos, tokenizer.eos, tokenizer.pad, tokenizer.unk) = (bos, eos, pad, unk);
        tokenizer.chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if tokenizer.chat_template.is_none() && jinja.is_file() {
            tokenizer.chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| TokenizerError::Load { path: jinja.clone(), message: e.to_string() })?,
            );
        }
        Ok(tokenizer)
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let content = read_gguf_content(path)?;
        Self::from_gguf_content(&content)
    }

    /// Builds the tokenizer from already-read GGUF content.
    pub fn from_gguf_content(content: &gguf_file::Content) -> Result<Self> {
        Self::from_gguf_spec(&GgufTokenizerSpec::from_metadata(&content.metadata)?)
    }

    /// Builds the tokenizer from a GGUF tokenizer spec.
    pub fn from_gguf_spec(spec: &GgufTokenizerSpec) -> Result<Self> {
        if spec.model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel { model: spec.model.clone() });
        }
        let kind = spec.pre_tokenizer_kind()?;
        let n = spec.tokens.len();
        if !spec.token_types.is_empty() && spec.token_types.len() != n {
            return Err(TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.token_type".into(),
                expected: n,
                found: spec.token_types.len(),
            });
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", spec.bos_token_id),
            ("tokenizer.ggml.eos_token_id", spec.eos_token_id),
            ("tokenizer.ggml.padding_token_id", spec.padding_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::IdOutOfRange { key: key.into(), id, vocab: n });
                }
            }
        }
        let vocab: tokenizers::models::bpe::Vocab =
            spec.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = spec
            .merges
            .iter()
            .enumerate()
            .map(|(index, merge)| match merge.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(TokenizerError::BadMerge { index, merge: merge.clone() }),
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(kind == PreTokenizerKind::Llama3)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level_regex = ByteLevel::new(false, false, true);
        let byte_level_plain = ByteLevel::new(false, false, false);
        let split = |pattern: &str| {
            Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex: {e}")))
        };
        let pre: PreTokenizerWrapper = match kind {
            PreTokenizerKind::SmolLm => Sequence::new(vec![Digits::new(true).into(), byte_level_regex.into()]).into(),
            PreTokenizerKind::Gpt2 => byte_level_regex.into(),
            PreTokenizerKind::Qwen2 => {
                Sequence::new(vec![split(QWEN2_PATTERN)?.into(), byte_level_plain.into()]).into()
            }
            PreTokenizerKind::Llama3 => {
                Sequence::new(vec![split(LLAMA3_PATTERN)?.into(), byte_level_plain.into()]).into()
            }
        };
        if kind == PreTokenizerKind::Qwen2 {
            inner.with_normalizer(Some(NFC)).map_err(|e| TokenizerError::Build(e.to_string()))?;
        }
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let types = |i: usize| spec.token_types.get(i).copied().unwrap_or(token_type::NORMAL);
        let special: Vec<AddedToken> = (0..n)
            .filter(|&i| types(i) == token_type::CONTROL)
            .map(|i| AddedToken::from(spec.tokens[i].clone(), true))
            .collect();
        let user: Vec<AddedToken> = (0..n)
            .filter(|&i| types(i) == token_type::USER_DEFINED)
            .map(|i| AddedToken::from(spec.tokens[i].clone(), false).normalized(false))
            .collect();
        inner.add_special_tokens(special).map_err(|e| TokenizerError::Build(e.to_string()))?;
        inner.add_tokens(user).map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut tokenizer = Self::assemble(
            inner,
            Specials::Manual { add_bos: spec.add_bos_token, add_eos: spec.add_eos_token },
            spec.bos_token_id,
            spec.eos_token_id,
            spec.padding_token_id,
            spec.chat_template.clone(),
        );
        tokenizer.unk = spec.unknown_token_id.filter(|&id| (id as usize) < n);
        Ok(tokenizer)
    }

    fn encode_error(text: &str, e: impl std::fmt::Display) -> TokenizerError {
        TokenizerError::Encode {
            chars: text.chars().count(),
            start: text.chars().take(40).collect(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
    /// recognised; `add_special` adds what the model adds around a text (GGUF `add_bos_token`,
    /// or the tokenizer.json post-processor).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match self.specials {
            Specials::PostProcessor => {
                let encoding = self.inner.encode(text, add_special).map_err(|e| Self::encode_error(text, e))?;
                Ok(encoding.get_ids().to_vec())
            }
            Specials::Manual { add_bos, add_eos } => {
                let encoding = self.plain.encode(text, false).map_err(|e| Self::encode_error(text, e))?;
                let mut ids = Vec::with_capacity(encoding.len() + 2);
                if add_special && add_bos {
                    ids.extend(self.bos);
                }
                ids.extend_from_slice(encoding.get_ids());
                if add_special && add_eos {
                    ids.extend(self.eos);
                }
                Ok(ids)
            }
        }
    }

    /// Token ids of `text` with no special tokens added, and each token's byte range in `text`.
    /// Tokens that cover part of one character (byte-level pieces of an emoji) each report that
    /// character's whole range.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let encoding = self.plain.encode(text, false).map_err(|e| Self::encode_error(text, e))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`; `skip_special` leaves special tokens out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::UnknownId { id, vocab });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode { count: ids.len(), message: e.to_string() })
    }

    /// A streaming decoder: feed it ids one at a time, get text deltas.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(skip_special)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad
    }

    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk
    }

    pub fn unk_token(&self) -> Option<String> {
        self.unk.and_then(|id| self.id_to_token(id))
    }

    pub fn bos_token(&self) -> Option<String> {
        self.bos.and_then(|id| self.id_to_token(id))
    }

    pub fn eos_token(&self) -> Option<String> {
        self.eos.and_then(|id| self.id_to_token(id))
    }

    /// Overrides the end-of-sequence token (some HF folders name it only in generation_config.json).
    pub fn set_eos_token_id(&mut self, id: Option<u32>) {
        self.eos = id;
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The chat template that came with the tokenizer (GGUF `tokenizer.chat_template`,
    /// tokenizer_config.json `chat_template`).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental decoding for streaming: each new token id yields the text it completes, if any.
///
/// Decodes a short window of recent ids and emits only what extends the previous text, holding
/// back while the window ends in an incomplete UTF-8 sequence (an emoji split over byte tokens),
/// so the concatenated deltas equal `decode(all ids)`.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self { skip_special, ids: Vec::new(), prefix: String::new(), prefix_index: 0 }
    }

    /// Adds one token; returns the new text, or `None` while it waits for the rest of a character.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let prefix = tokenizer.decode(&self.ids, self.skip_special)?;
            if !prefix.ends_with('\u{FFFD}') {
                self.prefix = prefix;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, self.skip_special)?;
        if text.len() > self.prefix.len() && !text.ends_with('\u{FFFD}') {
            let Some(delta) = text.strip_prefix(self.prefix.as_str()) else {
                return Err(TokenizerError::Decode {
                    count: self.ids.len(),
                    message: format!(
                        "streaming decode: the text of the window {:?} does not extend the previous text {:?}",
                        text, self.prefix
                    ),
                });
            };
            let delta = delta.to_string();
            let keep = self.ids.len() - self.prefix_index;
            self.ids.drain(..self.prefix_index);
            self.prefix = tokenizer.decode(&self.ids, self.skip_special)?;
            self.prefix_index = keep;
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// The text still held back at the end of a stream (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let text = tokenizer.decode(&self.ids, self.skip_special)?;
        let rest = text.strip_prefix(self.prefix.as_str()).unwrap_or(&text).to_string();
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        Ok(if rest.is_empty() { None } else { Some(rest) })
    }
}
