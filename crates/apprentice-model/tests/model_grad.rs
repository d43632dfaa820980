//! Autograd reaches every parameter: a fused op without a backward pass (softmax_last_dim,
//! rms_norm, rope) would leave whole groups of parameters with no gradient.

mod model_support;

use apprentice_model::config::ModelConfig;
use candle_core::{DType, Device, Tensor};
use model_support::{ids, random_model, tiny_llama, tiny_qwen2};

fn check_every_parameter_gets_a_gradient(config: &ModelConfig, masked: bool) {
    let loaded = random_model(config, 7);
    let input = ids(&[&[1, 5, 9, 14, 3, 77, 20, 8], &[4, 4, 60, 31, 2, 9, 0, 0]]);
    let targets = ids(&[&[5, 9, 14, 3, 77, 20, 8, 11], &[4, 60, 31, 2, 9, 10, 0, 0]]);
    let logits = if masked {
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        loaded.model.forward_masked(&input, &mask).unwrap()
    } else {
        loaded.model.forward(&input).unwrap()
    };
    assert_eq!(logits.dims(), [2, 8, config.vocab_size]);
    // Loss over all positions, so every position's path through the network counts.
    let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &targets.flatten_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();

    let vars = loaded.varmap.data().lock().unwrap();
    assert_eq!(vars.len(), apprentice_model::llama::Llama::parameter_shapes(config).len());
    let mut missing = Vec::new();
    for (name, var) in vars.iter() {
        let norm = grads
            .get(var.as_tensor())
            .map(|g| g.abs().unwrap().sum_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap());
        match norm {
            Some(n) if n > 0.0 && n.is_finite() => {}
            other => missing.push(format!("{name}: {other:?}")),
        }
    }
    assert!(missing.is_empty(), "parameters without a usable gradient: {missing:#?}");
}

#[test]
fn every_parameter_gets_a_gradient_llama_tied() {
    check_every_parameter_gets_a_gradient(&tiny_llama(true), false);
}

#[test]
fn every_parameter_gets_a_gradient_qwen2_with_biases() {
    check_every_parameter_gets_a_gradient(&tiny_qwen2(), false);
}

#[test]
fn every_parameter_gets_a_gradient_with_padding_mask() {
    check_every_parameter_gets_a_gradient(&tiny_llama(false), true);
}

/// The gradient is the gradient of the loss: a central-difference check on one weight. The loss
/// is a mean cross-entropy (≈ 4.6), small enough that f32 rounding stays far below the signal.
#[test]
fn gradient_matches_finite_difference() {
    let config = tiny_llama(true);
    let loaded = random_model(&config, 3);
    let input = ids(&[&[1, 5, 9, 14, 3]]);
    let targets = Tensor::new(&[5u32, 9, 14, 3, 40], &Device::Cpu).unwrap();
    let loss_of = |model: &apprentice_model::llama::Llama| {
        let logits = model.forward(&input).unwrap().squeeze(0).unwrap();
        candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
    };
    let loss = loss_of(&loaded.model);
    let grads = loss.backward().unwrap();
    let vars = loaded.varmap.data().lock().unwrap().clone();
    let var = &vars["model.layers.0.self_attn.q_proj.weight"];
    let analytic = grads.get(var.as_tensor()).unwrap().get(3).unwrap().get(7).unwrap().to_scalar::<f32>().unwrap();

    let eps = 1e-2f32;
    let original = var.as_tensor().copy().unwrap();
    let shifted = |delta: f32| {
        let mut values = original.to_vec2::<f32>().unwrap();
        values[3][7] += delta;
        var.set(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap();
        loss_of(&loaded.model).to_scalar::<f32>().unwrap()
    };
    let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
    var.set(&original).unwrap();
    let tolerance = 2e-2 * analytic.abs().max(1e-2);
    assert!((numeric - analytic).abs() < tolerance, "analytic {analytic}, numeric {numeric}");
}

/// The detached model computes the same logits without recording a graph, and sees in-place
/// updates of the variables (as an optimizer makes them).
#[test]
fn detached_model_shares_weights_and_records_no_graph() {
    let config = tiny_qwen2();
    let loaded = random_model(&config, 4);
    let detached = loaded.model.detached();
    let input = ids(&[&[1, 5, 9, 14, 3]]);
    let attached = loaded.model.forward(&input).unwrap();
    let free = detached.forward(&input).unwrap();
    assert!(attached.track_op() && !free.track_op());
    assert_eq!(model_support::max_abs_diff(&attached, &free), 0.0);

    let vars = loaded.varmap.data().lock().unwrap().clone();
    let norm = &vars["model.norm.weight"];
    norm.set(&(norm.as_tensor() * 2.0).unwrap()).unwrap();
    let updated = loaded.model.forward(&input).unwrap();
    assert_eq!(model_support::max_abs_diff(&updated, &detached.forward(&input).unwrap()), 0.0);
    assert!(model_support::max_abs_diff(&updated, &free) > 1e-3);
}

/// The fused attention kernel and the composed one give the same training forward and the same
/// gradient for every parameter: plain causal rows, and packed rows (a shared prefix, two
/// sequences and padding).
#[test]
fn fused_and_composed_attention_train_alike() {
    use apprentice_model::{AttentionKernel, PackedRows};
    let config = tiny_llama(false);
    let loaded = random_model(&config, 11);
    let input = ids(&[&[1, 5, 9, 14, 3, 77, 20, 8, 4, 60], &[4, 4, 60, 31, 2, 9, 10, 12, 0, 0]]);
    let pad = PackedRows::PADDING;
    let packed = PackedRows {
        positions: vec![vec![0, 1, 2, 3, 4, 3, 4, 5, 6, 0], (0..10).collect()],
        segments: vec![vec![0, 0, 0, 1, 1, 2, 2, 2, 2, pad], vec![0; 10]],
    };
    let run = |kernel: AttentionKernel, packed_rows: bool| {
        let mut model = loaded.model.clone();
        model.set_attention_kernel(kernel);
        let hidden = if packed_rows {
            model.forward_hidden_packed(&input, &packed).unwrap()
        } else {
            model.forward_hidden(&input).unwrap()
        };
        // A fixed, uneven probe: every position and feature weighs differently.
        let probe = Tensor::from_vec(
            (0..hidden.elem_count()).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect::<Vec<_>>(),
            hidden.dims(),
            &Device::Cpu,
        )
        .unwrap();
        let grads = (&hidden * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        (hidden, grads)
    };
    let vars = loaded.varmap.data().lock().unwrap().clone();
    for packed_rows in [false, true] {
        let (fused, fused_grads) = run(AttentionKernel::Fused, packed_rows);
        let (composed, composed_grads) = run(AttentionKernel::Composed, packed_rows);
        let diff = model_support::max_abs_diff(&fused, &composed);
        assert!(diff < 1e-4, "packed {packed_rows}: hidden states differ by {diff}");
        for (name, var) in &vars {
            let (f, c) = (fused_grads.get(var.as_tensor()), composed_grads.get(var.as_tensor()));
            match (f, c) {
                (Some(f), Some(c)) => {
                    let diff = model_support::max_abs_diff(f, c);
                    assert!(diff < 1e-4, "packed {packed_rows}: gradient of {name} differs by {diff}");
                }
                (None, None) => {}
                _ => panic!("packed {packed_rows}: {name} has a gradient under one kernel only"),
            }
        }
    }
}
