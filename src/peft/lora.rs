//! LoRA: `y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ` with `A: [r, in]`, `B: [out, r]`, `s = alpha / r`
//! (or `alpha / √r` with rsLoRA). Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models"; Kalajdzievski 2023 for rsLoRA. Mirrors PEFT's `tuners/lora/layer.py`, including
//! several named adapters on one model and a per-row choice of adapter within a batch (PEFT's
//! `adapter_names` forward argument), which MEET needs: one adapter per preference.

use crate::models::{Architecture, ARCHITECTURES};
use crate::nn::linear::{matmul_t, LinearAdapter};
use crate::nn::AdapterSource;
use crate::peft::RowControls;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, RwLock};

/// One adapter's hyper-parameters (PEFT's `LoraConfig` fields of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator (`lora_alpha`).
    #[serde(default = "default_alpha", alias = "lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input while training (`lora_dropout`).
    #[serde(default, alias = "lora_dropout")]
    pub dropout: f64,
    /// Module names the adapter wraps, as PEFT names them for the architecture (Llama: q_proj,
    /// k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-Neo: q_proj, k_proj, v_proj,
    /// out_proj, c_fc, c_proj; GPT-2: c_attn, c_proj, c_fc), or PEFT's `"all-linear"`: all of them.
    #[serde(default = "default_targets", deserialize_with = "targets")]
    pub target_modules: Vec<String>,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The wrapped weights are stored `[in, out]` (GPT-2's `Conv1D`), as PEFT's field of this
    /// name; set from the model's architecture ([`LoraConfig::for_architecture`]), not by users.
    #[serde(skip)]
    pub fan_in_fan_out: bool,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    ["q_proj", "v_proj"].iter().map(|s| s.to_string()).collect()
}

/// PEFT's name for every linear layer but the output head: the architecture's projections.
pub const ALL_LINEAR: &str = "all-linear";

/// `target_modules` as a list of names, or PEFT's single string `"all-linear"`.
fn targets<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Targets {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Targets::deserialize(d)? {
        Targets::One(s) => vec![s],
        Targets::Many(v) => v,
    })
}

/// The projections a LoRA adapter may wrap in the Llama family.
pub const TARGETABLE: &[&str] = crate::models::llama::ARCHITECTURE.lora_targets;

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: default_targets(),
            use_rslora: false,
            fan_in_fan_out: false,
        }
    }
}

impl LoraConfig {
    /// The factor on `B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The fields in which `other` differs from `self`, as `name: self vs other` (empty when the
    /// two describe the same adapter). `target_modules` is a set, as PEFT treats it (it saves the
    /// names in its own order).
    pub fn differences(&self, other: &LoraConfig) -> Vec<String> {
        let mut out = Vec::new();
        if self.r != other.r {
            out.push(format!("r: {} vs {}", self.r, other.r));
        }
        if self.alpha != other.alpha {
            out.push(format!("lora_alpha: {} vs {}", self.alpha, other.alpha));
        }
        if self.dropout != other.dropout {
            out.push(format!("lora_dropout: {} vs {}", self.dropout, other.dropout));
        }
        let set = |c: &LoraConfig| c.target_modules.iter().cloned().collect::<std::collections::BTreeSet<_>>();
        if set(self) != set(other) {
            let (a, b) = (set(self), set(other));
            out.push(format!(
                "target_modules: [{}] vs [{}]",
                a.into_iter().collect::<Vec<_>>().join(", "),
                b.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        if self.use_rslora != other.use_rslora {
            out.push(format!("use_rslora: {} vs {}", self.use_rslora, other.use_rslora));
        }
        out
    }

    /// Checks the rank, dropout and target names.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Invalid("lora: r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!("lora: dropout {} must be in [0, 1)", self.dropout)));
        }
        if self.target_modules.is_empty() {
            return Err(Error::Invalid("lora: target_modules is empty".into()));
        }
        let mut known: Vec<&str> = Vec::new();
        for t in ARCHITECTURES.iter().flat_map(|a| a.lora_targets.iter().copied()) {
            if !known.contains(&t) {
                known.push(t);
            }
        }
        for t in &self.target_modules {
            if t == ALL_LINEAR && self.target_modules.len() == 1 {
                continue;
            }
            if !known.contains(&t.as_str()) {
                return Err(Error::Invalid(format!(
                    "lora: unknown target module '{t}' (choose among {})",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// This adapter on a model of `arch` (its `model_type` for messages): every target must be
    /// one of the architecture's layers, and its weight layout sets `fan_in_fan_out`.
    pub fn for_architecture(&self, arch: &Architecture, model_type: &str) -> Result<LoraConfig> {
        if self.target_modules == [ALL_LINEAR] {
            let target_modules = arch.lora_targets.iter().map(|t| t.to_string()).collect();
            return Ok(LoraConfig { target_modules, fan_in_fan_out: arch.fan_in_fan_out, ..self.clone() });
        }
        if let Some(t) = self.target_modules.iter().find(|t| !arch.lora_targets.contains(&t.as_str())) {
            return Err(Error::Invalid(format!(
                "lora: {model_type} models have no '{t}' layers to target (choose among {})",
                arch.lora_targets.join(", ")
            )));
        }
        Ok(LoraConfig { fan_in_fan_out: arch.fan_in_fan_out, ..self.clone() })
    }
}

/// Which adapter each forward pass uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// Base model only (the reference policy of LoRA-DPO).
    Off,
    /// One adapter for every row.
    All(usize),
    /// An adapter (or none) per batch row.
    PerRow(Vec<Option<usize>>),
    /// Several weighted adapters per batch row: their deltas, each times its weight, summed (as
    /// PEFT sums the deltas of several active adapters).
    Mixed(Vec<RowControls>),
    /// The same weighted adapters for every row.
    Several(RowControls),
}

impl Routing {
    /// The routing of per-row controls: [`Routing::PerRow`] when no row has more than one
    /// control and every weight is 1 (the one-dimension case, computed as before), else
    /// [`Routing::Mixed`].
    pub fn of_rows(rows: &[RowControls]) -> Routing {
        if rows.iter().all(|r| r.len() <= 1 && r.iter().all(|&(_, w)| w == 1.0)) {
            Routing::PerRow(rows.iter().map(|r| r.first().map(|&(i, _)| i)).collect())
        } else {
            Routing::Mixed(rows.to_vec())
        }
    }
}

/// Named adapters attached to one model: their configs, their trainable `A`/`B` matrices and the
/// routing every wrapped layer reads. Shared by all LoRA layers of the model.
pub struct Adapters {
    pub names: Vec<String>,
    pub configs: Vec<LoraConfig>,
    /// `A` and `B` of every adapter, named as PEFT's in-memory state dict:
    /// `model.layers.0.self_attn.q_proj.lora_A.{adapter}.weight`.
    pub varmap: VarMap,
    routing: RwLock<Routing>,
    /// Seeded dropout stream while training; `None` in evaluation.
    dropout_rng: Mutex<Option<ChaCha8Rng>>,
    seed: u64,
}

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Adapters({:?})", self.names)
    }
}

impl Adapters {
    /// Adapters `(name, config)` whose fresh weights are drawn from `seed`. Every adapter is
    /// routed to all rows when there is one, otherwise routing starts [`Routing::Off`].
    pub fn new(adapters: Vec<(String, LoraConfig)>, seed: u64) -> Result<Arc<Self>> {
        if adapters.is_empty() {
            return Err(Error::Invalid("lora: no adapters given".into()));
        }
        for (i, (n, c)) in adapters.iter().enumerate() {
            c.validate().map_err(|e| Error::Invalid(format!("adapter '{n}': {e}")))?;
            if n.is_empty() || n.contains(['.', '/']) || adapters[..i].iter().any(|(m, _)| m == n) {
                return Err(Error::Invalid(format!("lora: adapter name '{n}' is empty, repeated or has '.' or '/'")));
            }
        }
        let routing = if adapters.len() == 1 { Routing::All(0) } else { Routing::Off };
        let (names, configs) = adapters.into_iter().unzip();
        Ok(Arc::new(Self {
            names,
            configs,
            varmap: VarMap::new(),
            routing: RwLock::new(routing),
            dropout_rng: Mutex::new(None),
            seed,
        }))
    }

    /// Sets which adapter the following forward passes use.
    pub fn route(&self, routing: Routing) {
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = routing;
    }

    /// The current routing.
    pub fn routing(&self) -> Routing {
        self.routing.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Training mode with dropout drawn from a stream fixed by `(seed, step)`, so that a resumed
    /// run draws the same masks; `None` switches dropout off (evaluation).
    pub fn set_training_step(&self, step: Option<u64>) {
        let rng = step.map(|s| ChaCha8Rng::seed_from_u64(self.seed ^ s.wrapping_mul(0x9E3779B97F4A7C15)));
        *self.dropout_rng.lock().unwrap_or_else(|p| p.into_inner()) = rng;
    }

    /// The `A`/`B` weights of adapter `index` for the module at `path` (HF path without
    /// `.weight`), created when missing: `A` kaiming-uniform with a = √5 (bound `1/√in`) as
    /// `nn.Linear`'s default that PEFT keeps, `B` zeros, so a fresh adapter changes nothing.
    fn weights(
        &self,
        index: usize,
        path: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let r = self.configs[index].r;
        let name = &self.names[index];
        let (ka, kb) = (format!("{path}.lora_A.{name}.weight"), format!("{path}.lora_B.{name}.weight"));
        let mut data = self.varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
        if !data.contains_key(&ka) {
            let h = ka.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ h);
            let bound = 1.0 / (in_dim as f32).sqrt();
            let a: Vec<f32> = (0..r * in_dim).map(|_| rng.gen_range(-bound..bound)).collect();
            data.insert(ka.clone(), Var::from_tensor(&Tensor::from_vec(a, (r, in_dim), device)?)?);
            data.insert(kb.clone(), Var::zeros((out_dim, r), DType::F32, device)?);
        }
        let get = |k: &str, shape: (usize, usize)| -> Result<Tensor> {
            let v = data.get(k).ok_or_else(|| Error::Invalid(format!("lora: missing '{k}'")))?;
            if v.dims() != [shape.0, shape.1] {
                return Err(Error::Invalid(format!("lora: '{k}' has shape {:?}, expected {shape:?}", v.dims())));
            }
            Ok(v.as_tensor().clone())
        };
        Ok((get(&ka, (r, in_dim))?, get(&kb, (out_dim, r))?))
    }

    /// Replaces adapter `index`'s weights with `tensors` (PEFT names relative to the model,
    /// `model.layers.0.self_attn.q_proj.lora_A.weight`). Every tensor must be used and match.
    pub fn load_weights(&self, index: usize, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let name = &self.names[index];
        let data = self.varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
        for (k, t) in tensors {
            let internal = k
                .strip_suffix(".weight")
                .map(|p| format!("{p}.{name}.weight"))
                .ok_or_else(|| Error::Invalid(format!("adapter tensor '{k}' does not end in .weight")))?;
            let v = data.get(&internal).ok_or_else(|| {
                Error::Invalid(format!("adapter tensor '{k}' matches no wrapped module of the model"))
            })?;
            if v.dims() != t.dims() {
                return Err(Error::Invalid(format!(
                    "adapter tensor '{k}' has shape {:?}, expected {:?}",
                    t.dims(),
                    v.dims()
                )));
            }
            v.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Adapter `index`'s tensors under PEFT's saved names (relative to the model, no adapter name).
    pub fn tensors(&self, index: usize) -> Result<Vec<(String, Tensor)>> {
        let suffix = format!(".{}.weight", self.names[index]);
        let data = self.varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
        let mut out: Vec<(String, Tensor)> = data
            .iter()
            .filter_map(|(k, v)| k.strip_suffix(&suffix).map(|p| (format!("{p}.weight"), v.as_tensor().clone())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn dropout_mask(&self, dims: &[usize], p: f64, device: &Device) -> Result<Option<Tensor>> {
        let mut guard = self.dropout_rng.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rng) = guard.as_mut() else { return Ok(None) };
        if p == 0.0 {
            return Ok(None);
        }
        let n: usize = dims.iter().product();
        let keep = 1.0 / (1.0 - p) as f32;
        let m: Vec<f32> = (0..n).map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep }).collect();
        Ok(Some(Tensor::from_vec(m, dims, device)?))
    }
}

impl Adapters {
    /// What a model being built asks for the adapters of each of its linear layers.
    pub fn source(self: &Arc<Self>) -> Arc<dyn AdapterSource> {
        Arc::new(Source(self.clone()))
    }
}

/// [`Adapters`] as the model builder sees them.
struct Source(Arc<Adapters>);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LoraAdapters").field(&self.0.names).finish()
    }
}

impl AdapterSource for Source {
    fn layer(
        &self,
        path: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<Option<Arc<dyn LinearAdapter>>> {
        Ok(LoraLayer::new(&self.0, path, in_dim, out_dim, device)?.map(|l| Arc::new(l) as Arc<dyn LinearAdapter>))
    }
}

impl LinearAdapter for LoraLayer {
    fn apply(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        LoraLayer::apply(self, x, y)
    }

    fn low_rank(&self) -> Option<(Tensor, Tensor, f64)> {
        let i = match self.adapters.routing() {
            Routing::All(i) => i,
            Routing::PerRow(rows) if rows.iter().all(|r| *r == rows[0]) => rows.first().copied().flatten()?,
            _ => return None,
        };
        let (a, b, scale) = self.parts.get(i)?.as_ref()?;
        // Dropout draws a mask per call: that takes the general path.
        let training = self.adapters.dropout_rng.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if training && self.adapters.configs[i].dropout > 0.0 {
            return None;
        }
        Some((a.clone(), b.clone(), *scale))
    }
}

/// The adapters wrapping one linear layer.
#[derive(Clone)]
pub struct LoraLayer {
    /// `(A, B, scale)` per adapter; `None` where an adapter does not target this module.
    parts: Vec<Option<(Tensor, Tensor, f64)>>,
    adapters: Arc<Adapters>,
}

impl std::fmt::Debug for LoraLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoraLayer({} adapters)", self.parts.len())
    }
}

impl LoraLayer {
    /// The adapters of `adapters` that target `module` (the last part of `path`), or `None`.
    pub fn new(
        adapters: &Arc<Adapters>,
        path: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<Option<Self>> {
        let module = path.rsplit('.').next().unwrap_or(path);
        let mut any = false;
        let parts = (0..adapters.names.len())
            .map(|i| {
                let c = &adapters.configs[i];
                if !c.target_modules.iter().any(|t| t == module) {
                    return Ok(None);
                }
                any = true;
                let (a, b) = adapters.weights(i, path, in_dim, out_dim, device)?;
                Ok(Some((a, b, c.scale())))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(any.then(|| Self { parts, adapters: adapters.clone() }))
    }

    fn delta(&self, i: usize, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a, b, scale)) = &self.parts[i] else { return Ok(None) };
        let x = match self.adapters.dropout_mask(x.dims(), self.adapters.configs[i].dropout, x.device())? {
            Some(m) => x.mul(&m)?,
            None => x.clone(),
        };
        // Both products through the layer kernel, whose backward writes dA and dB directly.
        // The scale on the rank-r activations: a pass over r columns instead of the output's.
        let h = matmul_t(&x, a)?.affine(*scale, 0.0)?; // (.., r)
        let y = matmul_t(&h, b)?; // (.., out)
        let dims = y.dims().to_vec();
        Ok(Some(y.reshape(dims)?))
    }

    /// `y` plus adapter `i`'s output for every row (unchanged where `i` does not wrap this layer).
    fn add_delta(&self, i: usize, x: &Tensor, y: Tensor) -> Result<Tensor> {
        Ok(match self.delta(i, x)? {
            Some(d) => (y + d)?,
            None => y,
        })
    }

    /// `y + Σ_i w_ri · delta_i(x_r)` over the adapters routed to each row `r`, each row with its
    /// own weights; an adapter's delta is computed on its own rows only.
    fn apply_mixed(&self, x: &Tensor, y: Tensor, rows: &[RowControls]) -> Result<Tensor> {
        let b = x.dims()[0];
        if rows.len() != b {
            return Err(Error::Invalid(format!("lora routing names {} rows for a batch of {b}", rows.len())));
        }
        let mut y = y;
        for i in 0..self.parts.len() {
            let used: Vec<(u32, f32)> = rows
                .iter()
                .enumerate()
                .filter_map(|(r, c)| c.iter().find(|&&(j, _)| j == i).map(|&(_, w)| (r as u32, w)))
                .collect();
            if used.is_empty() {
                continue;
            }
            if let Some(&(_, w)) = used.iter().find(|&&(_, w)| !w.is_finite()) {
                return Err(Error::Invalid(format!(
                    "adapter '{}': weight {w} is not a finite number",
                    self.adapters.names[i]
                )));
            }
            let sel: Vec<u32> = used.iter().map(|&(r, _)| r).collect();
            let idx = Tensor::new(sel.as_slice(), x.device())?;
            let Some(d) = self.delta(i, &x.index_select(&idx, 0)?)? else { continue };
            let mut wdims = vec![1; d.rank()];
            wdims[0] = sel.len();
            let d = if used.iter().all(|&(_, w)| w == 1.0) {
                d
            } else {
                let w: Vec<f32> = used.iter().map(|&(_, w)| w).collect();
                d.broadcast_mul(&Tensor::from_vec(w, wdims, x.device())?.to_dtype(d.dtype())?)?
            };
            // Back to the batch's rows: the rows without this adapter take the zero row at the
            // end (a gather, whose backward scatters the gradient).
            let zero = d.narrow(0, 0, 1)?.zeros_like()?;
            let mut map = vec![sel.len() as u32; b];
            for (pos, &r) in sel.iter().enumerate() {
                map[r as usize] = pos as u32;
            }
            let full = Tensor::cat(&[d, zero], 0)?.index_select(&Tensor::new(map.as_slice(), x.device())?, 0)?;
            y = (y + full)?;
        }
        Ok(y)
    }

    /// `y + Σ` the routed adapters' outputs for input `x: (b, .., in)`.
    pub fn apply(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let rows = match self.adapters.routing() {
            Routing::Off => return Ok(y),
            Routing::All(i) => return self.add_delta(i, x, y),
            Routing::PerRow(rows) => rows,
            Routing::Mixed(rows) => return self.apply_mixed(x, y, &rows),
            Routing::Several(c) => {
                let rows = vec![c; x.dims()[0]];
                return self.apply_mixed(x, y, &rows);
            }
        };
        let b = x.dims()[0];
        if rows.len() != b {
            return Err(Error::Invalid(format!("lora routing names {} rows for a batch of {b}", rows.len())));
        }
        if rows.iter().all(|r| *r == rows[0]) {
            return match rows[0] {
                Some(i) => self.add_delta(i, x, y),
                None => Ok(y),
            };
        }
        // Each adapter runs on its own rows only; the pieces are put back in row order
        // by one gather (whose backward scatters the gradient).
        let mut pieces = Vec::new();
        let mut order = Vec::with_capacity(b);
        for i in 0..self.parts.len() {
            let sel: Vec<u32> = (0..b as u32).filter(|&r| rows[r as usize] == Some(i)).collect();
            if sel.is_empty() {
                continue;
            }
            let idx = Tensor::new(sel.as_slice(), x.device())?;
            match self.delta(i, &x.index_select(&idx, 0)?)? {
                Some(d) => pieces.push(d),
                None => pieces.push(y.index_select(&idx, 0)?.zeros_like()?),
            }
            order.extend(sel);
        }
        let rest: Vec<u32> = (0..b as u32).filter(|&r| !order.contains(&r)).collect();
        if !rest.is_empty() {
            let mut dims = y.dims().to_vec();
            dims[0] = rest.len();
            pieces.push(Tensor::zeros(dims, y.dtype(), y.device())?);
            order.extend(rest);
        }
        let mut inverse = vec![0u32; b];
        for (pos, &r) in order.iter().enumerate() {
            inverse[r as usize] = pos as u32;
        }
        let delta = Tensor::cat(&pieces, 0)?.index_select(&Tensor::new(inverse.as_slice(), x.device())?, 0)?;
        Ok((y + delta)?)
    }
}
