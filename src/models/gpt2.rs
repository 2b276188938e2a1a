//! GPT-2 (Radford et al. 2019), the common small baseline.
//!
//! Mirrors transformers' `models/gpt2/modeling_gpt2.py`: learned absolute positions (`wpe`),
//! pre-norm LayerNorm blocks, attention through one fused `c_attn` projection (q, k, v side by
//! side) scaled by 1/√d (and by 1/(layer + 1) with `scale_attn_by_inverse_layer_idx`), a GELU-new
//! MLP, the LM head tied to the token embeddings. Its projections are `Conv1D`s, weights stored
//! `[in, out]` (see [`Builder::conv1d`]). Checkpoints name tensors under `transformer.` or, in the
//! original OpenAI conversions, at the root (`h.0.attn.c_attn.weight`); both load.

use crate::models::{parse_config, Architecture, AttentionInputs, CausalLm, KvCache};
use crate::nn::attention::attention;
use crate::nn::linear::Linear;
use crate::nn::ops::{self, gelu_new};
use crate::nn::{Builder, Embedding, Init, LayerNorm};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;

/// GPT-2 checkpoints (`GPT2LMHeadModel`).
pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["gpt2"],
    build: |config, b, path| {
        let cfg: Config = parse_config(config, path)?;
        cfg.validate().map_err(|e| crate::Error::parse(path, e))?;
        // The original OpenAI conversions keep their tensors at the root, without `transformer.`.
        let root_names = b.has_tensor("wte.weight") && !b.has_tensor("transformer.wte.weight");
        Ok(Box::new(Gpt2::new(&cfg, b, root_names)?))
    },
    vocab_tensors: &["transformer.wte.weight", "wte.weight", "lm_head.weight"],
    lora_targets: &["c_attn", "c_proj", "c_fc"],
    fan_in_fan_out: true,
};

/// The fields of a GPT-2 `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// `4 * n_embd` when absent or null.
    pub n_inner: Option<usize>,
    #[serde(default = "default_positions")]
    pub n_positions: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Only where the scores are computed in f32 (they always are here): same values.
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

fn default_positions() -> usize {
    1024
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_init() -> f64 {
    0.02
}
fn default_true() -> bool {
    true
}

impl Config {
    /// Checks what the model cannot run.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !["gelu_new", "gelu_pytorch_tanh"].contains(&self.activation_function.as_str()) {
            return Err(format!("activation_function '{}' is not supported (gelu_new)", self.activation_function));
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!("n_embd {} must be a multiple of n_head {}", self.n_embd, self.n_head));
        }
        Ok(())
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_c_proj: Linear,
    heads: usize,
    scale: f64,
}

impl Block {
    fn new(cfg: &Config, layer: usize, b: &Builder) -> Result<Self> {
        let (h, eps, std) = (cfg.n_embd, cfg.layer_norm_epsilon, cfg.initializer_range);
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let (attn, mlp) = (b.pp("attn"), b.pp("mlp"));
        let d = h / cfg.n_head;
        let mut scale = if cfg.scale_attn_weights { 1.0 / (d as f64).sqrt() } else { 1.0 };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            ln_1: b.pp("ln_1").layer_norm(h, eps)?,
            c_attn: attn.pp("c_attn").conv1d(h, 3 * h, std)?,
            attn_c_proj: attn.pp("c_proj").conv1d(h, h, std)?,
            ln_2: b.pp("ln_2").layer_norm(h, eps)?,
            c_fc: mlp.pp("c_fc").conv1d(h, inner, std)?,
            mlp_c_proj: mlp.pp("c_proj").conv1d(inner, h, std)?,
            heads: cfg.n_head,
            scale,
        })
    }

    fn attention(
        &self,
        x: &Tensor,
        inp: &AttentionInputs,
        cache: Option<&mut (Tensor, Tensor)>,
        past: usize,
    ) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        let (h, d) = (self.heads, hidden / self.heads);
        let qkv = self.c_attn.forward(x)?; // (b, t, 3 hidden): q, k, v side by side
        let q = qkv.narrow(2, 0, hidden)?.reshape((b, t, h, d))?;
        let k = qkv.narrow(2, hidden, hidden)?.reshape((b, t, h, d))?;
        let v = qkv.narrow(2, 2 * hidden, hidden)?.reshape((b, t, h, d))?;
        let (k, v) = super::with_cache(cache, k, v, past)?;
        let out = attention(&q, &k, &v, inp.mask.as_ref(), self.scale)?.reshape((b, t, hidden))?;
        Ok(self.attn_c_proj.forward(&out)?)
    }

    fn forward(
        &self,
        x: &Tensor,
        inp: &AttentionInputs,
        cache: Option<&mut (Tensor, Tensor)>,
        past: usize,
    ) -> Result<Tensor> {
        let h = ops::add(x, &self.attention(&self.ln_1.forward(x)?, inp, cache, past)?)?;
        let m = self.mlp_c_proj.forward(&gelu_new(&self.c_fc.forward(&self.ln_2.forward(&h)?)?)?)?;
        Ok(ops::add(&h, &m)?)
    }
}

/// The decoder with its LM head (`GPT2LMHeadModel`).
pub struct Gpt2 {
    wte: Embedding,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    cfg: Config,
}

impl Gpt2 {
    /// Builds the model from `b`: HF names under `transformer.`, or at the root when the
    /// checkpoint has them there (`root_names`).
    pub fn new(cfg: &Config, b: &Builder, root_names: bool) -> Result<Self> {
        cfg.validate().map_err(Error::Invalid)?;
        let m = if root_names { b.clone() } else { b.pp("transformer") };
        let (h, std) = (cfg.n_embd, cfg.initializer_range);
        let wte = m.pp("wte").embedding(cfg.vocab_size, h, std)?;
        let wpe = m.pp("wpe").get((cfg.n_positions, h), "weight", Init::Normal(std))?;
        let blocks = (0..cfg.n_layer).map(|i| Block::new(cfg, i, &m.pp(format!("h.{i}")))).collect::<Result<_>>()?;
        let ln_f = m.pp("ln_f").layer_norm(h, cfg.layer_norm_epsilon)?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.as_linear()
        } else {
            b.pp("lm_head").linear(h, cfg.vocab_size, false, std)?
        };
        Ok(Self { wte, wpe, blocks, ln_f, lm_head, cfg: cfg.clone() })
    }
}

impl CausalLm for Gpt2 {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.cfg.n_embd
    }

    fn max_positions(&self) -> usize {
        self.cfg.n_positions
    }

    fn num_layers(&self) -> usize {
        self.cfg.n_layer
    }

    fn num_heads(&self) -> usize {
        self.cfg.n_head
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.wte.forward(ids)?)
    }

    fn forward_embeds(&self, x: &Tensor, inp: &AttentionInputs, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let past = super::cache_past(cache.as_deref(), t)?;
        let mut x = (x + super::position_embeddings(&self.wpe, inp, b, t, h)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let c = cache.as_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, inp, c, past)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(self.ln_f.forward(&x)?)
    }

    fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(h)?)
    }

    fn dense_lm_head(&self) -> Option<crate::nn::linear::DenseWeight> {
        self.lm_head.dense_cpu()
    }

    fn new_cache(&self, batch: usize, capacity: usize, device: &Device) -> Result<KvCache> {
        let (h, d) = (self.cfg.n_head, self.cfg.n_embd / self.cfg.n_head);
        super::zero_cache(self.blocks.len(), (batch, capacity, h, d), capacity, device)
    }
}
