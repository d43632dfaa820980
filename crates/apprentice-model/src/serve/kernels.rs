//! Matrix products for serving: `Y[M, N] = X[M, K] · Wᵀ` with `W: [N, K]` stored as f32 or as
//! q8_0 blocks, vectorised with the instruction set found at run time.
//!
//! A decode step is memory-bound: every weight is read once per step and used for one
//! multiply-add per sequence. Two things make it cheap:
//! - q8_0 reads 1.125 bytes per weight (a signed byte, plus an f32 scale per block of 32)
//!   instead of 4;
//! - a product reads the weights once for the whole batch: a tile of [`TILE_W`] weight rows is
//!   loaded and every activation row of the batch is run past it while it sits in cache, so a
//!   batch of 8 sequences streams the same bytes from memory as one. The tiles prefetch the next
//!   tile's weights in software: they read 8 short rows side by side, which the hardware
//!   prefetcher follows badly (it doubled the q8_0 bandwidth of one core).
//!
//! q8_0 weights are multiplied as f32: each tile of weight rows is dequantised once into a
//! scratch buffer and the f32 FMA tiles run every activation row past it (for one or two rows,
//! the tiles dequantise in registers instead; the same operations, so the same bits). The
//! activations stay f32: no q8_0 rounding of `x`, unlike llama.cpp, so q8_0 loses only the
//! weights' rounding. Integer dot products (`maddubs` + `madd`, as llama.cpp does on AVX2) were
//! measured slower here: on the AMD EPYC this was tuned on, the integer multiplies, `sign`,
//! `cvtdq2ps` and the FMAs all issue on the same two vector pipes, and one 32-value block costs
//! ~6 of those operations per (weight row, activation row) pair where f32 costs 4 FMAs: 20
//! against 38 GMAC/s per core in L1.
//!
//! Batch invariance (bit for bit): the output `(m, n)` is always produced by the same sequence of
//! floating-point operations, one that depends only on `K`. Tiles of different shapes only
//! interleave independent accumulators; the reduction over `k` is never split, neither across
//! tiles nor across threads (threads share out the weight rows `n`). So a sequence gets the same
//! logits alone, in a batch of 16, with one thread or with eight. Results do differ between
//! kernel families (scalar versus AVX2), which is fixed per process.
//!
//! Kernel families: AVX2+FMA on x86-64 CPUs that have it, portable scalar code elsewhere. There
//! is no AVX-512 path: the machines this was written and measured on have none, and an untested
//! kernel is worse than a slower one.

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

/// How a [`WeightMatrix`] stores its values: the config's setting (`weights = "q8_0"`).
pub use apprentice_core::config::WeightFormat;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("a {rows}×{cols} weight matrix needs {} values, got {given}", rows * cols)]
    ValueCount { rows: usize, cols: usize, given: usize },
    #[error("a weight matrix needs at least one row and one column, got {rows}×{cols}")]
    Empty { rows: usize, cols: usize },
    #[error(
        "q8_0 quantises rows in blocks of 32 values: the {rows}×{cols} matrix has {cols} columns, not a multiple of 32"
    )]
    Q8Columns { rows: usize, cols: usize },
    #[error("weight [{row}, {col}] of the {rows}×{cols} matrix is {value}: q8_0 can only quantise finite values")]
    NonFinite { rows: usize, cols: usize, row: usize, col: usize, value: f32 },
    #[error("cannot stack zero matrices")]
    StackNothing,
    #[error(
        "cannot stack part {index} ({rows}×{cols}, {format}) under part 0 ({expected_cols} columns, {expected_format}): \
         parts need the same columns and format"
    )]
    StackMismatch {
        index: usize,
        rows: usize,
        cols: usize,
        format: WeightFormat,
        expected_cols: usize,
        expected_format: WeightFormat,
    },
}

/// Values per q8_0 block (and per scale).
const QK: usize = 32;

/// A weight matrix W: [rows = N outputs, cols = K inputs], row-major, in a serving format.
#[derive(Clone)]
pub struct WeightMatrix {
    rows: usize,
    cols: usize,
    data: Data,
}

#[derive(Clone)]
enum Data {
    F32(Vec<f32>),
    /// Row-major quants, and one scale per 32 quants (row-major `[rows, cols / 32]`). The
    /// scales are f32 in their own array: dequantising reads them once per block, and f16 would
    /// save only 0.06 bytes per weight.
    Q8_0 {
        quants: Vec<i8>,
        scales: Vec<f32>,
    },
}

impl fmt::Debug for WeightMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("format", &self.format())
            .finish_non_exhaustive()
    }
}

impl WeightMatrix {
    /// From row-major f32 values. Q8_0 needs cols % 32 == 0 (error otherwise, naming the shape)
    /// and finite values.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32], format: WeightFormat) -> Result<Self, KernelError> {
        if rows == 0 || cols == 0 {
            return Err(KernelError::Empty { rows, cols });
        }
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(KernelError::ValueCount { rows, cols, given: values.len() });
        }
        let data = match format {
            WeightFormat::F32 => Data::F32(values.to_vec()),
            WeightFormat::Q8_0 => {
                if !cols.is_multiple_of(QK) {
                    return Err(KernelError::Q8Columns { rows, cols });
                }
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    let (row, col) = (i / cols, i % cols);
                    return Err(KernelError::NonFinite { rows, cols, row, col, value: values[i] });
                }
                let (quants, scales) = quantise(values);
                Data::Q8_0 { quants, scales }
            }
        };
        Ok(Self { rows, cols, data })
    }

    /// Stacks matrices with the same cols along rows (used to fuse q/k/v and gate/up into one product).
    pub fn stack(parts: &[WeightMatrix]) -> Result<Self, KernelError> {
        let first = parts.first().ok_or(KernelError::StackNothing)?;
        for (index, part) in parts.iter().enumerate() {
            if part.cols != first.cols || part.format() != first.format() {
                return Err(KernelError::StackMismatch {
                    index,
                    rows: part.rows,
                    cols: part.cols,
                    format: part.format(),
                    expected_cols: first.cols,
                    expected_format: first.format(),
                });
            }
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        // Rows are contiguous in every format, so stacking is concatenation.
        let data = match &first.data {
            Data::F32(_) => Data::F32(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        Data::F32(w) => w.as_slice(),
                        Data::Q8_0 { .. } => unreachable!("formats checked above"),
                    })
                    .copied()
                    .collect(),
            ),
            Data::Q8_0 { .. } => {
                let mut quants = Vec::new();
                let mut scales = Vec::new();
                for part in parts {
                    let Data::Q8_0 { quants: q, scales: s } = &part.data else { unreachable!("formats checked above") };
                    quants.extend_from_slice(q);
                    scales.extend_from_slice(s);
                }
                Data::Q8_0 { quants, scales }
            }
        };
        Ok(Self { rows, cols: first.cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> WeightFormat {
        match self.data {
            Data::F32(_) => WeightFormat::F32,
            Data::Q8_0 { .. } => WeightFormat::Q8_0,
        }
    }

    /// Bytes a product reads from this matrix (what one decode step streams from memory).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(w) => std::mem::size_of_val(w.as_slice()),
            Data::Q8_0 { quants, scales } => quants.len() + std::mem::size_of_val(scales.as_slice()),
        }
    }

    /// out[m*N + n] = Σ_k x[m*K + k] · W[n, k] for m in 0..M, where M = x.len() / K.
    ///
    /// Row m of `out` depends only on row m of `x`, bit for bit: not on M, not on the other rows,
    /// not on the number of threads of the rayon pool the call runs in (see the module docs).
    ///
    /// # Panics
    /// On caller bugs only: if `x.len()` is not a multiple of K, or `out.len() != M * N`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_with(detected(), x, out)
    }

    fn matmul_with(&self, kernels: Kernels, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        assert!(x.len().is_multiple_of(k), "matmul: x has {} values, not a whole number of rows of K = {k}", x.len());
        let m = x.len() / k;
        assert!(out.len() == m * n, "matmul: out has {} values, expected M × N = {m} × {n} = {}", out.len(), m * n);
        if m == 0 {
            return;
        }
        let weights = match &self.data {
            Data::F32(w) => Weights::F32(w),
            Data::Q8_0 { quants, scales } => Weights::Q8_0 { quants, scales },
        };
        product(kernels, weights, x, n, k, m, out)
    }
}

/// Which kernel family runs on this CPU, e.g. "avx2+fma", "scalar" (for reports).
pub fn cpu_kernels() -> &'static str {
    match detected() {
        Kernels::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => "avx2+fma",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

fn detected() -> Kernels {
    static KERNELS: OnceLock<Kernels> = OnceLock::new();
    *KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernels::Avx2;
        }
        Kernels::Scalar
    })
}

// ---------------------------------------------------------------------------------------------
// q8_0

/// Quantises row-major weights (a whole number of 32-blocks, all finite) to q8_0 as llama.cpp's
/// `quantize_row_q8_0`: per block `d = max|w| / 127` and `q = round(w / d)` (ties to even, as its
/// SIMD versions round).
fn quantise(values: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut quants = vec![0i8; values.len()];
    let mut scales = vec![0f32; values.len() / QK];
    for ((block, q), d) in values.chunks_exact(QK).zip(quants.chunks_exact_mut(QK)).zip(&mut scales) {
        let amax = block.iter().fold(0f32, |amax, v| amax.max(v.abs()));
        *d = amax / 127.0;
        let inverse = if *d == 0.0 { 0.0 } else { 1.0 / *d };
        for (q, v) in q.iter_mut().zip(block) {
            // |v · inverse| <= 127 up to an ulp; the clamp keeps -128 out of the quants.
            *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
    (quants, scales)
}

/// `out = q · d` blockwise: one rounding per weight, so every kernel family (and every tile)
/// sees the same f32 weights.
#[inline(always)]
fn dequantise_into(quants: &[i8], scales: &[f32], out: &mut [f32]) {
    for ((q, &d), out) in quants.chunks_exact(QK).zip(scales).zip(out.chunks_exact_mut(QK)) {
        for (out, &q) in out.iter_mut().zip(q) {
            *out = f32::from(q) * d;
        }
    }
}

fn dequantise(kernels: Kernels, quants: &[i8], scales: &[f32], out: &mut [f32]) {
    match kernels {
        Kernels::Scalar => dequantise_into(quants, scales, out),
        // SAFETY: `Kernels::Avx2` is only chosen when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => unsafe { avx2::dequantise_into(quants, scales, out) },
    }
}

// ---------------------------------------------------------------------------------------------
// The product: rows of W shared out between threads, tiles within a thread.

/// Weight rows per tile: the batch's activation rows all run past these rows (see [`run_tiles`])
/// before the next rows are read; q8_0 dequantises them into a scratch buffer of 8 × K f32.
const TILE_W: usize = 8;
/// Bytes of activations a thread keeps hot across its weight rows: only prefill (hundreds of
/// rows) has more, and then runs over its rows in slices of this size.
const X_SLICE_BYTES: usize = 128 << 10;
/// Below this many multiply-adds a product runs on the calling thread: forking costs a few
/// microseconds, and tiny models are all small products.
const PARALLEL_MACS: usize = 1 << 17;
/// Tasks per rayon thread, so a thread slowed by a neighbour does not hold up the step.
const TASKS_PER_THREAD: usize = 4;
/// Fewest weight rows per task (a multiple of `TILE_W`).
const MIN_TASK_ROWS: usize = 16;

/// The weights of one product, borrowed.
#[derive(Clone, Copy)]
enum Weights<'a> {
    F32(&'a [f32]),
    Q8_0 { quants: &'a [i8], scales: &'a [f32] },
}

/// Where the tiles write: the row-major `[M, N]` output, shared between the tasks, each of
/// which writes only the columns of its own weight rows.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    /// N: the distance between two rows.
    stride: usize,
}

// SAFETY: tasks write disjoint elements (their own columns) of one buffer that outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element (m, n).
    ///
    /// # Safety
    /// `m * stride + n` must lie inside the buffer.
    unsafe fn at(self, m: usize, n: usize) -> *mut f32 {
        unsafe { self.ptr.add(m * self.stride + n) }
    }
}

fn product(kernels: Kernels, weights: Weights, x: &[f32], n: usize, k: usize, m: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), m * n);
    let out = Out { ptr: out.as_mut_ptr(), stride: n };
    let x_slice = (X_SLICE_BYTES / (k * 4)).max(2);

    let threads = rayon::current_num_threads();
    if threads == 1 || n * k * m < PARALLEL_MACS {
        // SAFETY: one task covers all rows; `out` is `[m, n]`.
        unsafe { compute_rows(kernels, weights, x, k, m, 0..n, x_slice, out) };
        return;
    }
    let task_rows = n.div_ceil(threads * TASKS_PER_THREAD).next_multiple_of(TILE_W).max(MIN_TASK_ROWS);
    (0..n.div_ceil(task_rows)).into_par_iter().for_each(|task| {
        let rows = task * task_rows..((task + 1) * task_rows).min(n);
        // SAFETY: the tasks' row ranges are disjoint, so are the columns of `out` they write.
        unsafe { compute_rows(kernels, weights, x, k, m, rows, x_slice, out) };
    });
}

/// All M outputs of the weight rows `rows`. Every output (m, n) goes through the same tile code
/// for its (n, m) whatever tile it lands in, so the tiling here cannot change a result.
///
/// # Safety
/// `out` must be `[m, N]` with `rows` inside `0..N`, and no other thread may touch these columns.
#[allow(clippy::too_many_arguments)]
unsafe fn compute_rows(
    kernels: Kernels,
    weights: Weights,
    x: &[f32],
    k: usize,
    m: usize,
    rows: Range<usize>,
    x_slice: usize,
    out: Out,
) {
    let mut scratch = match weights {
        Weights::F32(_) => Vec::new(),
        Weights::Q8_0 { .. } => vec![0f32; TILE_W * k],
    };
    for slice_start in (0..m).step_by(x_slice) {
        let slice_end = (slice_start + x_slice).min(m);
        let x = &x[slice_start * k..slice_end * k];
        let mut n0 = rows.start;
        while n0 < rows.end {
            let r = if rows.end - n0 >= TILE_W { TILE_W } else { 1 };
            let w = match weights {
                Weights::F32(w) => Rows::F32(&w[n0 * k..(n0 + r) * k]),
                Weights::Q8_0 { quants, scales } => {
                    let quants = &quants[n0 * k..(n0 + r) * k];
                    let scales = &scales[n0 * k / QK..(n0 + r) * k / QK];
                    // Dequantising once into the scratch buffer pays when many activation rows
                    // reuse it; for one or two rows, dequantising in registers saves the round
                    // trip through memory.
                    if slice_end - slice_start <= 2 && kernels != Kernels::Scalar {
                        Rows::Q8_0 { quants, scales }
                    } else {
                        dequantise(kernels, quants, scales, &mut scratch[..r * k]);
                        Rows::Scratch(&scratch[..r * k])
                    }
                }
            };
            // SAFETY: (slice_start.., n0..) is inside `out` and in this task's columns.
            unsafe { run_tiles(kernels, w, x, k, r, slice_end - slice_start, out.at(slice_start, n0), out.stride) };
            n0 += r;
        }
    }
}

/// Weight rows as a tile reads them. q8_0 rows come dequantised into the scratch buffer, or as
/// quants that the tile dequantises in registers exactly as [`dequantise`] does (`f32(q) · d`,
/// one rounding), so both give the same bits.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// f32 rows of the matrix, streamed from memory.
    F32(&'a [f32]),
    /// q8_0 rows dequantised into the scratch buffer: already in cache, nothing to prefetch.
    Scratch(&'a [f32]),
    Q8_0 {
        quants: &'a [i8],
        scales: &'a [f32],
    },
}

impl<'a> Rows<'a> {
    /// Rows `range` of these rows (of `k` values each).
    fn rows(self, range: Range<usize>, k: usize) -> Rows<'a> {
        match self {
            Rows::F32(w) => Rows::F32(&w[range.start * k..range.end * k]),
            Rows::Scratch(w) => Rows::Scratch(&w[range.start * k..range.end * k]),
            Rows::Q8_0 { quants, scales } => Rows::Q8_0 {
                quants: &quants[range.start * k..range.end * k],
                scales: &scales[range.start * k / QK..range.end * k / QK],
            },
        }
    }
}

/// All `m` rows of `x` against the `r` rows of `w`, in register tiles: pairs of activation rows
/// against half of the weight rows at a time (4 rows: 8 accumulators, registers left for the
/// operands; 24 KiB of f32 at K = 1536, which stays in L1 while the pairs stream past), then a
/// last odd row against all 8 (8 independent FMA chains cover the FMA latency).
///
/// # Safety
/// `out` must be valid for writes at `j * stride + i` for `i < r`, `j < m`.
#[allow(clippy::too_many_arguments)]
unsafe fn run_tiles(kernels: Kernels, w: Rows, x: &[f32], k: usize, r: usize, m: usize, out: *mut f32, stride: usize) {
    let group = if r == TILE_W { TILE_W / 2 } else { r };
    let pairs = m / 2 * 2;
    for g0 in (0..r).step_by(group) {
        let w = w.rows(g0..g0 + group, k);
        for m0 in (0..pairs).step_by(2) {
            unsafe { tile(kernels, w, &x[m0 * k..(m0 + 2) * k], k, group, 2, out.add(m0 * stride + g0), stride) };
        }
    }
    if pairs < m {
        unsafe { tile(kernels, w, &x[pairs * k..], k, r, 1, out.add(pairs * stride), stride) };
    }
}

/// `out[j * stride + i] = w[i] · x[j]` for the `r` rows of `w` and the `c` rows of `x`.
///
/// # Safety
/// `out` must be valid for writes at `j * stride + i` for `i < r`, `j < c`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(kernels: Kernels, w: Rows, x: &[f32], k: usize, r: usize, c: usize, out: *mut f32, stride: usize) {
    match (kernels, w) {
        (Kernels::Scalar, Rows::F32(w) | Rows::Scratch(w)) => unsafe { scalar::tile(w, x, k, r, c, out, stride) },
        (Kernels::Scalar, Rows::Q8_0 { .. }) => unreachable!("the scalar kernels dequantise into scratch"),
        // SAFETY: `Kernels::Avx2` is only chosen when the CPU has AVX2 and FMA; the tile
        // shapes are monomorphised so that the accumulators stay in registers.
        #[cfg(target_arch = "x86_64")]
        (Kernels::Avx2, w) => unsafe {
            match (r, c) {
                (TILE_W, 1) => avx2::tile::<TILE_W, 1>(w, x, k, out, stride),
                (4, 2) => avx2::tile::<4, 2>(w, x, k, out, stride),
                (1, 2) => avx2::tile::<1, 2>(w, x, k, out, stride),
                (1, 1) => avx2::tile::<1, 1>(w, x, k, out, stride),
                _ => unreachable!("no {r}×{c} tile"),
            }
        },
    }
}

/// Portable tiles, for CPUs without AVX2+FMA. They keep the AVX2 tiles' summation order (8
/// lanes, then the same horizontal sum), but multiply and add separately where those fuse, so
/// their results differ from AVX2's in the last bits.
mod scalar {
    /// # Safety
    /// `out` must be valid for writes at `j * stride + i` for `i < r`, `j < c`.
    pub(super) unsafe fn tile(w: &[f32], x: &[f32], k: usize, r: usize, c: usize, out: *mut f32, stride: usize) {
        for j in 0..c {
            for i in 0..r {
                let value = dot(&w[i * k..(i + 1) * k], &x[j * k..(j + 1) * k]);
                unsafe { *out.add(j * stride + i) = value };
            }
        }
    }

    fn dot(w: &[f32], x: &[f32]) -> f32 {
        let body = w.len() / 8 * 8;
        let mut lanes = [0f32; 8];
        for (w, x) in w[..body].chunks_exact(8).zip(x[..body].chunks_exact(8)) {
            for lane in 0..8 {
                lanes[lane] += w[lane] * x[lane];
            }
        }
        // The order of `avx2::hsum`: halves, then quarters, then the last pair.
        let h = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
        let mut sum = (h[0] + h[2]) + (h[1] + h[3]);
        for (w, x) in w[body..].iter().zip(&x[body..]) {
            sum += w * x;
        }
        sum
    }
}

/// AVX2+FMA tiles: `R` weight rows × `C` activation rows, one 8-lane accumulator per output.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Rows, QK};

    /// [`super::dequantise_into`], compiled with AVX2 so that it vectorises
    /// (`vpmovsxbd` + `vcvtdq2ps` + `vmulps`; the same roundings, so the same values), and
    /// prefetching the next tile's weights, which the hardware prefetcher misses: they are
    /// read in bursts, between the products over the scratch buffer.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequantise_into(quants: &[i8], scales: &[f32], out: &mut [f32]) {
        let (ahead, scales_ahead) = (quants.len(), scales.len());
        for (b, ((q, d), out)) in
            quants.chunks_exact(QK).zip(scales.chunks_exact(1)).zip(out.chunks_exact_mut(QK)).enumerate()
        {
            prefetch(quants.as_ptr().wrapping_add(ahead + b * QK));
            if b % 16 == 0 {
                prefetch(scales.as_ptr().wrapping_add(scales_ahead + b));
            }
            super::dequantise_into(q, d, out);
        }
    }

    /// Asks for the cache line at `p`, the weights one tile ahead (the next rows in memory):
    /// a tile reads `R` short rows side by side, too many streams too short for the hardware
    /// prefetcher to follow (q8_0 rows of K = 576 are 9 cache lines). A prefetch never faults,
    /// so `p` may point past the weights.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn prefetch<T>(p: *const T) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast())
    }

    /// Fixed order: 8 lanes → 4 (low + high half) → 2 → 1.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `out[j * stride + i] = w[i] · x[j]`: each step of 8 columns loads (or dequantises) `R`
    /// weight vectors and loads `C` activation vectors for `R × C` FMAs; the tail of K past a
    /// multiple of 8 (f32 only: q8_0 rows are whole blocks) is added after the horizontal sum.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `out` must be valid for writes at `j * stride + i` for
    /// `i < R`, `j < C`.
    #[allow(clippy::needless_range_loop)] // accumulators are indexed by (activation row, weight row)
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize, const C: usize>(
        w: Rows,
        x: &[f32],
        k: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let body = k / 8 * 8;
        assert!(x.len() == C * k, "tile activations do not match {C} rows of {k}");
        let xp = x.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let from_memory = matches!(w, Rows::F32(_));
        match w {
            Rows::F32(w) | Rows::Scratch(w) => {
                assert!(w.len() == R * k, "tile weights do not match {R} rows of {k}");
                let wp = w.as_ptr();
                let mut kk = 0;
                while kk < body {
                    let mut xv = [_mm256_setzero_ps(); C];
                    for (j, xv) in xv.iter_mut().enumerate() {
                        // SAFETY: kk + 8 <= k and j < C: inside `x` (asserted above).
                        *xv = unsafe { _mm256_loadu_ps(xp.add(j * k + kk)) };
                    }
                    for i in 0..R {
                        if from_memory && kk % 16 == 0 {
                            prefetch(wp.wrapping_add(R * k + i * k + kk));
                        }
                        // SAFETY: as above, inside `w`.
                        let wv = unsafe { _mm256_loadu_ps(wp.add(i * k + kk)) };
                        for j in 0..C {
                            acc[j][i] = _mm256_fmadd_ps(wv, xv[j], acc[j][i]);
                        }
                    }
                    kk += 8;
                }
                for j in 0..C {
                    for i in 0..R {
                        let mut sum = hsum(acc[j][i]);
                        for t in body..k {
                            sum += w[i * k + t] * x[j * k + t];
                        }
                        unsafe { *out.add(j * stride + i) = sum };
                    }
                }
                return;
            }
            Rows::Q8_0 { quants, scales } => {
                let blocks = k / QK;
                assert!(
                    k.is_multiple_of(QK) && quants.len() == R * k && scales.len() == R * blocks,
                    "q8_0 tile weights do not match {R} rows of {k}"
                );
                let qp = quants.as_ptr();
                for b in 0..blocks {
                    for i in 0..R {
                        prefetch(qp.wrapping_add(R * k + i * k + b * QK));
                        if b % 16 == 0 {
                            prefetch(scales.as_ptr().wrapping_add(R * blocks + i * blocks + b));
                        }
                        let d = _mm256_set1_ps(scales[i * blocks + b]);
                        for v in 0..QK / 8 {
                            let kk = b * QK + v * 8;
                            // SAFETY: kk + 8 <= k and i < R: inside `quants` (asserted above).
                            let q = unsafe { _mm_loadl_epi64(qp.add(i * k + kk).cast()) };
                            let wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
                            for j in 0..C {
                                // SAFETY: as above, inside `x`.
                                let xv = unsafe { _mm256_loadu_ps(xp.add(j * k + kk)) };
                                acc[j][i] = _mm256_fmadd_ps(wv, xv, acc[j][i]);
                            }
                        }
                    }
                }
            }
        }
        for j in 0..C {
            for i in 0..R {
                unsafe { *out.add(j * stride + i) = hsum(acc[j][i]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn uniform(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }

        /// Uniform values with a few outliers, as activations have, so that block scales vary.
        fn values(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| if self.uniform() > 0.98 { 8.0 * self.uniform() } else { self.uniform() }).collect()
        }
    }

    fn reference(w: &[f32], x: &[f32], k: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for x in x.chunks_exact(k) {
            for w in w.chunks_exact(k) {
                out.push(w.iter().zip(x).map(|(&w, &x)| f64::from(w) * f64::from(x)).sum());
            }
        }
        out
    }

    /// Σ_k |x_k · w_k| for every output: what the rounding error of a dot product scales with.
    fn magnitudes(w: &[f32], x: &[f32], k: usize) -> Vec<f64> {
        let w_abs: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        let x_abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        reference(&w_abs, &x_abs, k)
    }

    fn dequantised(quants: &[i8], scales: &[f32]) -> Vec<f32> {
        quants.chunks_exact(QK).zip(scales).flat_map(|(q, &d)| q.iter().map(move |&q| f32::from(q) * d)).collect()
    }

    fn assert_close(got: &[f32], want: &[f64], magnitude: &[f64], relative: f64, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, ((&got, &want), &magnitude)) in got.iter().zip(want).zip(magnitude).enumerate() {
            let err = (f64::from(got) - want).abs();
            assert!(err <= relative * magnitude + 1e-30, "{what}: output {i} is {got}, want {want} (error {err:e})");
        }
    }

    fn product_with(kernels: Kernels, w: &WeightMatrix, x: &[f32]) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.len() / w.cols() * w.rows()];
        w.matmul_with(kernels, x, &mut out);
        out
    }

    fn product(w: &WeightMatrix, x: &[f32]) -> Vec<f32> {
        product_with(detected(), w, x)
    }

    const SHAPES: [(usize, usize); 4] = [(64, 37), (576, 70), (1536, 41), (576, 4)];
    const BATCHES: [usize; 4] = [1, 3, 8, 17];

    #[test]
    fn f32_products_match_f64_reference() {
        let mut rng = Rng(1);
        // K = 13 and 37 exercise the tails: k not a multiple of 8, n not of the tile.
        for (k, n) in SHAPES.into_iter().chain([(13, 5)]) {
            let w_values = rng.values(n * k);
            let w = WeightMatrix::from_f32(n, k, &w_values, WeightFormat::F32).unwrap();
            for m in BATCHES {
                let x = rng.values(m * k);
                // f32 sums of at most K / 8 + 3 terms per lane path: 1e-5 of Σ|x·w| is ample.
                let what = format!("f32 K={k} N={n} M={m}");
                assert_close(
                    &product(&w, &x),
                    &reference(&w_values, &x, k),
                    &magnitudes(&w_values, &x, k),
                    1e-5,
                    &what,
                );
            }
        }
    }

    #[test]
    fn q8_0_products_match_reference() {
        let mut rng = Rng(2);
        for (k, n) in SHAPES {
            let w_values = rng.values(n * k);
            let w = WeightMatrix::from_f32(n, k, &w_values, WeightFormat::Q8_0).unwrap();
            let Data::Q8_0 { quants, scales } = &w.data else { panic!("q8_0 matrix holds f32") };
            let w_hat = dequantised(quants, scales);
            for m in BATCHES {
                let x = rng.values(m * k);
                let got = product(&w, &x);

                // The arithmetic: the f32 product over the dequantised weights.
                let what = format!("q8_0 K={k} N={n} M={m} against the dequantised weights");
                assert_close(&got, &reference(&w_hat, &x, k), &magnitudes(&w_hat, &x, k), 1e-5, &what);

                // The quantisation: each weight moves by at most half a step, d / 2 = max|block| / 254,
                // so a block's error vector has norm <= √32 / 254 of the block's norm, and
                // |x·w − x·ŵ| <= ‖x‖ ‖w − ŵ‖ <= ‖x‖‖w‖ · √32 / 254 (≈ 0.022).
                let bound = (QK as f64).sqrt() / 254.0 + 1e-5;
                let norm = |v: &[f32]| v.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
                let want = reference(&w_values, &x, k);
                for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
                    let (mi, ni) = (i / n, i % n);
                    let scale = norm(&x[mi * k..(mi + 1) * k]) * norm(&w_values[ni * k..(ni + 1) * k]);
                    let err = (f64::from(got) - want).abs();
                    assert!(err <= bound * scale, "q8_0 K={k} N={n} M={m}: output {i} is {got}, want {want}");
                }
            }
        }
    }

    #[test]
    fn quantisation_moves_weights_by_at_most_half_a_step() {
        let mut rng = Rng(3);
        let mut values = rng.values(32 * 64);
        values[32..64].fill(0.0);
        let (quants, scales) = quantise(&values);
        assert!(scales[1] == 0.0 && quants[32..64].iter().all(|&q| q == 0));
        for ((block, q), &d) in values.chunks_exact(QK).zip(quants.chunks_exact(QK)).zip(&scales) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(!q.contains(&i8::MIN) && (amax == 0.0 || q.iter().any(|q| q.abs() == 127)));
            for (&v, &q) in block.iter().zip(q) {
                assert!((v - f32::from(q) * d).abs() <= amax / 254.0 * (1.0 + 1e-5), "{v} quantised to {q} × {d}");
            }
        }
        // Every kernel family sees the same dequantised weights.
        let mut simd = vec![0.0; values.len()];
        dequantise(detected(), &quants, &scales, &mut simd);
        assert_eq!(bits(&simd), bits(&dequantised(&quants, &scales)));
    }

    /// Every row of `x` (M rows) computed alone, bit for bit.
    fn rows_alone(w: &WeightMatrix, x: &[f32]) -> Vec<u32> {
        x.chunks_exact(w.cols()).flat_map(|row| product(w, row)).map(f32::to_bits).collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn rows_are_bitwise_independent_of_batch_and_threads() {
        let mut rng = Rng(4);
        let (n, k) = (302, 576);
        let w_values = rng.values(n * k);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for format in [WeightFormat::F32, WeightFormat::Q8_0] {
            let w = WeightMatrix::from_f32(n, k, &w_values, format).unwrap();
            // Rows alone and 2 rows dequantise q8_0 in registers, 13 rows through the scratch
            // buffer (tiles of every height); 230 rows take more than one slice of activations.
            for m in [2, 13, 230] {
                let x = rng.values(m * k);
                let alone = rows_alone(&w, &x);
                assert_eq!(bits(&product(&w, &x)), alone, "{format} M={m}: batch against rows alone");
                assert_eq!(bits(&one.install(|| product(&w, &x))), alone, "{format} M={m}: one thread");
                assert_eq!(bits(&two.install(|| product(&w, &x))), alone, "{format} M={m}: two threads");

                if m < 8 {
                    continue;
                }
                // Other neighbours, one of them broken, change nothing in row 5.
                let mut other = rng.values(m * k);
                other[5 * k..6 * k].copy_from_slice(&x[5 * k..6 * k]);
                other[7 * k] = f32::NAN;
                let got = two.install(|| product(&w, &other));
                assert_eq!(bits(&got[5 * n..6 * n]), alone[5 * n..6 * n], "{format} M={m}: other neighbours");
                assert!(got[7 * n..8 * n].iter().all(|v| v.is_nan()), "{format}: a NaN input gives NaN outputs");
            }
        }
    }

    #[test]
    fn scalar_kernels_agree_with_simd() {
        let mut rng = Rng(5);
        for (k, n) in SHAPES {
            let w_values = rng.values(n * k);
            let x = rng.values(9 * k);
            let w = WeightMatrix::from_f32(n, k, &w_values, WeightFormat::F32).unwrap();
            let want: Vec<f64> = product_with(Kernels::Scalar, &w, &x).into_iter().map(f64::from).collect();
            assert_close(&product(&w, &x), &want, &magnitudes(&w_values, &x, k), 1e-5, "f32 scalar against simd");

            let w = WeightMatrix::from_f32(n, k, &w_values, WeightFormat::Q8_0).unwrap();
            let want: Vec<f64> = product_with(Kernels::Scalar, &w, &x).into_iter().map(f64::from).collect();
            assert_close(&product(&w, &x), &want, &magnitudes(&w_values, &x, k), 1e-5, "q8_0 scalar against simd");
        }
    }

    #[test]
    fn q8_0_needs_whole_blocks_and_finite_values() {
        let err = WeightMatrix::from_f32(3, 48, &[0.5; 144], WeightFormat::Q8_0).unwrap_err();
        assert!(matches!(err, KernelError::Q8Columns { rows: 3, cols: 48 }));
        let message = err.to_string();
        assert!(message.contains("3×48") && message.contains("32"), "{message}");
        assert!(WeightMatrix::from_f32(3, 48, &[0.5; 144], WeightFormat::F32).is_ok());

        let mut values = vec![0.5; 64];
        values[33] = f32::INFINITY;
        let err = WeightMatrix::from_f32(2, 32, &values, WeightFormat::Q8_0).unwrap_err();
        assert!(err.to_string().contains("weight [1, 1]"), "{err}");

        let err = WeightMatrix::from_f32(2, 32, &[0.0; 63], WeightFormat::F32).unwrap_err();
        assert!(err.to_string().contains("2×32 weight matrix needs 64 values, got 63"), "{err}");
        assert!(matches!(WeightMatrix::from_f32(0, 32, &[], WeightFormat::F32), Err(KernelError::Empty { .. })));
    }

    #[test]
    fn stacking_fuses_products() {
        let mut rng = Rng(6);
        let k = 64;
        for format in [WeightFormat::F32, WeightFormat::Q8_0] {
            let (a, b) = (rng.values(3 * k), rng.values(5 * k));
            let parts =
                [WeightMatrix::from_f32(3, k, &a, format).unwrap(), WeightMatrix::from_f32(5, k, &b, format).unwrap()];
            let stacked = WeightMatrix::stack(&parts).unwrap();
            assert_eq!((stacked.rows(), stacked.cols(), stacked.format()), (8, k, format));
            assert_eq!(stacked.bytes(), parts[0].bytes() + parts[1].bytes());
            let x = rng.values(2 * k);
            let (ya, yb, y) = (product(&parts[0], &x), product(&parts[1], &x), product(&stacked, &x));
            for m in 0..2 {
                assert_eq!(bits(&y[m * 8..m * 8 + 3]), bits(&ya[m * 3..m * 3 + 3]));
                assert_eq!(bits(&y[m * 8 + 3..m * 8 + 8]), bits(&yb[m * 5..m * 5 + 5]));
            }
        }
        assert_eq!(
            WeightMatrix::from_f32(1, 64, &[0.0; 64], WeightFormat::Q8_0).unwrap().bytes(),
            64 + 2 * 4,
            "q8_0 reads a byte per weight and an f32 per block"
        );

        let f32_part = WeightMatrix::from_f32(1, 64, &[0.0; 64], WeightFormat::F32).unwrap();
        let q8_part = WeightMatrix::from_f32(1, 64, &[0.0; 64], WeightFormat::Q8_0).unwrap();
        let narrow = WeightMatrix::from_f32(1, 32, &[0.0; 32], WeightFormat::F32).unwrap();
        let err = WeightMatrix::stack(&[f32_part.clone(), q8_part]).unwrap_err();
        assert!(err.to_string().contains("part 1 (1×64, q8_0)"), "{err}");
        assert!(WeightMatrix::stack(&[f32_part, narrow]).is_err());
        assert!(matches!(WeightMatrix::stack(&[]), Err(KernelError::StackNothing)));
    }

    #[test]
    fn weight_format_parses_and_serialises() {
        assert_eq!("f32".parse::<WeightFormat>().unwrap(), WeightFormat::F32);
        assert_eq!("q8_0".parse::<WeightFormat>().unwrap(), WeightFormat::Q8_0);
        assert_eq!("Q8".parse::<WeightFormat>().unwrap(), WeightFormat::Q8_0);
        let err = "q4_k".parse::<WeightFormat>().unwrap_err();
        assert!(err.to_string().contains("`q4_k`"), "{err}");
        assert_eq!(WeightFormat::default(), WeightFormat::Q8_0);
        for format in [WeightFormat::F32, WeightFormat::Q8_0] {
            let json = serde_json::to_string(&format).unwrap();
            assert_eq!(json, format!("\"{}\"", format.name()));
            assert_eq!(serde_json::from_str::<WeightFormat>(&json).unwrap(), format);
            assert_eq!(format.to_string().parse::<WeightFormat>().unwrap(), format);
        }
        assert_eq!(serde_json::from_str::<WeightFormat>("\"q8\"").unwrap(), WeightFormat::Q8_0);
        assert!(serde_json::from_str::<WeightFormat>("\"f16\"").is_err());
    }

    #[test]
    #[should_panic(expected = "not a whole number of rows")]
    fn ragged_activations_are_a_caller_bug() {
        let w = WeightMatrix::from_f32(2, 32, &[0.0; 64], WeightFormat::F32).unwrap();
        w.matmul(&[0.0; 33], &mut [0.0; 2]);
    }
}
