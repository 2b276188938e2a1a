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
use crate::nn::simd::{self, dot_block, exp_shifted_sum, weighted_rows};
use crate::nn::team::{SharedMut, Team};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// A causal attention mask with hidden keys: query step `i` of `t` (after `past` cached steps)
/// sees key `j` when `j <= past + i` and key `j` of its batch row is not hidden (left padding, the
/// gap after a soft prompt). As an additive mask (transformers' eager attention): 0 where a query
/// may attend, `f32::MIN` elsewhere. Kept in this form, not as `b·t·total` floats (256 MB for one
/// 8k prompt), and the kernel skips the keys past the causal limit instead of scoring them.
#[derive(Debug, Clone)]
pub struct Mask {
    pub b: usize,
    pub t: usize,
    pub total: usize,
    pub past: usize,
    /// `b` rows of `total` flags, `true` = hidden; `None`: only the causal rule.
    pub hidden: Option<Arc<Vec<bool>>>,
    /// A sliding window (GPT-Neo's local layers): step `i` sees only the `window` keys ending
    /// at `past + i`.
    pub window: Option<usize>,
}

impl Mask {
    /// The causal mask of `t` steps after `past`, with `hidden` keys (`b` rows of `past + t`).
    pub fn causal(b: usize, t: usize, past: usize, hidden: Option<Vec<bool>>) -> Self {
        Self { b, t, total: past + t, past, hidden: hidden.map(Arc::new), window: None }
    }

    /// The same mask limited to a sliding window of `window` keys.
    pub fn with_window(self, window: usize) -> Self {
        Self { window: Some(window), ..self }
    }

    /// Keys before this one are outside step `i`'s window.
    pub fn visible_start(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (self.past + i + 1).saturating_sub(w))
    }

    /// Whether the window hides any key from any step (else it is the plain causal mask).
    fn window_cuts(&self) -> bool {
        self.window.is_some_and(|w| self.total > w)
    }

    /// Keys `0..end` may be visible to step `i`; none after.
    pub fn visible_end(&self, i: usize) -> usize {
        (self.past + i + 1).min(self.total)
    }

    /// Whether batch row `bi` hides key `j` regardless of the step.
    fn hides(&self, bi: usize, j: usize) -> bool {
        self.hidden.as_ref().is_some_and(|h| h[bi * self.total + j])
    }

    /// The additive mask `(b, 1, t, total)`, for the composed path.
    pub fn tensor(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        let mut m = vec![0f32; self.b * self.t * self.total];
        for (row, out) in m.chunks_exact_mut(self.total).enumerate() {
            let (bi, i) = (row / self.t, row % self.t);
            for (j, x) in out.iter_mut().enumerate() {
                if j >= self.visible_end(i) || j < self.visible_start(i) || self.hides(bi, j) {
                    *x = f32::MIN;
                }
            }
        }
        Tensor::from_vec(m, (self.b, 1, self.t, self.total), device)
    }
}

/// Scores of step `i` of batch row `bi` (`row[j]`, keys `0..row.len()`) turned into attention
/// probabilities in place: hidden keys and those past the causal limit get 0. A step that sees
/// no key at all spreads evenly over every one of the `total` keys, as `f32::MIN` everywhere does
/// in transformers; then `true` is returned (the row holds `1 / total` each).
fn softmax_row(row: &mut [f32], mask: Option<&Mask>, bi: usize, i: usize, total: usize) -> bool {
    let Some(m) = mask else {
        let max = simd::max(row);
        let inv = 1.0 / exp_shifted_sum(row, max);
        row.iter_mut().for_each(|x| *x *= inv);
        return false;
    };
    let end = m.visible_end(i).min(row.len());
    if let Some(h) = &m.hidden {
        for (x, &hid) in row[..end].iter_mut().zip(&h[bi * m.total..][..end]) {
            if hid {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let (seen, rest) = row.split_at_mut(end);
    let max = simd::max(seen);
    if max == f32::NEG_INFINITY {
        let u = 1.0 / total as f32;
        seen.iter_mut().chain(rest.iter_mut()).for_each(|x| *x = u);
        return true;
    }
    let inv = 1.0 / exp_shifted_sum(seen, max);
    seen.iter_mut().for_each(|x| *x *= inv);
    rest.fill(0.0);
    false
}

struct Attention {
    mask: Option<Mask>,
    scale: f32,
    /// Whether a backward pass may follow (an input tracks gradients): only then are the
    /// probabilities kept (decoding skips writing `b·h·t·T` of them per layer and step).
    keep_probs: bool,
    /// Probabilities `(b, h, t, T)` kept by a long forward pass for the backward pass.
    probs: Mutex<Option<Vec<f32>>>,
    /// Steps per block of the training products ([`CAUSAL_BLOCK`]; the tests vary it).
    block: usize,
}

/// From this many query steps on, attention runs as per-head matrix products (training,
/// prefill); shorter calls (decoding) use the row kernel.
const GEMM_MIN_T: usize = 16;

/// Query steps per work unit of the long forward pass without a backward (prefill): its scores
/// are `g·CHUNK × keys` for the g query heads of a kv head (6 MB at 8k keys) instead of a `t × T`
/// matrix per head, and only the keys up to the chunk's causal limit are scored.
const CHUNK: usize = 64;

/// Keys per block of the prefill pass: a block's scores (`g·CHUNK × KEY_BLOCK`, 384 KB) stay in
/// cache between the score product, the softmax and the value product.
const KEY_BLOCK: usize = 512;

/// Query (and key) steps per block of the training products. A block of queries scores only the
/// keys up to its last step's causal limit, and a block of keys is reached only by the queries
/// from the first one that sees it: the skipped products are the masked ones, exact zeros in the
/// sums they entered, so causal attention does about half the multiply-adds (a 4x128 batch: a
/// quarter fewer) with the same bits as whole products, tested up to 148 steps. Longer sums may
/// round differently: the `gemm` crate splits a sum by its length (a 1x1024 LoRA step's second loss
/// moved in the 7th digit). Blocks are at least this long (the last takes the remainder), so no
/// product shrinks to a vector one.
const CAUSAL_BLOCK: usize = 64;

/// `0..n` in blocks of `block` steps, the last one taking the remainder (one block if `n` is
/// shorter than two).
fn blocks(n: usize, block: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let count = (n / block.max(1)).max(1);
    (0..count).map(move |i| i * block..if i + 1 == count { n } else { (i + 1) * block })
}

/// How far the causal rule lets the training products stop, per batch row.
struct Reach {
    past: usize,
    total: usize,
    /// Per batch row: whether the causal cut applies (a mask, and no step that sees no key: such
    /// a step spreads evenly over every key).
    causal: Vec<bool>,
}

impl Reach {
    fn new(mask: Option<&Mask>, b: usize, t: usize, total: usize) -> Self {
        let causal = (0..b)
            .map(|bi| {
                mask.is_some_and(|m| {
                    // The first key this row does not hide; step 0 sees keys 0..visible_end(0).
                    let first = (0..total).find(|&j| !m.hides(bi, j)).unwrap_or(total);
                    t == 0 || m.visible_end(0) > first
                })
            })
            .collect();
        Self { past: mask.map_or(0, |m| m.past), total, causal }
    }

    /// Keys the query steps `rows` of batch row `bi` may see (with nonzero probability).
    fn key_end(&self, bi: usize, rows: &std::ops::Range<usize>) -> usize {
        if self.causal[bi] {
            (self.past + rows.end).min(self.total)
        } else {
            self.total
        }
    }

    /// The first query step that may see a key of `keys` in batch row `bi`.
    fn first_query(&self, bi: usize, keys: &std::ops::Range<usize>) -> usize {
        if self.causal[bi] {
            keys.start.saturating_sub(self.past)
        } else {
            0
        }
    }
}

thread_local! {
    /// Each team thread's scores, gathered queries and outputs of a prefill chunk, kept between
    /// calls (allocating and zeroing megabytes per chunk showed up as memset in profiles).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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
            if m.b != b || m.t != t || m.total != total || m.hidden.as_ref().is_some_and(|h| h.len() != b * total) {
                candle_core::bail!(
                    "attention: mask ({}, {}, {}) does not fit b={b}, t={t} and {total} keys",
                    m.b,
                    m.t,
                    m.total
                );
            }
        }
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else { unreachable!() };
        let g = h / kvh;
        let mask = self.mask.as_ref();
        if t >= GEMM_MIN_T && !self.keep_probs {
            // Prefill: chunks of query steps, each scoring only the keys its causal limit allows;
            // the g query heads of a kv head go through one product with its keys.
            let chunks = t.div_ceil(CHUNK);
            let units = b * kvh * chunks;
            let mut out = vec![0f32; b * t * h * d];
            let po = SharedMut(out.as_mut_ptr());
            Team::global().for_chunks(units, 1, &|range| {
                let po = &po;
                SCRATCH.with_borrow_mut(|scratch| {
                    for unit in range {
                        // The last chunks (most keys) first, so the dynamic split ends evenly.
                        let unit = units - 1 - unit;
                        let (bh, c) = (unit % (b * kvh), unit / (b * kvh));
                        let (bi, hi) = (bh / kvh, bh % kvh);
                        let t0 = c * CHUNK;
                        let rows = CHUNK.min(t - t0);
                        let keys = mask.map_or(total, |m| m.visible_end(t0 + rows - 1));
                        let m = g * rows;
                        scratch.resize(m * KEY_BLOCK.min(keys) + 2 * m * d + 2 * m, 0.0);
                        let (sc, rest) = scratch.split_at_mut(m * KEY_BLOCK.min(keys));
                        let (qs, rest) = rest.split_at_mut(m * d);
                        let (os, stats) = rest.split_at_mut(m * d);
                        // Row i * rows + r: query head hi * g + i at step t0 + r.
                        for i in 0..g {
                            for r in 0..rows {
                                let src = qo + bi * qst[0] + (t0 + r) * qst[1] + (hi * g + i) * qst[2];
                                qs[(i * rows + r) * d..][..d].copy_from_slice(&q[src..src + d]);
                            }
                        }
                        let kbase = ko + bi * kst[0] + hi * kst[2];
                        let vbase = vo + bi * vst[0] + hi * vst[2];
                        // Keys in blocks of KEY_BLOCK with a running softmax (as flash attention):
                        // a block's scores stay in cache between the two products. Per row: the
                        // largest score so far and the sum of exponentials relative to it; the
                        // output is rescaled when the largest score grows.
                        let (mx, rest) = stats.split_at_mut(m);
                        let (sum, _) = rest.split_at_mut(m);
                        mx.fill(f32::NEG_INFINITY);
                        sum.fill(0.0);
                        os.fill(0.0);
                        for j0 in (0..keys).step_by(KEY_BLOCK) {
                            let kb = KEY_BLOCK.min(keys - j0);
                            let sc = &mut sc[..m * kb];
                            // Safety: the views stay inside the scratch and k, v (checked dims
                            // and strides).
                            unsafe {
                                let qv = View { ptr: qs.as_ptr(), rs: d as isize, cs: 1 };
                                let kt = View { ptr: k.as_ptr().add(kbase + j0 * kst[1]), rs: 1, cs: kst[1] as isize };
                                sgemm_view(m, kb, d, qv, kt, sc.as_mut_ptr(), kb as isize, false, self.scale);
                            }
                            for (row, p) in sc.chunks_exact_mut(kb).enumerate() {
                                let step = t0 + row % rows;
                                // Keys of this block the step may see: before its causal limit
                                // and not hidden.
                                let end = mask.map_or(kb, |mk| mk.visible_end(step).saturating_sub(j0).min(kb));
                                if let Some(hid) = mask.and_then(|mk| mk.hidden.as_ref()) {
                                    let hr = &hid[bi * total + j0..][..end];
                                    p[..end]
                                        .iter_mut()
                                        .zip(hr)
                                        .filter(|(_, &h)| h)
                                        .for_each(|(x, _)| *x = f32::NEG_INFINITY);
                                }
                                let (seen, after) = p.split_at_mut(end);
                                after.fill(0.0);
                                let bmax = simd::max(seen);
                                if bmax == f32::NEG_INFINITY {
                                    seen.fill(0.0);
                                    continue;
                                }
                                let new = bmax.max(mx[row]);
                                let alpha = (mx[row] - new).exp();
                                sum[row] = sum[row] * alpha + simd::exp_shifted_sum_wide(seen, new);
                                if alpha != 1.0 {
                                    os[row * d..(row + 1) * d].iter_mut().for_each(|x| *x *= alpha);
                                }
                                mx[row] = new;
                            }
                            // Safety: the block's scores (m x kb) are in the scratch, its values
                            // inside v (checked dims and strides); `os` is this unit's.
                            unsafe {
                                let pv = View { ptr: sc.as_ptr(), rs: kb as isize, cs: 1 };
                                let vv = View { ptr: v.as_ptr().add(vbase + j0 * vst[1]), rs: vst[1] as isize, cs: 1 };
                                sgemm_view(m, d, kb, pv, vv, os.as_mut_ptr(), d as isize, true, 1.0);
                            }
                        }
                        for row in 0..m {
                            let o = &mut os[row * d..(row + 1) * d];
                            if sum[row] > 0.0 {
                                let inv = 1.0 / sum[row];
                                o.iter_mut().for_each(|x| *x *= inv);
                            } else {
                                // A step that sees no key (a padding query) spreads evenly over
                                // every key, as f32::MIN everywhere does in transformers.
                                o.fill(0.0);
                                for j in 0..total {
                                    let vr = &v[vbase + j * vst[1]..][..d];
                                    o.iter_mut().zip(vr).for_each(|(x, y)| *x += y / total as f32);
                                }
                            }
                        }
                        for (row, o) in os.chunks_exact(d).enumerate() {
                            let (i, r) = (row / rows, row % rows);
                            // Safety: output row (bi, t0 + r, hi * g + i) belongs to this unit alone.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(po.0.add(((bi * t + t0 + r) * h + hi * g + i) * d), d)
                            };
                            dst.copy_from_slice(o);
                        }
                    }
                })
            });
            return Ok((CpuStorage::F32(out), Shape::from((b, t, h, d))));
        }
        if t >= GEMM_MIN_T {
            let mut out = vec![0f32; b * t * h * d];
            let mut probs = vec![0f32; b * h * t * total];
            let (po, pp) = (SharedMut(out.as_mut_ptr()), SharedMut(probs.as_mut_ptr()));
            let reach = Reach::new(mask, b, t, total);
            Team::global().for_chunks(b * h, 1, &|units| {
                let (po, pp) = (&po, &pp);
                for unit in units {
                    let (bi, head) = (unit / h, unit % h);
                    let hi = head / g;
                    for rows in blocks(t, self.block) {
                        // Keys past `end` are masked for every step of the block: their
                        // probabilities stay the zeros `probs` starts with.
                        let (r0, m, end) = (rows.start, rows.len(), reach.key_end(bi, &rows));
                        // Safety: each unit writes its own (bi, head) block of probs and output
                        // rows; the views stay inside q, k, v (checked dims and strides).
                        unsafe {
                            let p = pp.0.add(unit * t * total + r0 * total);
                            let qv = View {
                                ptr: q.as_ptr().add(qo + bi * qst[0] + r0 * qst[1] + head * qst[2]),
                                rs: qst[1] as isize,
                                cs: 1,
                            };
                            let kt = View {
                                ptr: k.as_ptr().add(ko + bi * kst[0] + hi * kst[2]),
                                rs: 1,
                                cs: kst[1] as isize,
                            };
                            sgemm_view(m, end, d, qv, kt, p, total as isize, false, self.scale);
                            let p = std::slice::from_raw_parts_mut(p, m * total);
                            for (i, row) in p.chunks_exact_mut(total).enumerate() {
                                softmax_row(row, mask, bi, r0 + i, total);
                            }
                            let pv = View { ptr: p.as_ptr(), rs: total as isize, cs: 1 };
                            let vv = View {
                                ptr: v.as_ptr().add(vo + bi * vst[0] + hi * vst[2]),
                                rs: vst[1] as isize,
                                cs: 1,
                            };
                            sgemm_view(
                                m,
                                d,
                                end,
                                pv,
                                vv,
                                po.0.add(((bi * t + r0) * h + head) * d),
                                (h * d) as isize,
                                false,
                                1.0,
                            );
                        }
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
                    pr.iter_mut().for_each(|x| *x *= self.scale);
                    softmax_row(pr, mask, bi, at(r).0, total);
                }
                for r in 0..nr {
                    let (ti, head) = at(r);
                    // Safety: output row (bi, ti, head) and its probabilities belong to this unit.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(((bi * t + ti) * h + head) * d), d) };
                    if self.keep_probs {
                        // Safety: probabilities of (bi, head, ti) belong to this unit as its output row.
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
                        let reach = Reach::new(self.mask.as_ref(), b, t, total);
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
                                    let dov = View { ptr: dout.as_ptr().wrapping_add(ho), rs: hrs, cs: 1 };
                                    // dP = dO Vᵀ, only up to each query block's last visible key;
                                    // past it dS is zero, as the probabilities are.
                                    for rows in blocks(t, self.block) {
                                        let (r0, m, end) = (rows.start, rows.len(), reach.key_end(bi, &rows));
                                        let dsb = &mut ds[r0 * total..(r0 + m) * total];
                                        // Safety: views stay inside the contiguous v and dout.
                                        unsafe {
                                            let dov = View { ptr: dov.ptr.add(r0 * h * d), ..dov };
                                            let vt = View { ptr: v.as_ptr().add(kvo), rs: 1, cs: krs };
                                            sgemm_view(
                                                m,
                                                end,
                                                d,
                                                dov,
                                                vt,
                                                dsb.as_mut_ptr(),
                                                total as isize,
                                                false,
                                                1.0,
                                            );
                                        }
                                        for (dsr, pr) in
                                            dsb.chunks_exact_mut(total).zip(p[r0 * total..].chunks_exact(total))
                                        {
                                            dsr[end..].fill(0.0);
                                            let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                                            dsr.iter_mut().zip(pr).for_each(|(x, &pj)| *x = pj * (*x - dot));
                                        }
                                        // dQ = s dS K over the same keys.
                                        // Safety: views inside ds and k; dq of these heads is this
                                        // unit's alone.
                                        unsafe {
                                            let dsv = View { ptr: dsb.as_ptr(), rs: total as isize, cs: 1 };
                                            let kv = View { ptr: k.as_ptr().add(kvo), rs: krs, cs: 1 };
                                            sgemm_view(
                                                m,
                                                d,
                                                end,
                                                dsv,
                                                kv,
                                                pq.0.add(ho + r0 * h * d),
                                                hrs,
                                                false,
                                                scale,
                                            );
                                        }
                                    }
                                    // dV += Pᵀ dO and dK += s dSᵀ Q per block of keys, from the first
                                    // query that sees the block (earlier ones add exact zeros).
                                    for keys in blocks(total, self.block) {
                                        let (j0, m, i0) = (keys.start, keys.len(), reach.first_query(bi, &keys));
                                        if i0 >= t {
                                            continue;
                                        }
                                        // Safety: views stay inside p, ds, dout and q; dk/dv of
                                        // (bi, hi) are this unit's alone.
                                        unsafe {
                                            let dov = View { ptr: dov.ptr.add(i0 * h * d), ..dov };
                                            let pt = View {
                                                ptr: p.as_ptr().add(i0 * total + j0),
                                                rs: 1,
                                                cs: total as isize,
                                            };
                                            let out = kvo + j0 * kvh * d;
                                            sgemm_view(m, d, t - i0, pt, dov, pv.0.add(out), krs, true, 1.0);
                                            let dst = View {
                                                ptr: ds.as_ptr().add(i0 * total + j0),
                                                rs: 1,
                                                cs: total as isize,
                                            };
                                            let qv = View { ptr: q.as_ptr().add(ho + i0 * h * d), rs: hrs, cs: 1 };
                                            sgemm_view(m, d, t - i0, dst, qv, pk.0.add(out), krs, true, scale);
                                        }
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
            .broadcast_add(&m.tensor(q.device())?.unsqueeze(1)?)?
            .reshape((b, kvh, rows, total))?,
        None => s,
    };
    softmax_last_dim(&s)
}

/// `softmax(q k^T * scale + mask) v` for queries `(b, t, h, d)` and keys/values `(b, T, kvh, d)`
/// (`h` a multiple of `kvh`); returns `(b, t, h, d)`. Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Mask>, scale: f64) -> candle_core::Result<Tensor> {
    // The kernels know the causal limit and hidden keys, not windows: a window that hides keys
    // (sequences longer than it) takes the composed path.
    if q.device().is_cpu() && q.dtype() == candle_core::DType::F32 && !mask.is_some_and(Mask::window_cuts) {
        let keep_probs = q.track_op() || k.track_op() || v.track_op();
        let op = Attention {
            mask: mask.cloned(),
            scale: scale as f32,
            keep_probs,
            probs: Mutex::new(None),
            block: CAUSAL_BLOCK,
        };
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
        Mask::causal(b, t, past, None)
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
    fn prefill_chunks_match_composed_with_padding_and_blind_rows() {
        // No gradient: the chunked prefill path. t = 700 spans eleven chunks (the last partial)
        // and two key blocks (the running softmax), after 5 cached steps; row 1 hides its first 40
        // keys (left padding), so its first 35 steps see no key at all and must spread evenly over
        // every key as the additive mask does.
        let (b, t, past, kvh, g, d) = (2, 700, 5, 2, 3, 8);
        let total = past + t;
        let mut hidden = vec![false; b * total];
        hidden[total..total + 40].iter_mut().for_each(|x| *x = true);
        hidden[7] = true;
        let mask = Mask::causal(b, t, past, Some(hidden));
        let q = rand(&[b, t, kvh * g, d], 11);
        let k = rand(&[b, total, kvh, d], 12);
        let v = rand(&[b, total, kvh, d], 13);
        let a = attention(&q, &k, &v, Some(&mask), 0.35).unwrap();
        let c = attention_composed(&q, &k, &v, Some(&mask), 0.35).unwrap();
        assert!(max_diff(&a, &c) < 1e-5, "{}", max_diff(&a, &c));
        let plain = attention(&q, &k.narrow(1, 0, t).unwrap(), &v.narrow(1, 0, t).unwrap(), None, 0.35).unwrap();
        let plain_c =
            attention_composed(&q, &k.narrow(1, 0, t).unwrap(), &v.narrow(1, 0, t).unwrap(), None, 0.35).unwrap();
        assert!(max_diff(&plain, &plain_c) < 1e-5);
    }

    #[test]
    fn causal_blocks_keep_the_bits_of_whole_products() {
        // The block products leave out only masked terms (exact zeros): outputs and gradients
        // must equal those of one whole product per head bit for bit. Masks: causal with hidden
        // keys (a gap in row 0, left padding in row 1 whose first steps see no key), plain
        // causal, none; lengths with a remainder block and after cached steps.
        let (b, kvh, g, d) = (2, 3, 3, 64);
        for (t, past) in [(148, 0), (130, 3), (70, 0), (40, 0)] {
            let total = past + t;
            let mut hidden = vec![false; b * total];
            hidden[20..30].iter_mut().for_each(|x| *x = true);
            hidden[total..total + 12].iter_mut().for_each(|x| *x = true);
            let masks = [Some(Mask::causal(b, t, past, Some(hidden))), Some(Mask::causal(b, t, past, None)), None];
            for (mi, mask) in masks.into_iter().enumerate() {
                let q = Var::from_tensor(&rand(&[b, t, kvh * g, d], 21)).unwrap();
                let k = Var::from_tensor(&rand(&[b, total, kvh, d], 22)).unwrap();
                let v = Var::from_tensor(&rand(&[b, total, kvh, d], 23)).unwrap();
                let probe = rand(&[b, t, kvh * g, d], 24);
                let run = |block: usize| -> Vec<Vec<u32>> {
                    let op = Attention {
                        mask: mask.clone(),
                        scale: 0.125,
                        keep_probs: true,
                        probs: Mutex::new(None),
                        block,
                    };
                    let o = q.apply_op3(&k, &v, op).unwrap();
                    let grads = (&o * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let bits = |x: &Tensor| {
                        x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect()
                    };
                    let mut out = vec![bits(&o)];
                    out.extend([&q, &k, &v].map(|x| bits(grads.get(x.as_tensor()).unwrap())));
                    out
                };
                let (whole, blocked) = (run(usize::MAX), run(CAUSAL_BLOCK));
                for (i, name) in ["output", "dq", "dk", "dv"].iter().enumerate() {
                    assert!(whole[i] == blocked[i], "t {t}, past {past}, mask {mi}: {name} differs");
                }
            }
        }
    }

    #[test]
    fn blocks_cover_the_steps_with_long_last_blocks() {
        let all = |n: usize, block: usize| blocks(n, block).map(|r| (r.start, r.end)).collect::<Vec<_>>();
        assert_eq!(all(148, 64), [(0, 64), (64, 148)]);
        assert_eq!(all(128, 64), [(0, 64), (64, 128)]);
        assert_eq!(all(40, 64), [(0, 40)]);
        assert_eq!(all(200, 64), [(0, 64), (64, 128), (128, 200)]);
        assert_eq!(all(7, usize::MAX), [(0, 7)]);
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
