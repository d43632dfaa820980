//! Model configs from HF config.json files as published, round trips through both formats, and
//! errors that name the field and the file.

use apprentice_model::config::{Architecture, ConfigError, ModelConfig};

/// HuggingFaceTB/SmolLM2-135M-Instruct config.json (transformers.js block left out).
const SMOLLM2: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.041666666666666664,
  "intermediate_size": 1536,
  "is_llama_config": true,
  "max_position_embeddings": 8192,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pad_token_id": 2,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_interleaved": false,
  "rope_scaling": null,
  "rope_theta": 100000,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.3",
  "use_cache": true,
  "vocab_size": 49152
}"#;

/// Qwen/Qwen2.5-0.5B-Instruct config.json.
const QWEN25: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

#[test]
fn smollm2_config_parses() {
    let c = ModelConfig::from_hf_json(SMOLLM2, "smollm2/config.json").unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size), (49152, 576, 1536));
    assert_eq!((c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim), (30, 9, 3, 64));
    assert_eq!((c.rms_norm_eps, c.rope_theta, c.max_position_embeddings), (1e-5, 100_000.0, 8192));
    assert!(c.tie_word_embeddings && !c.attention_bias);
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2][..]));
}

#[test]
fn qwen25_config_parses_with_biases() {
    let c = ModelConfig::from_hf_json(QWEN25, "qwen/config.json").unwrap();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert!(c.attention_bias && c.tie_word_embeddings);
    assert_eq!((c.head_dim, c.num_key_value_heads, c.rope_theta), (64, 2, 1e6));
    assert_eq!(c.eos_token_ids, [151645]);
}

#[test]
fn hf_json_round_trips() {
    for text in [SMOLLM2, QWEN25] {
        let c = ModelConfig::from_hf_json(text, "config.json").unwrap();
        let again = ModelConfig::from_hf_json(&c.to_hf_json().to_string(), "written config.json").unwrap();
        assert_eq!(again, c);
    }
    let mut json: serde_json::Value = serde_json::from_str(SMOLLM2).unwrap();
    json["eos_token_id"] = serde_json::json!([2, 0]);
    let c = ModelConfig::from_hf_json(&json.to_string(), "config.json").unwrap();
    assert_eq!(c.eos_token_ids, [2, 0]);
    let again = ModelConfig::from_hf_json(&c.to_hf_json().to_string(), "config.json").unwrap();
    assert_eq!(again.eos_token_ids, [2, 0]);
}

fn error_for(edit: impl FnOnce(&mut serde_json::Value)) -> ConfigError {
    let mut json: serde_json::Value = serde_json::from_str(SMOLLM2).unwrap();
    edit(&mut json);
    ModelConfig::from_hf_json(&json.to_string(), "/models/x/config.json").unwrap_err()
}

#[test]
fn errors_name_the_field_and_the_file() {
    let message = |e: ConfigError| e.to_string();
    let m = message(error_for(|j| {
        j.as_object_mut().unwrap().remove("hidden_size");
    }));
    assert!(m.contains("/models/x/config.json") && m.contains("`hidden_size`") && m.contains("missing"), "{m}");

    let m = message(error_for(|j| j["num_key_value_heads"] = serde_json::json!("three")));
    assert!(m.contains("`num_key_value_heads`") && m.contains("not a non-negative integer"), "{m}");

    let m = message(error_for(|j| j["num_key_value_heads"] = serde_json::json!(4)));
    assert!(m.contains("num_key_value_heads") && m.contains("does not divide"), "{m}");

    let m = message(error_for(|j| j["model_type"] = serde_json::json!("gpt2")));
    assert!(m.contains("unsupported") && m.contains("gpt2"), "{m}");

    let m = message(error_for(|j| j["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0})));
    assert!(m.contains("rope_scaling"), "{m}");

    let m = message(ModelConfig::from_hf_json("{ not json", "/models/y/config.json").unwrap_err());
    assert!(m.contains("/models/y/config.json") && m.contains("not valid JSON"), "{m}");

    let m = message(ModelConfig::from_hf_file(std::path::Path::new("/nonexistent/config.json")).unwrap_err());
    assert!(m.contains("/nonexistent/config.json"), "{m}");
}

#[test]
fn gguf_metadata_round_trips() {
    use candle_core::quantized::gguf_file::{Content, TensorInfo, VersionedMagic};
    for text in [SMOLLM2, QWEN25] {
        let c = ModelConfig::from_hf_json(text, "config.json").unwrap();
        let mut metadata: std::collections::HashMap<_, _> = c.to_gguf_metadata().into_iter().collect();
        metadata.insert(
            "tokenizer.ggml.bos_token_id".into(),
            candle_core::quantized::gguf_file::Value::U32(c.bos_token_id.unwrap()),
        );
        metadata.insert(
            "tokenizer.ggml.eos_token_id".into(),
            candle_core::quantized::gguf_file::Value::U32(c.eos_token_ids[0]),
        );
        let info = |dims: Vec<usize>| TensorInfo {
            ggml_dtype: candle_core::quantized::GgmlDType::F32,
            shape: dims.into(),
            offset: 0,
        };
        let mut tensor_infos = std::collections::HashMap::new();
        tensor_infos.insert("token_embd.weight".to_string(), info(vec![c.vocab_size, c.hidden_size]));
        if c.attention_bias {
            tensor_infos.insert("blk.0.attn_q.bias".to_string(), info(vec![c.hidden_size]));
        }
        let content = Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos, tensor_data_offset: 0 };
        assert_eq!(ModelConfig::from_gguf(&content, "x.gguf").unwrap(), c);

        let mut missing = content;
        missing.metadata.remove(&format!("{}.block_count", c.architecture.name()));
        let m = ModelConfig::from_gguf(&missing, "/models/x.gguf").unwrap_err().to_string();
        assert!(m.contains("/models/x.gguf") && m.contains(".block_count"), "{m}");
    }
}
