//! `y = x W^T + b`, with `W` either a dense f32 tensor (trainable when it is a `Var`) or a frozen
//! [`PackedWeight`] multiplied by a fused kernel; plus an adapter that adds to its output (LoRA,
//! plugged in from `peft` through [`LinearAdapter`]).
//!
//! Dense products on the CPU are one custom op whose backward computes the weight gradient only
//! when the weight is a `Var`: candle's own matmul backward computes and keeps `xᵀ dy` for every
//! frozen weight too (a third of the backward pass in LoRA and prompt tuning), and goes through
//! transposed copies.

use crate::nn::bf16::{sgemm_autocast, PackedA, PackedB, Src};
use crate::nn::ops::{f32_slice, with_f32};
use crate::nn::packed::PackedWeight;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use std::sync::{Arc, OnceLock};

/// What is added to a linear layer's output, `y + Δ(x)`: LoRA adapters implement it in `peft`, so
/// the layers and models below know nothing of them.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// `y` (the layer's output for `x`) with the adapter's contribution.
    fn apply(&self, x: &Tensor, y: Tensor) -> crate::Result<Tensor>;

    /// When the adapter adds `scale · x Aᵀ Bᵀ` to every row (one routed low-rank adapter without
    /// dropout): `(A [r, in], B [out, r], scale)`, so that a frozen layer can run base and
    /// adapter as one op. `None`: go through [`LinearAdapter::apply`].
    fn low_rank(&self) -> Option<(Tensor, Tensor, f64)> {
        None
    }
}

/// `x Wᵀ` for a dense `W: [out, in]` through the layer kernel, whose backward writes `dW` (only
/// when `W` is a `Var`) straight into its gradient: the low-level product adapters are made of.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    Linear::new(w.clone(), None).forward_base(x)
}

/// Where a linear layer's weight lives.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `[out, in]` f32 tensor; gradients flow to it when it is a `Var`.
    Dense(Tensor),
    /// Frozen compact storage; gradients flow to the input only.
    Packed(Arc<PackedWeight>),
}

/// A linear layer named like torch's `nn.Linear` (`weight: [out, in]`, optional `bias: [out]`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    /// The adapter on this layer (LoRA), if one targets it.
    pub adapter: Option<Arc<dyn LinearAdapter>>,
    /// `Wᵀ` (`[in, out]`) of a frozen dense weight, made on the first long input: the product
    /// kernels run ~20% faster on a row-major right operand than on a transposed one, and a frozen
    /// weight never changes (training of adapters and prompts, prefill in f32).
    pub transposed: Arc<OnceLock<Tensor>>,
    /// A frozen dense weight packed for bf16 products (`x Wᵀ` inside
    /// [`crate::nn::bf16::autocast`]), made on the first such product; `None` inside once made
    /// means the CPU has no tile unit.
    pub bf16: Arc<OnceLock<Option<Arc<PackedB>>>>,
    /// The same weight packed for the input gradient's product (`dy W`), made on the first
    /// forward pass inside autocast whose input needs a gradient (training adapters or prompts):
    /// packing `W` again on every backward product cost ~5% of a bf16 prompt-tuning step.
    pub bf16_dx: Arc<OnceLock<Option<Arc<PackedB>>>>,
}

/// What [`Linear::frozen_forms`] makes.
struct FrozenForms {
    packed: Option<Arc<PackedB>>,
    packed_dx: Option<Arc<PackedB>>,
    wt: Option<Tensor>,
}

/// A dense CPU weight with its bf16 packings (frozen weights inside autocast only): what a loss
/// fuses with the LM head.
pub struct DenseWeight {
    pub w: Tensor,
    /// `W` packed as the right operand of `x Wᵀ`.
    pub packed: Option<Arc<PackedB>>,
    /// Where `W` packed as the right operand of `dy W` is kept (frozen weights inside autocast).
    dx: Option<Arc<OnceLock<Option<Arc<PackedB>>>>>,
}

impl DenseWeight {
    /// `W` packed as the right operand of `dy W`, made on the first call (only a loss that
    /// needs the input gradient asks).
    pub fn packed_dx(&self) -> candle_core::Result<Option<Arc<PackedB>>> {
        match &self.dx {
            Some(cell) => pack_once(cell, &self.w, false),
            None => Ok(None),
        }
    }
}

/// The bf16 packing of a frozen `W: [out, in]` kept in `cell` (made on the first call): as the
/// right operand of `x Wᵀ` (`transposed`) or of `dy W`; `None` where the f32 kernels multiply.
fn pack_once(
    cell: &OnceLock<Option<Arc<PackedB>>>,
    w: &Tensor,
    transposed: bool,
) -> candle_core::Result<Option<Arc<PackedB>>> {
    if let Some(p) = cell.get() {
        return Ok(p.clone());
    }
    let (n, k) = w.dims2()?;
    let (depth, cols) = if transposed { (k, n) } else { (n, k) };
    let p = with_f32(w, |wv| PackedB::new(depth, cols, Src::F32(wv), transposed))?.map(Arc::new);
    let _ = cell.set(p.clone());
    Ok(p)
}

impl Linear {
    /// A dense layer.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
            adapter: None,
            transposed: Default::default(),
            bf16: Default::default(),
            bf16_dx: Default::default(),
        }
    }

    /// One layer computing `layers` side by side (outputs concatenated), when all of them are
    /// packed in one format without biases. Products that share an input then cost one pass over
    /// it and one synchronisation of the kernel threads instead of several.
    pub fn fuse_packed(layers: &[&Linear]) -> Option<Linear> {
        let parts = layers
            .iter()
            .map(|l| match (&l.weight, &l.bias, &l.adapter) {
                (LinearWeight::Packed(p), None, None) => Some(p.as_ref()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        let fused = PackedWeight::concat_rows(&parts)?;
        Some(Linear {
            weight: LinearWeight::Packed(Arc::new(fused)),
            bias: None,
            adapter: None,
            transposed: Default::default(),
            bf16: Default::default(),
            bf16_dx: Default::default(),
        })
    }

    /// `(out, in)` features.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match &self.weight {
            LinearWeight::Dense(w) => w.dims2(),
            LinearWeight::Packed(p) => Ok(p.dims()),
        }
    }

    /// The weight as a dense f32 `[out, in]` tensor (expanded from packed storage if needed).
    pub fn dense_weight(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Packed(p) => Tensor::from_vec(p.dequantize(), p.dims(), device),
        }
    }

    /// The weight when it is a dense CPU matrix without bias or adapter (trainable or frozen), with
    /// a frozen one's bf16 packing inside autocast: what a loss may fuse with the LM head (see
    /// `objectives::logps`).
    pub fn dense_cpu(&self) -> Option<DenseWeight> {
        match (&self.weight, &self.bias, &self.adapter) {
            (LinearWeight::Dense(w), None, None) if w.device().is_cpu() && (w.is_variable() || !w.track_op()) => {
                let frozen = self.frozen_bf16(w);
                Some(DenseWeight {
                    w: w.clone(),
                    packed: self.packed_bf16(w).ok().flatten(),
                    dx: frozen.then(|| self.bf16_dx.clone()),
                })
            }
            _ => None,
        }
    }

    /// The bf16 packing of a frozen dense CPU weight for `x Wᵀ`, inside autocast only (made
    /// once, kept with the layer); `None` otherwise or without a tile unit.
    fn packed_bf16(&self, w: &Tensor) -> candle_core::Result<Option<Arc<PackedB>>> {
        if !self.frozen_bf16(w) {
            return Ok(None);
        }
        pack_once(&self.bf16, w, true)
    }

    /// [`Self::packed_bf16`]'s twin for `dy W`, for an input `x` that needs a gradient.
    fn packed_bf16_dx(&self, w: &Tensor, x: &Tensor) -> candle_core::Result<Option<Arc<PackedB>>> {
        if !(self.frozen_bf16(w) && x.track_op()) {
            return Ok(None);
        }
        pack_once(&self.bf16_dx, w, false)
    }

    /// Whether `w` is a frozen dense CPU weight inside autocast (what is packed once for bf16).
    fn frozen_bf16(&self, w: &Tensor) -> bool {
        crate::nn::bf16::autocast_on() && !w.is_variable() && !w.track_op() && w.device().is_cpu()
    }

    /// Applies the layer (and its routed LoRA adapters) to `x: [..., in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // A frozen dense layer with one low-rank adapter: one op, one node in the graph. Apart,
        // the two products, the scale and the sum are five nodes whose gradients candle
        // accumulates with a zeroed tensor and an add each, on one thread.
        if let (Some(adapter), LinearWeight::Dense(w)) = (&self.adapter, &self.weight) {
            if x.device().is_cpu() && !w.track_op() && self.bias.as_ref().is_none_or(|b| !b.track_op()) {
                if let Some((a, b, scale)) = adapter.low_rank() {
                    let FrozenForms { packed, packed_dx, wt } = self.frozen_forms(w, x)?;
                    let op = LowRankMatMulT {
                        w: w.clone(),
                        wt,
                        packed,
                        packed_dx,
                        bias: self.bias.clone(),
                        scale: scale as f32,
                        hs: std::sync::Mutex::new(None),
                    };
                    return x.contiguous()?.apply_op3(&a, &b, op);
                }
            }
        }
        let y = self.forward_base(x)?;
        match &self.adapter {
            Some(a) => a.apply(x, y).map_err(|e| candle_core::Error::Msg(e.to_string())),
            None => Ok(y),
        }
    }

    /// The forms a frozen weight's products use, made once and kept: its bf16 packings inside
    /// autocast (where the CPU has bf16 kernels; the backward's only when `x` needs a
    /// gradient), else its transposed f32 copy for long inputs; none for a trainable weight.
    fn frozen_forms(&self, w: &Tensor, x: &Tensor) -> candle_core::Result<FrozenForms> {
        let packed = self.packed_bf16(w)?;
        let wt = if packed.is_some() { None } else { self.frozen_transposed(w, x)? };
        Ok(FrozenForms { packed_dx: self.packed_bf16_dx(w, x)?, packed, wt })
    }

    /// `Wᵀ` of a frozen weight for an input of many rows (made once, kept): the product kernels
    /// run faster on a row-major right operand.
    fn frozen_transposed(&self, w: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        if w.is_variable() || rows < MIN_ROWS_TRANSPOSED {
            return Ok(None);
        }
        if let Some(t) = self.transposed.get() {
            return Ok(Some(t.clone()));
        }
        let t = w.t()?.contiguous()?;
        let _ = self.transposed.set(t.clone());
        Ok(Some(t))
    }

    /// The layer without its adapters.
    pub fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            // A weight computed from a `Var` (GPT-2's transposed Conv1D) takes candle's product,
            // whose backward reaches that `Var`; the kernel writes gradients to `Var`s only.
            LinearWeight::Dense(w) if x.device().is_cpu() && (w.is_variable() || !w.track_op()) => {
                let FrozenForms { packed, packed_dx, wt } = self.frozen_forms(w, x)?;
                let op = MatMulT { weight_grad: w.is_variable(), wt, packed, packed_dx };
                // The bias is the product's starting value: no second pass over the output.
                return match &self.bias {
                    Some(b) => x.contiguous()?.apply_op3(w, &b.contiguous()?, op),
                    None => x.contiguous()?.apply_op2(w, op),
                };
            }
            LinearWeight::Dense(w) => {
                let (out, inp) = w.dims2()?;
                let mut dims = x.dims().to_vec();
                let last = dims.pop().unwrap_or(0);
                if last != inp {
                    candle_core::bail!("linear: input {:?} does not end in {inp}", x.dims());
                }
                let rows: usize = dims.iter().product();
                dims.push(out);
                // One [rows, in] x [in, out] gemm instead of a batched one.
                x.reshape((rows, inp))?.matmul(&w.t()?)?.reshape(dims)?
            }
            LinearWeight::Packed(p) => x.contiguous()?.apply_op1(PackedMatMul(p.clone()))?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// For an input `[.., k]` times `Wᵀ` (`W: [n, k]`): the rows `m` and the output shape `[.., n]`.
fn product_shape(input: &Shape, k: usize, n: usize) -> candle_core::Result<(usize, Shape)> {
    let mut dims = input.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!("linear: input {input:?} does not end in {k}");
    }
    dims.pop();
    let m = dims.iter().product();
    dims.push(n);
    Ok((m, Shape::from(dims)))
}

/// `y (+)= x Wᵀ` (`x: [m, k]`, `W: [n, k]`) through the fastest form of `W` at hand: its bf16
/// packing, its transposed copy `wt`, or `W` itself.
fn forward_product(
    x: &[f32],
    w: &[f32],
    packed: &Option<Arc<PackedB>>,
    wt: &Option<Tensor>,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
    acc: bool,
) -> candle_core::Result<()> {
    match (packed, wt) {
        (Some(p), _) => p.gemm(m, Src::F32(x), false, y, acc),
        (None, Some(wt)) => with_f32(wt, |wt| sgemm_autocast(m, n, k, x, false, wt, false, y, acc))?,
        (None, None) => sgemm_autocast(m, n, k, x, false, w, true, y, acc),
    }
    Ok(())
}

/// `dx = dy W` (`dy: [m, n]`, `W: [n, k]`): through `W`'s bf16 packing for this product when
/// there is one, else `W` itself (inside autocast, rounded as it is packed).
pub(crate) fn input_grad_product(
    g: &[f32],
    w: &[f32],
    packed: Option<&PackedB>,
    (m, n, k): (usize, usize, usize),
    dx: &mut [f32],
) {
    match packed {
        Some(p) => p.gemm(m, Src::F32(g), false, dx, false),
        None => sgemm_autocast(m, k, n, g, false, w, false, dx, false),
    }
}

/// `x Wᵀ` for a dense `W` on the CPU, with a backward that writes `dx = dy W` and (only for a
/// trainable `W`) `dW = dyᵀ x` straight in `W`'s layout, with no transposed copies.
struct MatMulT {
    weight_grad: bool,
    /// `Wᵀ` contiguous, for the forward product when available.
    wt: Option<Tensor>,
    /// A frozen `Wᵀ` packed for bf16 products, inside autocast.
    packed: Option<Arc<PackedB>>,
    /// A frozen `W` packed for the backward's `dy W`, inside autocast.
    packed_dx: Option<Arc<PackedB>>,
}

/// Inputs of at least this many rows use (and make) the transposed copy of a frozen weight;
/// decoding steps do not.
const MIN_ROWS_TRANSPOSED: usize = 64;

impl CustomOp2 for MatMulT {
    fn name(&self) -> &'static str {
        "meet-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?);
        self.forward(x, w, l1.shape(), l2.shape(), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, dy)
    }
}

/// `x Wᵀ + b`: [`MatMulT`] with the bias as the product's starting value, and `db = Σ_rows dy`
/// for a bias that trains.
impl CustomOp3 for MatMulT {
    fn name(&self) -> &'static str {
        "meet-matmul-t-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?, f32_slice(s3, l3, "linear")?);
        self.forward(x, w, l1.shape(), l2.shape(), Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.backward(x, w, dy)?;
        let db = if b.track_op() {
            let n = b.elem_count();
            let mut db = vec![0f32; n];
            with_f32(dy, |g| g.chunks_exact(n.max(1)).for_each(|r| db.iter_mut().zip(r).for_each(|(a, v)| *a += v)))?;
            Some(Tensor::from_vec(db, n, dy.device())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

impl MatMulT {
    /// `y = x Wᵀ (+ b)` for `x: [.., k]` and `W: [n, k]`.
    fn forward(
        &self,
        x: &[f32],
        w: &[f32],
        x_shape: &Shape,
        w_shape: &Shape,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = w_shape.dims2()?;
        let (m, out) = product_shape(x_shape, k, n)?;
        // Written in full by the bias copy or the product (which accumulates only onto a bias).
        let mut y = crate::nn::unfilled(m * n);
        if let Some(b) = bias {
            if b.len() != n {
                candle_core::bail!("linear: bias of {} for {n} outputs", b.len());
            }
            y.chunks_exact_mut(n.max(1)).for_each(|r| r.copy_from_slice(b));
        }
        forward_product(x, w, &self.packed, &self.wt, (m, n, k), &mut y, bias.is_some())?;
        Ok((CpuStorage::F32(y), out))
    }

    /// `dx = dy W` and, for a trainable `W`, `dW = dyᵀ x` (into its registered buffer when it has one).
    fn backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_f32(dy, |g| product_backward(g, x, w, self.packed_dx.as_deref(), self.weight_grad))??;
        let mut dims = dy.dims().to_vec();
        dims.pop();
        dims.push(w.dim(1)?);
        Ok((Some(Tensor::from_vec(dx, dims, dy.device())?), dw))
    }
}

/// The backward products of `y = x Wᵀ` (`x: [m, k]`, `W: [n, k]`) for `dy` (`g`, `m x n` values):
/// `dx = dy W` (through `packed_w`, `W` packed for bf16, when given), and when `weight_grad`,
/// `dW = dyᵀ x` — written into `W`'s registered gradient buffer when it has one (then `None` goes
/// back to candle), else returned as a tensor.
pub(crate) fn product_backward(
    g: &[f32],
    x: &Tensor,
    w: &Tensor,
    packed_w: Option<&PackedB>,
    weight_grad: bool,
) -> candle_core::Result<(Vec<f32>, Option<Tensor>)> {
    let (n, k) = w.dims2()?;
    let m = g.len() / n.max(1);
    // Written in full by the product (`accumulate` false).
    let mut dx = crate::nn::unfilled(m * k);
    with_f32(w, |wv| input_grad_product(g, wv, packed_w, (m, n, k), &mut dx))?;
    let dw = match weight_grad.then(|| crate::nn::grad::buffer(w)) {
        None => None,
        Some(Some(buf)) => {
            with_f32(x, |xv| buf.update(|dst, acc| sgemm_autocast(n, k, m, g, true, xv, false, dst, acc)))?;
            None
        }
        Some(None) => {
            let mut dw = crate::nn::unfilled(n * k);
            with_f32(x, |xv| sgemm_autocast(n, k, m, g, true, xv, false, &mut dw, false))?;
            Some(Tensor::from_vec(dw, (n, k), w.device())?)
        }
    };
    Ok((dx, dw))
}

/// `y = x Wᵀ + bias + s (x Aᵀ) Bᵀ` for a frozen dense `W` (LoRA on a frozen layer): inputs
/// `x [.., k]`, `A [r, k]`, `B [n, r]`. The backward writes `dx = dy W + s (dy B) A` into one
/// buffer and `dA = s (dy B)ᵀ x`, `dB = dyᵀ (s x Aᵀ)` into the adapters' gradient buffers.
struct LowRankMatMulT {
    w: Tensor,
    /// `Wᵀ` contiguous, for the forward product when available.
    wt: Option<Tensor>,
    /// `Wᵀ` packed for bf16 products, inside autocast.
    packed: Option<Arc<PackedB>>,
    /// `W` packed for the backward's `dy W`, inside autocast.
    packed_dx: Option<Arc<PackedB>>,
    bias: Option<Tensor>,
    scale: f32,
    /// `s x Aᵀ` `[m, r]` from the forward pass, for `dB`.
    hs: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LowRankMatMulT {
    fn name(&self) -> &'static str {
        "meet-low-rank-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "low-rank linear";
        let (x, a, b) = (f32_slice(s1, l1, op)?, f32_slice(s2, l2, op)?, f32_slice(s3, l3, op)?);
        let (n, k) = self.w.dims2()?;
        let (r, ka) = l2.shape().dims2()?;
        if ka != k || l3.shape().dims2()? != (n, r) {
            candle_core::bail!("low-rank linear: A {:?} and B {:?} do not fit W [{n}, {k}]", l2.shape(), l3.shape());
        }
        let (m, out) = product_shape(l1.shape(), k, n)?;
        // Written in full by the bias copy or the product (which accumulates only onto a bias).
        let mut y = crate::nn::unfilled(m * n);
        if let Some(bias) = &self.bias {
            with_f32(bias, |bv| y.chunks_exact_mut(n.max(1)).for_each(|row| row.copy_from_slice(&bv[..n])))?;
        }
        let mut hs = crate::nn::unfilled(m * r);
        match (&self.packed, crate::nn::bf16::autocast_on()) {
            // `x` packed once for both of its products; `(s x Aᵀ) Bᵀ` summed into `x Wᵀ`'s blocks.
            (Some(p), true) => {
                let xa = PackedA::new(m, k, Src::F32(x), false);
                xa.gemm(r, Src::F32(a), true, &mut hs, false);
                hs.iter_mut().for_each(|v| *v *= self.scale);
                let ha = PackedA::new(m, r, Src::F32(&hs), false);
                xa.gemm_packed_then(p, &ha, Src::F32(b), true, &mut y, self.bias.is_some());
            }
            _ => {
                with_f32(&self.w, |wv| {
                    forward_product(x, wv, &self.packed, &self.wt, (m, n, k), &mut y, self.bias.is_some())
                })??;
                sgemm_autocast(m, r, k, x, false, a, true, &mut hs, false);
                hs.iter_mut().for_each(|v| *v *= self.scale);
                sgemm_autocast(m, n, r, &hs, false, b, true, &mut y, true);
            }
        }
        *self.hs.lock().unwrap_or_else(|e| e.into_inner()) = Some(hs);
        Ok((CpuStorage::F32(y), out))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = self.w.dims2()?;
        let r = a.dim(0)?;
        let mut dims = dy.dims().to_vec();
        dims.pop();
        let m: usize = dims.iter().product();
        dims.push(k);
        // Kept (not taken): a second backward over the same graph must find it too.
        let hs = self.hs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let hs = match hs {
            Some(h) => h,
            None => candle_core::bail!("low-rank linear: backward without its forward"),
        };
        // Both written in full by the first product into them (`accumulate` false).
        let mut dx = crate::nn::unfilled(m * k);
        let mut gbs = crate::nn::unfilled(m * r);
        let (buf_a, buf_b) = (crate::nn::grad::buffer(a), crate::nn::grad::buffer(b));
        let mut da = if a.track_op() && buf_a.is_none() { vec![0f32; r * k] } else { Vec::new() };
        let mut db = if b.track_op() && buf_b.is_none() { vec![0f32; n * r] } else { Vec::new() };
        with_f32(dy, |g| {
            match (&self.packed_dx, crate::nn::bf16::autocast_on()) {
                // `dy` packed once for both of its products; `(s dy B) A` summed into `dy W`'s blocks.
                (Some(p), true) => {
                    let ga = PackedA::new(m, n, Src::F32(g), false);
                    with_f32(b, |bv| ga.gemm(r, Src::F32(bv), false, &mut gbs, false))?;
                    gbs.iter_mut().for_each(|v| *v *= self.scale);
                    let gp = PackedA::new(m, r, Src::F32(&gbs), false);
                    with_f32(a, |av| ga.gemm_packed_then(p, &gp, Src::F32(av), false, &mut dx, false))?;
                }
                _ => {
                    with_f32(b, |bv| sgemm_autocast(m, r, n, g, false, bv, false, &mut gbs, false))?;
                    with_f32(&self.w, |wv| input_grad_product(g, wv, self.packed_dx.as_deref(), (m, n, k), &mut dx))?;
                    gbs.iter_mut().for_each(|v| *v *= self.scale);
                    with_f32(a, |av| sgemm_autocast(m, k, r, &gbs, false, av, false, &mut dx, true))?;
                }
            }
            with_f32(x, |xv| match &buf_a {
                Some(buf) => buf.update(|dst, acc| sgemm_autocast(r, k, m, &gbs, true, xv, false, dst, acc)),
                None if a.track_op() => sgemm_autocast(r, k, m, &gbs, true, xv, false, &mut da, false),
                None => {}
            })?;
            match &buf_b {
                Some(buf) => buf.update(|dst, acc| sgemm_autocast(n, r, m, g, true, &hs, false, dst, acc)),
                None if b.track_op() => sgemm_autocast(n, r, m, g, true, &hs, false, &mut db, false),
                None => {}
            }
            Ok::<(), candle_core::Error>(())
        })??;
        let dx = Tensor::from_vec(dx, dims, dy.device())?;
        let da = if da.is_empty() { None } else { Some(Tensor::from_vec(da, (r, k), dy.device())?) };
        let db = if db.is_empty() { None } else { Some(Tensor::from_vec(db, (n, r), dy.device())?) };
        Ok((Some(dx), da, db))
    }
}

struct PackedMatMul(Arc<PackedWeight>);

impl CustomOp1 for PackedMatMul {
    fn name(&self) -> &'static str {
        "meet-packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        let x = f32_slice(s, l, "packed matmul")?;
        let (m, out) = product_shape(l.shape(), k, n)?;
        Ok((CpuStorage::F32(self.0.matmul_t(x, m)), out))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = dy W; the weight itself is frozen.
        let (n, k) = self.0.dims();
        let w = Tensor::from_vec(self.0.dequantize(), (n, k), dy.device())?;
        let mut dims = dy.dims().to_vec();
        dims.pop();
        let rows: usize = dims.iter().product();
        dims.push(k);
        Ok(Some(dy.reshape((rows, n))?.matmul(&w)?.reshape(dims)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::packed::PackedFormat;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_bias_matches_composed_ops_with_gradients() {
        // 70 rows: a frozen weight then takes its transposed copy; a trainable one does not.
        let dev = Device::Cpu;
        let t = |n: usize, k: usize, s: f32| {
            Tensor::arange(0f32, (n * k) as f32, &dev)
                .unwrap()
                .reshape((n, k))
                .unwrap()
                .affine(0.013, -s as f64)
                .unwrap()
                .sin()
                .unwrap()
        };
        let x = Var::from_tensor(&t(70, 32, 0.3)).unwrap();
        for trainable in [true, false] {
            let (w0, b0) = (t(6, 32, 0.7), t(1, 6, 0.1).squeeze(0).unwrap());
            let (wv, bv) = (Var::from_tensor(&w0).unwrap(), Var::from_tensor(&b0).unwrap());
            let (w, b) = if trainable { (wv.as_tensor().clone(), bv.as_tensor().clone()) } else { (w0, b0) };
            let layer = Linear::new(w.clone(), Some(b.clone()));
            let probe = t(70, 6, 0.5);
            let y = layer.forward(&x).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let d: f32 =
                (&y - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "trainable {trainable}: forward {d}");
            let ga = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (want * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let mut checked = vec![x.as_tensor()];
            if trainable {
                checked.extend([wv.as_tensor(), bv.as_tensor()]);
            } else {
                assert!(ga.get(&b).is_none(), "a frozen bias gets no gradient");
            }
            for v in checked {
                let d: f32 = (ga.get(v).unwrap() - gb.get(v).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(d < 1e-4, "trainable {trainable}: gradient {d} of {:?}", v.dims());
            }
        }
    }

    /// `y + s (x Aᵀ) Bᵀ` from candle ops; `fused` says whether to offer the low-rank form.
    #[derive(Debug)]
    struct TestAdapter {
        a: Tensor,
        b: Tensor,
        scale: f64,
        fused: bool,
    }

    impl LinearAdapter for TestAdapter {
        fn apply(&self, x: &Tensor, y: Tensor) -> crate::Result<Tensor> {
            let h = x.broadcast_matmul(&self.a.t()?)?;
            Ok((y + (h.broadcast_matmul(&self.b.t()?)? * self.scale)?)?)
        }

        fn low_rank(&self) -> Option<(Tensor, Tensor, f64)> {
            self.fused.then(|| (self.a.clone(), self.b.clone(), self.scale))
        }
    }

    #[test]
    fn a_frozen_layer_with_a_low_rank_adapter_is_one_op_with_the_same_values_and_gradients() {
        let dev = Device::Cpu;
        let t = |dims: &[usize], s: f64| {
            let n: usize = dims.iter().product();
            Tensor::arange(0f32, n as f32, &dev)
                .unwrap()
                .reshape(dims)
                .unwrap()
                .affine(0.017, s)
                .unwrap()
                .sin()
                .unwrap()
        };
        let (w, bias) = (t(&[12, 20], 0.2), t(&[12], 0.4));
        let x = Var::from_tensor(&t(&[3, 5, 20], 0.1)).unwrap();
        let (a, b) = (Var::from_tensor(&t(&[4, 20], 0.3)).unwrap(), Var::from_tensor(&t(&[12, 4], 0.5)).unwrap());
        let probe = t(&[3, 5, 12], 0.7);
        let run = |fused: bool| {
            let mut l = Linear::new(w.clone(), Some(bias.clone()));
            let adapter = TestAdapter { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: 1.5, fused };
            l.adapter = Some(Arc::new(adapter));
            let y = l.forward(&x).unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> =
                [x.as_tensor(), a.as_tensor(), b.as_tensor()].iter().map(|v| g.get(v).unwrap().clone()).collect();
            (y, grads)
        };
        let ((yf, gf), (yg, gg)) = (run(true), run(false));
        let diff = |p: &Tensor, q: &Tensor| -> f32 {
            (p - q).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
        };
        // Relative bounds: the two paths sum in different orders, and the kernels chosen (AVX2,
        // AVX-512) differ by processor; values here reach ~100, where an f32 ulp is 7.6e-6.
        let max_abs =
            |t: &Tensor| -> f32 { t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap() };
        assert!(diff(&yf, &yg) <= 1e-6 * max_abs(&yg).max(1.0), "forward {} of {}", diff(&yf, &yg), max_abs(&yg));
        for (name, (p, q)) in ["dx", "dA", "dB"].iter().zip(gf.iter().zip(&gg)) {
            assert!(diff(p, q) <= 1e-6 * max_abs(q).max(1.0), "{name}: {} of {}", diff(p, q), max_abs(q));
        }
    }

    #[test]
    fn packed_layer_matches_dense_layer_and_passes_input_gradients() {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..6 * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let p = Arc::new(PackedWeight::quantize(PackedFormat::Q8_0, 6, 32, &w).unwrap());
        let dense = Linear::new(Tensor::from_vec(p.dequantize(), (6, 32), &dev).unwrap(), None);
        let packed = Linear {
            weight: LinearWeight::Packed(p),
            bias: None,
            adapter: None,
            transposed: Default::default(),
            bf16: Default::default(),
            bf16_dx: Default::default(),
        };
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 2.0 * 3.0 * 32.0, &dev)
                .unwrap()
                .reshape((2, 3, 32))
                .unwrap()
                .affine(0.01, -0.5)
                .unwrap(),
        )
        .unwrap();
        let a = dense.forward(&x).unwrap();
        let b = packed.forward(&x).unwrap();
        assert_eq!(a.dims(), &[2, 3, 6]);
        let d: f32 = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(d < 1e-5, "{d}");
        let ga = a.sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let gb = b.sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d: f32 = (ga - gb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
