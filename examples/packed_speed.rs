//! Milliseconds per decoding step spent in the packed products at SmolLM2-135M's shapes (30
//! layers of fused qkv, o, fused gate/up, down in Q4_1; the tied LM head in Q8_0), and the
//! GFLOP/s each shape reaches, for a batch of `m` rows (default 16).
//!     cargo run --release --example packed_speed [m] [reps]
use meet::nn::packed::{PackedFormat, PackedWeight};
use std::time::Instant;

fn sample(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13).wrapping_mul(40503);
            (h % 20000) as f32 / 10000.0 - 1.0
        })
        .collect()
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let m = args.first().copied().unwrap_or(16);
    let reps = args.get(1).copied().unwrap_or(20);
    // (name, out, in, format, times per step)
    let shapes = [
        ("qkv", 960, 576, PackedFormat::Q4_1, 30),
        ("o", 576, 576, PackedFormat::Q4_1, 30),
        ("gate_up", 3072, 576, PackedFormat::Q4_1, 30),
        ("down", 576, 1536, PackedFormat::Q4_1, 30),
        ("lm_head", 49152, 576, PackedFormat::Q8_0, 1),
    ];
    let mut total = 0.0;
    for (name, n, k, f, per_step) in shapes {
        let w = PackedWeight::quantize(f, n, k, &sample(n * k, 5)).unwrap();
        let x = sample(m * k, 11);
        let _ = w.matmul_t(&x, m);
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(w.matmul_t(&x, m));
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        let gflops = 2.0 * (m * n * k) as f64 / best / 1e9;
        total += best * per_step as f64;
        println!("{name:>8} [{n:>5} x {k:>4}] x{per_step:>2}: {:8.3} ms  {gflops:6.1} GFLOP/s", best * 1e3);
    }
    println!("per step: {:.2} ms (m = {m})", total * 1e3);
}
