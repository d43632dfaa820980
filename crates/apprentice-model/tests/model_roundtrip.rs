//! Saving and loading give back the same model: safetensors exactly, GGUF f32 exactly (the Q/K
//! permutation is undone bit for bit), GGUF f16 and q8_0 within their rounding. A GGUF we save is
//! also read right by candle-transformers' quantized llama, an implementation of llama.cpp's
//! layout that shares no code with our loader.

mod model_support;

use std::collections::HashMap;

use apprentice_model::config::ModelConfig;
use apprentice_model::load::{load, load_gguf, load_hf_folder, GgufMetadata, LoadError};
use apprentice_model::save::{save_gguf, save_safetensors, GgufDType};
use candle_core::quantized::gguf_file;
use candle_core::{Device, IndexOp, Tensor};
use model_support::{argmax, ids, max_abs_diff, random_model, tiny_llama, tiny_qwen2};

const PROMPT: [u32; 10] = [1, 17, 42, 8, 95, 3, 3, 60, 21, 7];

fn configs() -> Vec<(&'static str, ModelConfig)> {
    vec![("llama tied", tiny_llama(true)), ("llama untied", tiny_llama(false)), ("qwen2", tiny_qwen2())]
}

#[test]
fn safetensors_round_trip_is_exact() {
    for (what, config) in configs() {
        let original = random_model(&config, 21);
        let dir = tempfile::tempdir().unwrap();
        save_safetensors(&original.model, dir.path()).unwrap();
        assert!(dir.path().join("config.json").is_file());
        let loaded = load_hf_folder(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.config, config, "{what}");
        let (a, b) =
            (original.model.forward(&ids(&[&PROMPT])).unwrap(), loaded.model.forward(&ids(&[&PROMPT])).unwrap());
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{what}");
        // The tied output projection is not stored, as in HF checkpoints.
        let weights = dir.path().join("model.safetensors");
        let stored = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
        assert_eq!(stored.contains_key("lm_head.weight"), !config.tie_word_embeddings, "{what}");
        // transformers' from_pretrained refuses safetensors files without this metadata.
        let bytes = std::fs::read(&weights).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        assert_eq!(header["__metadata__"]["format"], "pt", "{what}");
    }
}

/// Max abs logit difference allowed after a GGUF round trip, relative to the largest logit.
/// Measured on these models: f16 2–4e-4 (f16 keeps 11 significant bits), q8_0 4–8e-3 (8-bit
/// steps of each 32-weight block's maximum); the bounds leave 3–5× margin.
fn relative_tolerance(dtype: GgufDType) -> f32 {
    match dtype {
        GgufDType::F32 => 0.0,
        GgufDType::F16 => 2e-3,
        GgufDType::Q8_0 => 2.5e-2,
    }
}

#[test]
fn gguf_round_trips_within_tolerance() {
    for (what, config) in configs() {
        let original = random_model(&config, 22);
        let expected = original.model.forward(&ids(&[&PROMPT])).unwrap();
        for dtype in [GgufDType::F32, GgufDType::F16, GgufDType::Q8_0] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.gguf");
            save_gguf(&original.model, &path, dtype, None).unwrap();
            let loaded = load_gguf(&path, &Device::Cpu).unwrap();
            assert_eq!(loaded.config, config, "{what} {dtype:?}");
            let logits = loaded.model.forward(&ids(&[&PROMPT])).unwrap();
            let diff = max_abs_diff(&logits, &expected);
            let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let relative = diff / scale;
            assert!(
                relative <= relative_tolerance(dtype),
                "{what} {dtype:?}: max abs diff {diff}, {relative:e} of {scale}"
            );
            for t in 0..PROMPT.len() {
                let a = expected.i((0, t)).unwrap().to_vec1::<f32>().unwrap();
                let b = logits.i((0, t)).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(argmax(&a), argmax(&b), "{what} {dtype:?}: argmax at {t}");
            }
        }
    }
}

/// Our saved llama GGUF (Q/K rows permuted back to llama.cpp's interleaved layout) run by
/// candle-transformers' quantized llama, which uses interleaved rotary on them, gives our logits.
#[test]
fn saved_llama_gguf_runs_in_candle_transformers() {
    for config in [tiny_llama(true), tiny_llama(false)] {
        let original = random_model(&config, 23);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        save_gguf(&original.model, &path, GgufDType::F32, None).unwrap();

        let mut reader = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let mut reference =
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)
                .unwrap();
        let theirs = reference.forward(&ids(&[&PROMPT]), 0).unwrap();
        let ours = original.model.forward(&ids(&[&PROMPT])).unwrap().i((.., PROMPT.len() - 1, ..)).unwrap();
        let diff = max_abs_diff(&ours, &theirs);
        assert!(diff < 1e-4, "tied={}: max abs diff {diff}", config.tie_word_embeddings);
    }
}

#[test]
fn saved_gguf_carries_source_metadata() {
    let config = tiny_llama(true);
    let original = random_model(&config, 24);
    let mut source = GgufMetadata::default();
    let tokens: Vec<gguf_file::Value> = (0..96).map(|i| gguf_file::Value::String(format!("t{i}"))).collect();
    source.entries.insert("tokenizer.ggml.tokens".into(), gguf_file::Value::Array(tokens));
    source.entries.insert("tokenizer.ggml.model".into(), gguf_file::Value::String("gpt2".into()));
    source.entries.insert("tokenizer.ggml.eos_token_id".into(), gguf_file::Value::U32(2));
    source.entries.insert("tokenizer.chat_template".into(), gguf_file::Value::String("{{ messages }}".into()));
    source.entries.insert("general.name".into(), gguf_file::Value::String("tiny".into()));
    // Layout keys of the source must not leak into a file with another layout.
    source.entries.insert("general.file_type".into(), gguf_file::Value::U32(3));
    source.entries.insert("llama.block_count".into(), gguf_file::Value::U32(30));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    save_gguf(&original.model, &path, GgufDType::Q8_0, Some(&source)).unwrap();
    let saved = GgufMetadata::read(&path).unwrap();
    assert_eq!(saved.strings("tokenizer.ggml.tokens").unwrap().len(), 96);
    assert_eq!(saved.string("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(saved.string("tokenizer.chat_template"), Some("{{ messages }}"));
    assert_eq!(saved.string("general.name"), Some("tiny"));
    assert_eq!(saved.u32("general.file_type"), Some(7));
    assert_eq!(saved.u32("llama.block_count"), Some(2));
    assert_eq!(saved.u32("tokenizer.ggml.eos_token_id"), Some(2));
    let loaded = load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.gguf_metadata.unwrap().string("tokenizer.ggml.model"), Some("gpt2"));
}

#[test]
fn sharded_hf_folder_loads() {
    let config = tiny_qwen2();
    let original = random_model(&config, 25);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_hf_json().to_string()).unwrap();
    let tensors = original.model.named_tensors();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        // bf16 on disk, as most HF checkpoints are: loading converts to f32.
        let part: HashMap<String, Tensor> =
            part.iter().map(|(n, t)| (n.clone(), t.to_dtype(candle_core::DType::BF16).unwrap())).collect();
        candle_core::safetensors::save(&part, dir.path().join(shard)).unwrap();
        for name in part.keys() {
            weight_map.insert(name.clone(), serde_json::Value::String(shard.into()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    // A stray file beside the index must not be read.
    std::fs::write(dir.path().join("junk.safetensors"), b"not safetensors").unwrap();

    let loaded = load(dir.path(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &loaded.model.forward(&ids(&[&PROMPT])).unwrap(),
        &original.model.forward(&ids(&[&PROMPT])).unwrap(),
    );
    assert!(diff < 0.1, "bf16 weights: max abs diff {diff}");
    assert_eq!(loaded.varmap.all_vars().len(), tensors.len());
}

#[test]
fn load_errors_name_the_tensor_and_file() {
    let config = tiny_llama(false);
    let original = random_model(&config, 26);
    let dir = tempfile::tempdir().unwrap();
    save_safetensors(&original.model, dir.path()).unwrap();
    let weights = dir.path().join("model.safetensors");
    let mut stored = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();

    stored.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&stored, &weights).unwrap();
    let err = load_hf_folder(dir.path(), &Device::Cpu).err().unwrap();
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("model.layers.1.mlp.up_proj.weight") && message.contains(&dir.path().display().to_string())
    );

    stored.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        Tensor::zeros((96, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&stored, &weights).unwrap();
    let err = load_hf_folder(dir.path(), &Device::Cpu).err().unwrap();
    assert!(matches!(err, LoadError::ShapeMismatch { .. }), "{err}");

    stored.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        Tensor::zeros((96, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    stored.insert(
        "model.layers.1.mlp.extra.weight".into(),
        Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&stored, &weights).unwrap();
    let err = load_hf_folder(dir.path(), &Device::Cpu).err().unwrap();
    assert!(err.to_string().contains("unexpected tensor `model.layers.1.mlp.extra.weight`"), "{err}");

    let err = load(&dir.path().join("nothing-here"), &Device::Cpu).err().unwrap();
    assert!(matches!(err, LoadError::UnknownFormat { .. }), "{err}");
    std::fs::write(dir.path().join("not.gguf"), b"GGUF but not really").unwrap();
    let err = load_gguf(&dir.path().join("not.gguf"), &Device::Cpu).err().unwrap();
    assert!(err.to_string().contains("not.gguf"), "{err}");
}

#[test]
fn gguf_and_hf_names_map_both_ways() {
    use apprentice_model::load::{gguf_name, hf_name};
    for (g, h) in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.12.attn_k.bias", "model.layers.12.self_attn.k_proj.bias"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
    ] {
        assert_eq!(hf_name(g).as_deref(), Some(h));
        assert_eq!(gguf_name(h).as_deref(), Some(g));
    }
    assert_eq!(hf_name("rope_freqs.weight"), None);
    assert_eq!(hf_name("blk.x.attn_q.weight"), None);
}
