//! Generation on tiny random models: deterministic seeds, greedy decoding that matches full
//! recomputation, batches that match their prompts run alone, token limits, stop tokens, stop
//! strings, streaming and cancellation.

mod model_support;

use std::ops::ControlFlow;

use apprentice_model::generate::{
    generate, generate_stream, FinishReason, GenerateError, GenerateOptions, Generation, StreamEvent,
};
use apprentice_model::llama::Llama;
use candle_core::IndexOp;
use model_support::{argmax, ids, random_model, tiny_llama, tiny_qwen2};

/// A byte-level toy decoder, like a BPE tokenizer's: most ids are ASCII letters, some are the
/// two halves of "é" (0xC3 0xA9), so decoding a prefix can end in an incomplete character that
/// `from_utf8_lossy` shows as U+FFFD.
fn decode(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .map(|&id| match id % 7 {
            0 => 0xC3,
            1 => 0xA9,
            _ => b'a' + (id % 26) as u8,
        })
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn sampling(seed: u64, max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        temperature: 1.0,
        top_k: Some(20),
        top_p: Some(0.9),
        seed,
        ..GenerateOptions::default()
    }
}

fn model() -> Llama {
    random_model(&tiny_llama(false), 31).model
}

#[test]
fn same_seed_same_output() {
    let model = model();
    let prompts = vec![vec![1, 17, 42, 8]];
    let a = generate(&model, &prompts, &sampling(7, 24), None).unwrap();
    let b = generate(&model, &prompts, &sampling(7, 24), None).unwrap();
    assert_eq!(a, b);
    let c = generate(&model, &prompts, &sampling(8, 24), None).unwrap();
    assert_ne!(a[0].tokens, c[0].tokens, "another seed should sample another sequence");
    let greedy = generate(&model, &prompts, &GenerateOptions::greedy(24), None).unwrap();
    assert_ne!(a[0].tokens, greedy[0].tokens, "temperature 1 should not be greedy");
}

#[test]
fn greedy_generation_equals_argmax_of_full_recomputation() {
    for config in [tiny_llama(false), tiny_qwen2()] {
        let model = random_model(&config, 32).model;
        let prompt = vec![1u32, 17, 42, 8, 95];
        let out = generate(&model, std::slice::from_ref(&prompt), &GenerateOptions::greedy(16), None).unwrap();
        let mut sequence = prompt.clone();
        for &token in &out[0].tokens {
            let logits = model.forward(&ids(&[&sequence])).unwrap();
            let last = logits.i((0, sequence.len() - 1)).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(argmax(&last) as u32, token, "after {sequence:?}");
            sequence.push(token);
        }
        assert_eq!(out[0].tokens.len(), 16);
    }
}

#[test]
fn batch_generation_equals_each_prompt_alone() {
    let model = random_model(&tiny_qwen2(), 33).model;
    let prompts = vec![vec![1u32, 5, 9], vec![3u32, 17, 42, 8, 95, 60, 2], vec![11u32, 12, 13, 14, 15]];
    for options in [GenerateOptions::greedy(12), sampling(100, 12)] {
        let batch = generate(&model, &prompts, &options, Some(&decode)).unwrap();
        for (row, prompt) in prompts.iter().enumerate() {
            // Row `i` of a batch samples with seed + i.
            let alone_options = GenerateOptions { seed: options.seed + row as u64, ..options.clone() };
            let alone = generate(&model, std::slice::from_ref(prompt), &alone_options, Some(&decode)).unwrap();
            assert_eq!(batch[row], alone[0], "row {row}, temperature {}", options.temperature);
            assert_eq!(batch[row].prompt_tokens, prompt.len());
        }
    }
}

#[test]
fn max_new_tokens_ends_with_length() {
    let model = model();
    let out = generate(&model, &[vec![1, 2, 3]], &sampling(1, 9), Some(&decode)).unwrap();
    assert_eq!(out[0].tokens.len(), 9);
    assert_eq!(out[0].completion_tokens, 9);
    assert_eq!(out[0].finish_reason, FinishReason::Length);
    assert_eq!(out[0].text.as_deref(), Some(decode(&out[0].tokens).as_str()));
    let none = generate(&model, &[vec![1, 2, 3]], &sampling(1, 0), Some(&decode)).unwrap();
    assert_eq!((none[0].tokens.len(), none[0].finish_reason), (0, FinishReason::Length));
    assert_eq!(none[0].text.as_deref(), Some(""));
}

#[test]
fn stop_token_ends_the_sequence_and_is_not_output() {
    let model = model();
    let prompt = vec![vec![4u32, 40, 22]];
    let free = generate(&model, &prompt, &sampling(3, 20), None).unwrap().remove(0);
    // Stop on the token sampled fourth (at its first occurrence).
    let stop = free.tokens[3];
    let at = free.tokens.iter().position(|&t| t == stop).unwrap();
    let options = GenerateOptions { stop_token_ids: vec![stop], ..sampling(3, 20) };
    let stopped = generate(&model, &prompt, &options, None).unwrap().remove(0);
    assert_eq!(stopped.tokens, free.tokens[..at]);
    assert_eq!(stopped.completion_tokens, at + 1);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
}

/// Collects a row's streamed events.
#[derive(Default)]
struct Collected {
    tokens: Vec<u32>,
    text: String,
    finished: Vec<FinishReason>,
}

fn stream(model: &Llama, prompts: &[Vec<u32>], options: &GenerateOptions) -> (Vec<Generation>, Vec<Collected>) {
    let mut rows: Vec<Collected> = prompts.iter().map(|_| Collected::default()).collect();
    let out = generate_stream(model, prompts, options, Some(&decode), |event| {
        match event {
            StreamEvent::Token { row, token, text_delta } => {
                assert!(rows[row].finished.is_empty(), "token after the end of row {row}");
                rows[row].tokens.push(token);
                rows[row].text.push_str(text_delta);
            }
            StreamEvent::Finished { row, reason, text_delta } => {
                rows[row].text.push_str(text_delta);
                rows[row].finished.push(reason);
            }
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    (out, rows)
}

#[test]
fn stop_strings_cut_the_text_and_streaming_never_shows_them() {
    let model = model();
    let prompts = vec![vec![1u32, 17, 42, 8], vec![9u32, 9, 30]];
    let mut checked = 0;
    for seed in 0..6 {
        let (free, _) = stream(&model, &prompts, &sampling(seed, 30));
        let text = free[0].text.clone().unwrap();
        // A stop string taken from the second half of what row 0 generates freely.
        let chars: Vec<char> = text.chars().collect();
        let Some(stop) = (chars.len() / 2..chars.len().saturating_sub(3))
            .map(|i| chars[i..i + 3].iter().collect::<String>())
            .find(|s| !s.contains('\u{FFFD}'))
        else {
            continue;
        };
        let options =
            GenerateOptions { stop_strings: vec!["never appears here".into(), stop.clone()], ..sampling(seed, 30) };
        let (out, streamed) = stream(&model, &prompts, &options);
        let cut = text.find(&stop).unwrap();
        assert_eq!(out[0].text.as_deref(), Some(&text[..cut]), "seed {seed}, stop {stop:?}");
        assert_eq!(out[0].finish_reason, FinishReason::Stop);
        assert!(decode(&out[0].tokens).contains(&stop), "the tokens that made the stop string are kept");
        for (row, (generation, collected)) in out.iter().zip(&streamed).enumerate() {
            assert_eq!(generation.text.as_deref(), Some(collected.text.as_str()), "seed {seed} row {row}");
            assert_eq!(generation.tokens, collected.tokens, "seed {seed} row {row}");
            assert_eq!(collected.finished, [generation.finish_reason], "seed {seed} row {row}");
            assert!(!collected.text.contains(&stop) || generation.finish_reason != FinishReason::Stop);
        }
        checked += 1;
    }
    assert!(checked >= 3, "too few usable seeds: {checked}");
}

#[test]
fn streamed_deltas_add_up_to_the_text_with_incomplete_characters() {
    let model = model();
    let prompts = vec![vec![7u32, 8, 14], vec![21u32]];
    for seed in 0..8 {
        let (out, streamed) = stream(&model, &prompts, &sampling(seed, 25));
        for (generation, collected) in out.iter().zip(&streamed) {
            assert_eq!(generation.text.as_deref(), Some(collected.text.as_str()), "seed {seed}");
            assert_eq!(generation.tokens, collected.tokens);
        }
    }
}

#[test]
fn cancelling_a_row_stops_only_that_row() {
    let model = model();
    let prompts = vec![vec![1u32, 2, 3], vec![4u32, 5, 6]];
    let mut seen = 0;
    let out = generate_stream(&model, &prompts, &sampling(5, 10), None, |event| match event {
        StreamEvent::Token { row: 0, .. } => {
            seen += 1;
            if seen == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        _ => ControlFlow::Continue(()),
    })
    .unwrap();
    assert_eq!((out[0].tokens.len(), out[0].finish_reason), (3, FinishReason::Cancelled));
    assert_eq!((out[1].tokens.len(), out[1].finish_reason), (10, FinishReason::Length));
}

#[test]
fn invalid_requests_are_errors() {
    let model = model();
    let prompt = vec![vec![1u32, 2]];
    let bad = |options: GenerateOptions| generate(&model, &prompt, &options, None).unwrap_err();
    assert!(matches!(bad(GenerateOptions { top_p: Some(0.0), ..sampling(0, 4) }), GenerateError::Options(_)));
    assert!(matches!(bad(GenerateOptions { temperature: -1.0, ..sampling(0, 4) }), GenerateError::Options(_)));
    assert!(matches!(bad(GenerateOptions { top_k: Some(0), ..sampling(0, 4) }), GenerateError::Options(_)));
    let err = bad(GenerateOptions { stop_strings: vec!["x".into()], ..sampling(0, 4) });
    assert!(err.to_string().contains("need a decoder"), "{err}");
    let err = generate(&model, &[vec![1, 2], vec![]], &sampling(0, 4), None).unwrap_err();
    assert!(matches!(err, GenerateError::Prompt { row: 1, .. }), "{err}");
    let err = generate(&model, &[vec![1, 96]], &sampling(0, 4), None).unwrap_err();
    assert!(err.to_string().contains("token id 96"), "{err}");
    assert!(generate(&model, &[], &sampling(0, 4), None).unwrap().is_empty());
}
