//! Milliseconds per decoding step spent in the packed products at SmolLM2-135M's shapes: 30 layers
//! of fused qkv, o, fused gate/up and down in Q4_1, then the tied LM head in Q8_0, each layer its
//! own weights (85 MB in all, more than the last-level cache, as in real decoding), run in that
//! order for a batch of `m` rows (default 16). Prints the best of `reps` steps and the GFLOP/s.
//!     cargo run --release --example packed_speed [m] [reps]
use candle_core::{Device, Tensor};
use meet::nn::packed::{PackedFormat, PackedWeight};
use std::time::Instant;

/// Random values (a timing needs no particular ones).
fn sample(n: usize) -> Vec<f32> {
    Tensor::randn(0f32, 0.5, n, &Device::Cpu).unwrap().to_vec1().unwrap()
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let m = args.first().copied().unwrap_or(16);
    let reps = args.get(1).copied().unwrap_or(10);
    // (out, in) of one layer's products, then the LM head.
    let layer = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mut weights = Vec::new();
    for _ in 0..30 {
        for &(n, k) in &layer {
            let w = PackedWeight::quantize(PackedFormat::Q4_1, n, k, &sample(n * k)).unwrap();
            weights.push(w);
        }
    }
    weights.push(PackedWeight::quantize(PackedFormat::Q8_0, 49152, 576, &sample(49152 * 576)).unwrap());
    let xs: Vec<Vec<f32>> = [576, 1536].iter().map(|&k| sample(m * k)).collect();
    let flops: f64 = weights.iter().map(|w| 2.0 * (m * w.dims().0 * w.dims().1) as f64).sum();
    let mut times = Vec::new();
    for _ in 0..reps + 1 {
        let t = Instant::now();
        for w in &weights {
            let x = if w.dims().1 == 576 { &xs[0] } else { &xs[1] };
            std::hint::black_box(w.matmul_t(x, m));
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0); // warm-up
    times.sort_by(f64::total_cmp);
    let (best, median) = (times[0], times[times.len() / 2]);
    println!(
        "per step: best {:.2} ms, median {:.2} ms, {:.1} GFLOP/s at best (m = {m})",
        best * 1e3,
        median * 1e3,
        flops / best / 1e9
    );
}
