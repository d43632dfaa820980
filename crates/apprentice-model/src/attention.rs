//! Fused causal attention for training, with its own backward pass (FlashAttention's recipe on
//! the CPU).
//!
//! The composed attention (`q kᵀ`, bias, softmax, `p v`) keeps `[B, H, T, T]` scores and
//! probabilities alive from the forward pass to the backward pass of every layer: 30 layers × 9
//! heads × T² floats, 4.4 GiB per row of 2,048 tokens for SmolLM2-135M. This kernel keeps only its
//! output and one log-sum-exp per query, and recomputes the probabilities tile by tile in the
//! backward pass.
//!
//! Each (row, head) takes blocks of [`QUERY_TILE`] queries. A block's scores against every key it
//! may see (keys up to its last query: causal) are one gemm into a per-thread `[QUERY_TILE, T]`
//! scratch. A CPU thread holds a whole score row, so the softmax is exact in one pass; the online
//! rescaling GPUs need to stream keys through shared memory would only add work here. Memory is
//! O(T) per query tile and thread instead of O(H·T²) per layer.
//!
//! Visibility is the one [`crate::llama::PackedRows`] defines: a query sees earlier keys and
//! itself; with segments, only keys of its own segment or of the shared prefix (segment 0), and
//! padding sees only itself. Grouped-query attention reads each KV head once per group.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::llama::PackedRows;
use crate::ops::{fused, slice};

type CResult<T> = candle_core::Result<T>;

/// Queries per tile: enough rows for gemm to run at speed, small enough that a tile's scores
/// (`QUERY_TILE × T` floats) stay in L2 up to a few thousand keys.
const QUERY_TILE: usize = 64;

/// Which keys each query sees: causal, optionally within segments (see [`PackedRows`]).
#[derive(Debug, Clone)]
pub struct CausalMask {
    /// Per row, per slot: its segment. `None`: plain causal attention for every row.
    segments: Option<Arc<Vec<u32>>>,
}

impl CausalMask {
    /// Every query sees every earlier slot of its row and itself.
    pub fn causal() -> Self {
        Self { segments: None }
    }

    /// Causal within segments: `segments` holds `rows × T` entries, row-major.
    pub fn segmented(segments: Vec<u32>) -> Self {
        Self { segments: Some(Arc::new(segments)) }
    }

    fn row<'a>(&'a self, row: usize, t: usize) -> Option<&'a [u32]> {
        self.segments.as_deref().map(|s| &s[row * t..(row + 1) * t])
    }

    /// The same mask as an additive bias `[rows, 1, T, T]` for [`composed_attention`]: 0 where a
    /// query sees a key, -inf elsewhere.
    pub fn bias(&self, rows: usize, t: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        if self.segments.as_ref().is_some_and(|s| s.len() != rows * t) {
            candle_core::bail!("attention mask: segments do not cover {rows} rows of {t} slots");
        }
        let mut bias = Vec::with_capacity(rows * t * t);
        for row in 0..rows {
            let segments = self.row(row, t);
            for query in 0..t {
                bias.extend((0..t).map(|key| if visible(segments, query, key) { 0f32 } else { f32::NEG_INFINITY }));
            }
        }
        Tensor::from_vec(bias, (rows, 1, t, t), device)?.to_dtype(dtype)
    }
}

fn visible(segments: Option<&[u32]>, query: usize, key: usize) -> bool {
    if key == query {
        return true;
    }
    if key > query {
        return false;
    }
    match segments {
        None => true,
        Some(s) => {
            let (qs, ks) = (s[query], s[key]);
            qs != PackedRows::PADDING && ks != PackedRows::PADDING && (ks == 0 || ks == qs)
        }
    }
}

/// Attention composed from candle ops, on any device and dtype, with or without a KV cache:
/// `q: [B, H, T, D]` over `k, v: [B, KV, S, D]` with an additive `bias: [B or 1, 1, T, S]`
/// (none: every key is visible). Returns `[B, H, T, D]`. Autograd keeps the `[B, H, T, S]`
/// scores and probabilities of every call until the backward pass.
pub fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    // Grouped-query attention without copying K/V per query head: the `h / kv` query heads that
    // share a KV head (consecutive, as HF's repeat_kv orders them) are stacked along the time
    // axis and attend to that KV head in one matmul.
    let group = h / kv;
    let q = q.contiguous()?.reshape((b, kv, group * t, d))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores.reshape((b, h, t, s))?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let probs = crate::ops::softmax_last_dim(&scores)?;
    probs.reshape((b, kv, group * t, s))?.matmul(&v.contiguous()?)?.reshape((b, h, t, d))
}

/// Softmax attention of `q: [B, H, T, D]` over `k, v: [B, KV, T, D]` (H a multiple of KV; query
/// head `h` reads KV head `h / (H / KV)`, as HF's `repeat_kv` orders them), scaled by `1/√D`,
/// under `mask`. Returns `[B, H, T, D]`. CPU and f32 only; elsewhere callers compose attention
/// from candle ops.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &CausalMask) -> candle_core::Result<Tensor> {
    if !fused(&[q, k, v]) {
        candle_core::bail!("fused attention runs on the CPU in f32; compose it from candle ops elsewhere");
    }
    let (b, h, t, d) = q.dims4()?;
    let (kb, kv, kt, kd) = k.dims4()?;
    if (kb, kt, kd) != (b, t, d) || v.dims() != k.dims() || kv == 0 || h % kv != 0 || t == 0 || d == 0 {
        candle_core::bail!(
            "fused attention: q {:?}, k {:?} and v {:?} do not fit [B, H, T, D] / [B, KV, T, D]",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(segments) = &mask.segments {
        if segments.len() != b * t {
            candle_core::bail!("fused attention: {} segments for {b} rows of {t} slots", segments.len());
        }
    }
    let op = FusedAttention { mask: mask.clone(), scale: 1.0 / (d as f32).sqrt() };
    // The kernel's output carries each query's log-sum-exp in an extra last column, for the
    // backward pass; it gets no gradient (nothing downstream reads it).
    let out = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
    out.narrow(3, 0, d)
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn of(q: &Layout, k: &Layout) -> Self {
        let (qd, kd) = (q.dims(), k.dims());
        Self { b: qd[0], h: qd[1], kv: kd[1], t: qd[2], d: qd[3] }
    }

    fn group(&self) -> usize {
        self.h / self.kv
    }

    fn head_len(&self) -> usize {
        self.t * self.d
    }
}

/// A row-major view of `rows × cols` floats with row stride `stride`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    stride: usize,
}

/// `dst[m×n] (row stride dst_stride) = scale · op(lhs)[m×k] · op(rhs)[k×n] (+ dst when
/// `accumulate`)`, where `op` transposes when asked. One thread: the callers run one task per
/// head.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dst: &mut [f32],
    dst_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: View,
    lhs_transposed: bool,
    rhs: View,
    rhs_transposed: bool,
    scale: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_stride..row * dst_stride + n].fill(0.0);
            }
        }
        return;
    }
    // (row stride, column stride) of op(x) in elements.
    let strides = |view: View, transposed: bool| if transposed { (1, view.stride) } else { (view.stride, 1) };
    let (lhs_rs, lhs_cs) = strides(lhs, lhs_transposed);
    let (rhs_rs, rhs_cs) = strides(rhs, rhs_transposed);
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, k, lhs_rs, lhs_cs) < lhs.data.len(), "attention gemm: lhs out of bounds");
    assert!(last(k, n, rhs_rs, rhs_cs) < rhs.data.len(), "attention gemm: rhs out of bounds");
    assert!(last(m, n, dst_stride, 1) < dst.len(), "attention gemm: dst out of bounds");
    // SAFETY: the asserts above keep every element gemm reads or writes inside its slice, and
    // `dst` is borrowed mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.data.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The scaled scores of queries `first..first + rows` against keys `0..keys` into `scores`
/// (row stride `keys`), -inf where the mask hides a key.
#[allow(clippy::too_many_arguments)]
fn tile_scores(
    scores: &mut [f32],
    q: &[f32],
    k: &[f32],
    d: usize,
    (first, rows, keys): (usize, usize, usize),
    scale: f32,
    segments: Option<&[u32]>,
) {
    gemm(
        scores,
        keys,
        (rows, keys, d),
        View { data: &q[first * d..], stride: d },
        false,
        View { data: k, stride: d },
        true,
        scale,
        false,
    );
    for (i, row) in scores.chunks_mut(keys).take(rows).enumerate() {
        let query = first + i;
        match segments {
            // Plain causal: only the keys after the query, in the tile's own columns.
            None => row[query + 1..].fill(f32::NEG_INFINITY),
            Some(_) => {
                for (key, s) in row.iter_mut().enumerate() {
                    if !visible(segments, query, key) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
}

struct FusedAttention {
    mask: CausalMask,
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "apprentice-fused-attention"
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
        let (q, k, v) = (slice(s1, l1, name)?, slice(s2, l2, name)?, slice(s3, l3, name)?);
        let dims = Dims::of(l1, l2);
        let Dims { b, h, t, d, .. } = dims;
        let width = d + 1;
        let mut out = vec![0f32; b * h * t * width];
        out.par_chunks_mut(t * width).enumerate().for_each(|(head_index, out)| {
            let (row, head) = (head_index / h, head_index % h);
            let kv_index = row * dims.kv + head / dims.group();
            let q = &q[head_index * dims.head_len()..(head_index + 1) * dims.head_len()];
            let k = &k[kv_index * dims.head_len()..(kv_index + 1) * dims.head_len()];
            let v = &v[kv_index * dims.head_len()..(kv_index + 1) * dims.head_len()];
            let segments = self.mask.row(row, t);
            let mut scores = vec![0f32; QUERY_TILE.min(t) * t];
            for first in (0..t).step_by(QUERY_TILE) {
                let rows = QUERY_TILE.min(t - first);
                let keys = first + rows;
                tile_scores(&mut scores, q, k, d, (first, rows, keys), self.scale, segments);
                let mut inv_sums = [0f32; QUERY_TILE];
                for (i, row) in scores.chunks_mut(keys).take(rows).enumerate() {
                    // The query sees itself, so the maximum is finite.
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    inv_sums[i] = 1.0 / sum;
                    out[(first + i) * width + d] = max + sum.ln();
                }
                gemm(
                    &mut out[first * width..],
                    width,
                    (rows, d, keys),
                    View { data: &scores, stride: keys },
                    false,
                    View { data: v, stride: d },
                    false,
                    1.0,
                    false,
                );
                for (i, inv) in inv_sums.iter().take(rows).enumerate() {
                    out[(first + i) * width..(first + i) * width + d].iter_mut().for_each(|o| *o *= inv);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, width))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = FusedAttentionGrad {
            mask: self.mask.clone(),
            scale: self.scale,
            out: res.detach(),
            grad_out: grad_res.contiguous()?.detach(),
        };
        let flat = q.apply_op3_no_bwd(k, v, &grad)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = flat.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = flat.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = flat.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward pass: `[dq | dk | dv]` flattened into one tensor (a custom op has one output).
struct FusedAttentionGrad {
    mask: CausalMask,
    scale: f32,
    /// The forward output `[B, H, T, D + 1]`: attention output and log-sum-exp.
    out: Tensor,
    /// Its gradient; the log-sum-exp column's is ignored (it is never read downstream).
    grad_out: Tensor,
}

fn cpu_slice<'a>(storage: &'a Storage, layout: &Layout, op: &str) -> CResult<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => slice(cpu, layout, op),
        _ => candle_core::bail!("{op}: tensor is not on the CPU"),
    }
}

impl CustomOp3 for FusedAttentionGrad {
    fn name(&self) -> &'static str {
        "apprentice-fused-attention-grad"
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
        let (q, k, v) = (slice(s1, l1, name)?, slice(s2, l2, name)?, slice(s3, l3, name)?);
        let (out_storage, out_layout) = self.out.storage_and_layout();
        let out = cpu_slice(&out_storage, out_layout, name)?;
        let (grad_storage, grad_layout) = self.grad_out.storage_and_layout();
        let grad_out = cpu_slice(&grad_storage, grad_layout, name)?;
        if out.len() != grad_out.len() || out_layout.dims() != grad_layout.dims() {
            candle_core::bail!(
                "{name}: output {:?} and its gradient {:?} differ",
                out_layout.dims(),
                grad_layout.dims()
            );
        }
        let dims = Dims::of(l1, l2);
        let Dims { t, d, .. } = dims;
        let width = d + 1;
        let group = dims.group();
        let head_len = dims.head_len();

        let mut flat = vec![0f32; q.len() + 2 * k.len()];
        let (dq, dkv) = flat.split_at_mut(q.len());
        let (dk, dv) = dkv.split_at_mut(k.len());
        // One task per (row, KV head): it owns dq of its group's query heads and dk, dv of its KV
        // head, so nothing is shared between tasks.
        dq.par_chunks_mut(group * head_len)
            .zip(dk.par_chunks_mut(head_len))
            .zip(dv.par_chunks_mut(head_len))
            .enumerate()
            .for_each(|(kv_index, ((dq_group, dk), dv))| {
                let row = kv_index / dims.kv;
                let k = &k[kv_index * head_len..(kv_index + 1) * head_len];
                let v = &v[kv_index * head_len..(kv_index + 1) * head_len];
                let segments = self.mask.row(row, t);
                let tile = QUERY_TILE.min(t) * t;
                let (mut probs, mut dscores) = (vec![0f32; tile], vec![0f32; tile]);
                for (member, dq) in dq_group.chunks_mut(head_len).enumerate() {
                    let head_index = kv_index * group + member;
                    let q = &q[head_index * head_len..(head_index + 1) * head_len];
                    let out = &out[head_index * t * width..(head_index + 1) * t * width];
                    let grad_out = &grad_out[head_index * t * width..(head_index + 1) * t * width];
                    for first in (0..t).step_by(QUERY_TILE) {
                        let rows = QUERY_TILE.min(t - first);
                        let keys = first + rows;
                        let grad_tile = View { data: &grad_out[first * width..], stride: width };
                        // P = exp(S - lse): the forward's probabilities, recomputed.
                        tile_scores(&mut probs, q, k, d, (first, rows, keys), self.scale, segments);
                        // dP = dO Vᵀ
                        gemm(
                            &mut dscores,
                            keys,
                            (rows, keys, d),
                            grad_tile,
                            false,
                            View { data: v, stride: d },
                            true,
                            1.0,
                            false,
                        );
                        for i in 0..rows {
                            let slot = (first + i) * width;
                            let lse = out[slot + d];
                            // Δ = dO · O, the softmax backward's row term.
                            let delta: f32 =
                                grad_out[slot..slot + d].iter().zip(&out[slot..slot + d]).map(|(g, o)| g * o).sum();
                            let p_row = &mut probs[i * keys..(i + 1) * keys];
                            let ds_row = &mut dscores[i * keys..(i + 1) * keys];
                            for (p, ds) in p_row.iter_mut().zip(ds_row.iter_mut()) {
                                *p = (*p - lse).exp();
                                *ds = *p * (*ds - delta);
                            }
                        }
                        let (p_tile, ds_tile) =
                            (View { data: &probs, stride: keys }, View { data: &dscores, stride: keys });
                        // dQ = scale · dS K
                        gemm(
                            &mut dq[first * d..],
                            d,
                            (rows, d, keys),
                            ds_tile,
                            false,
                            View { data: k, stride: d },
                            false,
                            self.scale,
                            false,
                        );
                        // dK += scale · dSᵀ Q
                        gemm(
                            dk,
                            d,
                            (keys, d, rows),
                            ds_tile,
                            true,
                            View { data: &q[first * d..], stride: d },
                            false,
                            self.scale,
                            true,
                        );
                        // dV += Pᵀ dO
                        gemm(dv, d, (keys, d, rows), p_tile, true, grad_tile, false, 1.0, true);
                    }
                }
            });
        let n = flat.len();
        Ok((CpuStorage::F32(flat), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{close, randn};
    use candle_core::{Var, D};

    /// The composed attention the model runs elsewhere: KV heads repeated for their query heads,
    /// scores plus a -inf bias where the mask hides a key, softmax, then the values.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &CausalMask) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let group = h / k.dim(1).unwrap();
        let repeat = |x: &Tensor| {
            let (b, kv, t, d) = x.dims4().unwrap();
            x.unsqueeze(2).unwrap().expand((b, kv, group, t, d)).unwrap().reshape((b, h, t, d)).unwrap()
        };
        let mut bias = Vec::with_capacity(b * t * t);
        for row in 0..b {
            for query in 0..t {
                bias.extend((0..t).map(
                    |key| {
                        if visible(mask.row(row, t), query, key) {
                            0f32
                        } else {
                            f32::NEG_INFINITY
                        }
                    },
                ));
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu).unwrap();
        let scores = (q.matmul(&repeat(k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&bias).unwrap(), D::Minus1).unwrap();
        probs.matmul(&repeat(v).contiguous().unwrap()).unwrap()
    }

    /// Values, and the gradients of a random linear functional of the output with respect to q,
    /// k and v, against the composed attention.
    fn check(shape: (usize, usize, usize, usize, usize), mask: &CausalMask, seed: u64) {
        let (b, h, kv, t, d) = shape;
        let vars: Vec<Var> =
            [randn(&[b, h, t, d], seed), randn(&[b, kv, t, d], seed + 1), randn(&[b, kv, t, d], seed + 2)]
                .iter()
                .map(|x| Var::from_tensor(x).unwrap())
                .collect();
        let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
        let fused = causal_attention(&q, &k, &v, mask).unwrap();
        let reference = composed(&q, &k, &v, mask);
        close(&fused, &reference, 1e-5, "values");
        let probe = randn(fused.dims(), seed + 3);
        let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
            close(gf.get(x).expect("fused gradient"), gr.get(x).expect("reference gradient"), 1e-4, name);
        }
    }

    #[test]
    fn causal_matches_composed_attention_in_value_and_gradient() {
        // One tile, then several with a ragged last one; grouped-query and plain heads.
        check((2, 6, 2, 9, 8), &CausalMask::causal(), 1);
        check((2, 6, 2, 150, 16), &CausalMask::causal(), 10);
        check((1, 3, 3, 70, 8), &CausalMask::causal(), 20);
    }

    #[test]
    fn segments_and_padding_match_composed_attention_in_value_and_gradient() {
        let pad = PackedRows::PADDING;
        // Row 0: a shared prefix of 40, two sequences, padding. Row 1: one plain sequence.
        let mut segments: Vec<u32> = [vec![0; 40], vec![1; 50], vec![2; 35], vec![pad; 5]].concat();
        segments.extend(vec![0u32; 130]);
        check((2, 6, 2, 130, 16), &CausalMask::segmented(segments), 30);
    }

    #[test]
    fn a_query_sees_no_other_segment_and_padding_sees_only_itself() {
        let pad = PackedRows::PADDING;
        let segments = [0, 0, 1, 1, 2, 2, pad];
        assert!(visible(Some(&segments), 4, 1), "the prefix");
        assert!(!visible(Some(&segments), 4, 3), "another segment");
        assert!(visible(Some(&segments), 5, 4), "its own segment");
        assert!(!visible(Some(&segments), 2, 3), "a later key");
        assert!(visible(Some(&segments), 6, 6) && !visible(Some(&segments), 6, 0), "padding");
        assert!(!visible(Some(&segments), 5, 6), "a padding key");
    }

    #[test]
    fn mismatched_shapes_are_clear_errors() {
        let q = randn(&[1, 4, 5, 8], 1);
        let k = randn(&[1, 3, 5, 8], 2);
        let err = causal_attention(&q, &k, &k, &CausalMask::causal()).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        let k = randn(&[1, 2, 5, 8], 2);
        let err = causal_attention(&q, &k, &k, &CausalMask::segmented(vec![0; 4])).unwrap_err().to_string();
        assert!(err.contains("4 segments for 1 rows of 5 slots"), "{err}");
    }
}
