//! GFLOP/s of the training products of SmolLM2 (batch 4 x 128 tokens), and of LoRA r 64 on
//! GPT-Neo-125M, through `meet::nn::gemm` (f32), or `meet::nn::bf16` (bf16 operands, f32 sums)
//! with the argument `bf16`; the best of 5 timed batches per product.
//!     cargo run --release --example gemm_speed [-- bf16|f32 [ROWS [NAME]]]
//! ROWS (default 512) sets the rows of x: 64 is a decoding step of a batch of 64; NAME keeps only
//! the products whose name contains it.
use meet::nn::bf16::{self, Src};
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
fn product(bf: bool, m: usize, n: usize, k: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool, c: &mut [f32]) {
    if bf {
        bf16::gemm(m, n, k, Src::F32(a), a_t, Src::F32(b), b_t, c, false)
    } else {
        meet::nn::gemm::sgemm(m, n, k, a, a_t, b, b_t, c, false)
    }
}

/// Timed batches per product; the fastest is reported.
const BATCHES: usize = 5;

fn main() {
    let bf = std::env::args().nth(1).as_deref() == Some("bf16");
    println!("{} products", if bf { "bf16" } else { "f32" });
    let rows: usize = std::env::args().nth(2).map_or(512, |r| r.parse().expect("ROWS: a number of rows"));
    for (name, n, k) in [
        ("q/o 576x576", 576, 576),
        ("k/v 192x576", 192, 576),
        ("gate/up 1536x576", 1536, 576),
        ("down 576x1536", 576, 1536),
        ("lm_head 49152x576", 49152, 576),
        // LoRA r 64 on GPT-Neo-125M's projections: A (r x in), B (out x r).
        ("lora A 64x768", 64, 768),
        ("lora B 768x64", 768, 64),
        ("lora A 64x3072", 64, 3072),
        ("lora B 3072x64", 3072, 64),
    ] {
        if std::env::args().nth(3).is_some_and(|only| !name.contains(&only)) {
            continue;
        }
        let x = vec![0.5f32; rows * k];
        let w = vec![0.25f32; n * k];
        let dy = vec![0.1f32; rows * n];
        let mut y = vec![0f32; rows * n];
        let mut dx = vec![0f32; rows * k];
        let mut dw = vec![0f32; n * k];
        let reps = if n > 10000 { 3 } else { 20 };
        // The best of several batches: these machines are shared, and a batch that another
        // tenant slowed says nothing about the kernel.
        let rate = |f: &mut dyn FnMut()| {
            let best = (0..BATCHES)
                .map(|_| {
                    let t = Instant::now();
                    (0..reps).for_each(|_| f());
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            2.0 * (rows * n * k) as f64 * reps as f64 / best / 1e9
        };
        let f = rate(&mut || product(bf, rows, n, k, &x, false, &w, true, &mut y));
        let d = rate(&mut || product(bf, rows, k, n, &dy, false, &w, false, &mut dx));
        let g = rate(&mut || product(bf, n, k, rows, &dy, true, &x, false, &mut dw));
        println!("{name:>20}: fwd {f:6.1}  dx {d:6.1}  dW {g:6.1} GFLOP/s");
    }
}
