//! Differentiable fused ops for the decoders: RMSNorm, LayerNorm, rotary embeddings, SwiGLU,
//! GELU-new, softmax and the embedding lookup.
//!
//! candle-nn's fused versions of these (`ops::rms_norm`, `rotary_emb::rope`,
//! `ops::softmax_last_dim`) have no backward pass, so gradients through them silently vanish. Here
//! each op is a candle custom op with a CPU kernel *and* a `bwd`, and on other devices the same
//! function falls back to a composition of differentiable candle ops. The composed forms double as
//! the reference the tests hold the kernels to.

use crate::nn::simd::{self, silu_mul, silu_mul_grads};
use crate::nn::team::{SharedMut, Team};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D,
};
use std::sync::Arc;

type CResult<T> = candle_core::Result<T>;

/// The f32 values of a contiguous CPU storage (a custom op's input), or an error naming `op`.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: input must be contiguous"),
        _ => candle_core::bail!("{op}: only f32 is supported on CPU, got {:?}", s.dtype()),
    }
}

/// Applies `f(out_row, in_row)` to rows of width `w`: on the calling thread when the tensor is
/// small (a decoding step), over the kernel team otherwise.
fn for_rows(y: &mut [f32], x: &[f32], w: usize, f: &(dyn Fn(&mut [f32], &[f32]) + Sync)) {
    let w = w.max(1);
    if x.len() < 1 << 16 {
        y.chunks_exact_mut(w).zip(x.chunks_exact(w)).for_each(|(yr, xr)| f(yr, xr));
        return;
    }
    let out = SharedMut(y.as_mut_ptr());
    Team::global().for_chunks(x.len() / w, 16, &|rows| {
        let out = &out;
        for r in rows {
            // Safety: row r lies inside y and no other thread touches it.
            let yr = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * w), w) };
            f(yr, &x[r * w..(r + 1) * w]);
        }
    });
}

/// Runs `f` on the f32 values of a CPU tensor (made contiguous first), without copying them out.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match (&*s, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => candle_core::bail!("expected an f32 CPU tensor, got {:?} on {:?}", t.dtype(), t.device().location()),
    }
}

/// Runs `f(range)` over `n` items in parts on the kernel team when `work` (elements touched) is
/// large, else on the calling thread.
fn split(n: usize, work: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    if work < 1 << 16 {
        f(0..n)
    } else {
        Team::global().for_ranges(n, 1, f)
    }
}

/// Sums per-row vectors of width `width` over `rows` rows, split as [`split`] splits them:
/// `f(range, acc)` adds its rows' terms into `acc`, and the parts' sums are added in part order, so
/// the bits depend only on the split (the team's size), never on which thread finishes first.
fn sum_rows(
    rows: usize,
    work: usize,
    width: usize,
    f: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) -> Vec<f32> {
    let parts = std::sync::Mutex::new(Vec::new());
    split(rows, work, &|range| {
        let mut acc = vec![0f32; width];
        let start = range.start;
        f(range, &mut acc);
        parts.lock().unwrap_or_else(|e| e.into_inner()).push((start, acc));
    });
    let mut parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
    parts.sort_by_key(|(start, _)| *start);
    let mut total = vec![0f32; width];
    for (_, acc) in &parts {
        total.iter_mut().zip(acc).for_each(|(t, a)| *t += a);
    }
    total
}

fn use_kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `x + y` for two f32 tensors of one shape, on the kernel team (candle's add runs on the calling
/// thread while the team's helper waits); the residual stream's adds. Its backward hands `dy` to
/// both inputs, as candle's add does, so gradients keep their bits.
struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "meet-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1, "add")?, f32_slice(s2, l2, "add")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("add: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        // Every part written below.
        let mut y = crate::nn::unfilled(a.len());
        let out = SharedMut(y.as_mut_ptr());
        split(a.len(), a.len(), &|r| {
            let out = &out;
            // SAFETY: parts are disjoint ranges of y.
            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(r.start), r.len()) };
            o.iter_mut().zip(&a[r.clone()]).zip(&b[r]).for_each(|((o, x), y)| *o = x + y);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _out: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(dy.clone())))
    }
}

/// `x + y` (same shape), the fused op above on CPU f32, candle's add elsewhere.
pub fn add(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    if use_kernel(x) && use_kernel(y) && x.shape() == y.shape() {
        x.contiguous()?.apply_op2(&y.contiguous()?, Add)
    } else {
        x + y
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w   (Zhang & Sennrich 2019; HF LlamaRMSNorm)

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "meet-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm")?;
        let w = f32_slice(s2, l2, "rms_norm")?;
        let h = w.len();
        if x.len() % h.max(1) != 0 {
            candle_core::bail!("rms_norm: weight of {h} for rows of {:?}", l1.shape());
        }
        // Every row written below.
        let mut y = crate::nn::unfilled(x.len());
        let eps = self.eps;
        for_rows(&mut y, x, h, &|yr, xr| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * r * g;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        // With r = 1/sqrt(mean(x^2)+eps), xh = x*r and g = dy*w:
        //   dx = r * (g - xh * mean(g*xh)),  dw = sum over rows of dy*xh.
        let h = w.dim(0)?;
        let rows = x.elem_count() / h.max(1);
        // Every row written by the parts below.
        let mut dx = crate::nn::unfilled(x.elem_count());
        let eps = self.eps;
        let out = SharedMut(dx.as_mut_ptr());
        let dw = with_f32(x, |xv| {
            with_f32(w, |wv| {
                with_f32(dy, |dyv| {
                    let f = |range: std::ops::Range<usize>, dw: &mut [f32]| {
                        let out = &out;
                        for r in range {
                            let (xr, gr) = (&xv[r * h..(r + 1) * h], &dyv[r * h..(r + 1) * h]);
                            let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
                            let proj = (0..h).map(|i| gr[i] * wv[i] * xr[i]).sum::<f32>() * inv / h as f32;
                            // Safety: row r of dx is written by this part only.
                            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * h), h) };
                            for i in 0..h {
                                let xh = xr[i] * inv;
                                o[i] = inv * (gr[i] * wv[i] - xh * proj);
                                dw[i] += gr[i] * xh;
                            }
                        }
                    };
                    sum_rows(rows, rows * h, h, &f)
                })
            })
        })???;
        // A frozen norm weight gets no gradient.
        let dw = if w.track_op() { Some(Tensor::from_vec(dw, h, w.device())?) } else { None };
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), dw))
    }
}

/// RMSNorm over the last dimension, differentiable in `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if use_kernel(x) {
        x.contiguous()?.apply_op2(w, RmsNorm { eps: eps as f32 })
    } else {
        rms_norm_composed(x, w, eps)
    }
}

/// RMSNorm from differentiable primitives (any device, and the tests' reference).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b   (Ba et al. 2016; torch's nn.LayerNorm,
// biased variance)

struct LayerNormOp {
    eps: f32,
}

/// The mean and `1 / sqrt(var + eps)` of a row.
fn moments(xr: &[f32], eps: f32) -> (f32, f32) {
    let h = xr.len() as f32;
    let mean = xr.iter().sum::<f32>() / h;
    let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "meet-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm")?;
        let (w, b) = (f32_slice(s2, l2, "layer_norm")?, f32_slice(s3, l3, "layer_norm")?);
        let h = w.len();
        if b.len() != h || x.len() % h.max(1) != 0 {
            candle_core::bail!("layer_norm: weight {h}, bias {} for rows of {:?}", b.len(), l1.shape());
        }
        // Every row written below (x.len() is a multiple of h, checked above).
        let mut y = crate::nn::unfilled(x.len());
        let eps = self.eps;
        for_rows(&mut y, x, h, &|yr, xr| {
            let (mean, r) = moments(xr, eps);
            for i in 0..h {
                yr[i] = (xr[i] - mean) * r * w[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With xh = (x - mean) r and g = dy w:
        //   dx = r (g - mean(g) - xh mean(g xh)),  dw = Σ_rows dy xh,  db = Σ_rows dy.
        let h = w.dim(0)?;
        let rows = x.elem_count() / h.max(1);
        // Every row written by the parts below.
        let mut dx = crate::nn::unfilled(x.elem_count());
        let eps = self.eps;
        let out = SharedMut(dx.as_mut_ptr());
        // dw and db side by side in one sum of width 2h.
        let mut sums = with_f32(x, |xv| {
            with_f32(w, |wv| {
                with_f32(dy, |dyv| {
                    let f = |range: std::ops::Range<usize>, acc: &mut [f32]| {
                        let out = &out;
                        let (dw, db) = acc.split_at_mut(h);
                        let mut xh = vec![0f32; h];
                        for r in range {
                            let (xr, gr) = (&xv[r * h..(r + 1) * h], &dyv[r * h..(r + 1) * h]);
                            let (mean, inv) = moments(xr, eps);
                            let (mut mg, mut mgx) = (0f32, 0f32);
                            for i in 0..h {
                                xh[i] = (xr[i] - mean) * inv;
                                let g = gr[i] * wv[i];
                                mg += g;
                                mgx += g * xh[i];
                                dw[i] += gr[i] * xh[i];
                                db[i] += gr[i];
                            }
                            let (mg, mgx) = (mg / h as f32, mgx / h as f32);
                            // SAFETY: row r of dx is written by this part only, and lies inside dx.
                            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * h), h) };
                            for i in 0..h {
                                o[i] = inv * (gr[i] * wv[i] - mg - xh[i] * mgx);
                            }
                        }
                    };
                    sum_rows(rows, rows * h, 2 * h, &f)
                })
            })
        })???;
        let db = sums.split_off(h);
        let dw = sums;
        // Frozen norm parameters get no gradient.
        let dw = if w.track_op() { Some(Tensor::from_vec(dw, h, w.device())?) } else { None };
        let db = if b.track_op() { Some(Tensor::from_vec(db, h, b.device())?) } else { None };
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), dw, db))
    }
}

/// LayerNorm over the last dimension with weight `w` and bias `b`, differentiable in all three.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if use_kernel(x) {
        x.contiguous()?.apply_op3(w, b, LayerNormOp { eps: eps as f32 })
    } else {
        layer_norm_composed(x, w, b, eps)
    }
}

/// [`layer_norm`] from differentiable primitives (any device, and the tests' reference).
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let r = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    centred.broadcast_mul(&r)?.broadcast_mul(w)?.broadcast_add(b)
}

// ---------------------------------------------------------------------------------------------
// GELU-new (GPT-2's tanh approximation; Hendrycks & Gimpel 2016)

struct GeluNew;

impl CustomOp1 for GeluNew {
    fn name(&self) -> &'static str {
        "meet-gelu-new"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu_new")?;
        // Whole blocks below, then the rest.
        let mut y = crate::nn::unfilled(x.len());
        for_rows(&mut y, x, GELU_BLOCK, &|yr, xr| simd::gelu_new(xr, yr));
        let done = x.len() / GELU_BLOCK * GELU_BLOCK;
        simd::gelu_new(&x[done..], &mut y[done..]);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        if dy.elem_count() != x.elem_count() {
            candle_core::bail!("gelu_new: gradient {:?} for input {:?}", dy.shape(), x.shape());
        }
        // Every block written below.
        let mut dx = crate::nn::unfilled(x.elem_count());
        with_f32(x, |xv| {
            with_f32(dy, |dv| {
                let n = xv.len();
                let blocks = n.div_ceil(GELU_BLOCK);
                let out = SharedMut(dx.as_mut_ptr());
                split(blocks, n, &|range| {
                    let out = &out;
                    for blk in range {
                        let (a, e) = (blk * GELU_BLOCK, ((blk + 1) * GELU_BLOCK).min(n));
                        // SAFETY: block blk of dx is written by this part only, and lies inside dx.
                        let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(a), e - a) };
                        simd::gelu_new_grad(&xv[a..e], &dv[a..e], o);
                    }
                })
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Elements per unit of work of the GELU kernels.
const GELU_BLOCK: usize = 4096;

/// GPT-2's GELU (`gelu_new`, the tanh approximation):
/// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`, differentiable.
pub fn gelu_new(x: &Tensor) -> candle_core::Result<Tensor> {
    if use_kernel(x) {
        x.contiguous()?.apply_op1(GeluNew)
    } else {
        gelu_new_composed(x)
    }
}

/// [`gelu_new`] from candle's own tanh-approximated `gelu` (any device, and the tests' reference).
pub fn gelu_new_composed(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu()
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding, HF "rotate_half" layout (first half pairs with second half).

/// cos/sin tables for positions `0..max_positions`, `[max_positions, head_dim / 2]` each.
#[derive(Debug)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    pub max_positions: usize,
    cos_t: Tensor,
    sin_t: Tensor,
}

impl RopeTables {
    /// Builds the tables from per-pair inverse frequencies (already scaled, e.g. llama3), in f32
    /// as transformers does (`inv_freq` float32, `freqs = t * inv_freq`).
    pub fn new(inv_freq: &[f32], max_positions: usize, device: &candle_core::Device) -> candle_core::Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos_t = Tensor::from_slice(&cos, (max_positions, half), device)?;
        let sin_t = Tensor::from_slice(&sin, (max_positions, half), device)?;
        Ok(Self { cos, sin, half, max_positions, cos_t, sin_t })
    }
}

struct Rope {
    tables: Arc<RopeTables>,
    /// Position of each (batch, time) row, `b * t` entries.
    positions: Arc<Vec<u32>>,
    /// Rotate by -angle: the backward pass of a rotation is its inverse.
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "meet-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope")?;
        let (b, t, h, d) = l.shape().dims4()?;
        let half = self.tables.half;
        if d != 2 * half || self.positions.len() != b * t {
            candle_core::bail!(
                "rope: x {:?} vs head_dim {} and {} positions",
                l.shape(),
                2 * half,
                self.positions.len()
            );
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let tables = &self.tables;
        if let Some(&p) = self.positions.iter().find(|&&p| p as usize >= tables.max_positions) {
            candle_core::bail!("rope: position {p} is beyond the {} positions of the model", tables.max_positions);
        }
        // Every position's row and head written below, over the kernel team for a long input.
        let mut y = crate::nn::unfilled(x.len());
        let out = SharedMut(y.as_mut_ptr());
        let rotate = |rows: std::ops::Range<usize>| {
            let out = &out;
            for row in rows {
                let p = self.positions[row] as usize;
                let cos = &tables.cos[p * half..(p + 1) * half];
                let sin = &tables.sin[p * half..(p + 1) * half];
                // SAFETY: row `row` of y (h heads of d values) is written by this part only.
                let yr = unsafe { std::slice::from_raw_parts_mut(out.0.add(row * h * d), h * d) };
                for head in 0..h {
                    let off = head * d;
                    let (x1, x2) = x[row * h * d + off..row * h * d + off + d].split_at(half);
                    let (y1, y2) = yr[off..off + d].split_at_mut(half);
                    for i in 0..half {
                        let (c, s) = (cos[i], sign * sin[i]);
                        y1[i] = x1[i] * c - x2[i] * s;
                        y2[i] = x2[i] * c + x1[i] * s;
                    }
                }
            }
        };
        split(b * t, x.len(), &rotate);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let inv = Rope { tables: self.tables.clone(), positions: self.positions.clone(), inverse: !self.inverse };
        Ok(Some(dy.contiguous()?.apply_op1(inv)?))
    }
}

/// Rotates `x: [b, t, heads, head_dim]` by the angles of `positions` (`b * t` entries, row-major).
pub fn rope(x: &Tensor, tables: &Arc<RopeTables>, positions: &Arc<Vec<u32>>) -> candle_core::Result<Tensor> {
    if use_kernel(x) {
        x.contiguous()?.apply_op1(Rope { tables: tables.clone(), positions: positions.clone(), inverse: false })
    } else {
        rope_composed(x, tables, positions)
    }
}

/// [`rope`] from differentiable primitives.
pub fn rope_composed(x: &Tensor, tables: &RopeTables, positions: &[u32]) -> candle_core::Result<Tensor> {
    let (b, t, _h, d) = x.dims4()?;
    let half = d / 2;
    let idx = Tensor::from_slice(positions, b * t, x.device())?;
    let cos = tables.cos_t.to_device(x.device())?.index_select(&idx, 0)?.reshape((b, t, 1, half))?;
    let sin = tables.sin_t.to_device(x.device())?.index_select(&idx, 0)?.reshape((b, t, 1, half))?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)
}

// ---------------------------------------------------------------------------------------------
// SwiGLU gate: silu(g) * u (Shazeer 2020), the Llama MLP's elementwise part in one pass.

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "meet-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "swiglu")?;
        let u = f32_slice(s2, l2, "swiglu")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.shape(), l2.shape());
        }
        // Written in full (gate and up have its shape, checked above).
        let mut y = crate::nn::unfilled(g.len());
        let out = SharedMut(y.as_mut_ptr());
        // Parts of 16 values (the widest kernel's step), so each element gets the same kernel
        // path whatever the split.
        split(g.len().div_ceil(16), g.len(), &|r| {
            let out = &out;
            let (a, e) = (r.start * 16, (r.end * 16).min(g.len()));
            // SAFETY: parts are disjoint ranges of y.
            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(a), e - a) };
            silu_mul(&g[a..e], &u[a..e], o);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        if u.elem_count() != n || dy.elem_count() != n {
            candle_core::bail!("swiglu: gate {:?}, up {:?}, gradient {:?}", g.shape(), u.shape(), dy.shape());
        }
        // Every part of both written below.
        let (mut dg, mut du) = (crate::nn::unfilled(n), crate::nn::unfilled(n));
        let (pg, pu) = (SharedMut(dg.as_mut_ptr()), SharedMut(du.as_mut_ptr()));
        with_f32(g, |gv| {
            with_f32(u, |uv| {
                with_f32(dy, |dv| {
                    split(n, n, &|r| {
                        let (pg, pu) = (&pg, &pu);
                        // Safety: parts are disjoint ranges of dg and du.
                        let (a, b) = unsafe {
                            (
                                std::slice::from_raw_parts_mut(pg.0.add(r.start), r.len()),
                                std::slice::from_raw_parts_mut(pu.0.add(r.start), r.len()),
                            )
                        };
                        silu_mul_grads(&gv[r.clone()], &uv[r.clone()], &dv[r], a, b);
                    })
                })
            })
        })???;
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}

/// SwiGLU over one tensor holding gate and up side by side (`[.., 2n]` -> `[.., n]`), the output
/// of a fused gate/up product, without copying the halves apart.
struct SwiGluPacked;

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "meet-swiglu-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "swiglu")?;
        let mut dims = l.shape().dims().to_vec();
        let two_n = dims.pop().unwrap_or(0);
        if !two_n.is_multiple_of(2) {
            candle_core::bail!("swiglu: last dimension {two_n} of {:?} is not even", l.shape());
        }
        let n = two_n / 2;
        dims.push(n);
        // Every row written below (x.len() is rows x two_n).
        let mut y = crate::nn::unfilled(x.len() / 2);
        for (row, out) in x.chunks_exact(two_n).zip(y.chunks_exact_mut(n.max(1))) {
            silu_mul(&row[..n], &row[n..], out);
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let n = x.dim(D::Minus1)? / 2;
        let rows = x.elem_count() / (2 * n).max(1);
        if dy.elem_count() != rows * n {
            candle_core::bail!("swiglu: gradient {:?} for gate and up {:?}", dy.shape(), x.shape());
        }
        // Every row written below.
        let mut dx = crate::nn::unfilled(x.elem_count());
        let p = SharedMut(dx.as_mut_ptr());
        with_f32(x, |xv| {
            with_f32(dy, |dv| {
                split(rows, rows * n, &|range| {
                    let p = &p;
                    for r in range {
                        // Safety: row r of dx is written by this part only.
                        let o = unsafe { std::slice::from_raw_parts_mut(p.0.add(r * 2 * n), 2 * n) };
                        let (a, b) = o.split_at_mut(n);
                        let xr = &xv[r * 2 * n..(r + 1) * 2 * n];
                        silu_mul_grads(&xr[..n], &xr[n..], &dv[r * n..(r + 1) * n], a, b);
                    }
                })
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `silu(gate) * up`, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if use_kernel(gate) {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// [`swiglu`] of the two halves of the last dimension of `gate_up`.
pub fn swiglu_packed(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    if use_kernel(gate_up) {
        gate_up.contiguous()?.apply_op1(SwiGluPacked)
    } else {
        let n = gate_up.dim(D::Minus1)? / 2;
        swiglu(&gate_up.narrow(D::Minus1, 0, n)?, &gate_up.narrow(D::Minus1, n, n)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension.

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "meet-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        // Every row written below (n is the last dimension).
        let mut y = crate::nn::unfilled(x.len());
        for_rows(&mut y, x, n, &|yr, xr| {
            let max = crate::nn::simd::max(xr);
            yr.copy_from_slice(xr);
            let inv = 1.0 / crate::nn::simd::exp_shifted_sum(yr, max);
            yr.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        // dx = y * (dy - sum(dy * y))
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((dy.broadcast_sub(&dot)? * y)?))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if use_kernel(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// Rows `ids` of a trainable embedding table `w [vocab, hidden]`, whose backward adds `dy`'s rows
/// into the table's gradient buffer ([`crate::nn::grad`]) instead of candle's `index_select`
/// backward, which allocates a zeroed table-sized gradient and copies it again in `index_add`
/// (2 × 113 MB of fresh memory per step for SmolLM2's tied table, plus the add into the buffer).
struct EmbeddingLookup;

/// The ids of a contiguous CPU storage as indices below `vocab`.
fn token_ids(s: &CpuStorage, l: &Layout, vocab: usize) -> CResult<Vec<usize>> {
    let ids: Vec<usize> = match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => v[a..b].iter().map(|&i| i as usize).collect(),
        (CpuStorage::I64(v), Some((a, b))) => {
            v[a..b].iter().map(|&i| usize::try_from(i).unwrap_or(usize::MAX)).collect()
        }
        (CpuStorage::U8(v), Some((a, b))) => v[a..b].iter().map(|&i| i as usize).collect(),
        _ => candle_core::bail!("embedding: token ids must be contiguous u32, i64 or u8, got {:?}", s.dtype()),
    };
    if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
        candle_core::bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    Ok(ids)
}

impl CustomOp2 for EmbeddingLookup {
    fn name(&self) -> &'static str {
        "meet-embedding"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let w = f32_slice(s1, l1, "embedding")?;
        let (vocab, hidden) = l1.shape().dims2()?;
        let ids = token_ids(s2, l2, vocab)?;
        // Every row copied below.
        let mut out = crate::nn::unfilled(ids.len() * hidden);
        for (row, &id) in out.chunks_exact_mut(hidden.max(1)).zip(&ids) {
            row.copy_from_slice(&w[id * hidden..(id + 1) * hidden]);
        }
        let mut dims = l2.shape().dims().to_vec();
        dims.push(hidden);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, w: &Tensor, ids: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (vocab, hidden) = w.dims2()?;
        let flat = ids.flatten_all()?.contiguous()?;
        let Some(buf) = crate::nn::grad::buffer(w) else {
            let dy = dy.reshape((flat.elem_count(), hidden))?;
            return Ok((Some(w.zeros_like()?.index_add(&flat, &dy, 0)?), None));
        };
        let (s, l) = flat.storage_and_layout();
        let ids = match &*s {
            candle_core::Storage::Cpu(c) => token_ids(c, l, vocab)?,
            _ => candle_core::bail!("embedding: token ids must be on the CPU"),
        };
        // Each id's rows are summed in order from zero and the sum is added once, as candle's
        // `zeros.index_add` followed by the optimizer's add into the buffer did: the same bits.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&r| ids[r]);
        with_f32(dy, |g| {
            buf.update(|dst, acc| {
                if !acc {
                    dst.fill(0.0);
                }
                let mut sum = vec![0f32; hidden];
                for group in order.chunk_by(|&a, &b| ids[a] == ids[b]) {
                    sum.fill(0.0);
                    for &r in group {
                        sum.iter_mut().zip(&g[r * hidden..(r + 1) * hidden]).for_each(|(s, x)| *s += x);
                    }
                    let id = ids[group[0]];
                    dst[id * hidden..(id + 1) * hidden].iter_mut().zip(&sum).for_each(|(d, s)| *d += s);
                }
            })
        })?;
        Ok((None, None))
    }
}

/// Rows `ids` (any shape) of the embedding table `w [vocab, hidden]`, with `hidden` appended to
/// the shape. A trainable table on the CPU takes [`EmbeddingLookup`]; otherwise candle's
/// `index_select`.
pub fn embedding(w: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    if w.is_variable() && use_kernel(w) {
        return w.apply_op2(&ids.contiguous()?, EmbeddingLookup);
    }
    let mut dims = ids.dims().to_vec();
    dims.push(w.dim(1)?);
    w.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> =
            (0..n).map(|i| ((((i as u64 + 1) * 2654435761) ^ (seed * 97)) % 1000) as f32 / 500.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Gradients of `sum(f(x) * probe)` by the kernel's bwd and by autograd of the composed form.
    fn grads(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, probe: &Tensor) -> Tensor {
        let v = Var::from_tensor(x).unwrap();
        let loss = (f(v.as_tensor()) * probe).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
    }

    #[test]
    fn embedding_lookup_matches_index_select_and_writes_the_same_gradient_bits() {
        let w = Var::from_tensor(&rand(&[7, 5], 4)).unwrap();
        let ids = Tensor::new(&[[3u32, 1, 3], [6, 3, 0]], &Device::Cpu).unwrap();
        let probe = rand(&[2, 3, 5], 5);
        let composed = w.as_tensor().index_select(&ids.flatten_all().unwrap(), 0).unwrap().reshape((2, 3, 5)).unwrap();
        let kernel = embedding(w.as_tensor(), &ids).unwrap();
        assert_eq!(kernel.to_vec3::<f32>().unwrap(), composed.to_vec3::<f32>().unwrap());
        let grad_of = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let want = grad_of(&composed).get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Without a gradient buffer the gradient goes back to candle.
        let got = grad_of(&kernel).get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want);
        // With one (as an optimizer registers) holding a tied LM head's contribution, the rows are
        // added into it: the bits of that contribution plus candle's gradient.
        let buf = crate::nn::grad::register(w.as_tensor());
        let head = rand(&[35], 6).to_vec1::<f32>().unwrap();
        buf.update(|d, _| d.copy_from_slice(&head));
        let g = grad_of(&embedding(w.as_tensor(), &ids).unwrap());
        assert!(g.get(w.as_tensor()).is_none());
        let sum: Vec<f32> = head.iter().zip(&want).map(|(h, g)| h + g).collect();
        assert_eq!(buf.with(|d| d.to_vec()).unwrap(), sum);
        // The first write of a step overwrites a stale buffer.
        buf.clear();
        grad_of(&embedding(w.as_tensor(), &ids).unwrap());
        assert_eq!(buf.with(|d| d.to_vec()).unwrap(), want);
        assert!(embedding(w.as_tensor(), &Tensor::new(&[7u32], &Device::Cpu).unwrap()).is_err());
        crate::nn::grad::unregister(w.as_tensor());
    }

    #[test]
    fn rms_norm_kernel_matches_composed_forward_and_backward() {
        let x = rand(&[2, 3, 8], 1);
        let w = Var::from_tensor(&rand(&[8], 2)).unwrap();
        let probe = rand(&[2, 3, 8], 3);
        let a = rms_norm(&x, &w, 1e-5).unwrap();
        let b = rms_norm_composed(&x, &w, 1e-5).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let ga = grads(&|x| rms_norm(x, &w, 1e-5).unwrap(), &x, &probe);
        let gb = grads(&|x| rms_norm_composed(x, &w, 1e-5).unwrap(), &x, &probe);
        assert!(max_diff(&ga, &gb) < 1e-5, "dx");
        // Weight gradient through the kernel.
        let loss = (rms_norm(&x, &w, 1e-5).unwrap() * &probe).unwrap().sum_all().unwrap();
        let gw = loss.backward().unwrap().get(w.as_tensor()).unwrap().clone();
        let loss = (rms_norm_composed(&x, &w, 1e-5).unwrap() * &probe).unwrap().sum_all().unwrap();
        let gw2 = loss.backward().unwrap().get(w.as_tensor()).unwrap().clone();
        assert!(max_diff(&gw, &gw2) < 1e-5, "dw");
    }

    #[test]
    fn rope_kernel_matches_composed_and_inverts() {
        let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0)).collect();
        let tables = Arc::new(RopeTables::new(&inv, 16, &Device::Cpu).unwrap());
        let pos = Arc::new(vec![0, 1, 2, 5, 3, 4]);
        let x = rand(&[2, 3, 2, 8], 4);
        let a = rope(&x, &tables, &pos).unwrap();
        let b = rope_composed(&x, &tables, &pos).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let probe = rand(&[2, 3, 2, 8], 5);
        let ga = grads(&|x| rope(x, &tables, &pos).unwrap(), &x, &probe);
        let gb = grads(&|x| rope_composed(x, &tables, &pos).unwrap(), &x, &probe);
        assert!(max_diff(&ga, &gb) < 1e-6);
        // Position 0 is the identity.
        let x0 = rand(&[1, 1, 2, 8], 6);
        let y0 = rope(&x0, &tables, &Arc::new(vec![0])).unwrap();
        assert!(max_diff(&x0, &y0) < 1e-7);
        assert!(rope(&x0, &tables, &Arc::new(vec![16])).is_err(), "position beyond the table");
    }

    #[test]
    fn swiglu_kernel_matches_composed() {
        let g = Var::from_tensor(&(rand(&[3, 10], 10) * 4.0).unwrap()).unwrap();
        let u = Var::from_tensor(&rand(&[3, 10], 11)).unwrap();
        let a = swiglu(&g, &u).unwrap();
        let b = (candle_nn::ops::silu(&g).unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let probe = rand(&[3, 10], 12);
        let ga = (&a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&g, &u] {
            assert!(max_diff(ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap()) < 1e-5);
        }
        // The packed form over [gate | up] gives the same values and gradients.
        let gu = Var::from_tensor(&Tensor::cat(&[g.as_tensor(), u.as_tensor()], 1).unwrap()).unwrap();
        let c = swiglu_packed(&gu).unwrap();
        assert!(max_diff(&a, &c) < 1e-6);
        let gc = (c * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let want = Tensor::cat(&[gb.get(g.as_tensor()).unwrap(), gb.get(u.as_tensor()).unwrap()], 1).unwrap();
        assert!(max_diff(gc.get(gu.as_tensor()).unwrap(), &want) < 1e-5);
    }

    /// Central differences of `sum(f(x) * probe)` at a few elements of `x` against the kernel's
    /// gradient.
    fn check_finite_differences(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, probe: &Tensor) {
        let g = grads(f, x, probe).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x0 = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let loss = |v: &[f32]| {
            let t = Tensor::from_vec(v.to_vec(), x.shape(), &Device::Cpu).unwrap();
            (f(&t) * probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
        };
        for i in [0, x0.len() / 3, x0.len() - 1] {
            let h = 1e-2f32;
            let (mut up, mut down) = (x0.clone(), x0.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * h as f64);
            let tol = 2e-3 + 1e-2 * g[i].abs() as f64;
            assert!((numeric - g[i] as f64).abs() <= tol, "[{i}]: finite difference {numeric} vs kernel {}", g[i]);
        }
    }

    #[test]
    fn layer_norm_kernel_matches_composed_and_finite_differences() {
        // 2 x 3 rows of 8 (one thread), and 300 rows of 256 (over the team).
        for (shape, h) in [(vec![2, 3, 8], 8), (vec![300, 256], 256)] {
            let x = (rand(&shape, 1) * 3.0).unwrap();
            let w = Var::from_tensor(&rand(&[h], 2)).unwrap();
            let b = Var::from_tensor(&rand(&[h], 3)).unwrap();
            let probe = rand(&shape, 4);
            let a = layer_norm(&x, &w, &b, 1e-5).unwrap();
            let c = layer_norm_composed(&x, &w, &b, 1e-5).unwrap();
            assert!(max_diff(&a, &c) < 1e-5, "{shape:?}: forward {}", max_diff(&a, &c));
            let ga = grads(&|x| layer_norm(x, &w, &b, 1e-5).unwrap(), &x, &probe);
            let gc = grads(&|x| layer_norm_composed(x, &w, &b, 1e-5).unwrap(), &x, &probe);
            assert!(max_diff(&ga, &gc) < 1e-4, "{shape:?}: dx {}", max_diff(&ga, &gc));
            let gk = (a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (c * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("dw", &w), ("db", &b)] {
                let d = max_diff(gk.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
                assert!(d < 1e-3, "{shape:?}: {name} {d}");
            }
        }
        let (x, probe) = ((rand(&[3, 16], 5) * 2.0).unwrap(), rand(&[3, 16], 6));
        let (w, b) = (rand(&[16], 7), rand(&[16], 8));
        check_finite_differences(&|x| layer_norm(x, &w, &b, 1e-5).unwrap(), &x, &probe);
    }

    #[test]
    fn gelu_new_kernel_matches_composed_and_finite_differences() {
        // Lengths with a partial vector and several blocks (over the team) with a partial one.
        for n in [13, 3 * GELU_BLOCK * 7 + 5] {
            let x = (rand(&[n], 1) * 6.0).unwrap();
            let probe = rand(&[n], 2);
            let a = gelu_new(&x).unwrap();
            let c = gelu_new_composed(&x).unwrap();
            assert!(max_diff(&a, &c) < 1e-5, "n {n}: forward {}", max_diff(&a, &c));
            let ga = grads(&|x| gelu_new(x).unwrap(), &x, &probe);
            let gc = grads(&|x| gelu_new_composed(x).unwrap(), &x, &probe);
            assert!(max_diff(&ga, &gc) < 1e-5, "n {n}: dx {}", max_diff(&ga, &gc));
        }
        // Far in both tails GELU is x and 0, its slope 1 and 0.
        let x = Tensor::new(&[-30f32, 30.0], &Device::Cpu).unwrap();
        assert_eq!(gelu_new(&x).unwrap().to_vec1::<f32>().unwrap(), [0.0, 30.0]);
        let g = grads(&|x| gelu_new(x).unwrap(), &x, &Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap());
        assert_eq!(g.to_vec1::<f32>().unwrap(), [0.0, 1.0]);
        check_finite_differences(&|x| gelu_new(x).unwrap(), &(rand(&[40], 3) * 3.0).unwrap(), &rand(&[40], 4));
    }

    #[test]
    fn softmax_kernel_matches_composed() {
        let x = (rand(&[3, 7], 8) * 5.0).unwrap();
        let a = softmax_last_dim(&x).unwrap();
        let b = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let probe = rand(&[3, 7], 9);
        let ga = grads(&|x| softmax_last_dim(x).unwrap(), &x, &probe);
        let gb = grads(&|x| candle_nn::ops::softmax(x, D::Minus1).unwrap(), &x, &probe);
        assert!(max_diff(&ga, &gb) < 1e-6);
    }
}
