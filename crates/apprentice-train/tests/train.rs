//! The trainer end to end on tiny random models: every objective overfits a tiny dataset,
//! dataset weights pull the model toward the heavier answer in proportion, iw-SFT's first step
//! equals SFT's, LoRA merges exactly, and a killed-and-resumed run ends bit for bit where an
//! unbroken one does.

use std::collections::HashMap;

use apprentice_model::config::{Architecture, ModelConfig};
use apprentice_model::llama::LoraConfig;
use apprentice_model::load::{from_tensors, LoadedModel};
use apprentice_model::Llama;
use apprentice_model::PackedRows;
use apprentice_train::data::{share_prefixes, Example};
use apprentice_train::objective::{Granularity, HelperPolicy, IwConfig, Objective};
use apprentice_train::trainer::{train, validation_loss, LoraSpec, TrainConfig, TrainingData};
use candle_core::{Device, Tensor, D};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn tiny() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 32,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

fn model(seed: u64) -> LoadedModel {
    let config = tiny();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in Llama::parameter_shapes(&config) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.contains("embed_tokens") {
            // Large enough that a frozen (tied) output projection can express confident answers.
            (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
        } else {
            (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect()
        };
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
    }
    from_tensors(&config, tensors, &Device::Cpu, "tiny").unwrap()
}

/// Prompt tokens (weight 0) then answer tokens (weight `w`).
fn example(prompt: &[u32], answer: &[u32], w: f32) -> Example {
    let input_ids: Vec<u32> = prompt.iter().chain(answer).copied().collect();
    let weights = prompt.iter().map(|_| 0.0).chain(answer.iter().map(|_| w)).collect();
    Example::new(input_ids, weights)
}

fn tiny_dataset() -> Vec<Example> {
    vec![
        example(&[1, 5, 6, 7], &[10, 11, 2], 1.0),
        example(&[1, 8, 9], &[12, 13, 14, 2], 2.0),
        example(&[1, 5, 9, 7, 6], &[15, 2], 1.0),
        example(&[1, 20, 21], &[22, 23, 2], 0.5),
    ]
}

fn quick(objective: Objective) -> TrainConfig {
    TrainConfig {
        objective,
        lr: 2e-2,
        warmup_ratio: 0.0,
        max_steps: Some(100),
        eval_every: 0,
        checkpoint_every: 0,
        progress: false,
        token_budget: 64,
        max_batch: 4,
        lora: Some(LoraSpec { rank: 8, alpha: 16.0, ..LoraSpec::default() }),
        ..TrainConfig::default()
    }
}

fn data(train: Vec<Example>) -> TrainingData {
    TrainingData { validation: train.clone(), train, pad_id: 0, base_id: "tiny".into() }
}

#[test]
fn a_tiny_model_overfits_a_tiny_dataset_under_each_objective() {
    let cases = [
        (Objective::Sft, quick(Objective::Sft)),
        (Objective::IwSft, quick(Objective::IwSft)),
        (Objective::SftQ, quick(Objective::SftQ)),
        (Objective::IwSftQ, quick(Objective::IwSftQ)),
        (Objective::IwSft, TrainConfig { iw: IwConfig::control(), ..quick(Objective::IwSft) }),
        (
            Objective::IwSft,
            TrainConfig {
                iw: IwConfig { granularity: Granularity::Token, ..IwConfig::default() },
                ..quick(Objective::IwSft)
            },
        ),
        (Objective::Sft, TrainConfig { lora: None, lr: 3e-3, ..quick(Objective::Sft) }),
    ];
    for (objective, config) in cases {
        let dir = tempfile::tempdir().unwrap();
        let outcome = train(model(1), &data(tiny_dataset()), &config, dir.path(), false).unwrap();
        let (first, last) = (outcome.val_losses[0].1, outcome.val_losses.last().unwrap().1);
        assert!(
            last < 0.15 * first,
            "{objective:?} (lora: {}): validation loss {first:.3} → {last:.3}",
            config.lora.is_some()
        );
        assert!(dir.path().join("metrics.jsonl").is_file() && dir.path().join("loss.png").is_file());
        assert!(dir.path().join("loss.svg").is_file() && dir.path().join("checkpoint/state.json").is_file());
    }
}

/// P(answer a) / (P(a) + P(b)) after the prompt.
fn preference(model: &Llama, prompt: &[u32], a: u32, b: u32) -> f64 {
    let ids = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&ids).unwrap().squeeze(0).unwrap();
    let last = logits.get(prompt.len() - 1).unwrap();
    let p = candle_nn::ops::softmax(&last, D::Minus1).unwrap().to_vec1::<f32>().unwrap();
    p[a as usize] as f64 / (p[a as usize] + p[b as usize]) as f64
}

#[test]
fn weighted_examples_pull_the_model_in_proportion_to_their_weight() {
    let prompt = [1, 5, 6, 7];
    let run = |wa: f32, wb: f32| {
        let examples = vec![example(&prompt, &[10], wa), example(&prompt, &[11], wb)];
        let config = TrainConfig { max_steps: Some(200), ..quick(Objective::SftQ) };
        let dir = tempfile::tempdir().unwrap();
        let outcome = train(model(2), &data(examples), &config, dir.path(), false).unwrap();
        preference(&outcome.model, &prompt, 10, 11)
    };
    let heavy_a = run(3.0, 1.0);
    let heavy_b = run(1.0, 3.0);
    // The weighted likelihood's optimum is P(a) : P(b) = 3 : 1.
    assert!((heavy_a - 0.75).abs() < 0.08, "weights 3:1 gave preference {heavy_a:.3} for a");
    assert!((heavy_b - 0.25).abs() < 0.08, "weights 1:3 gave preference {heavy_b:.3} for a");
    // Plain SFT ignores the dataset weights: an even split.
    let examples = vec![example(&prompt, &[10], 3.0), example(&prompt, &[11], 1.0)];
    let config = TrainConfig { max_steps: Some(200), ..quick(Objective::Sft) };
    let dir = tempfile::tempdir().unwrap();
    let even =
        preference(&train(model(2), &data(examples), &config, dir.path(), false).unwrap().model, &prompt, 10, 11);
    assert!((even - 0.5).abs() < 0.08, "sft gave {even:.3}");
}

#[test]
fn the_first_iw_sft_step_equals_the_sft_step() {
    let step = |objective| {
        let config = TrainConfig { max_steps: Some(1), ..quick(objective) };
        let dir = tempfile::tempdir().unwrap();
        train(model(3), &data(tiny_dataset()), &config, dir.path(), false).unwrap().trainable
    };
    let (sft, iw) = (step(Objective::Sft), step(Objective::IwSft));
    for ((name, a), (_, b)) in sft.iter().zip(&iw) {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{name} differs by {diff}");
    }
}

#[test]
fn a_killed_and_resumed_run_ends_with_the_same_weights_as_an_unbroken_one() {
    let config = TrainConfig {
        max_steps: Some(8),
        checkpoint_every: 2,
        grad_accum: 2,
        token_budget: 20,
        max_batch: 2,
        eval_every: 3,
        iw: IwConfig { helper: HelperPolicy::Ema { decay: 0.9 }, ..IwConfig::default() },
        lora: Some(LoraSpec { rank: 4, alpha: 8.0, dropout: 0.1, ..LoraSpec::default() }),
        ..quick(Objective::IwSftQ)
    };
    let unbroken_dir = tempfile::tempdir().unwrap();
    let unbroken = train(model(4), &data(tiny_dataset()), &config, unbroken_dir.path(), false).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let killed = TrainConfig { stop_after: Some(5), ..config.clone() };
    let first = train(model(4), &data(tiny_dataset()), &killed, dir.path(), false).unwrap();
    assert!(!first.finished && first.steps_done == 5);
    let resumed = train(model(4), &data(tiny_dataset()), &config, dir.path(), true).unwrap();
    assert!(resumed.finished && resumed.steps_done == 8);
    for ((name, a), (_, b)) in unbroken.trainable.iter().zip(&resumed.trainable) {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs after resume");
    }
    assert_eq!(unbroken.val_losses, resumed.val_losses);
    // The starting model's validation loss (step 0), then one line per step, none repeated.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..=8).collect::<Vec<_>>());
}

#[test]
fn lora_starts_as_the_base_model_trains_only_adapters_and_merges_exactly() {
    let loaded = model(5);
    let ids = Tensor::from_vec(vec![1u32, 5, 6, 7, 8], (1, 5), &Device::Cpu).unwrap();
    let base_logits = loaded.model.forward(&ids).unwrap();
    let mut lora = loaded.model.detached();
    let varmap = VarMap::new();
    lora.add_lora(&LoraConfig { rank: 4, ..LoraConfig::default() }, &varmap).unwrap();
    assert_eq!(varmap.all_vars().len(), 2 * 7 * 2);
    let same = (lora.forward(&ids).unwrap() - &base_logits).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);
    // Give every B random values, then merge: the merged model computes the same logits.
    let mut rng = StdRng::seed_from_u64(9);
    for var in varmap.all_vars() {
        let n = var.as_tensor().elem_count();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.2..0.2)).collect();
        var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let adapted = lora.forward(&ids).unwrap();
    assert!((&adapted - &base_logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3);
    // Only adapters receive gradients; the frozen base gets none.
    let loss = adapted.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(varmap.all_vars().iter().all(|v| grads.get(v.as_tensor()).is_some()));
    assert!(loaded.varmap.all_vars().iter().all(|v| grads.get(v.as_tensor()).is_none()));
    lora.merge_lora().unwrap();
    assert!(!lora.has_lora());
    let diff = (lora.forward(&ids).unwrap() - adapted).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    let v = validation_loss(&lora, &tiny_dataset(), &TrainConfig::default(), 0, &None).unwrap();
    assert!(v.is_finite());
}

/// Eight examples that begin with the same 18 tokens (a system prompt), then differ.
fn shared_prefix_dataset() -> Vec<Example> {
    let system: Vec<u32> = (0..18).map(|i| 3 + (i % 7)).collect();
    let mut rng = StdRng::seed_from_u64(9);
    (0..8u32)
        .map(|k| {
            let mut prompt = system.clone();
            prompt.extend((0..3 + k % 3).map(|_| rng.gen_range(3..30u32)));
            example(&prompt, &[10 + k % 5, 2], if k % 2 == 0 { 1.0 } else { 0.5 })
        })
        .collect()
}

#[test]
fn a_packed_row_gives_each_sequence_the_hidden_states_it_has_alone() {
    let loaded = model(5);
    let examples = shared_prefix_dataset()[..3].to_vec();
    let packed = share_prefixes(examples.clone(), 4, 1024, 16);
    assert_eq!(packed.len(), 1, "three examples behind one prefix");
    let row = &packed[0];
    let layout = row.layout.as_ref().unwrap();
    assert_eq!(row.input_ids.len(), 18 + examples.iter().map(|e| e.input_ids.len() - 18).sum::<usize>());
    assert_eq!(row.trained_tokens(), examples.iter().map(Example::trained_tokens).sum::<usize>());

    let ids = Tensor::new(row.input_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let rows = PackedRows { positions: vec![layout.positions.clone()], segments: vec![layout.segments.clone()] };
    let hidden = loaded.model.forward_hidden_packed(&ids, &rows).unwrap().squeeze(0).unwrap();
    let hidden = hidden.to_vec2::<f32>().unwrap();
    for (i, e) in examples.iter().enumerate() {
        let alone = Tensor::new(e.input_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let alone = loaded.model.forward_hidden(&alone).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let mut compared = 0;
        for (slot, (&segment, &position)) in layout.segments.iter().zip(&layout.positions).enumerate() {
            if segment == i as u32 + 1 || (segment == 0 && i == 0) {
                assert_eq!(e.input_ids[position], row.input_ids[slot]);
                let diff = hidden[slot].iter().zip(&alone[position]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-5, "sequence {i}, position {position}: {diff}");
                compared += 1;
            }
        }
        assert_eq!(compared, if i == 0 { e.input_ids.len() } else { e.input_ids.len() - 18 });
    }
}

#[test]
fn packing_examples_behind_their_shared_prefix_changes_the_compute_not_the_run() {
    assert_eq!(share_prefixes(shared_prefix_dataset(), 4, 1024, 16).len(), 2);
    for objective in [Objective::Sft, Objective::IwSft] {
        let config = |share| TrainConfig {
            share_prefixes: share,
            max_steps: Some(3),
            token_budget: 4096,
            max_batch: 8,
            ..quick(objective)
        };
        let (plain_dir, packed_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let plain = train(model(3), &data(shared_prefix_dataset()), &config(1), plain_dir.path(), false).unwrap();
        let packed = train(model(3), &data(shared_prefix_dataset()), &config(4), packed_dir.path(), false).unwrap();
        for ((name, a), (_, b)) in plain.trainable.iter().zip(&packed.trainable) {
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{objective:?}: {name} differs by {diff}");
        }
        for ((_, a), (_, b)) in plain.val_losses.iter().zip(&packed.val_losses) {
            assert!((a - b).abs() < 1e-4, "{objective:?}: validation loss {a} against {b}");
        }
    }
}
