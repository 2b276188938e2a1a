//! Building blocks shared by the model files: linear layers (dense or packed), fused differentiable
//! ops, and [`Builder`], which hands each layer its weights by Hugging Face tensor name.

pub mod attention;
pub mod bf16;
pub mod gemm;
pub mod grad;
pub mod linear;
pub mod ops;
pub mod packed;
pub mod simd;
pub mod team;

use crate::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use linear::{Linear, LinearAdapter, LinearWeight};
use packed::PackedWeight;
use rand::SeedableRng;
use rand_distr::Distribution;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A buffer of `len` f32 for an output that the code right after it writes in full before
/// anything reads it (a product with `accumulate` false, an element-wise kernel's output): not
/// zeroed. Zeroing the outputs of a training step cost ~13% of the calling thread's time in bf16
/// LoRA (`perf`), serial work while the kernel team's helper waited.
#[allow(clippy::uninit_vec)]
pub(crate) fn unfilled(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; f32 has no invalid bit patterns, and every caller writes all
    // `len` elements before any is read (the contract above, kept at each call site), which is
    // what candle's own CPU backend does with its uninitialised outputs.
    unsafe { v.set_len(len) };
    v
}

/// How a fresh parameter is filled when a model is built without a checkpoint.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Normal with this standard deviation (HF `initializer_range`).
    Normal(f64),
    /// Every element equal (norm weights start at 1).
    Const(f64),
}

#[derive(Clone)]
enum Origin {
    /// Weights loaded from a file; a missing tensor is an error naming the file. `used` collects
    /// the names the model asked for, so that leftovers can be reported.
    Loaded {
        path: Arc<PathBuf>,
        packed: Arc<HashMap<String, Arc<PackedWeight>>>,
        used: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
        /// The format a dense weight of a linear layer is rounded to when the layer is built
        /// (`--weights q8_0|bf16|...`); tensors read any other way (GPT-2's position table,
        /// norms) stay as stored.
        quantize: Option<packed::PackedFormat>,
    },
    /// Fresh parameters drawn from a seeded RNG (tiny test models).
    Init { varmap: VarMap, seed: u64 },
}

/// Hands out weights by their HF name (`model.layers.0.self_attn.q_proj.weight`), like
/// candle-nn's `VarBuilder`, which it wraps, plus packed weights for frozen inference.
#[derive(Clone)]
pub struct Builder<'a> {
    vb: VarBuilder<'a>,
    origin: Origin,
    adapters: Option<Arc<dyn AdapterSource>>,
}

/// Where a model being built gets the adapter of each linear layer (LoRA, from `peft`), by the
/// layer's path (`model.layers.0.self_attn.q_proj`).
pub trait AdapterSource: std::fmt::Debug + Send + Sync {
    /// The adapter of the layer at `path` (`in_dim -> out_dim`), or `None` when none targets it.
    fn layer(
        &self,
        path: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<Option<Arc<dyn LinearAdapter>>>;
}

impl<'a> Builder<'a> {
    /// Weights from `vb` (tensors or a pre-filled `VarMap`) and `packed`, loaded from `path`.
    pub fn loaded(vb: VarBuilder<'a>, packed: HashMap<String, Arc<PackedWeight>>, path: PathBuf) -> Self {
        let used = Default::default();
        let origin = Origin::Loaded { path: Arc::new(path), packed: Arc::new(packed), used, quantize: None };
        Self { vb, origin, adapters: None }
    }

    /// Rounds the dense weight of every linear layer built from here on to `format` (whose rows
    /// split into whole blocks; others stay dense): frozen inference weights only.
    pub fn quantizing(mut self, format: packed::PackedFormat) -> Self {
        if let Origin::Loaded { quantize, .. } = &mut self.origin {
            *quantize = Some(format);
        }
        self
    }

    /// The format dense linear weights of `[_, k]` are rounded to, when one is set and `k` splits
    /// into its blocks.
    fn quantize_for(&self, k: usize) -> Option<packed::PackedFormat> {
        match &self.origin {
            Origin::Loaded { quantize: Some(f), .. } if k.is_multiple_of(f.block_size()) => Some(*f),
            _ => None,
        }
    }

    /// A linear layer over the dense `w` (`[out_dim, in_dim]`) rounded to `format`.
    fn quantized_linear(
        &self,
        format: packed::PackedFormat,
        w: &Tensor,
        bias: Option<Tensor>,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Linear> {
        let p = PackedWeight::quantize(format, out_dim, in_dim, &w.flatten_all()?.to_vec1::<f32>()?)?;
        self.packed_linear(Arc::new(p), bias, in_dim, out_dim)
    }

    /// A linear layer over the packed `w` (`[out_dim, in_dim]`).
    fn packed_linear(
        &self,
        w: Arc<PackedWeight>,
        bias: Option<Tensor>,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Linear> {
        let adapter = self.adapter(in_dim, out_dim)?;
        Ok(Linear {
            weight: LinearWeight::Packed(w),
            bias,
            adapter,
            transposed: Default::default(),
            bf16: Default::default(),
            bf16_dx: Default::default(),
        })
    }

    /// Names of the loaded tensors the model has asked for so far.
    pub fn used(&self) -> std::collections::HashSet<String> {
        match &self.origin {
            Origin::Loaded { used, .. } => used.lock().map(|u| u.clone()).unwrap_or_default(),
            Origin::Init { .. } => Default::default(),
        }
    }

    fn mark_used(&self, full: String) {
        if let Origin::Loaded { used, .. } = &self.origin {
            if let Ok(mut u) = used.lock() {
                u.insert(full);
            }
        }
    }

    /// Fresh trainable parameters in `varmap`, drawn deterministically from `seed`.
    pub fn init(varmap: &VarMap, seed: u64, device: &Device) -> Self {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        Self { vb, origin: Origin::Init { varmap: varmap.clone(), seed }, adapters: None }
    }

    /// Wraps the linear layers that `adapters` target with LoRA.
    pub fn with_adapters(mut self, adapters: Option<Arc<dyn AdapterSource>>) -> Self {
        self.adapters = adapters;
        self
    }

    /// The builder for a sub-module.
    pub fn pp(&self, s: impl ToString) -> Self {
        Self { vb: self.vb.pp(s), origin: self.origin.clone(), adapters: self.adapters.clone() }
    }

    /// The device weights live on.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    fn path(&self, name: &str) -> String {
        let p = self.vb.prefix();
        if p.is_empty() {
            name.to_string()
        } else {
            format!("{p}.{name}")
        }
    }

    /// Whether the source has tensor `name` (below this builder's prefix); always false for fresh
    /// parameters.
    pub fn has_tensor(&self, name: &str) -> bool {
        matches!(self.origin, Origin::Loaded { .. }) && self.vb.contains_tensor(name)
    }

    /// The tensor `name` with the given shape; missing or misshapen tensors are errors naming the
    /// tensor and the file.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        match &self.origin {
            Origin::Loaded { path, .. } => {
                self.mark_used(self.path(name));
                if !self.vb.contains_tensor(name) {
                    return Err(Error::format(path.as_ref(), format!("missing tensor '{}'", self.path(name))));
                }
                self.vb.get(shape.clone(), name).map_err(|e| {
                    Error::format(
                        path.as_ref(),
                        format!("tensor '{}' (expected shape {shape:?}): {e}", self.path(name)),
                    )
                })
            }
            Origin::Init { varmap, seed } => {
                let full = self.path(name);
                if !self.vb.contains_tensor(name) {
                    let t = init_tensor(&shape, init, *seed, &full, self.device())?;
                    varmap
                        .data()
                        .lock()
                        .map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?
                        .insert(full, Var::from_tensor(&t)?);
                }
                Ok(self.vb.get(shape, name)?)
            }
        }
    }

    /// A linear layer `in_dim -> out_dim`: `weight` packed when the loader packed it, else dense.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool, std: f64) -> Result<Linear> {
        let bias = if bias { Some(self.get(out_dim, "bias", Init::Const(0.0))?) } else { None };
        if let Origin::Loaded { packed, path, .. } = &self.origin {
            if let Some(p) = packed.get(&self.path("weight")) {
                self.mark_used(self.path("weight"));
                if p.dims() != (out_dim, in_dim) {
                    return Err(Error::format(
                        path.as_ref(),
                        format!(
                            "tensor '{}' has shape {:?}, expected [{out_dim}, {in_dim}]",
                            self.path("weight"),
                            p.dims()
                        ),
                    ));
                }
                return self.packed_linear(p.clone(), bias, in_dim, out_dim);
            }
        }
        if let Some(format) = self.quantize_for(in_dim) {
            let w = self.get((out_dim, in_dim), "weight", Init::Normal(std))?;
            return self.quantized_linear(format, &w, bias, in_dim, out_dim);
        }
        let mut l = Linear::new(self.get((out_dim, in_dim), "weight", Init::Normal(std))?, bias);
        l.adapter = self.adapter(in_dim, out_dim)?;
        Ok(l)
    }

    /// GPT-2's `Conv1D` `in_dim -> out_dim`: a linear layer whose `weight` is stored `[in, out]`
    /// (with a bias). A trainable weight stays the stored `Var` (its transpose is a view whose
    /// gradient reaches it, and what is saved keeps the stored layout); a frozen one is laid out
    /// `[out, in]` once for the product kernels.
    pub fn conv1d(&self, in_dim: usize, out_dim: usize, std: f64) -> Result<Linear> {
        let bias = Some(self.get(out_dim, "bias", Init::Const(0.0))?);
        let w = self.get((in_dim, out_dim), "weight", Init::Normal(std))?;
        let w = if w.is_variable() { w.t()? } else { w.t()?.contiguous()? };
        if let Some(format) = self.quantize_for(in_dim) {
            // Rounded in the `[out, in]` layout, blocks along the input as for any linear layer.
            return self.quantized_linear(format, &w, bias, in_dim, out_dim);
        }
        let mut l = Linear::new(w, bias);
        l.adapter = self.adapter(in_dim, out_dim)?;
        Ok(l)
    }

    fn adapter(&self, in_dim: usize, out_dim: usize) -> Result<Option<Arc<dyn LinearAdapter>>> {
        match &self.adapters {
            Some(a) => a.layer(&self.vb.prefix(), in_dim, out_dim, self.device()),
            None => Ok(None),
        }
    }
}

fn init_tensor(shape: &Shape, init: Init, seed: u64, name: &str, device: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let data: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Normal(std) => {
            // One stream per tensor name, so adding a layer does not reshuffle the others.
            let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h);
            let normal = rand_distr::Normal::new(0.0, std).map_err(|e| Error::Invalid(e.to_string()))?;
            (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
        }
    };
    Ok(Tensor::from_vec(data, shape.clone(), device)?)
}

/// A token embedding table (`weight: [vocab, hidden]`), dense or packed.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub weight: LinearWeight,
    pub hidden: usize,
}

impl Embedding {
    /// Looks up `ids` (u32, any shape) and appends the hidden dimension.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden);
        match &self.weight {
            LinearWeight::Dense(w) => ops::embedding(w, ids),
            LinearWeight::Packed(p) => {
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let (vocab, hidden) = p.dims();
                let mut out = vec![0f32; ids.len() * hidden];
                for (row, &id) in out.chunks_exact_mut(hidden).zip(&ids) {
                    if id as usize >= vocab {
                        candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
                    }
                    p.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, dims, &Device::Cpu)
            }
        }
    }

    /// The output projection that shares this table (tied embeddings).
    pub fn as_linear(&self) -> Linear {
        Linear {
            weight: self.weight.clone(),
            bias: None,
            adapter: None,
            transposed: Default::default(),
            bf16: Default::default(),
            bf16_dx: Default::default(),
        }
    }
}

/// LayerNorm with weight and bias (`weight`, `bias`), as torch's `nn.LayerNorm`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

impl<'a> Builder<'a> {
    /// A LayerNorm over `size` features (weight 1, bias 0 when initialised).
    pub fn layer_norm(&self, size: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.get(size, "weight", Init::Const(1.0))?,
            bias: self.get(size, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// An embedding table `vocab x hidden` under `weight`.
    pub fn embedding(&self, vocab: usize, hidden: usize, std: f64) -> Result<Embedding> {
        let lin = self.linear(hidden, vocab, false, std)?;
        Ok(Embedding { weight: lin.weight, hidden })
    }
}
