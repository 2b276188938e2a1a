//! Log-probabilities of the labelled tokens of a batch under a policy — the one forward pass
//! every objective uses — and the fused token log-probability op beneath it.
//!
//! `log p(y) = x_y - logsumexp(x)` per row, without materialising `log_softmax` over the
//! vocabulary (49k columns for SmolLM2): the forward keeps one `logsumexp` per row, the backward
//! writes `g (onehot(y) - softmax(x))` straight into the logits' gradient.

use crate::nn::bf16::sgemm_autocast;
use crate::nn::linear::input_grad_product;
use crate::nn::ops::{f32_slice, with_f32};
use crate::nn::simd::{exp_shifted_sum, log_sum_exp};
use crate::nn::team::{SharedMut, Team};
use crate::policy::{Batch, Policy};
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
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
    let logps = match policy.pretrained.model.dense_lm_head() {
        Some(d) if d.w.is_variable() => trainable_head_logps(&h, &d.w, &tgt)?,
        Some(d) if h.track_op() => frozen_head_logps(&h, &d.w, d.packed.clone(), d.packed_dx()?, &tgt)?,
        _ => token_logps(&policy.pretrained.model.lm_head(&h)?, &tgt)?, // logits (labelled, v)
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

/// `log p(target_r) = x_r[target_r] - logsumexp(x_r)` of every row of `x` (`v` columns), and
/// each row's logsumexp.
fn row_logps(x: &[f32], v: usize, targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let n = targets.len();
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
                *po.0.add(r) = row[targets[r] as usize] - z;
            }
        }
    });
    (out, lse)
}

/// Turns logits `x` (rows of `v`) into the gradient of `Σ_r g_r log p(target_r)`:
/// `g_r (onehot(target_r) − softmax(x_r))`, in place, given each row's logsumexp.
fn logits_grad_in_place(x: &mut [f32], v: usize, g: &[f32], lse: &[f32], targets: &[u32]) {
    let p = SharedMut(x.as_mut_ptr());
    Team::global().for_chunks(targets.len(), 1, &|rows| {
        let p = &p;
        for r in rows {
            // Safety: row r is written by this thread only.
            let d = unsafe { std::slice::from_raw_parts_mut(p.0.add(r * v), v) };
            if g[r] == 0.0 {
                d.fill(0.0);
                continue;
            }
            exp_shifted_sum(d, lse[r]);
            let s = -g[r];
            d.iter_mut().for_each(|e| *e *= s);
            d[targets[r] as usize] += g[r];
        }
    });
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
        let (out, lse) = row_logps(x, v, &self.targets);
        *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = lse;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = x.dims2()?;
        let g = dy.to_vec1::<f32>()?;
        let lse = self.lse.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut dx = with_f32(x, |x| x.to_vec())?;
        logits_grad_in_place(&mut dx, v, &g, &lse, &self.targets);
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
    /// `W` packed for the input gradient's product (inside autocast).
    packed_dx: Option<Arc<crate::nn::bf16::PackedB>>,
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
        // Both written in full: every row of every chunk below (`dh` by a product that does not
        // accumulate).
        let mut out = crate::nn::unfilled(n);
        let mut dh = crate::nn::unfilled(n * hidden);
        // 50 MB: above the allocator's mmap threshold, so a fresh buffer per step is fresh pages
        // (12k page faults and their zeroing per step).
        let mut logits = take_logit_buffer(CHUNK.min(n) * v);
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
                        let max = crate::nn::simd::max(row);
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
                let dhc = &mut dh[r0 * hidden..(r0 + c) * hidden];
                input_grad_product(z, w, self.packed_dx.as_deref(), (c, v, hidden), dhc);
            }
        })?;
        keep_logit_buffer(logits);
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
/// `packed`, `packed_dx`: the head packed for bf16 products (`h Wᵀ`, `dz W`), used inside autocast.
pub fn frozen_head_logps(
    h: &Tensor,
    w: &Tensor,
    packed: Option<Arc<crate::nn::bf16::PackedB>>,
    packed_dx: Option<Arc<crate::nn::bf16::PackedB>>,
    targets: &[u32],
) -> Result<Tensor> {
    let op = FrozenHeadLogps {
        w: w.clone(),
        packed,
        packed_dx,
        targets: Arc::new(targets.to_vec()),
        dh: Mutex::new(Vec::new()),
    };
    Ok(h.contiguous()?.apply_op1(op)?)
}

/// Logit buffers of [`TrainableHeadLogps`] and [`FrozenHeadLogps`]' chunks, kept between steps: a
/// fresh `(n, v)` buffer per step (100 MB for a 4x128 batch of SmolLM2) costs ~25k page faults,
/// more than its products.
static LOGIT_BUFFERS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
/// Most buffers kept (a DPO step holds two heads' logits at once at most), and the largest kept
/// (in values: 256 MB; a larger batch's logits are freed after use, not held for the process).
const KEPT_BUFFERS: usize = 2;
const KEPT_MAX_LEN: usize = 64 << 20;

fn take_logit_buffer(len: usize) -> Vec<f32> {
    let mut b = LOGIT_BUFFERS.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
    b.resize(len, 0.0);
    b
}

fn keep_logit_buffer(b: Vec<f32>) {
    let mut kept = LOGIT_BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
    if kept.len() < KEPT_BUFFERS && b.len() <= KEPT_MAX_LEN {
        kept.push(b);
    }
}

/// `log p(target_i | h_i W^T)` with a trainable head `W: [v, hidden]` (full fine-tuning's tied
/// LM head): the logits live in a reused buffer ([`LOGIT_BUFFERS`]) that the backward turns into
/// their gradient in place before `dh = dz W` and `dW (+)= dzᵀ h` (into `W`'s gradient buffer
/// when it has one) — the products, order and values of the head's linear layer followed by
/// [`token_logps`], without two fresh logit-sized tensors per step.
struct TrainableHeadLogps {
    targets: Arc<Vec<u32>>,
    /// The forward's logits and each row's logsumexp, for the backward.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl Drop for TrainableHeadLogps {
    fn drop(&mut self) {
        if let Some((z, _)) = self.saved.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            keep_logit_buffer(z);
        }
    }
}

impl CustomOp2 for TrainableHeadLogps {
    fn name(&self) -> &'static str {
        "meet-head-logps"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, w) = (f32_slice(s1, l1, "head log-probs")?, f32_slice(s2, l2, "head log-probs")?);
        let (n, hidden) = l1.shape().dims2()?;
        let (v, wh) = l2.shape().dims2()?;
        if wh != hidden {
            candle_core::bail!("head log-probs: hidden states of width {hidden} for a head of width {wh}");
        }
        check_targets(&self.targets, n, v)?;
        let mut z = take_logit_buffer(n * v);
        sgemm_autocast(n, v, hidden, h, false, w, true, &mut z, false);
        let (out, lse) = row_logps(&z, v, &self.targets);
        if let Some((old, _)) = self.saved.lock().unwrap_or_else(|p| p.into_inner()).replace((z, lse)) {
            keep_logit_buffer(old);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, hidden) = h.dims2()?;
        let v = w.dim(0)?;
        let g = dy.to_vec1::<f32>()?;
        let Some((mut dz, lse)) = self.saved.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            candle_core::bail!("head log-probs: backward without a forward pass");
        };
        logits_grad_in_place(&mut dz, v, &g, &lse, &self.targets);
        let (dh, dw) = crate::nn::linear::product_backward(&dz, h, w, None, true)?;
        keep_logit_buffer(dz);
        let dh = h.track_op().then(|| Tensor::from_vec(dh, (n, hidden), h.device())).transpose()?;
        Ok((dh, dw))
    }
}

/// [`token_logps`] of `h W^T` for a trainable LM head `w` (a `Var` on the CPU): see
/// [`TrainableHeadLogps`].
pub fn trainable_head_logps(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let op = TrainableHeadLogps { targets: Arc::new(targets.to_vec()), saved: Mutex::new(None) };
    Ok(h.contiguous()?.apply_op2(&w.contiguous()?, op)?)
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
        let fused = frozen_head_logps(h.as_tensor(), &w, None, None, &y).unwrap();
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
    fn the_frozen_head_ignores_what_a_kept_logit_buffer_held() {
        // The chunk buffer comes from the kept ones: leave a NaN-filled one there (more rows than
        // a chunk, so a second, shorter chunk reuses its head) and expect the fresh values.
        let dev = Device::Cpu;
        let (n, hidden, v) = (300, 8, 50);
        {
            let mut kept = LOGIT_BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
            kept.clear();
            kept.push(vec![f32::NAN; 1000 * v]);
        }
        let h: Vec<f32> = (0..n * hidden).map(|i| ((i * 7919) % 97) as f32 / 40.0 - 1.2).collect();
        let w: Vec<f32> = (0..v * hidden).map(|i| ((i * 104729) % 89) as f32 / 50.0 - 0.9).collect();
        let h = Tensor::from_vec(h, (n, hidden), &dev).unwrap();
        let w = Tensor::from_vec(w, (v, hidden), &dev).unwrap();
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
        let plain = token_logps(&h.matmul(&w.t().unwrap()).unwrap(), &y).unwrap();
        for _ in 0..2 {
            let fused = frozen_head_logps(&h, &w, None, None, &y).unwrap();
            let d = (&fused - &plain).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "{d}");
        }
    }

    #[test]
    fn the_fused_trainable_head_gives_the_bits_of_the_linear_layer_then_log_probs() {
        let dev = Device::Cpu;
        let (n, hidden, v) = (70, 24, 300);
        let h: Vec<f32> = (0..n * hidden).map(|i| ((i * 7919) % 97) as f32 / 40.0 - 1.2).collect();
        let w: Vec<f32> = (0..v * hidden).map(|i| ((i * 104729) % 89) as f32 / 50.0 - 0.9).collect();
        let h = Var::from_vec(h, (n, hidden), &dev).unwrap();
        let w = Var::from_vec(w, (v, hidden), &dev).unwrap();
        let head = crate::nn::linear::Linear::new(w.as_tensor().clone(), None);
        let y: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
        let wr = Tensor::arange(0f32, n as f32, &dev).unwrap().affine(0.1, -2.0).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let plain = token_logps(&head.forward(h.as_tensor()).unwrap(), &y).unwrap();
        let gp = (&plain * &wr).unwrap().sum_all().unwrap().backward().unwrap();
        for buffered in [false, true] {
            let buf = buffered.then(|| crate::nn::grad::register(w.as_tensor()));
            let fused = trainable_head_logps(h.as_tensor(), w.as_tensor(), &y).unwrap();
            assert_eq!(bits(&fused), bits(&plain));
            let gf = (&fused * &wr).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(bits(gf.get(h.as_tensor()).unwrap()), bits(gp.get(h.as_tensor()).unwrap()));
            let want = bits(gp.get(w.as_tensor()).unwrap());
            match buf {
                Some(b) => {
                    assert!(gf.get(w.as_tensor()).is_none());
                    assert_eq!(b.with(|d| d.to_vec()).unwrap(), want);
                    crate::nn::grad::unregister(w.as_tensor());
                }
                None => assert_eq!(bits(gf.get(w.as_tensor()).unwrap()), want),
            }
        }
        assert!(trainable_head_logps(h.as_tensor(), w.as_tensor(), &y[1..]).is_err());
    }

    #[test]
    fn targets_are_shifted_and_masked() {
        // Row 0: labels [-100, 7, 8] -> positions 0, 1 predict 7, 8. Row 1: [-100, -100, 9].
        let (pos, tgt) = shifted_targets(&[-100, 7, 8, -100, -100, 9], 2, 3);
        assert_eq!(pos, vec![0, 1, 4]);
        assert_eq!(tgt, vec![7, 8, 9]);
    }
}
