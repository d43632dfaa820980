//! Fused CPU kernels with hand-written backward passes, for the training hot path.
//!
//! candle composes RMSNorm, softmax, rotary, SwiGLU and log-softmax from elementwise ops, and
//! its autograd keeps every intermediate alive until the backward pass ends and accumulates each
//! gradient into a fresh zero tensor. On the 2-core CPU that was over a third of a LoRA step and
//! most of its memory. Each op here keeps only its inputs and output and does its backward in one
//! pass over them. Every public function falls back to the composed candle ops on other devices
//! and dtypes (CUDA keeps candle's kernels); tests check values and gradients against them.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Rows below this many elements in total run on one thread: the fork costs more than the work.
const PARALLEL_MIN: usize = 1 << 15;

pub(crate) fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> CResult<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&data[start..end])
}

pub(crate) fn fused(xs: &[&Tensor]) -> bool {
    xs.iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

/// Runs `f(row_index, out_row)` over the rows of `out` (each `width` long), in parallel when big.
fn for_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if width == 0 {
        return;
    }
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(width).enumerate().for_each(|(i, row)| f(i, row));
    } else {
        out.chunks_mut(width).enumerate().for_each(|(i, row)| f(i, row));
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = w ⊙ x · r, r = (mean(x²) + eps)^-½ over the last dimension.

/// RMSNorm over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if !fused(&[x, weight]) {
        return candle_nn::ops::rms_norm_slow(x, weight, eps);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "apprentice-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let n = w.len();
        if l1.dims().last() != Some(&n) {
            candle_core::bail!("rms-norm: weight of {n} does not match input {:?}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, n, |i, y| {
            let row = &x[i * n..(i + 1) * n];
            let r = inv_rms(row, self.eps);
            for ((y, &v), &w) in y.iter_mut().zip(row).zip(w) {
                *y = v * r * w;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gx = x.apply_op3_no_bwd(w, &g, &RmsNormGradInput { eps: self.eps })?;
        // A frozen norm weight (LoRA) needs no gradient: skip the pass.
        let gw = if w.is_variable() || w.track_op() {
            let n = w.elem_count();
            let normalized = x.apply_op2_no_bwd(&w.ones_like()?, self)?;
            Some((g * normalized)?.reshape(((), n))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(gx), gw))
    }
}

struct RmsNormGradInput {
    eps: f32,
}

impl CustomOp3 for RmsNormGradInput {
    fn name(&self) -> &'static str {
        "apprentice-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, g) = (slice(s1, l1, name)?, slice(s2, l2, name)?, slice(s3, l3, name)?);
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, n, |i, gx| {
            let (row, grow) = (&x[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
            let r = inv_rms(row, self.eps);
            // ∂y_j/∂x_k = w_j (r δ_jk − r³ x_j x_k / n)
            let dot: f32 = grow.iter().zip(w).zip(row).map(|((g, w), x)| g * w * x).sum();
            let c = r * r * r * dot / n as f32;
            for (((gx, &g), &w), &v) in gx.iter_mut().zip(grow).zip(w).zip(row) {
                *gx = r * w * g - c * v;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension (attention probabilities).

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fused(&[x]) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "apprentice-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let n = layout.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, n, |i, y| {
            let row = &x[i * n..(i + 1) * n];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                // A fully masked row attends to nothing.
                y.fill(0.0);
                return;
            }
            let mut sum = 0f32;
            for (y, &v) in y.iter_mut().zip(row) {
                *y = (v - max).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "apprentice-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (y, g) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let n = l1.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; y.len()];
        for_rows(&mut out, n, |i, gx| {
            let (yr, gr) = (&y[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
            let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
            for ((gx, &y), &g) in gx.iter_mut().zip(yr).zip(gr) {
                *gx = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Half-split rotary embedding: dimension i pairs with i + d/2.

/// Rotates `x: [B, H, T, D]` by the angles `cos, sin: [B or 1, 1, T, D/2]` (half-split layout).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if !fused(&[x, cos, sin]) {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated_1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let rotated_2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        return Tensor::cat(&[rotated_1, rotated_2], D::Minus1);
    }
    let (b, _, t, d) = x.dims4()?;
    let angle_rows = cos.dim(0)?;
    if (angle_rows != b && angle_rows != 1) || cos.dims()[1..] != [1, t, d / 2] || sin.dims() != cos.dims() {
        candle_core::bail!("rotary: angles {:?} do not fit input {:?}", cos.dims(), x.dims());
    }
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary { inverse: false })
}

struct Rotary {
    /// Rotates by −θ: the backward pass of a rotation is its inverse.
    inverse: bool,
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "apprentice-rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, cos, sin) = (slice(s1, l1, name)?, slice(s2, l2, name)?, slice(s3, l3, name)?);
        let dims = l1.dims();
        let (h, t, d) = (dims[1], dims[2], dims[3]);
        let half = d / 2;
        // Angles shared by every row of the batch when they have one row.
        let shared = l2.dims()[0] == 1;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        // One row per (b, h, t) position.
        for_rows(&mut out, d, |i, y| {
            let (bi, ti) = (i / (h * t), i % t);
            let angle = (if shared { ti } else { bi * t + ti }) * half;
            let (c, s) = (&cos[angle..angle + half], &sin[angle..angle + half]);
            let row = &x[i * d..(i + 1) * d];
            for j in 0..half {
                let (x1, x2, s) = (row[j], row[j + half], sign * s[j]);
                y[j] = x1 * c[j] - x2 * s;
                y[j + half] = x2 * c[j] + x1 * s;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &Rotary { inverse: !self.inverse })?;
        Ok((Some(gx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU gate: silu(a) ⊙ u.

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !fused(&[gate, up]) || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "apprentice-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (a, u) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let width = l1.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; a.len()];
        for_rows(&mut out, width, |i, y| {
            let range = i * width..(i + 1) * width;
            for ((y, &a), &u) in y.iter_mut().zip(&a[range.clone()]).zip(&u[range]) {
                *y = a * sigmoid(a) * u;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, u: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients in one pass, stacked on a new leading axis.
        let both = a.apply_op3_no_bwd(u, &g.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "apprentice-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let name = self.name();
        let (a, u, g) = (slice(s1, l1, name)?, slice(s2, l2, name)?, slice(s3, l3, name)?);
        let n = a.len();
        let width = l1.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; 2 * n];
        let (ga, gu) = out.split_at_mut(n);
        let grads = |i: usize, ga: &mut [f32], gu: &mut [f32]| {
            let range = i * width..(i + 1) * width;
            for ((((ga, gu), &a), &u), &g) in
                ga.iter_mut().zip(gu.iter_mut()).zip(&a[range.clone()]).zip(&u[range.clone()]).zip(&g[range])
            {
                let s = sigmoid(a);
                *ga = g * u * s * (1.0 + a * (1.0 - s));
                *gu = g * a * s;
            }
        };
        if n >= PARALLEL_MIN && width > 0 {
            ga.par_chunks_mut(width).zip(gu.par_chunks_mut(width)).enumerate().for_each(|(i, (x, y))| grads(i, x, y));
        } else if width > 0 {
            ga.chunks_mut(width).zip(gu.chunks_mut(width)).enumerate().for_each(|(i, (x, y))| grads(i, x, y));
        }
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

// ---------------------------------------------------------------------------------------------
// log softmax gathered at the targets: log p(target) per row of logits.

/// `log softmax(logits)[target]` for every row of `logits: [..., V]` with `targets: [...]`
/// (u32). The vocabulary-sized log-softmax is never materialised: the forward keeps one number
/// per row, the backward rebuilds the probabilities from it in one pass.
pub fn log_softmax_gather(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let lead = &logits.dims()[..logits.rank() - 1];
    if targets.dims() != lead {
        candle_core::bail!("targets {:?} do not match logits {:?}", targets.dims(), logits.dims());
    }
    let ids = targets.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("target id {bad} is outside the vocabulary of {v}");
    }
    if !fused(&[logits]) {
        let logits = logits.to_dtype(DType::F32)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let index = targets.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?.contiguous()?;
        return (shifted.gather(&index, D::Minus1)? - lse)?.squeeze(D::Minus1);
    }
    logits.contiguous()?.apply_op1(LogSoftmaxGather { targets: ids })
}

struct LogSoftmaxGather {
    targets: Vec<u32>,
}

impl CustomOp1 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "apprentice-log-softmax-gather"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let dims = layout.dims();
        let v = dims.last().copied().unwrap_or(1);
        let lse = |row: &[f32]| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln()
        };
        let rows = || x.chunks(v).zip(&self.targets);
        let out: Vec<f32> = if x.len() >= PARALLEL_MIN {
            x.par_chunks(v).zip(self.targets.par_iter()).map(|(row, &t)| row[t as usize] - lse(row)).collect()
        } else {
            rows().map(|(row, &t)| row[t as usize] - lse(row)).collect()
        };
        Ok((CpuStorage::F32(out), Shape::from(&dims[..dims.len() - 1])))
    }

    fn bwd(&self, logits: &Tensor, res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        // With lse = x[t] − res, p = exp(x − lse): ∂/∂x_j = g (δ_jt − p_j).
        let per_row = Tensor::stack(&[res.flatten_all()?, g.flatten_all()?], 1)?.contiguous()?;
        let targets = self.targets.clone();
        Ok(Some(logits.apply_op2_no_bwd(&per_row, &LogSoftmaxGatherGrad { targets })?))
    }
}

struct LogSoftmaxGatherGrad {
    targets: Vec<u32>,
}

impl CustomOp2 for LogSoftmaxGatherGrad {
    fn name(&self) -> &'static str {
        "apprentice-log-softmax-gather-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (x, per_row) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let v = l1.dims().last().copied().unwrap_or(1);
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, v, |i, gx| {
            let row = &x[i * v..(i + 1) * v];
            let t = self.targets[i] as usize;
            let (res, g) = (per_row[2 * i], per_row[2 * i + 1]);
            let lse = row[t] - res;
            for (gx, &x) in gx.iter_mut().zip(row) {
                *gx = -g * (x - lse).exp();
            }
            gx[t] += g;
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// x Wᵀ for a weight that gets no gradient.

/// `x Wᵀ` for a weight `[out, in]` that gets no gradient: the backward pass computes only the
/// input's gradient (`g W`). candle's matmul backward always computes both sides, so autograd
/// through a frozen weight costs a third more work and a weight-sized gradient per projection.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (out_dim, in_dim) = weight.dims2()?;
    if !fused(&[x, weight]) || weight.is_variable() {
        return x.broadcast_matmul(&weight.t()?);
    }
    let dims = x.dims().to_vec();
    if dims.last() != Some(&in_dim) {
        candle_core::bail!("frozen matmul: input {dims:?} does not end in {in_dim}");
    }
    let rows = x.elem_count() / in_dim.max(1);
    let y = x.contiguous()?.reshape((rows, in_dim))?.apply_op1(FrozenMatmul { weight: weight.detach() })?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked above") = out_dim;
    y.reshape(out_dims)
}

struct FrozenMatmul {
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "apprentice-frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (rows, in_dim) = layout.shape().dims2()?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen matmul: the weight is not on the CPU");
        };
        let out_dim = w_layout.dims()[0];
        let wt = w_layout.transpose(0, 1)?;
        let y = storage.matmul(w, (1, rows, out_dim, in_dim), layout, &wt)?;
        Ok((y, Shape::from((rows, out_dim))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(g.matmul(&self.weight)?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f32, f32::max);
        assert!(worst < tol, "{what}: largest relative difference {worst}");
    }

    /// Checks `fused` against `reference` on the same variables: the values, and the gradients
    /// of a random linear functional of the output with respect to every input.
    fn check(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (f, r) = (fused(&ts), reference(&ts));
        close(&f, &r, 1e-5, "values");
        let probe = randn(f.dims(), 99);
        let gf = (&f * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&r * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            close(gf.get(t).expect("fused grad"), gr.get(t).expect("reference grad"), 1e-4, &format!("grad {i}"));
        }
    }

    #[test]
    fn rms_norm_matches_candle_in_value_and_gradient() {
        check(
            &[randn(&[3, 5, 16], 1), randn(&[16], 2)],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap(),
        );
    }

    #[test]
    fn softmax_matches_candle_and_a_masked_row_is_zero() {
        check(
            &[randn(&[2, 3, 7], 3)],
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
        );
        let masked =
            Tensor::new(&[[f32::NEG_INFINITY, f32::NEG_INFINITY], [0.0, f32::NEG_INFINITY]], &Device::Cpu).unwrap();
        assert_eq!(softmax_last_dim(&masked).unwrap().to_vec2::<f32>().unwrap(), [[0.0, 0.0], [1.0, 0.0]]);
    }

    #[test]
    fn rotary_matches_the_composed_rotation_and_its_gradient() {
        let (cos, sin) = (randn(&[2, 1, 5, 4], 4).cos().unwrap(), randn(&[2, 1, 5, 4], 5).sin().unwrap());
        let composed = |x: &Tensor, cos: &Tensor, sin: &Tensor| {
            let x1 = x.narrow(D::Minus1, 0, 4).unwrap();
            let x2 = x.narrow(D::Minus1, 4, 4).unwrap();
            let a = (x1.broadcast_mul(cos).unwrap() - x2.broadcast_mul(sin).unwrap()).unwrap();
            let b = (x2.broadcast_mul(cos).unwrap() + x1.broadcast_mul(sin).unwrap()).unwrap();
            Tensor::cat(&[a, b], D::Minus1).unwrap()
        };
        check(&[randn(&[2, 3, 5, 8], 6)], |t| rotary(&t[0], &cos, &sin).unwrap(), |t| composed(&t[0], &cos, &sin));
        // Angles shared by the batch.
        let (cos, sin) = (cos.narrow(0, 1, 1).unwrap(), sin.narrow(0, 1, 1).unwrap());
        check(&[randn(&[2, 3, 5, 8], 16)], |t| rotary(&t[0], &cos, &sin).unwrap(), |t| composed(&t[0], &cos, &sin));
    }

    #[test]
    fn swiglu_matches_silu_times_up() {
        // The second shape is above PARALLEL_MIN: the threaded path.
        for (shape, seed) in [([4, 9], 7), ([64, 600], 17)] {
            check(
                &[randn(&shape, seed), randn(&shape, seed + 1)],
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            );
        }
    }

    #[test]
    fn large_inputs_take_the_threaded_path_with_the_same_results() {
        check(
            &[randn(&[8, 64, 80], 13), randn(&[80], 14)],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap(),
        );
        check(
            &[randn(&[8, 64, 80], 15)],
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
        );
    }

    #[test]
    fn log_softmax_gather_matches_log_softmax_and_rejects_bad_targets() {
        let targets = Tensor::new(&[[3u32, 0, 9], [1, 1, 5]], &Device::Cpu).unwrap();
        check(
            &[(randn(&[2, 3, 10], 9) * 10.0).unwrap()],
            |t| log_softmax_gather(&t[0], &targets).unwrap(),
            |t| {
                let lsm = candle_nn::ops::log_softmax(&t[0], D::Minus1).unwrap();
                lsm.gather(&targets.unsqueeze(D::Minus1).unwrap(), D::Minus1).unwrap().squeeze(D::Minus1).unwrap()
            },
        );
        let bad = Tensor::new(&[[10u32, 0, 0], [0, 0, 0]], &Device::Cpu).unwrap();
        let err = log_softmax_gather(&randn(&[2, 3, 10], 1), &bad).unwrap_err().to_string();
        assert!(err.contains("target id 10"), "{err}");
    }

    #[test]
    fn frozen_matmul_gives_the_input_gradient_and_no_weight_gradient() {
        let w = randn(&[6, 4], 10);
        let x = Var::from_tensor(&randn(&[2, 3, 4], 11)).unwrap();
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        close(&y, &x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap(), 1e-5, "values");
        let probe = randn(&[2, 3, 6], 12);
        let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        close(grads.get(x.as_tensor()).unwrap(), &probe.broadcast_matmul(&w).unwrap(), 1e-5, "input grad");
        assert!(grads.get(&w).is_none());
    }
}
