//! Scaled dot-product attention with grouped queries, as one op with a backward pass.
//!
//! Layouts are the projections' own: queries and output `(b, t, heads, d)`, keys and values
//! `(b, T, kv_heads, d)` (any strides with a contiguous last dim, e.g. views of a KV cache), so no
//! transposes are copied. Query head `j * g + i` uses kv head `j` (HF's `repeat_kv`) without the
//! keys and values ever being repeated. On CPU the forward pass is one kernel (scores, mask,
//! softmax and weighted sum for blocks of query rows that share a kv head, spread over the team);
//! candle's batched matmul would run `b * kv_heads` tiny gemms per product, which dominated
//! decoding time; long inputs (training, prefill) run as per-head matrix products instead. Both
//! keep the probabilities, and the backward pass is per-head products over them, one (batch, kv
//! head) per work unit. Other devices use the composed form throughout.

use crate::nn::gemm::{sgemm_view, View};
use crate::nn::ops::{softmax_last_dim, with_f32};
use crate::nn::simd::{dot_block, exp_shifted_sum, weighted_rows};
use crate::nn::team::{SharedMut, Team};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

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
    scale: f32,
    /// Whether a backward pass may follow (an input tracks gradients): only then are the
    /// probabilities kept (decoding skips writing `b·h·t·T` of them per layer and step).
    keep_probs: bool,
    /// Probabilities `(b, h, t, T)` kept by a long forward pass for the backward pass.
    probs: Mutex<Option<Vec<f32>>>,
}

/// From this many query steps on, attention runs as per-head matrix products (training,
/// prefill); shorter calls (decoding) use the row kernel.
const GEMM_MIN_T: usize = 16;

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
        let (b, t, h, d) = (qd[0], qd[1], qd[2], qd[3]);
        let (total, kvh) = (kd[1], kd[2]);
        if kd != [b, total, kvh, d] || vd != kd || kvh == 0 || h % kvh != 0 {
            candle_core::bail!("attention: q {qd:?}, k {kd:?}, v {vd:?} do not match");
        }
        if let Some(m) = &self.mask {
            if m.t != t || m.total != total || m.data.len() != b * t * total {
                candle_core::bail!("attention: mask ({}, {}) does not fit t={t} and {total} keys", m.t, m.total);
            }
        }
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else { unreachable!() };
        let g = h / kvh;
        if t >= GEMM_MIN_T {
            let mut out = vec![0f32; b * t * h * d];
            let mut probs = vec![0f32; b * h * t * total];
            let (po, pp) = (SharedMut(out.as_mut_ptr()), SharedMut(probs.as_mut_ptr()));
            Team::global().for_chunks(b * h, 1, &|units| {
                let (po, pp) = (&po, &pp);
                for unit in units {
                    let (bi, head) = (unit / h, unit % h);
                    let hi = head / g;
                    // Safety: each unit writes its own (bi, head) block of probs and output rows;
                    // the views stay inside q, k, v (checked dims and strides).
                    unsafe {
                        let p = pp.0.add(unit * t * total);
                        let qv =
                            View { ptr: q.as_ptr().add(qo + bi * qst[0] + head * qst[2]), rs: qst[1] as isize, cs: 1 };
                        let kt =
                            View { ptr: k.as_ptr().add(ko + bi * kst[0] + hi * kst[2]), rs: 1, cs: kst[1] as isize };
                        sgemm_view(t, total, d, qv, kt, p, total as isize, false, self.scale);
                        let p = std::slice::from_raw_parts_mut(p, t * total);
                        for (ti, row) in p.chunks_exact_mut(total).enumerate() {
                            if let Some(m) = &self.mask {
                                row.iter_mut()
                                    .zip(&m.data[(bi * t + ti) * total..][..total])
                                    .for_each(|(x, mv)| *x += mv);
                            }
                            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                            let inv = 1.0 / exp_shifted_sum(row, max);
                            row.iter_mut().for_each(|x| *x *= inv);
                        }
                        let pv = View { ptr: p.as_ptr(), rs: total as isize, cs: 1 };
                        let vv =
                            View { ptr: v.as_ptr().add(vo + bi * vst[0] + hi * vst[2]), rs: vst[1] as isize, cs: 1 };
                        sgemm_view(
                            t,
                            d,
                            total,
                            pv,
                            vv,
                            po.0.add((bi * t * h + head) * d),
                            (h * d) as isize,
                            false,
                            1.0,
                        );
                    }
                }
            });
            *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(probs);
            return Ok((CpuStorage::F32(out), Shape::from((b, t, h, d))));
        }
        let rows = g * t; // query rows per (batch, kv head): row r is head j*g + r/t at step r%t
        let mut out = vec![0f32; b * t * h * d];
        let dst = SharedMut(out.as_mut_ptr());
        // Work units are blocks of up to RB query rows of one (batch, kv head): each key and
        // value row is loaded once per block, not once per query row.
        const RB: usize = 8;
        let blocks = rows.div_ceil(RB);
        // Probabilities `(b, h, t, T)` for the backward pass, only when one may follow (not in
        // generation).
        let mut probs = if self.keep_probs { vec![0f32; b * h * t * total] } else { Vec::new() };
        let pp = SharedMut(probs.as_mut_ptr());
        Team::global().for_chunks(b * kvh * blocks, 1, &|range| {
            let (dst, pp) = (&dst, &pp);
            let mut p = vec![0f32; RB * total];
            let mut qs = vec![0f32; RB * d];
            for unit in range {
                let (bh, r0) = (unit / blocks, (unit % blocks) * RB);
                let nr = RB.min(rows - r0);
                let (bi, hi) = (bh / kvh, bh % kvh);
                // (step, head) of row r0 + r.
                let at = |r: usize| ((r0 + r) % t, hi * g + (r0 + r) / t);
                let qrow = |r: usize| {
                    let (ti, head) = at(r);
                    &q[qo + bi * qst[0] + ti * qst[1] + head * qst[2]..][..d]
                };
                let kbase = ko + bi * kst[0] + hi * kst[2];
                let vbase = vo + bi * vst[0] + hi * vst[2];
                // The block's query rows side by side, then every key against all of them.
                for r in 0..nr {
                    qs[r * d..(r + 1) * d].copy_from_slice(qrow(r));
                }
                dot_block(&qs, d, nr, &k[kbase..], kst[1], total, d, &mut p, total);
                for r in 0..nr {
                    let pr = &mut p[r * total..(r + 1) * total];
                    match &self.mask {
                        Some(m) => {
                            let mrow = &m.data[(bi * t + at(r).0) * total..][..total];
                            pr.iter_mut().zip(mrow).for_each(|(x, mv)| *x = *x * self.scale + mv);
                        }
                        None => pr.iter_mut().for_each(|x| *x *= self.scale),
                    }
                    let max = pr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let inv = 1.0 / exp_shifted_sum(pr, max);
                    pr.iter_mut().for_each(|x| *x *= inv);
                }
                for r in 0..nr {
                    let (ti, head) = at(r);
                    // Safety: output row (bi, ti, head) and its probabilities belong to this unit.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(((bi * t + ti) * h + head) * d), d) };
                    if self.keep_probs {
                        unsafe { std::slice::from_raw_parts_mut(pp.0.add(((bi * h + head) * t + ti) * total), total) }
                            .copy_from_slice(&p[r * total..(r + 1) * total]);
                    }
                    weighted_rows(&p[r * total..(r + 1) * total], &v[vbase..], vst[1], o);
                }
            }
        });
        if self.keep_probs {
            *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, t, h, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match self.probs.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(probs) => self.bwd_gemm(q, k, v, dout, probs),
            None => candle_core::bail!("attention backward: the forward pass kept no probabilities"),
        }
    }
}

impl Attention {
    /// The backward pass with the forward's probabilities, as matrix products per head:
    /// `dP = dO Vᵀ`, `dV += Pᵀ dO`, `dS = P ∘ (dP − rowsum(dP ∘ P))`, `dQ = s dS K`, `dK += s dSᵀ Q`.
    /// One work unit per (batch, kv head) owns that head's key and value gradients.
    fn bwd_gemm(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dout: &Tensor,
        probs: &[f32],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, h, d) = q.dims4()?;
        let (total, kvh) = (k.dim(1)?, k.dim(2)?);
        let g = h / kvh;
        if probs.len() != b * h * t * total {
            candle_core::bail!("attention backward: saved probabilities do not match the inputs");
        }
        let mut dq = vec![0f32; b * t * h * d];
        let mut dk = vec![0f32; b * total * kvh * d];
        let mut dv = vec![0f32; b * total * kvh * d];
        let (pq, pk, pv) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let scale = self.scale;
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(dout, |dout| {
                        Team::global().for_chunks(b * kvh, 1, &|units| {
                            let (pq, pk, pv) = (&pq, &pk, &pv);
                            let mut ds = vec![0f32; t * total];
                            for unit in units {
                                let (bi, hi) = (unit / kvh, unit % kvh);
                                let kvo = (bi * total * kvh + hi) * d;
                                let (krs, hrs) = ((kvh * d) as isize, (h * d) as isize);
                                for head in hi * g..(hi + 1) * g {
                                    let p = &probs[(bi * h + head) * t * total..][..t * total];
                                    let ho = (bi * t * h + head) * d;
                                    // Safety: views stay inside the contiguous q, k, v, dout;
                                    // this unit alone writes dk/dv of (bi, hi) and dq of its heads.
                                    unsafe {
                                        let dov = View { ptr: dout.as_ptr().add(ho), rs: hrs, cs: 1 };
                                        let vt = View { ptr: v.as_ptr().add(kvo), rs: 1, cs: krs };
                                        sgemm_view(t, total, d, dov, vt, ds.as_mut_ptr(), total as isize, false, 1.0);
                                        let pt = View { ptr: p.as_ptr(), rs: 1, cs: total as isize };
                                        sgemm_view(total, d, t, pt, dov, pv.0.add(kvo), krs, true, 1.0);
                                    }
                                    for (dsr, pr) in ds.chunks_exact_mut(total).zip(p.chunks_exact(total)) {
                                        let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                                        dsr.iter_mut().zip(pr).for_each(|(x, &pj)| *x = pj * (*x - dot));
                                    }
                                    unsafe {
                                        let dsv = View { ptr: ds.as_ptr(), rs: total as isize, cs: 1 };
                                        let kv = View { ptr: k.as_ptr().add(kvo), rs: krs, cs: 1 };
                                        sgemm_view(t, d, total, dsv, kv, pq.0.add(ho), hrs, false, scale);
                                        let dst = View { ptr: ds.as_ptr(), rs: 1, cs: total as isize };
                                        let qv = View { ptr: q.as_ptr().add(ho), rs: hrs, cs: 1 };
                                        sgemm_view(total, d, t, dst, qv, pk.0.add(kvo), krs, true, scale);
                                    }
                                }
                            }
                        })
                    })
                })
            })
        })????;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, t, h, d), dev)?),
            Some(Tensor::from_vec(dk, (b, total, kvh, d), dev)?),
            Some(Tensor::from_vec(dv, (b, total, kvh, d), dev)?),
        ))
    }
}

/// `(b, t, h, d)` -> `(b, kvh, g*t, d)`: the query heads of each kv head stacked.
fn grouped_q(q: &Tensor, kvh: usize) -> candle_core::Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    q.transpose(1, 2)?.contiguous()?.reshape((b, kvh, h / kvh * t, d))
}

/// `(b, kvh, g*t, d)` -> `(b, t, h, d)`.
fn ungrouped_q(x: &Tensor, h: usize) -> candle_core::Result<Tensor> {
    let (b, _, rows, d) = x.dims4()?;
    let t = rows * x.dim(1)? / h;
    x.reshape((b, h, t, d))?.transpose(1, 2)?.contiguous()
}

/// `(b, T, kvh, d)` -> `(b, kvh, T, d)`.
fn grouped_kv(k: &Tensor) -> candle_core::Result<Tensor> {
    k.transpose(1, 2)?.contiguous()
}

/// Attention probabilities `(b, kvh, g*t, T)` in the grouped layout, from differentiable ops.
fn probs(q: &Tensor, k: &Tensor, mask: Option<&Mask>, t: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (b, kvh, rows, _) = q.dims4()?;
    let total = k.dim(2)?;
    let s = (q.matmul(&k.t()?)? * scale)?;
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

/// `softmax(q k^T * scale + mask) v` for queries `(b, t, h, d)` and keys/values `(b, T, kvh, d)`
/// (`h` a multiple of `kvh`); returns `(b, t, h, d)`. Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Mask>, scale: f64) -> candle_core::Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == candle_core::DType::F32 {
        let keep_probs = q.track_op() || k.track_op() || v.track_op();
        let op = Attention { mask: mask.cloned(), scale: scale as f32, keep_probs, probs: Mutex::new(None) };
        q.apply_op3(k, v, op)
    } else {
        attention_composed(q, k, v, mask, scale)
    }
}

/// [`attention`] from candle ops (any device, and the tests' reference).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Mask>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let kvh = k.dim(2)?;
    let p = probs(&grouped_q(q, kvh)?, &grouped_kv(k)?, mask, q.dim(1)?, scale)?;
    ungrouped_q(&p.matmul(&grouped_kv(v)?)?, q.dim(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

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
        // b=2, kv heads 2, groups of 3 query heads, t new steps after 2 cached, d=8: t=4 runs
        // the row kernel and the recomputing backward, t=20 the per-head products.
        for t in [4, GEMM_MIN_T + 4] {
            check_against_composed(t);
        }
    }

    fn check_against_composed(t: usize) {
        let (b, kvh, g, past, d) = (2, 2, 3, 2, 8);
        let mask = causal_mask(b, t, past);
        let q = Var::from_tensor(&rand(&[b, t, kvh * g, d], 1)).unwrap();
        // Keys as a strided view of a larger cache, as during generation.
        let cache = rand(&[b, past + t + 4, kvh, d], 2);
        let k = Var::from_tensor(&cache.narrow(1, 0, past + t).unwrap().contiguous().unwrap()).unwrap();
        let v = Var::from_tensor(&rand(&[b, past + t, kvh, d], 3)).unwrap();
        let a = attention(&q, &k, &v, Some(&mask), 0.35).unwrap();
        let c = attention_composed(&q, &k, &v, Some(&mask), 0.35).unwrap();
        assert_eq!(a.dims(), &[b, t, kvh * g, d]);
        assert!(max_diff(&a, &c) < 1e-6);
        let strided = attention(&q, &cache.narrow(1, 0, past + t).unwrap(), &v, Some(&mask), 0.35).unwrap();
        assert!(max_diff(&a, &strided) < 1e-6);
        let probe = rand(&[b, t, kvh * g, d], 4);
        let ga = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (c * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (x, y) = (ga.get(var.as_tensor()).unwrap(), gc.get(var.as_tensor()).unwrap());
            assert_eq!(x.dims(), var.dims(), "d{name} shape");
            assert!(max_diff(x, y) < 1e-5, "d{name}");
        }
    }

    #[test]
    fn heads_use_their_own_kv_group() {
        // With kv head 1's values all zero, the query heads of group 1 must output zeros.
        let (b, t, kvh, g, d) = (1, 3, 2, 2, 4);
        let q = rand(&[b, t, kvh * g, d], 5);
        let k = rand(&[b, t, kvh, d], 6);
        let v =
            Tensor::cat(&[rand(&[b, t, 1, d], 7), Tensor::zeros((b, t, 1, d), DType::F32, &Device::Cpu).unwrap()], 2)
                .unwrap();
        let o = attention(&q, &k, &v, Some(&causal_mask(b, t, 0)), 0.5).unwrap();
        let group1 = o.narrow(2, g, g).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let group0 = o.narrow(2, 0, g).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(group1, 0.0);
        assert!(group0 > 0.0);
    }
}
