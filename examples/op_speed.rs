//! Forward and backward milliseconds of the fused ops at SmolLM2's training shapes (4 x 128).
//!     cargo run --release --example op_speed
use candle_core::{Device, Tensor, Var};
use meet::nn::attention::attention;
use meet::nn::ops::{rms_norm, swiglu};
use std::time::Instant;

fn time(name: &str, reps: usize, x: &Var, f: &dyn Fn(&Tensor) -> Tensor) {
    let (mut fw, mut bw) = (0.0, 0.0);
    for _ in 0..reps {
        let t = Instant::now();
        let y = f(x.as_tensor());
        fw += t.elapsed().as_secs_f64();
        let s = y.sum_all().unwrap();
        let t = Instant::now();
        let _g = s.backward().unwrap();
        bw += t.elapsed().as_secs_f64();
    }
    println!("{name:>12}: fwd {:7.3} ms  bwd {:7.3} ms", fw * 1e3 / reps as f64, bw * 1e3 / reps as f64);
}

fn main() {
    let dev = Device::Cpu;
    let r = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
    let w = Var::from_tensor(&r(&[576])).unwrap();
    let x = Var::from_tensor(&r(&[4, 128, 576])).unwrap();
    time("rms_norm", 30, &x, &|x| rms_norm(x, w.as_tensor(), 1e-5).unwrap());
    let g = Var::from_tensor(&r(&[4, 128, 1536])).unwrap();
    let u = Var::from_tensor(&r(&[4, 128, 1536])).unwrap();
    time("swiglu", 30, &g, &|g| swiglu(g, u.as_tensor()).unwrap());
    let q = Var::from_tensor(&r(&[4, 128, 9, 64])).unwrap();
    let k = Var::from_tensor(&r(&[4, 128, 3, 64])).unwrap();
    let v = Var::from_tensor(&r(&[4, 128, 3, 64])).unwrap();
    let inp = meet::models::AttentionInputs::new(4, 128, 0, None).unwrap();
    time("attention", 30, &q, &|q| attention(q, k.as_tensor(), v.as_tensor(), inp.mask.as_ref(), 0.125).unwrap());
    let b = r(&[4, 128, 576]);
    time("residual add", 30, &x, &|a| (a + &b).unwrap());
    let logits = Var::from_tensor(&r(&[508, 49152])).unwrap();
    let tg: Vec<u32> = (0..508).map(|i| i * 7).collect();
    time("token_logps", 5, &logits, &|l| meet::objectives::logps::token_logps(l, &tg).unwrap());
}
