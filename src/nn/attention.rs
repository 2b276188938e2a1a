//! Scaled dot-product attention with grouped queries, as one op with a backward pass.
//!
//! Queries come grouped by the key/value head they share (`(b, kv_heads, g * t, d)`, where the
//! `g` query heads of a group are stacked), so keys and values are never copied `g` times (HF's
//! `repeat_kv`). On CPU the forward pass is one kernel (scores, mask, softmax and weighted sum per
//! query row, rows spread over the team); candle's batched matmul would run `b * kv_heads` tiny
//! gemms per product, which dominated decoding time. The backward pass recomputes the
//! probabilities with candle ops. Other devices use the composed form throughout.

use crate::nn::ops::softmax_last_dim;
use crate::nn::simd::exp_shifted_sum;
use crate::nn::team::Team;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use std::sync::Arc;

/// An additive attention mask: 0 where a query may attend, `f32::MIN` elsewhere.
#[derive(Debug, Clone)]
pub struct Mask {
    /// `(b, 1, t, total)`, for the composed path.
    pub tensor: Tensor,
    /// The same values, row-major `(b, t, total)`, for the kernel.
    pub data: Arc<Vec<f32>>,
    pub t: usize,
    pub total: usize,
}

struct Attention {
    mask: Option<Mask>,
    /// Query steps per head (`t`), so row `r` of a group is step `r % t`.
    t: usize,
    scale: f32,
}

fn strided(s: &CpuStorage, l: &Layout, what: &str) -> candle_core::Result<(Vec<usize>, Vec<usize>, usize)> {
    match s {
        CpuStorage::F32(_) => {}
        _ => candle_core::bail!("attention: {what} must be f32, got {:?}", s.dtype()),
    }
    if l.dims().len() != 4 || l.stride()[3] != 1 {
        candle_core::bail!("attention: {what} must be 4-d with unit stride on the last dim, got {l:?}");
    }
    Ok((l.dims().to_vec(), l.stride().to_vec(), l.start_offset()))
}

struct SendPtr(*mut f32);
// Safety: threads write disjoint rows of the output.
unsafe impl Sync for SendPtr {}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "meet-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (qd, qst, qo) = strided(qs, ql, "q")?;
        let (kd, kst, ko) = strided(ks, kl, "k")?;
        let (vd, vst, vo) = strided(vs, vl, "v")?;
        let (b, kvh, rows, d) = (qd[0], qd[1], qd[2], qd[3]);
        let total = kd[2];
        if kd != [b, kvh, total, d] || vd != kd {
            candle_core::bail!("attention: q {qd:?}, k {kd:?}, v {vd:?} do not match");
        }
        if let Some(m) = &self.mask {
            if m.t != self.t || m.total != total || m.data.len() != b * m.t * total {
                candle_core::bail!("attention: mask ({}, {}) does not fit t={} and {total} keys", m.t, m.total, self.t);
            }
        }
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else { unreachable!() };
        let mut out = vec![0f32; b * kvh * rows * d];
        let dst = SendPtr(out.as_mut_ptr());
        // Work units are blocks of up to RB query rows of one (batch, kv head): each key and
        // value row is loaded once per block, not once per query row.
        const RB: usize = 8;
        let blocks = rows.div_ceil(RB);
        Team::global().for_chunks(b * kvh * blocks, 1, &|range| {
            let dst = &dst;
            let mut p = vec![0f32; RB * total];
            for unit in range {
                let (bh, r0) = (unit / blocks, (unit % blocks) * RB);
                let nr = RB.min(rows - r0);
                let (bi, hi) = (bh / kvh, bh % kvh);
                let qrow = |r: usize| &q[qo + bi * qst[0] + hi * qst[1] + (r0 + r) * qst[2]..][..d];
                let kbase = ko + bi * kst[0] + hi * kst[1];
                let vbase = vo + bi * vst[0] + hi * vst[1];
                for j in 0..total {
                    let kj = &k[kbase + j * kst[2]..][..d];
                    for r in 0..nr {
                        p[r * total + j] = dot(qrow(r), kj) * self.scale;
                    }
                }
                for r in 0..nr {
                    let pr = &mut p[r * total..(r + 1) * total];
                    if let Some(m) = &self.mask {
                        let mrow = &m.data[(bi * self.t + (r0 + r) % self.t) * total..][..total];
                        pr.iter_mut().zip(mrow).for_each(|(x, mv)| *x += mv);
                    }
                    let max = pr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let inv = 1.0 / exp_shifted_sum(pr, max);
                    pr.iter_mut().for_each(|x| *x *= inv);
                }
                // Safety: rows r0..r0+nr of this (batch, head) belong to this thread alone.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add((bh * rows + r0) * d), nr * d) };
                o.fill(0.0);
                for j in 0..total {
                    let vj = &v[vbase + j * vst[2]..][..d];
                    for r in 0..nr {
                        let w = p[r * total + j];
                        if w != 0.0 {
                            for (oi, vi) in o[r * d..(r + 1) * d].iter_mut().zip(vj) {
                                *oi += w * vi;
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, kvh, rows, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // p = softmax(s), s = q k^T * scale + mask; o = p v.
        // dv = p^T do; dp = do v^T; ds = p * (dp - rowsum(dp * p)); dq = ds k * scale;
        // dk = ds^T q * scale. Rows of a group share k and v, so the group sums come for free.
        let p = probs(q, k, self.mask.as_ref(), self.t, self.scale as f64)?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let dv = p.t()?.matmul(dout)?;
        let dp = dout.matmul(&v.t()?)?;
        let ds = ((&dp - (&dp * &p)?.sum_keepdim(D::Minus1)?.broadcast_as(dp.shape())?)? * &p)?;
        let dq = (ds.matmul(&k)? * self.scale as f64)?;
        let dk = (ds.t()?.matmul(&q.contiguous()?)? * self.scale as f64)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes let the compiler vectorise without reassociating a single sum.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Attention probabilities `(b, kvh, g*t, T)` from differentiable candle ops.
fn probs(q: &Tensor, k: &Tensor, mask: Option<&Mask>, t: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (b, kvh, rows, _) = q.dims4()?;
    let total = k.dim(2)?;
    let s = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
    let s = match mask {
        // (b, kvh, g, t, T) + (b, 1, 1, t, T)
        Some(m) => s
            .reshape((b, kvh, rows / t, t, total))?
            .broadcast_add(&m.tensor.unsqueeze(1)?)?
            .reshape((b, kvh, rows, total))?,
        None => s,
    };
    softmax_last_dim(&s)
}

/// `softmax(q k^T * scale + mask) v` for grouped queries `q: (b, kvh, g*t, d)` and keys/values
/// `(b, kvh, T, d)`; returns `(b, kvh, g*t, d)`. Differentiable in q, k and v.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Mask>,
    t: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == candle_core::DType::F32 {
        let op = Attention { mask: mask.cloned(), t, scale: scale as f32 };
        q.contiguous()?.apply_op3(k, v, op)
    } else {
        attention_composed(q, k, v, mask, t, scale)
    }
}

/// [`attention`] from candle ops (any device, and the tests' reference).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Mask>,
    t: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    probs(q, k, mask, t, scale)?.matmul(&v.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> =
            (0..n).map(|i| ((((i as u64 + 7) * 2654435761) ^ (seed * 97)) % 1000) as f32 / 500.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn causal_mask(b: usize, t: usize, past: usize) -> Mask {
        let total = past + t;
        let data: Vec<f32> =
            (0..b * t * total).map(|i| if i % total > past + (i / total) % t { f32::MIN } else { 0.0 }).collect();
        let tensor = Tensor::from_vec(data.clone(), (b, 1, t, total), &Device::Cpu).unwrap();
        Mask { tensor, data: Arc::new(data), t, total }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn kernel_matches_composed_forward_and_backward() {
        // b=2, kv heads 2, groups of 3 query heads, t=4 new steps after 2 cached, d=8.
        let (b, kvh, g, t, past, d) = (2, 2, 3, 4, 2, 8);
        let mask = causal_mask(b, t, past);
        let q = Var::from_tensor(&rand(&[b, kvh, g * t, d], 1)).unwrap();
        // Keys as a strided view of a larger cache, as during generation.
        let cache = rand(&[b, kvh, 10, d], 2);
        let k = Var::from_tensor(&cache.narrow(2, 0, past + t).unwrap().contiguous().unwrap()).unwrap();
        let v = Var::from_tensor(&rand(&[b, kvh, past + t, d], 3)).unwrap();
        let a = attention(&q, &k, &v, Some(&mask), t, 0.35).unwrap();
        let c = attention_composed(&q, &k, &v, Some(&mask), t, 0.35).unwrap();
        assert!(max_diff(&a, &c) < 1e-6);
        let strided = attention(&q, &cache.narrow(2, 0, past + t).unwrap(), &v, Some(&mask), t, 0.35).unwrap();
        assert!(max_diff(&a, &strided) < 1e-6);
        let probe = rand(&[b, kvh, g * t, d], 4);
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (c * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (x, y) = (ga.get(var.as_tensor()).unwrap(), gc.get(var.as_tensor()).unwrap());
            assert!(max_diff(x, y) < 1e-5, "d{name}");
        }
    }
}
