//! Log-probabilities of the labelled tokens of a batch under a policy — the one forward pass
//! every objective uses — and the fused token log-probability op beneath it.
//!
//! `log p(y) = x_y - logsumexp(x)` per row, without materialising `log_softmax` over the
//! vocabulary (49k columns for SmolLM2): the forward keeps one `logsumexp` per row, the backward
//! writes `g (onehot(y) - softmax(x))` straight into the logits' gradient.

use crate::nn::bf16::sgemm_autocast;
use crate::nn::ops::with_f32;
use crate::nn::simd::{exp_shifted_sum, log_sum_exp};
use crate::nn::team::{SharedMut, Team};
use crate::policy::{Batch, Policy};
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Log-probabilities of the labelled tokens of a batch.
pub struct LabelLogps {
    /// `(n,)`: one entry per labelled token, row-major.
    pub logps: Tensor,
    /// The batch row of each entry.
    pub rows: Vec<u32>,
    pub b: usize,
}

impl LabelLogps {
    /// Summed log-probability of each row's labels `(b,)`, differentiable.
    pub fn per_sequence_sum(&self) -> Result<Tensor> {
        let n = self.rows.len();
        let mut onehot = vec![0f32; self.b * n];
        for (i, &r) in self.rows.iter().enumerate() {
            onehot[r as usize * n + i] = 1.0;
        }
        let m = Tensor::from_vec(onehot, (self.b, n), self.logps.device())?;
        Ok(m.matmul(&self.logps.unsqueeze(1)?)?.squeeze(1)?)
    }

    /// Mean log-probability of each row's labels `(b,)` (0 for a row without labels).
    pub fn per_sequence_mean(&self) -> Result<Tensor> {
        let counts: Vec<f32> = self.counts().iter().map(|&c| 1.0 / c.max(1) as f32).collect();
        let inv = Tensor::from_vec(counts, self.b, self.logps.device())?;
        Ok((self.per_sequence_sum()? * inv)?)
    }

    /// Labelled tokens per row.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.b];
        self.rows.iter().for_each(|&r| c[r as usize] += 1);
        c
    }
}

/// Log-probabilities of every labelled token. Only the labelled positions go through the LM
/// head, which saves most of its cost when prompts are long.
pub fn label_logps(policy: &Policy, batch: &Batch) -> Result<LabelLogps> {
    let (h, n) = policy.hidden(batch)?;
    let (pos, tgt) = shifted_targets(&batch.labels, batch.b, batch.t);
    if pos.is_empty() {
        return Err(Error::Invalid("the batch has no labelled tokens".into()));
    }
    let (b, total, hidden) = h.dims3()?;
    let rows: Vec<u32> = pos.iter().map(|&p| p / batch.t as u32).collect();
    // Position p = r * t + j sits at r * total + n + j once the prompt is in front.
    let idx: Vec<u32> =
        pos.iter().map(|&p| (p / batch.t as u32) * total as u32 + n as u32 + p % batch.t as u32).collect();
    let h = h.reshape((b * total, hidden))?.index_select(&Tensor::new(idx.as_slice(), h.device())?, 0)?;
    // The fused head computes its input gradient up front: only worth it when one is needed.
    let logps = match policy.pretrained.model.frozen_lm_head().filter(|_| h.track_op()) {
        Some((w, packed)) => frozen_head_logps(&h, &w, packed, &tgt)?,
        None => token_logps(&policy.pretrained.model.lm_head(&h)?, &tgt)?, // logits (labelled, v)
    };
    Ok(LabelLogps { logps, rows, b })
}

/// One target per row, each inside the vocabulary.
fn check_targets(targets: &[u32], n: usize, v: usize) -> candle_core::Result<()> {
    if targets.len() != n {
        candle_core::bail!("{} targets for {n} rows of logits", targets.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("target token {t} is outside the vocabulary of {v}");
    }
    Ok(())
}

struct TokenLogps {
    targets: Arc<Vec<u32>>,
    /// logsumexp of every row, kept by the forward for the backward.
    lse: Mutex<Vec<f32>>,
}

impl CustomOp1 for TokenLogps {
    fn name(&self) -> &'static str {
        "meet-token-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("token_logps: needs contiguous f32 logits"),
        };
        let (n, v) = l.shape().dims2()?;
        check_targets(&self.targets, n, v)?;
        let mut lse = vec![0f32; n];
        let mut out = vec![0f32; n];
        let (po, pl) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
        Team::global().for_chunks(n, 1, &|rows| {
            let (po, pl) = (&po, &pl);
            for r in rows {
                let row = &x[r * v..(r + 1) * v];
                let z = log_sum_exp(row);
                // Safety: row r is written by this thread only.
                unsafe {
                    *pl.0.add(r) = z;
                    *po.0.add(r) = row[self.targets[r] as usize] - z;
                }
            }
        });
        *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = lse;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = x.dims2()?;
        let g = dy.to_vec1::<f32>()?;
        let lse = self.lse.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut dx = vec![0f32; n * v];
        let p = SharedMut(dx.as_mut_ptr());
        with_f32(x, |x| {
            Team::global().for_chunks(n, 1, &|rows| {
                let p = &p;
                for r in rows {
                    // Safety: row r is written by this thread only.
                    let d = unsafe { std::slice::from_raw_parts_mut(p.0.add(r * v), v) };
                    if g[r] == 0.0 {
                        continue; // already zero
                    }
                    d.copy_from_slice(&x[r * v..(r + 1) * v]);
                    exp_shifted_sum(d, lse[r]);
                    let s = -g[r];
                    d.iter_mut().for_each(|e| *e *= s);
                    d[self.targets[r] as usize] += g[r];
                }
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (n, v), dy.device())?))
    }
}

/// `log p(target_i | h_i W^T)` with a frozen head `W: [v, hidden]`, for hidden rows `h: (n, hidden)`.
///
/// The loss is the last op, so its gradient is known up to one factor per row:
/// `d log p / d h = (onehot − softmax) W`. The forward pass computes that product chunk by chunk
/// and keeps only the `(n, hidden)` result; the backward pass scales its rows. The `(n, v)`
/// logits (100 MB for a 4x128 batch of SmolLM2) and their gradient never exist in full.
struct FrozenHeadLogps {
    w: Tensor,
    /// `Wᵀ` packed for bf16 products (inside autocast).
    packed: Option<Arc<crate::nn::bf16::PackedB>>,
    targets: Arc<Vec<u32>>,
    /// `(onehot − softmax) W` per row, from the forward pass.
    dh: Mutex<Vec<f32>>,
}

impl CustomOp1 for FrozenHeadLogps {
    fn name(&self) -> &'static str {
        "meet-frozen-head-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("head log-probs: needs contiguous f32 hidden states"),
        };
        let (n, hidden) = l.shape().dims2()?;
        let (v, wh) = self.w.dims2()?;
        if wh != hidden {
            candle_core::bail!("head log-probs: hidden states of width {hidden} for a head of width {wh}");
        }
        check_targets(&self.targets, n, v)?;
        // Rows per chunk: each chunk streams the whole head twice, so fewer, larger chunks (50 MB
        // of logits for SmolLM2) beat small cache-sized ones.
        const CHUNK: usize = 256;
        let mut out = vec![0f32; n];
        let mut dh = vec![0f32; n * hidden];
        let mut logits = vec![0f32; CHUNK.min(n) * v];
        with_f32(&self.w, |w| {
            for r0 in (0..n).step_by(CHUNK) {
                let c = CHUNK.min(n - r0);
                let z = &mut logits[..c * v];
                let hc = &h[r0 * hidden..(r0 + c) * hidden];
                match &self.packed {
                    Some(p) => p.gemm(c, crate::nn::bf16::Src::F32(hc), false, z, false),
                    None => sgemm_autocast(c, v, hidden, hc, false, w, true, z, false),
                }
                let po = SharedMut(out.as_mut_ptr());
                let pz = SharedMut(z.as_mut_ptr());
                Team::global().for_chunks(c, 1, &|rows| {
                    let (po, pz) = (&po, &pz);
                    for i in rows {
                        // Safety: row i of the chunk and out[r0 + i] belong to this thread.
                        let row = unsafe { std::slice::from_raw_parts_mut(pz.0.add(i * v), v) };
                        let t = self.targets[r0 + i] as usize;
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let xt = row[t];
                        let sum = exp_shifted_sum(row, max);
                        // Safety: as above: out[r0 + i] is this thread's.
                        unsafe { *po.0.add(r0 + i) = xt - max - sum.ln() };
                        // onehot − softmax
                        let inv = -1.0 / sum;
                        row.iter_mut().for_each(|e| *e *= inv);
                        row[t] += 1.0;
                    }
                });
                sgemm_autocast(c, hidden, v, z, false, w, false, &mut dh[r0 * hidden..(r0 + c) * hidden], false);
            }
        })?;
        *self.dh.lock().unwrap_or_else(|p| p.into_inner()) = dh;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, hidden) = h.dims2()?;
        let g = dy.to_vec1::<f32>()?;
        let mut dh = self.dh.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (row, &gr) in dh.chunks_exact_mut(hidden).zip(&g) {
            row.iter_mut().for_each(|x| *x *= gr);
        }
        Ok(Some(Tensor::from_vec(dh, (n, hidden), h.device())?))
    }
}

/// [`token_logps`] of `h W^T` for a frozen LM head `w`, without materialising the logits.
/// `packed`: the head packed for bf16 products, used inside autocast.
pub fn frozen_head_logps(
    h: &Tensor,
    w: &Tensor,
    packed: Option<Arc<crate::nn::bf16::PackedB>>,
    targets: &[u32],
) -> Result<Tensor> {
    let op = FrozenHeadLogps { w: w.clone(), packed, targets: Arc::new(targets.to_vec()), dh: Mutex::new(Vec::new()) };
    Ok(h.contiguous()?.apply_op1(op)?)
}

/// `log p(target_i | row_i)` for logits `(n, v)` and `n` targets, differentiable in the logits.
pub fn token_logps(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    check_targets(targets, n, v)?;
    if !logits.device().is_cpu() {
        // Composed fallback (the same numbers, materialising log_softmax).
        let lsm = candle_nn::ops::log_softmax(logits, 1)?;
        let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
        return Ok(lsm.gather(&idx, 1)?.squeeze(1)?);
    }
    let op = TokenLogps { targets: Arc::new(targets.to_vec()), lse: Mutex::new(Vec::new()) };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

/// Which positions of a `(b, t)` batch predict a label: `labels[r][j + 1]` is the target of
/// position `j` (labels are shifted inside, as transformers does). Entries below 0 (−100) are
/// ignored. Returns the flat position indices and their targets.
pub fn shifted_targets(labels: &[i64], b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let (mut pos, mut tgt) = (Vec::new(), Vec::new());
    for r in 0..b {
        for j in 0..t.saturating_sub(1) {
            let y = labels[r * t + j + 1];
            if y >= 0 {
                pos.push((r * t + j) as u32);
                tgt.push(y as u32);
            }
        }
    }
    (pos, tgt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn logps_and_gradient_match_log_softmax() {
        // Reference: torch.log_softmax(x, -1).gather(1, y) and its autograd.
        let dev = Device::Cpu;
        let x: Vec<f32> = (0..3 * 70).map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0).collect();
        let x = Var::from_vec(x, (3, 70), &dev).unwrap();
        let y = [4u32, 69, 0];
        let fused = token_logps(x.as_tensor(), &y).unwrap();
        let lsm = candle_nn::ops::log_softmax(x.as_tensor(), 1).unwrap();
        let want =
            lsm.gather(&Tensor::new(&y[..], &dev).unwrap().unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap();
        let d = (&fused - &want).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{d}");
        let w = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d = (g1 - g2).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn the_fused_frozen_head_matches_logits_then_log_probs() {
        let dev = Device::Cpu;
        let (n, hidden, v) = (70, 24, 300);
        let h: Vec<f32> = (0..n * hidden).map(|i| ((i * 7919) % 97) as f32 / 40.0 - 1.2).collect();
        let w: Vec<f32> = (0..v * hidden).map(|i| ((i * 104729) % 89) as f32 / 50.0 - 0.9).collect();
        let h = Var::from_vec(h, (n, hidden), &dev).unwrap();
        let w = Tensor::from_vec(w, (v, hidden), &dev).unwrap();
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
        let fused = frozen_head_logps(h.as_tensor(), &w, None, &y).unwrap();
        let plain = token_logps(&h.as_tensor().matmul(&w.t().unwrap()).unwrap(), &y).unwrap();
        let d = (&fused - &plain).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{d}");
        let wr = Tensor::arange(0f32, n as f32, &dev).unwrap().affine(0.1, -2.0).unwrap();
        let g1 = (fused * &wr).unwrap().sum_all().unwrap().backward().unwrap().get(h.as_tensor()).unwrap().clone();
        let g2 = (plain * &wr).unwrap().sum_all().unwrap().backward().unwrap().get(h.as_tensor()).unwrap().clone();
        let d = (g1 - g2).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn targets_are_shifted_and_masked() {
        // Row 0: labels [-100, 7, 8] -> positions 0, 1 predict 7, 8. Row 1: [-100, -100, 9].
        let (pos, tgt) = shifted_targets(&[-100, 7, 8, -100, -100, 9], 2, 3);
        assert_eq!(pos, vec![0, 1, 4]);
        assert_eq!(tgt, vec![7, 8, 9]);
    }
}
