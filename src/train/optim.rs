//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), updating every parameter in
//! place in one fused pass, the same update as `torch.optim.AdamW`; learning-rate schedules as
//! transformers' `get_scheduler`; global gradient-norm clipping as `clip_grad_norm_`.
//!
//! candle-nn's AdamW builds a dozen temporary tensors per parameter and step; here the moments are
//! plain buffers and one kernel reads the gradient once and writes parameter and moments once.

use crate::nn::grad::{self, GradBuf};
use crate::nn::ops::with_f32;
use crate::nn::team::{SharedMut, Team};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Layout, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::Arc;

/// AdamW hyper-parameters (torch's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable tensor with its moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Learning-rate group (e.g. 0 = model, 1 = controls).
    pub group: usize,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Where dense products write this parameter's gradient (see [`crate::nn::grad`]).
    buf: Arc<GradBuf>,
}

impl Drop for Param {
    fn drop(&mut self) {
        grad::unregister(self.var.as_tensor());
    }
}

/// AdamW over named parameters in learning-rate groups.
pub struct AdamW {
    pub params: Vec<Param>,
    pub config: AdamWConfig,
    /// Updates done so far (torch's `state["step"]`).
    pub step: u64,
}

struct Update<'a> {
    g: &'a [f32],
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    step: crate::nn::simd::AdamWStep,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "meet-adamw"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout) -> candle_core::Result<()> {
        let p = match (dst, dst_l.contiguous_offsets()) {
            (CpuStorage::F32(p), Some((a, b))) => &mut p[a..b],
            _ => candle_core::bail!("adamw: parameters must be contiguous f32"),
        };
        let g = self.g;
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let n = p.len();
        if g.len() != n || m.len() != n || v.len() != n {
            candle_core::bail!("adamw: sizes differ (param {n}, grad {}, moments {})", g.len(), m.len());
        }
        let (pp, pm, pv) = (SharedMut(p.as_mut_ptr()), SharedMut(m.as_mut_ptr()), SharedMut(v.as_mut_ptr()));
        let k = self.step;
        let run = |r: std::ops::Range<usize>| {
            let (pp, pm, pv) = (&pp, &pm, &pv);
            // Safety: ranges handed out by the team are disjoint and within n.
            let (p, m, v) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pp.0.add(r.start), r.len()),
                    std::slice::from_raw_parts_mut(pm.0.add(r.start), r.len()),
                    std::slice::from_raw_parts_mut(pv.0.add(r.start), r.len()),
                )
            };
            crate::nn::simd::adamw(p, m, v, &g[r], k);
        };
        if n < 1 << 15 {
            run(0..n);
        } else {
            Team::global().for_ranges(n, 64, &|r| run(r));
        }
        Ok(())
    }
}

impl AdamW {
    /// An optimizer over `params` `(name, var, group)` with zeroed moments.
    pub fn new(params: Vec<(String, Var, usize)>, config: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, var, group)| {
                let n = var.elem_count();
                let buf = grad::register(var.as_tensor());
                Param { name, var, group, m: vec![0.0; n], v: vec![0.0; n], buf }
            })
            .collect();
        Self { params, config, step: 0 }
    }

    /// Trainable elements.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.m.len()).sum()
    }

    /// Adds candle's gradients (`grads`, from `backward`) to the buffers the dense products wrote,
    /// clips the global L2 norm to `max_norm`, updates every parameter that has a gradient with
    /// learning rate `lrs[group]`, and clears the buffers. Returns the norm before clipping; a
    /// non-finite norm is an error and nothing is updated. A parameter without a gradient is
    /// skipped, as torch skips parameters whose `.grad` is None.
    pub fn step(&mut self, grads: &GradStore, lrs: &[f64], max_norm: Option<f64>) -> Result<f64> {
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                with_f32(g, |gv| {
                    p.buf.update(|dst, acc| {
                        if acc {
                            dst.iter_mut().zip(gv).for_each(|(d, x)| *d += x);
                        } else {
                            dst.copy_from_slice(gv);
                        }
                    })
                })
                .map_err(|e| Error::Invalid(format!("gradient of '{}': {e}", p.name)))?;
            }
        }
        // Summed in parameter order (nothing for one without a gradient this step), whichever
        // thread summed each.
        let sq: f64 = squared_norms(&self.params).iter().sum();
        let norm = sq.sqrt();
        if !norm.is_finite() {
            self.params.iter().for_each(|p| p.buf.clear());
            return Err(Error::Invalid(format!("gradient norm {norm} is not finite; lower the learning rate")));
        }
        let grad_scale = clip_scale(norm, max_norm);
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for p in &mut self.params {
            if !p.buf.is_written() {
                continue;
            }
            let lr =
                *lrs.get(p.group).ok_or_else(|| Error::Invalid(format!("no learning rate for group {}", p.group)))?;
            let (var, buf) = (p.var.clone(), p.buf.clone());
            let (m, v) = (&mut p.m, &mut p.v);
            buf.with(|g| {
                let op = Update {
                    g,
                    m: RefCell::new(m),
                    v: RefCell::new(v),
                    step: crate::nn::simd::AdamWStep {
                        keep: 1.0 - lr as f32 * c.weight_decay as f32,
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        eps: c.eps as f32,
                        step_size: (lr / bc1) as f32,
                        bc2_sqrt: bc2.sqrt() as f32,
                        grad_scale: grad_scale as f32,
                    },
                };
                var.as_tensor().inplace_op1(&op)
            })
            .transpose()?;
            buf.clear();
        }
        Ok(norm)
    }
}

/// Values per chunk of [`sum_of_squares`].
const CHUNK: usize = 4096;

/// [`sum_of_squares`] of each parameter's gradient (0 where none was written this step). The
/// parameters of fewer than 16 chunks (LoRA's factors: hundreds of them) are shared out whole
/// over the kernel team, the larger ones are cut into chunks on it one after the other.
fn squared_norms(params: &[Param]) -> Vec<f64> {
    let mut sums = vec![0f64; params.len()];
    let split = |p: &Param| p.buf.with(|v| splits_over_team(v.len())).unwrap_or(true);
    let (small, large): (Vec<usize>, Vec<usize>) = (0..params.len()).partition(|&i| !split(&params[i]));
    let out = SharedMut(sums.as_mut_ptr());
    Team::global().for_chunks(small.len(), 1, &|range| {
        let out = &out;
        for &i in &small[range] {
            let s = params[i].buf.with(|v| sum_of_squares(v)).unwrap_or(0.0);
            // SAFETY: entry `i` of `sums` is written by this job only.
            unsafe { *out.0.add(i) = s };
        }
    });
    for i in large {
        sums[i] = params[i].buf.with(|v| sum_of_squares(v)).unwrap_or(0.0);
    }
    sums
}

/// Whether [`sum_of_squares`] cuts `len` values into chunks over the kernel team (at least 16
/// chunks: one group of the vector kernel) rather than summing them on the calling thread.
fn splits_over_team(len: usize) -> bool {
    len.div_ceil(CHUNK) >= 16
}

/// `Σ x²` in f64 over chunks of 4096 values, each summed in order, then the chunk sums in order:
/// the chunks are summed on the kernel team (the same value on any number of threads).
fn sum_of_squares(v: &[f32]) -> f64 {
    let chunks = v.len().div_ceil(CHUNK);
    let mut sums = vec![0f64; chunks];
    let out = SharedMut(sums.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        let out = &out;
        // SAFETY: the sums of chunks `range` are written by this thread only, inside `sums`.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(range.start), range.len()) };
        crate::nn::simd::chunk_square_sums(&v[range.start * CHUNK..(range.end * CHUNK).min(v.len())], CHUNK, dst);
    };
    if !splits_over_team(v.len()) {
        work(0..chunks);
    } else {
        // Whole groups of 16 chunks per part where possible (the vector kernel's unit).
        Team::global().for_ranges(chunks, 16, &work);
    }
    sums.iter().sum()
}

/// Learning-rate schedule shapes (transformers' `SchedulerType` names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Constant,
    Linear,
    Cosine,
}

/// Learning rate for optimizer step `step` (0-based) of `total`, after `warmup` linear warm-up
/// steps from 0 — transformers' `get_{constant,linear,cosine}_schedule_with_warmup` multipliers.
pub fn lr_at(base: f64, schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// The factor `clip_grad_norm_` multiplies gradients by: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(m) if m > 0.0 => (m / (norm + 1e-6)).min(1.0),
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn the_parallel_sum_of_squares_is_the_sequential_one_bit_for_bit() {
        let v: Vec<f32> = (0..300_001).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 13) as f32)).collect();
        let sequential: f64 = v.chunks(4096).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum();
        assert_eq!(sum_of_squares(&v).to_bits(), sequential.to_bits());
        assert_eq!(sum_of_squares(&v[..5]), v[..5].iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>());
        assert_eq!(sum_of_squares(&[]), 0.0);
    }

    #[test]
    fn adamw_matches_torch() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) on p = [1, -2, 3] with gradients
        // [0.5, -1, 2] then [-0.3, 0.2, 1], worked out in f64 with torch's formula below.
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0, 3.0], &dev).unwrap();
        let mut opt =
            AdamW::new(vec![("p".into(), p.clone(), 0)], AdamWConfig { weight_decay: 0.01, ..Default::default() });
        let mut want = [1.0f64, -2.0, 3.0];
        let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
        for (k, g) in [[0.5, -1.0, 2.0], [-0.3, 0.2, 1.0]].iter().enumerate() {
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32, g[2] as f32], &dev).unwrap();
            let loss = (p.as_tensor() * &gt).unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), &[0.1], None).unwrap();
            let t = (k + 1) as i32;
            for i in 0..3 {
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            assert!((got[i] as f64 - want[i]).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn schedules_follow_transformers() {
        // get_linear_schedule_with_warmup(warmup=2, total=10): 0, .5, 1, then (10-s)/8.
        assert_eq!(lr_at(1.0, Schedule::Linear, 0, 2, 10), 0.0);
        assert_eq!(lr_at(1.0, Schedule::Linear, 1, 2, 10), 0.5);
        assert_eq!(lr_at(1.0, Schedule::Linear, 2, 2, 10), 1.0);
        assert!((lr_at(1.0, Schedule::Linear, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(2.0, Schedule::Constant, 9, 0, 10), 2.0);
        assert_eq!(clip_scale(4.0, Some(1.0)), 1.0 / (4.0 + 1e-6));
        assert_eq!(clip_scale(0.5, Some(1.0)), 1.0);
    }
}
