//! AdamW on plain `f32` buffers, updating the model's `Var`s in place, and the learning-rate
//! schedule. Its state (moments, step count) is plain data, saved in checkpoints, so a resumed
//! run continues bit for bit.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // The paper's LLM settings: β = (0.9, 0.95), weight decay 1e-4.
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 1e-4 }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// First and second moments, one buffer per parameter.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Updates applied so far.
    pub t: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        Self {
            config,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            t: 0,
        }
    }

    /// One update of every parameter from its gradient (already accumulated and clipped):
    /// decoupled weight decay, bias-corrected moments.
    pub fn step(&mut self, params: &[Var], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let step = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let eps = c.eps as f32;
        for (i, param) in params.iter().enumerate() {
            let mut values = param.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            for j in 0..values.len() {
                m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                let denom = v[j].sqrt() / bc2_sqrt + eps;
                values[j] = values[j] * decay - step * m[j] / denom;
            }
            let updated = Tensor::from_vec(values, param.as_tensor().shape(), param.as_tensor().device())?;
            param.set(&updated)?;
        }
        Ok(())
    }
}

/// Linear warmup over `warmup` steps to `lr`, then cosine decay to `min_lr` at `total` steps.
pub fn cosine_lr(step: usize, total: usize, warmup: usize, lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales the gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads.iter().flatten().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().flatten().for_each(|g| *g *= scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((cosine_lr(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(100, 100, 10, 1.0, 0.0).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert!((clip_grad_norm(&mut g, 1.0) - 5.0).abs() < 1e-9);
        assert!((g[0][0] - 0.6).abs() < 1e-5 && (g[1][0] - 0.8).abs() < 1e-5);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        let p = Var::from_tensor(&Tensor::new(&[1.0f32, -1.0], &candle_core::Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() }, &[2]);
        opt.step(std::slice::from_ref(&p), &[vec![0.5, -2.0]], 0.1).unwrap();
        let v = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.9).abs() < 1e-5 && (v[1] + 0.9).abs() < 1e-5, "{v:?}");
    }
}
