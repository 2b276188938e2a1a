//! Milliseconds and GFLOP/s of one layer's prefill attention (no gradient) at SmolLM2's shapes
//! (9 query heads, 3 kv heads, d 64), causal, for prompts of 1k, 4k and 8k tokens.
//!     cargo run --release --example prefill_attention
use candle_core::{Device, Tensor};
use meet::nn::attention::attention;
use std::time::Instant;

fn main() {
    let dev = Device::Cpu;
    for t in [1024usize, 4096, 8000] {
        let q = Tensor::randn(0f32, 1.0, (1, t, 9, 64), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, t, 3, 64), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, t, 3, 64), &dev).unwrap();
        let inp = meet::models::AttentionInputs::new(1, t, 0, None).unwrap();
        let reps = (8192 / t).clamp(1, 4);
        attention(&q, &k, &v, inp.mask.as_ref(), 0.125).unwrap();
        let started = Instant::now();
        for _ in 0..reps {
            attention(&q, &k, &v, inp.mask.as_ref(), 0.125).unwrap();
        }
        let s = started.elapsed().as_secs_f64() / reps as f64;
        // Causal: half the t x t scores, two products of d = 64 each.
        let flops = 9.0 * (t * t) as f64 / 2.0 * 64.0 * 2.0 * 2.0;
        println!("t {t:>5}: {:8.1} ms  {:6.1} GFLOP/s (causal half)", s * 1e3, flops / s / 1e9);
    }
}
