//! Matrix products for serving: `Y[M, N] = X[M, K] · Wᵀ` with `W: [N, K]` stored as f32 or as
//! q8_0 blocks, vectorised with the instruction set found at run time.
//!
//! A decode step is memory-bound: every weight is read once per step and used for one
//! multiply-add per sequence. Two things make it cheap:
//! - q8_0 reads 1.125 bytes per weight (a signed byte, plus an f32 scale per block of 32)
//!   instead of 4, and multiplies in integers against activations quantised the same way;
//! - a product reads the weights once for the whole batch: a tile of [`TILE_W`] weight rows is
//!   loaded and every activation row of the batch is run past it while it sits in L1, so a batch
//!   of 8 sequences streams the same bytes from memory as one.
//!
//! Batch invariance (bit for bit): the output `(m, n)` is always produced by the same sequence of
//! floating-point operations, one that depends only on `K`. Tiles of different shapes only
//! interleave independent accumulators; the reduction over `k` is never split, neither across
//! tiles nor across threads (threads share out the weight rows `n`); and each activation row is
//! quantised on its own. So a sequence gets the same logits alone, in a batch of 16, with one
//! thread or with eight. Results do differ between kernel families (scalar versus AVX2), which
//! is fixed per process.
//!
//! Kernel families: AVX2+FMA on x86-64 CPUs that have it, portable scalar code elsewhere. There
//! is no AVX-512 (VNNI) path: the machines this was written and measured on have none, and an
//! untested kernel is worse than a slower one.

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
    /// scales are f32 in their own array: the kernel broadcasts them straight from memory, and
    /// f16 would save only 0.06 bytes per weight.
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
                if cols % QK != 0 {
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
    /// For q8_0 each row of `x` is quantised to q8_0 first.
    ///
    /// # Panics
    /// On caller bugs only: if `x.len()` is not a multiple of K, or `out.len() != M * N`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_with(detected(), x, out)
    }

    fn matmul_with(&self, kernels: Kernels, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        assert!(x.len() % k == 0, "matmul: x has {} values, not a whole number of rows of K = {k}", x.len());
        let m = x.len() / k;
        assert!(out.len() == m * n, "matmul: out has {} values, expected M × N = {m} × {n} = {}", out.len(), m * n);
        if m == 0 {
            return;
        }
        match &self.data {
            Data::F32(w) => product(kernels, Operands::F32 { w, x }, n, k, m, out),
            Data::Q8_0 { quants, scales } => {
                let (x_quants, x_scales) = quantise_activations(kernels, x);
                let operands = Operands::Q8_0 { w: quants, w_scales: scales, x: &x_quants, x_scales: &x_scales };
                product(kernels, operands, n, k, m, out)
            }
        }
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
// q8_0 quantisation

/// Quantises row-major values (a whole number of 32-blocks) to q8_0: quants and one scale per
/// block. Blocks are independent, so every row of a batch is quantised as it would be alone.
fn quantise(values: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut quants = vec![0i8; values.len()];
    let mut scales = vec![0f32; values.len() / QK];
    for ((block, q), d) in values.chunks_exact(QK).zip(quants.chunks_exact_mut(QK)).zip(&mut scales) {
        *d = quantise_block(block, q);
    }
    (quants, scales)
}

/// One block as llama.cpp's `quantize_row_q8_0`: `d = max|v| / 127`, `q = round(v / d)` (ties to
/// even, as its SIMD versions round). Returns `d`. A block holding NaN or an infinity gets scale
/// NaN, so the products it enters come out NaN rather than silently finite.
#[inline(always)]
fn quantise_block(values: &[f32], quants: &mut [i8]) -> f32 {
    let amax = values.iter().fold(0f32, |amax, v| amax.max(v.abs()));
    if !amax.is_finite() || values.iter().any(|v| v.is_nan()) {
        quants.fill(0);
        return f32::NAN;
    }
    let d = amax / 127.0;
    let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (q, v) in quants.iter_mut().zip(values) {
        // |v · inverse| <= 127 up to an ulp; `as` saturates, so no value leaves [-127, 127].
        *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// The activations of one q8_0 product, quantised: compiled for AVX2 where the products are, so
/// the rounding vectorises (the operations, and so the results, are the same either way).
fn quantise_activations(kernels: Kernels, x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    // Prefill brings hundreds of rows: worth sharing out, by whole blocks.
    const PARALLEL_VALUES: usize = 1 << 16;
    const VALUES_PER_TASK: usize = 1 << 14;
    let mut quants = vec![0i8; x.len()];
    let mut scales = vec![0f32; x.len() / QK];
    let run = |x: &[f32], quants: &mut [i8], scales: &mut [f32]| match kernels {
        Kernels::Scalar => quantise_into(x, quants, scales),
        // SAFETY: `Kernels::Avx2` is only chosen when the CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2 => unsafe { avx2::quantise_into(x, quants, scales) },
    };
    if x.len() >= PARALLEL_VALUES && rayon::current_num_threads() > 1 {
        x.par_chunks(VALUES_PER_TASK)
            .zip(quants.par_chunks_mut(VALUES_PER_TASK))
            .zip(scales.par_chunks_mut(VALUES_PER_TASK / QK))
            .for_each(|((x, q), s)| run(x, q, s));
    } else {
        run(x, &mut quants, &mut scales);
    }
    (quants, scales)
}

#[inline(always)]
fn quantise_into(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    for ((block, q), d) in x.chunks_exact(QK).zip(quants.chunks_exact_mut(QK)).zip(scales) {
        *d = quantise_block(block, q);
    }
}

// ---------------------------------------------------------------------------------------------
// The product: rows of W shared out between threads, tiles within a thread.

/// Weight rows per tile: four rows of K = 1536 are 6 KiB in q8_0 (24 KiB in f32), well inside
/// L1 while the batch's activation rows run past them.
const TILE_W: usize = 4;
/// Activation rows per tile, per format: `TILE_W × TILE_X` accumulators live in the 16 AVX2
/// registers with room for the operands.
const TILE_X_F32: usize = 2;
const TILE_X_Q8: usize = 2;
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

/// One product's operands, rows of `x` and `w` both of length K.
#[derive(Clone, Copy)]
enum Operands<'a> {
    F32 { w: &'a [f32], x: &'a [f32] },
    Q8_0 { w: &'a [i8], w_scales: &'a [f32], x: &'a [i8], x_scales: &'a [f32] },
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
    /// `m * stride + n` must lie inside the buffer, and no other thread may access the element.
    unsafe fn at(self, m: usize, n: usize) -> *mut f32 {
        unsafe { self.ptr.add(m * self.stride + n) }
    }
}

fn product(kernels: Kernels, operands: Operands, n: usize, k: usize, m: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), m * n);
    let out = Out { ptr: out.as_mut_ptr(), stride: n };
    let x_row_bytes = match operands {
        Operands::F32 { .. } => k * 4,
        Operands::Q8_0 { .. } => k + k / QK * 4,
    };
    let x_slice = (X_SLICE_BYTES / x_row_bytes).max(1);

    let threads = rayon::current_num_threads();
    if threads == 1 || n * k * m < PARALLEL_MACS {
        // SAFETY: one task covers all rows; `out` is `[m, n]`.
        unsafe { compute_rows(kernels, operands, k, m, 0..n, x_slice, out) };
        return;
    }
    let task_rows = n.div_ceil(threads * TASKS_PER_THREAD).next_multiple_of(TILE_W).max(MIN_TASK_ROWS);
    (0..n.div_ceil(task_rows)).into_par_iter().for_each(|task| {
        let rows = task * task_rows..((task + 1) * task_rows).min(n);
        // SAFETY: the tasks' row ranges are disjoint, so are the columns of `out` they write.
        unsafe { compute_rows(kernels, operands, k, m, rows, x_slice, out) };
    });
}

/// All M outputs of the weight rows `rows`. Every output (m, n) goes through the same tile code
/// for its (n, m) whatever tile it lands in, so the tiling here cannot change a result.
///
/// # Safety
/// `out` must be `[m, N]` with `rows` inside `0..N`, and no other thread may touch these columns.
unsafe fn compute_rows(
    kernels: Kernels,
    operands: Operands,
    k: usize,
    m: usize,
    rows: Range<usize>,
    x_slice: usize,
    out: Out,
) {
    let tile_x = match operands {
        Operands::F32 { .. } => TILE_X_F32,
        Operands::Q8_0 { .. } => TILE_X_Q8,
    };
    for slice_start in (0..m).step_by(x_slice) {
        let slice_end = (slice_start + x_slice).min(m);
        let mut n0 = rows.start;
        while n0 < rows.end {
            let r = if rows.end - n0 >= TILE_W { TILE_W } else { 1 };
            let mut m0 = slice_start;
            while m0 < slice_end {
                let c = (slice_end - m0).min(tile_x);
                unsafe { tile(kernels, operands, k, n0, r, m0, c, out) };
                m0 += c;
            }
            n0 += r;
        }
    }
}

/// Rows of q8_0 values: quants, and a scale per 32 of them.
#[derive(Clone, Copy)]
struct Q8Rows<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
}

/// Calls the tile of shape `r × c` (weight rows × activation rows), monomorphised so that its
/// accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! by_shape {
    ($r:expr, $c:expr, $module:ident::$f:ident, ($($arg:expr),* $(,)?)) => {
        match ($r, $c) {
            (TILE_W, 1) => $module::$f::<TILE_W, 1>($($arg),*),
            (TILE_W, 2) => $module::$f::<TILE_W, 2>($($arg),*),
            (TILE_W, 3) => $module::$f::<TILE_W, 3>($($arg),*),
            (TILE_W, 4) => $module::$f::<TILE_W, 4>($($arg),*),
            (1, 1) => $module::$f::<1, 1>($($arg),*),
            (1, 2) => $module::$f::<1, 2>($($arg),*),
            (1, 3) => $module::$f::<1, 3>($($arg),*),
            (1, 4) => $module::$f::<1, 4>($($arg),*),
            (r, c) => unreachable!("no {r}×{c} tile"),
        }
    };
}

/// The outputs (m0..m0+c, n0..n0+r).
///
/// # Safety
/// As [`compute_rows`], for these elements.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(kernels: Kernels, operands: Operands, k: usize, n0: usize, r: usize, m0: usize, c: usize, out: Out) {
    // SAFETY: (m0, n0) is inside `out` by the caller's contract.
    let dst = unsafe { out.at(m0, n0) };
    let stride = out.stride;
    match operands {
        Operands::F32 { w, x } => {
            let w = &w[n0 * k..(n0 + r) * k];
            let x = &x[m0 * k..(m0 + c) * k];
            match kernels {
                Kernels::Scalar => unsafe { scalar::f32_tile(w, x, k, r, c, dst, stride) },
                // SAFETY: `Kernels::Avx2` is only chosen when the CPU has AVX2 and FMA.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx2 => unsafe { by_shape!(r, c, avx2::f32_tile, (w, x, k, dst, stride)) },
            }
        }
        Operands::Q8_0 { w, w_scales, x, x_scales } => {
            let blocks = k / QK;
            let w = Q8Rows { quants: &w[n0 * k..(n0 + r) * k], scales: &w_scales[n0 * blocks..(n0 + r) * blocks] };
            let x = Q8Rows { quants: &x[m0 * k..(m0 + c) * k], scales: &x_scales[m0 * blocks..(m0 + c) * blocks] };
            match kernels {
                Kernels::Scalar => unsafe { scalar::q8_tile(w, x, k, r, c, dst, stride) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx2 => unsafe { by_shape!(r, c, avx2::q8_tile, (w, x, k, dst, stride)) },
            }
        }
    }
}

/// Adds 8 lanes in the order of `avx2::hsum`: halves, then quarters, then the last pair.
#[inline(always)]
fn sum_lanes(v: [f32; 8]) -> f32 {
    let h = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Portable tiles, for CPUs without AVX2+FMA. They keep the AVX2 kernels' summation order (8
/// lanes, the same horizontal sum), but multiply and add separately where those fuse, so their
/// results differ from AVX2's in the last bits.
mod scalar {
    use super::{sum_lanes, Q8Rows, QK};

    /// # Safety
    /// `out` must be valid for writes at `j * stride + i` for `i < r`, `j < c`.
    pub(super) unsafe fn f32_tile(w: &[f32], x: &[f32], k: usize, r: usize, c: usize, out: *mut f32, stride: usize) {
        for j in 0..c {
            for i in 0..r {
                let value = dot_f32(&w[i * k..(i + 1) * k], &x[j * k..(j + 1) * k]);
                unsafe { *out.add(j * stride + i) = value };
            }
        }
    }

    /// # Safety
    /// As [`f32_tile`].
    pub(super) unsafe fn q8_tile(w: Q8Rows, x: Q8Rows, k: usize, r: usize, c: usize, out: *mut f32, stride: usize) {
        let blocks = k / QK;
        for j in 0..c {
            for i in 0..r {
                let value = dot_q8(
                    &w.quants[i * k..(i + 1) * k],
                    &w.scales[i * blocks..(i + 1) * blocks],
                    &x.quants[j * k..(j + 1) * k],
                    &x.scales[j * blocks..(j + 1) * blocks],
                );
                unsafe { *out.add(j * stride + i) = value };
            }
        }
    }

    fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let body = w.len() / 8 * 8;
        let mut lanes = [0f32; 8];
        for (w, x) in w[..body].chunks_exact(8).zip(x[..body].chunks_exact(8)) {
            for lane in 0..8 {
                lanes[lane] += w[lane] * x[lane];
            }
        }
        let mut sum = sum_lanes(lanes);
        for (w, x) in w[body..].iter().zip(&x[body..]) {
            sum += w * x;
        }
        sum
    }

    /// Lane `l` of a block holds the exact integer sum of its values `4l..4l+4`, as
    /// `maddubs` + `madd` leave it.
    fn dot_q8(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        for (((wq, xq), dw), dx) in wq.chunks_exact(QK).zip(xq.chunks_exact(QK)).zip(ws).zip(xs) {
            let d = dw * dx;
            for (lane, (w4, x4)) in lanes.iter_mut().zip(wq.chunks_exact(4).zip(xq.chunks_exact(4))) {
                let sum: i32 = w4.iter().zip(x4).map(|(&w, &x)| i32::from(w) * i32::from(x)).sum();
                *lane += sum as f32 * d;
            }
        }
        sum_lanes(lanes)
    }
}

/// AVX2+FMA tiles: `R` weight rows × `C` activation rows, one 8-lane accumulator per output.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Q8Rows, QK};

    /// [`super::quantise_into`], compiled with AVX2 so that its loops vectorise.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantise_into(x: &[f32], quants: &mut [i8], scales: &mut [f32]) {
        super::quantise_into(x, quants, scales)
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

    /// `out[j * stride + i] = w[i] · x[j]`: a k-step loads `R + C` vectors for `R × C` FMAs.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `out` must be valid for writes at `j * stride + i` for
    /// `i < R`, `j < C`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f32_tile<const R: usize, const C: usize>(
        w: &[f32],
        x: &[f32],
        k: usize,
        out: *mut f32,
        stride: usize,
    ) {
        assert!(w.len() == R * k && x.len() == C * k, "f32 tile operands do not match {R}×{C} rows of {k}");
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let body = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let mut kk = 0;
        while kk < body {
            let mut xv = [_mm256_setzero_ps(); C];
            for (j, xv) in xv.iter_mut().enumerate() {
                // SAFETY: kk + 8 <= k and j < C, inside `x` (asserted above).
                *xv = unsafe { _mm256_loadu_ps(xp.add(j * k + kk)) };
            }
            for i in 0..R {
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
    }

    /// q8_0 dot products in integers, llama.cpp's way: `maddubs` multiplies unsigned by signed
    /// bytes, so it gets `|x|` and `w` carrying the sign of `x`; pairs of its i16 sums (at most
    /// 2 · 127 · 127, no saturation) are widened by `madd` with ones, so lane `l` holds the
    /// exact sum of the block's values `4l..4l+4`; one FMA per block scales it by `dw · dx`.
    ///
    /// # Safety
    /// As [`f32_tile`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q8_tile<const R: usize, const C: usize>(
        w: Q8Rows,
        x: Q8Rows,
        k: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let blocks = k / QK;
        assert!(
            w.quants.len() == R * k
                && w.scales.len() == R * blocks
                && x.quants.len() == C * k
                && x.scales.len() == C * blocks,
            "q8_0 tile operands do not match {R}×{C} rows of {k}"
        );
        let (wq, ws, xq, xs) = (w.quants.as_ptr(), w.scales.as_ptr(), x.quants.as_ptr(), x.scales.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        for b in 0..blocks {
            let mut xv = [_mm256_setzero_si256(); C];
            let mut x_abs = [_mm256_setzero_si256(); C];
            let mut dx = [_mm256_setzero_ps(); C];
            for j in 0..C {
                // SAFETY: b < blocks and j < C: inside `x` (asserted above).
                xv[j] = unsafe { _mm256_loadu_si256(xq.add(j * k + b * QK).cast()) };
                x_abs[j] = _mm256_sign_epi8(xv[j], xv[j]);
                dx[j] = _mm256_set1_ps(unsafe { *xs.add(j * blocks + b) });
            }
            for i in 0..R {
                // SAFETY: as above, inside `w`.
                let wv = unsafe { _mm256_loadu_si256(wq.add(i * k + b * QK).cast()) };
                let dw = _mm256_set1_ps(unsafe { *ws.add(i * blocks + b) });
                for j in 0..C {
                    let pairs = _mm256_maddubs_epi16(x_abs[j], _mm256_sign_epi8(wv, xv[j]));
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    acc[j][i] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, dx[j]), acc[j][i]);
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

    fn dequantise(quants: &[i8], scales: &[f32]) -> Vec<f32> {
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
            let w_hat = dequantise(quants, scales);
            for m in BATCHES {
                let x = rng.values(m * k);
                let got = product(&w, &x);
                let (x_quants, x_scales) = quantise_activations(Kernels::Scalar, &x);
                let x_hat = dequantise(&x_quants, &x_scales);

                // The arithmetic: exact integer block sums, then f32 sums of K / 32 + 3 terms.
                let what = format!("q8_0 K={k} N={n} M={m} against the dequantised operands");
                assert_close(&got, &reference(&w_hat, &x_hat, k), &magnitudes(&w_hat, &x_hat, k), 1e-5, &what);

                // The quantisation: each value moves by at most half a step, d / 2 = max|block| / 254,
                // so a block's error vector has norm <= √32 / 254 of the block's norm, and
                // |x·w − x̂·ŵ| <= ‖x‖‖w‖ (2e + e²) with e = √32 / 254 ≈ 0.0223.
                let e = (QK as f64).sqrt() / 254.0;
                let bound = 2.0 * e + e * e + 1e-5;
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
    fn quantisation_moves_values_by_at_most_half_a_step() {
        let mut rng = Rng(3);
        let mut x = rng.values(32 * 64);
        x[32..64].fill(0.0);
        let (quants, scales) = quantise_activations(detected(), &x);
        assert_eq!((quants.clone(), scales.clone()), quantise_activations(Kernels::Scalar, &x));
        assert!(scales[1] == 0.0 && quants[32..64].iter().all(|&q| q == 0));
        for ((block, q), &d) in x.chunks_exact(QK).zip(quants.chunks_exact(QK)).zip(&scales) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(!q.contains(&i8::MIN) && (amax == 0.0 || q.iter().any(|q| q.abs() == 127)));
            for (&v, &q) in block.iter().zip(q) {
                assert!((v - f32::from(q) * d).abs() <= amax / 254.0 * (1.0 + 1e-5), "{v} quantised to {q} × {d}");
            }
        }
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
            // 13 rows: tiles of every height; 230 rows: more than one slice of activations.
            for m in [13, 230] {
                let x = rng.values(m * k);
                let alone = rows_alone(&w, &x);
                assert_eq!(bits(&product(&w, &x)), alone, "{format} M={m}: batch against rows alone");
                assert_eq!(bits(&one.install(|| product(&w, &x))), alone, "{format} M={m}: one thread");
                assert_eq!(bits(&two.install(|| product(&w, &x))), alone, "{format} M={m}: two threads");

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

    // BENCH-BEGIN (temporary)
    #[test]
    #[ignore]
    fn bench_decode_step() {
        use std::time::Instant;
        let mut rng = Rng(9);
        let big = rng.values(49152 * 576 + 4096);
        let slice = |n: usize, k: usize, off: usize| &big[off % 4096..off % 4096 + n * k];
        // memory bandwidth baseline
        let mem: Vec<f32> = vec![1.0; 128 << 20];
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let s: f32 = pool.install(|| mem.par_chunks(1 << 16).map(|c| c.iter().sum::<f32>()).sum());
                std::hint::black_box(s);
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("memory read {threads} threads: {:.1} GB/s", (mem.len() * 4) as f64 / best / 1e9);
        }
        let only: Option<WeightFormat> = std::env::var("BENCH_FORMAT").ok().map(|s| s.parse().unwrap());
        for format in [WeightFormat::F32, WeightFormat::Q8_0] {
            if only.is_some_and(|o| o != format) { continue; }
            let t = Instant::now();
            let mut layers = Vec::new();
            for l in 0..30 {
                let qkv = WeightMatrix::from_f32(960, 576, slice(960, 576, l * 7), format).unwrap();
                let o = WeightMatrix::from_f32(576, 576, slice(576, 576, l * 7 + 1), format).unwrap();
                let gu = WeightMatrix::from_f32(3072, 576, slice(3072, 576, l * 7 + 2), format).unwrap();
                let down = WeightMatrix::from_f32(576, 1536, slice(576, 1536, l * 7 + 3), format).unwrap();
                layers.push((qkv, o, gu, down));
            }
            let head = WeightMatrix::from_f32(49152, 576, slice(49152, 576, 5), format).unwrap();
            let bytes: usize =
                layers.iter().map(|(a, b, c, d)| a.bytes() + b.bytes() + c.bytes() + d.bytes()).sum::<usize>()
                    + head.bytes();
            println!("{format}: built in {:.1}s, {:.1} MB per step, kernels {}", t.elapsed().as_secs_f64(), bytes as f64 / 1e6, cpu_kernels());
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                for m in [1, 2, 4, 8, 16] {
                    let x576 = rng.values(m * 576);
                    let x1536 = rng.values(m * 1536);
                    let mut o960 = vec![0.0; m * 960];
                    let mut o576 = vec![0.0; m * 576];
                    let mut o3072 = vec![0.0; m * 3072];
                    let mut ohead = vec![0.0; m * 49152];
                    let mut step = || {
                        for (qkv, o, gu, down) in &layers {
                            qkv.matmul(&x576, &mut o960);
                            o.matmul(&x576, &mut o576);
                            gu.matmul(&x576, &mut o3072);
                            down.matmul(&x1536, &mut o576);
                        }
                        head.matmul(&x576, &mut ohead);
                    };
                    let mut times = Vec::new();
                    pool.install(|| {
                        step();
                        for _ in 0..7 {
                            let t = Instant::now();
                            step();
                            times.push(t.elapsed().as_secs_f64());
                        }
                    });
                    times.sort_by(f64::total_cmp);
                    let med = times[times.len() / 2];
                    println!(
                        "{format} threads={threads} M={m:2}: median {:7.2} ms  min {:7.2} ms  {:5.1} GB/s",
                        med * 1e3, times[0] * 1e3, bytes as f64 / med / 1e9
                    );
                }
            }
        }
    }
    // BENCH-END
}
