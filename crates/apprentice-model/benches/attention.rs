//! `cargo bench -p apprentice-model --bench attention`: one layer's attention, forward and
//! backward, with the fused kernel and with candle ops, at SmolLM2-135M's head shape (9 query
//! heads, 3 KV heads, 64 dims) and growing lengths: time (best of runs) and peak heap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use apprentice_model::attention::{causal_attention, composed_attention, CausalMask};
use candle_core::{DType, Device, Tensor, Var};

/// Counts live heap bytes and their peak, so each measurement reports what it allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const RUNS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Kernel {
    Fused,
    Composed,
}

/// One forward and backward; returns seconds and the peak heap above what was live before.
fn step(kernel: Kernel, q: &Var, k: &Var, v: &Var, mask: &CausalMask) -> candle_core::Result<(f64, usize)> {
    let (b, _, t, _) = q.dims4()?;
    let bias = match kernel {
        Kernel::Composed => Some(mask.bias(b, t, DType::F32, &Device::Cpu)?),
        Kernel::Fused => None,
    };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let out = match kernel {
        Kernel::Fused => causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask)?,
        Kernel::Composed => composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), bias.as_ref())?,
    };
    let grads = out.sum_all()?.backward()?;
    let seconds = start.elapsed().as_secs_f64();
    drop(grads);
    Ok((seconds, PEAK.load(Ordering::Relaxed) - base))
}

fn main() -> candle_core::Result<()> {
    println!(
        "attention forward + backward, {HEADS} heads / {KV_HEADS} KV heads × {HEAD_DIM}, {} threads, best of {RUNS}",
        rayon::current_num_threads()
    );
    println!(
        "{:>5} {:>5} {:>12} {:>12} {:>8} {:>12} {:>12}",
        "rows", "T", "fused s", "composed s", "speed", "fused heap", "composed heap"
    );
    for (rows, t) in [(4, 256), (1, 1024), (1, 2048), (1, 4096)] {
        let var = |heads: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, heads, t, HEAD_DIM), &Device::Cpu)?);
        let (q, k, v) = (var(HEADS)?, var(KV_HEADS)?, var(KV_HEADS)?);
        let mask = CausalMask::causal();
        let mut best = [(f64::INFINITY, 0usize); 2];
        for _ in 0..RUNS {
            for (i, kernel) in [Kernel::Fused, Kernel::Composed].into_iter().enumerate() {
                let (seconds, heap) = step(kernel, &q, &k, &v, &mask)?;
                best[i] = (best[i].0.min(seconds), heap);
            }
        }
        let mib = |bytes: usize| format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64);
        println!(
            "{rows:>5} {t:>5} {:>12.4} {:>12.4} {:>7.2}× {:>12} {:>12}",
            best[0].0,
            best[1].0,
            best[1].0 / best[0].0,
            mib(best[0].1),
            mib(best[1].1)
        );
    }
    Ok(())
}
