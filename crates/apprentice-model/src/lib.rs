//! The student model: llama-family model code in candle that autograd reaches end to end,
//! loading and saving (GGUF, HF safetensors folders), the tokenizer, the model's own chat
//! template with assistant-only loss masks, and generation with a KV cache.
//!
//! Each module owns its error type; nothing here knows about the gateway or the store.

pub mod attention;
pub mod bench;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod generate;
pub mod llama;
pub mod load;
pub mod ops;
pub mod save;
pub mod serve;
pub mod tokenizer;

pub use cache::{resolve_model, ModelCache};
pub use chat_template::{ChatTemplate, LossMaskedExample};
pub use config::{Architecture, ModelConfig};
pub use generate::{generate, generate_stream, FinishReason, GenerateOptions, Generation, StreamEvent, TokenDecoder};
pub use llama::{AttentionKernel, KvCache, Llama, LoraConfig, LoraState, PackedRows, LORA_TARGETS};
pub use load::{load, GgufMetadata, LoadedModel};
pub use save::{save_gguf, save_safetensors, GgufDType};
pub use tokenizer::Tokenizer;
