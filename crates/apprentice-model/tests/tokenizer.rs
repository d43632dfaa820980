//! The tokenizer against golden ids from Python's HF stack (tests/golden/make_golden.py), on the
//! real SmolLM2 GGUF (fetched by `apprentice model fetch smollm2-135m`; these tests fail without it).

use std::path::PathBuf;
use std::sync::OnceLock;

use apprentice_model::cache::resolve_model;
use apprentice_model::tokenizer::{GgufTokenizerSpec, Tokenizer, TokenizerError};
use serde_json::Value;

fn gguf_path() -> PathBuf {
    resolve_model("smollm2-135m").unwrap_or_else(|e| panic!("the SmolLM2 model is required by these tests: {e}"))
}

fn spec() -> &'static GgufTokenizerSpec {
    static SPEC: OnceLock<GgufTokenizerSpec> = OnceLock::new();
    SPEC.get_or_init(|| GgufTokenizerSpec::from_gguf_file(&gguf_path()).unwrap())
}

fn smollm2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf_spec(spec()).unwrap())
}

fn golden() -> Value {
    let text = include_str!("golden/tokenizer_ids.json");
    serde_json::from_str(text).unwrap()
}

fn golden_cases(pre: &str) -> Vec<(String, Vec<u32>)> {
    golden()["pre_tokenizers"][pre]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
            (c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

#[test]
fn reference_ids_from_hf() {
    let ids = smollm2().encode("a 12 héllo 🤖 <|im_start|>", false).unwrap();
    assert_eq!(ids, vec![81, 216, 33, 34, 294, 2756, 31394, 15107, 114, 240, 216, 1]);
}

#[test]
fn smollm2_ids_equal_golden_ids_and_round_trip() {
    let tokenizer = smollm2();
    let cases = golden_cases("smollm");
    assert!(cases.len() >= 40);
    for (text, want) in cases {
        let got = tokenizer.encode(&text, false).unwrap();
        assert_eq!(got, want, "ids of {text:?}");
        // SmolLM2 adds nothing around a text.
        assert_eq!(tokenizer.encode(&text, true).unwrap(), want, "ids of {text:?} with add_special");
        assert_eq!(tokenizer.decode(&got, false).unwrap(), text, "decode(encode({text:?}))");
    }
}

#[test]
fn qwen2_and_llama3_pre_tokenizers_equal_golden_ids() {
    for (pre, golden_key) in [("qwen2", "qwen2"), ("llama-bpe", "llama-bpe"), ("llama3", "llama-bpe")] {
        let mut spec = spec().clone();
        spec.pre = Some(pre.to_string());
        let tokenizer = Tokenizer::from_gguf_spec(&spec).unwrap();
        for (text, want) in golden_cases(golden_key) {
            assert_eq!(tokenizer.encode(&text, false).unwrap(), want, "{pre}: ids of {text:?}");
        }
    }
}

#[test]
fn special_tokens_and_vocabulary() {
    let t = smollm2();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.bos_token_id(), Some(1));
    assert_eq!(t.eos_token_id(), Some(2));
    assert_eq!(t.pad_token_id(), Some(2));
    assert_eq!(t.bos_token().as_deref(), Some("<|im_start|>"));
    assert_eq!(t.eos_token().as_deref(), Some("<|im_end|>"));
    assert_eq!(t.unk_token().as_deref(), Some("<|endoftext|>"));
    assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(t.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(t.id_to_token(216).as_deref(), Some("Ġ"));
    assert!(t.is_special(0) && t.is_special(16) && !t.is_special(17));
    assert_eq!(t.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert_eq!(t.encode("<|im_end|>\n", false).unwrap(), vec![2, 198]);
    assert!(t.chat_template().unwrap().contains("<|im_start|>"));
}

#[test]
fn decode_can_skip_special_tokens() {
    let t = smollm2();
    let ids = t.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(t.decode(&ids, false).unwrap(), "<|im_start|>user\nhi<|im_end|>");
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let err = smollm2().decode(&[5, 49152], false).unwrap_err();
    assert!(matches!(err, TokenizerError::UnknownId { id: 49152, vocab: 49152 }), "{err}");
}

#[test]
fn stream_decoder_deltas_concatenate_to_the_decoded_text() {
    let t = smollm2();
    let mut held_back = 0;
    for (text, ids) in golden_cases("smollm") {
        let mut stream = t.stream_decoder(false);
        let mut out = String::new();
        for &id in &ids {
            match stream.step(t, id).unwrap() {
                Some(delta) => {
                    assert!(!delta.contains('\u{FFFD}'), "no half characters in {delta:?} of {text:?}");
                    out.push_str(&delta)
                }
                None => held_back += 1,
            }
        }
        if let Some(rest) = stream.finish(t).unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, text, "streamed text of {text:?}");
    }
    assert!(held_back > 0, "emoji split over byte tokens must be held back until complete");
}

#[test]
fn stream_decoder_finish_flushes_an_incomplete_character() {
    let t = smollm2();
    // The first byte token of 🤖 alone.
    let ids = t.encode("🤖", false).unwrap();
    assert!(ids.len() > 1);
    let mut stream = t.stream_decoder(false);
    assert_eq!(stream.step(t, ids[0]).unwrap(), None);
    assert_eq!(stream.finish(t).unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn offsets_cover_the_text() {
    let t = smollm2();
    let text = "<|im_start|>user\nHéllo 🤖 12<|im_end|>\n";
    let (ids, offsets) = t.encode_with_offsets(text).unwrap();
    assert_eq!(ids, t.encode(text, false).unwrap());
    assert_eq!(offsets.first().unwrap().0, 0);
    assert_eq!(offsets.last().unwrap().1, text.len());
    for pair in offsets.windows(2) {
        assert!(pair[0].0 <= pair[1].0 && pair[0].1 <= pair[1].1, "{offsets:?}");
    }
    assert_eq!(&text[offsets[0].0..offsets[0].1], "<|im_start|>");
}

#[test]
fn unknown_pre_tokenizer_is_named_in_the_error() {
    let mut spec = spec().clone();
    spec.pre = Some("deepseek-coder".into());
    let err = Tokenizer::from_gguf_spec(&spec).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("deepseek-coder") && text.contains("smollm") && text.contains("qwen2"), "{text}");
}

#[test]
fn malformed_gguf_metadata_is_a_clear_error() {
    let mut spec = spec().clone();
    spec.model = "llama".into();
    let err = Tokenizer::from_gguf_spec(&spec).unwrap_err();
    assert!(err.to_string().contains("`llama`"), "{err}");

    let mut spec = self::spec().clone();
    spec.merges[7] = "nospace".into();
    let err = Tokenizer::from_gguf_spec(&spec).unwrap_err();
    assert!(matches!(err, TokenizerError::BadMerge { index: 7, .. }), "{err}");

    let mut spec = self::spec().clone();
    spec.token_types.pop();
    let err = Tokenizer::from_gguf_spec(&spec).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.token_type"), "{err}");

    let mut spec = self::spec().clone();
    spec.eos_token_id = Some(1_000_000);
    let err = Tokenizer::from_gguf_spec(&spec).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.eos_token_id"), "{err}");

    let missing = GgufTokenizerSpec::from_metadata(&Default::default()).unwrap_err();
    assert!(missing.to_string().contains("tokenizer.ggml.model"), "{missing}");
}

#[test]
fn hf_folder_tokenizer_matches_the_gguf_one() {
    let gguf = smollm2();
    let dir = tempfile::tempdir().unwrap();
    gguf.inner().save(dir.path().join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": gguf.chat_template().unwrap(),
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let hf = Tokenizer::from_hf_folder(dir.path()).unwrap();
    assert_eq!((hf.bos_token_id(), hf.eos_token_id(), hf.pad_token_id()), (Some(1), Some(2), Some(2)));
    assert_eq!(hf.chat_template(), gguf.chat_template());
    for (text, want) in golden_cases("smollm") {
        assert_eq!(hf.encode(&text, false).unwrap(), want, "ids of {text:?}");
        assert_eq!(hf.decode(&want, false).unwrap(), text);
    }

    let err = Tokenizer::from_hf_folder(&dir.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
