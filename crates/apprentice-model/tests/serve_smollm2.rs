//! The serving engine on the real SmolLM2-135M-Instruct: f32 serving against the training model,
//! and the compact q8_0 weights against f32. The GGUF comes from the model cache (`apprentice
//! model fetch smollm2-135m`); these tests fail, not skip, without it.

use std::ops::ControlFlow;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use apprentice_model::cache::resolve_model;
use apprentice_model::generate::GenerateOptions;
use apprentice_model::load::{load_gguf, LoadedModel};
use apprentice_model::serve::{Chunk, Request, Scheduler, SchedulerConfig, ServingModel, WeightFormat};
use apprentice_model::tokenizer::Tokenizer;
use apprentice_model::ChatTemplate;
use candle_core::{Device, Tensor};
use serde_json::json;

fn loaded() -> &'static (LoadedModel, Tokenizer) {
    static MODEL: OnceLock<(LoadedModel, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = resolve_model("smollm2-135m").unwrap_or_else(|e| {
            panic!("these tests need SmolLM2-135M-Instruct: run `apprentice model fetch smollm2-135m` ({e})")
        });
        (load_gguf(&path, &Device::Cpu).expect("load SmolLM2"), Tokenizer::from_path(&path).expect("tokenizer"))
    })
}

fn prompt() -> Vec<u32> {
    let (_, tokenizer) = loaded();
    let template = ChatTemplate::from_tokenizer(tokenizer).unwrap();
    let messages = [
        json!({"role": "system", "content": "You are an agent in a grid world. Answer with one action."}),
        json!({"role": "user", "content": "Mission: go to the red ball. You see a wall 2 steps forward, a red ball 1 step left. Actions: turn left, turn right, go forward, pick up, drop, toggle."}),
    ];
    tokenizer.encode(&template.render_prompt(&messages, None).unwrap(), false).unwrap()
}

fn last_logits(model: &ServingModel, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    model.forward(&mut [Chunk { cache: &mut cache, tokens, logits: true }]).unwrap().remove(0).unwrap()
}

fn greedy(model: &Arc<ServingModel>, tokens: &[u32], n: usize) -> Vec<u32> {
    let scheduler = Scheduler::start(model.clone(), None, SchedulerConfig::default(), None);
    let (tx, rx) = mpsc::channel();
    let request = Request { prompt: tokens.to_vec(), options: GenerateOptions::greedy(n), prefix_key: None };
    let _ticket = scheduler
        .submit(request, Box::new(|_| ControlFlow::Continue(())), Box::new(move |c| tx.send(c).unwrap()))
        .unwrap();
    rx.recv_timeout(Duration::from_secs(120)).unwrap().unwrap().generation.tokens
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn f32_serving_equals_the_training_model_and_q8_0_stays_within_tolerance() {
    let (loaded, _) = loaded();
    let tokens = prompt();
    let ids = Tensor::from_vec(tokens.clone(), (1, tokens.len()), &Device::Cpu).unwrap();
    let training = loaded.model.forward(&ids).unwrap().get(0).unwrap().get(tokens.len() - 1).unwrap();
    let training = training.to_vec1::<f32>().unwrap();

    let f32_model = Arc::new(ServingModel::from_llama(&loaded.model, WeightFormat::F32).unwrap());
    let q8_model = Arc::new(ServingModel::from_llama(&loaded.model, WeightFormat::Q8_0).unwrap());
    assert!(q8_model.weight_bytes() * 3 < f32_model.weight_bytes(), "q8_0 reads under a third of f32's bytes");

    let f32_logits = last_logits(&f32_model, &tokens);
    let q8_logits = last_logits(&q8_model, &tokens);
    let spread = training.iter().fold(0f32, |m, v| m.max(v.abs()));
    // f32 serving differs from the training model only in summation order.
    let f32_diff = max_abs(&f32_logits, &training);
    assert!(f32_diff < 2e-3 * spread, "f32 serving: max |diff| {f32_diff} (logits up to {spread})");
    // q8_0 rounds every weight to 1/254 of its block's largest (activations stay f32).
    let q8_diff = max_abs(&q8_logits, &f32_logits);
    assert!(q8_diff < 0.05 * spread, "q8_0: max |diff| {q8_diff} (logits up to {spread})");

    eprintln!("max |logit diff| against the training model: f32 {f32_diff}, q8_0 {q8_diff} (logits up to {spread})");

    // Greedy tokens: q8_0 follows f32's greedy path for all 24 tokens of this prompt (measured;
    // 12 are required, as a near tie may flip one day); llama.cpp's Q4_1 leaves it after 6.
    let f32_tokens = greedy(&f32_model, &tokens, 24);
    let q8_tokens = greedy(&q8_model, &tokens, 24);
    let agree = f32_tokens.iter().zip(&q8_tokens).take_while(|(a, b)| a == b).count();
    eprintln!("q8_0 and f32 greedy tokens agree for {agree} of {}", f32_tokens.len());
    assert!(agree >= 12, "q8_0 and f32 greedy tokens part after {agree}: {f32_tokens:?} vs {q8_tokens:?}");
}
