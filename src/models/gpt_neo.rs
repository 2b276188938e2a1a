//! GPT-Neo (EleutherAI; Black et al. 2021), the model MEET was evaluated on.
//!
//! Mirrors transformers' `models/gpt_neo/modeling_gpt_neo.py`: learned absolute positions (`wpe`)
//! added to the token embeddings, pre-norm LayerNorm blocks, attention layers alternating `global`
//! (causal) and `local` (causal within a sliding window of `window_size` keys), q/k/v projections
//! without bias and an output projection with one, attention scores not scaled by 1/√d (GPT-Neo's
//! quirk), a GELU-new MLP, and the LM head tied to the token embeddings. Fields are named like the
//! HF tensors they load (`transformer.h.{i}.attn.attention.q_proj.weight`, …).

use crate::models::{parse_config, Architecture, AttentionInputs, CausalLm, KvCache};
use crate::nn::attention::{attention, Mask};
use crate::nn::linear::Linear;
use crate::nn::ops::{self, gelu_new};
use crate::nn::{Builder, Embedding, LayerNorm};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;

/// GPT-Neo checkpoints (`GPTNeoForCausalLM`).
pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["gpt_neo"],
    build: |config, b, path| {
        let cfg: Config = parse_config(config, path)?;
        cfg.validate().map_err(|e| crate::Error::parse(path, e))?;
        Ok(Box::new(GptNeo::new(&cfg, b)?))
    },
    vocab_tensors: &["transformer.wte.weight", "lm_head.weight"],
    lora_targets: &["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
    fan_in_fan_out: false,
};

/// The fields of a GPT-Neo `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// `4 * hidden_size` when absent or null.
    pub intermediate_size: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_window")]
    pub window_size: usize,
    /// One of `global` / `local` per layer (written by transformers beside `attention_types`).
    pub attention_layers: Option<Vec<String>>,
    /// `[[["global", "local"], repeat], ...]`, expanded into `attention_layers` when that is absent.
    pub attention_types: Option<Vec<(Vec<String>, usize)>>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_tied")]
    pub tie_word_embeddings: bool,
}

fn default_max_pos() -> usize {
    2048
}
fn default_window() -> usize {
    256
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
fn default_tied() -> bool {
    true
}

impl Config {
    /// The kind of each layer, `true` = local.
    pub fn local_layers(&self) -> std::result::Result<Vec<bool>, String> {
        let names: Vec<String> = match (&self.attention_layers, &self.attention_types) {
            (Some(l), _) => l.clone(),
            (None, Some(t)) => t.iter().flat_map(|(kinds, n)| (0..*n).flat_map(move |_| kinds.clone())).collect(),
            (None, None) => return Err("neither attention_layers nor attention_types is given".into()),
        };
        if names.len() != self.num_layers {
            return Err(format!("{} attention layer kinds for num_layers {}", names.len(), self.num_layers));
        }
        names
            .iter()
            .map(|k| match k.as_str() {
                "global" => Ok(false),
                "local" => Ok(true),
                other => Err(format!("unknown attention layer kind '{other}' (global or local)")),
            })
            .collect()
    }

    /// Checks what the model cannot run.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !["gelu_new", "gelu_pytorch_tanh"].contains(&self.activation_function.as_str()) {
            return Err(format!("activation_function '{}' is not supported (gelu_new)", self.activation_function));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!("hidden_size {} must be a multiple of num_heads {}", self.hidden_size, self.num_heads));
        }
        if self.window_size == 0 {
            return Err("window_size must be at least 1".into());
        }
        self.local_layers().map(|_| ())
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    /// The sliding window of a local layer.
    window: Option<usize>,
}

impl SelfAttention {
    fn new(cfg: &Config, local: bool, b: &Builder) -> Result<Self> {
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        Ok(Self {
            q_proj: b.pp("q_proj").linear(h, h, false, std)?,
            k_proj: b.pp("k_proj").linear(h, h, false, std)?,
            v_proj: b.pp("v_proj").linear(h, h, false, std)?,
            out_proj: b.pp("out_proj").linear(h, h, true, std)?,
            heads: cfg.num_heads,
            window: local.then_some(cfg.window_size),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        inp: &AttentionInputs,
        cache: Option<&mut (Tensor, Tensor)>,
        past: usize,
    ) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        let (h, d) = (self.heads, hidden / self.heads);
        let q = self.q_proj.forward(x)?.reshape((b, t, h, d))?;
        let k = self.k_proj.forward(x)?.reshape((b, t, h, d))?;
        let v = self.v_proj.forward(x)?.reshape((b, t, h, d))?;
        let (k, v) = super::with_cache(cache, k, v, past)?;
        let mask = match (self.window, &inp.mask) {
            (Some(w), Some(m)) => Some(m.clone().with_window(w)),
            (Some(w), None) => Some(Mask::causal(b, t, past, None).with_window(w)),
            (None, m) => m.clone(),
        };
        // No 1/√d scaling: GPT-Neo's attention (modeling_gpt_neo.py `_attn`).
        let out = attention(&q, &k, &v, mask.as_ref(), 1.0)?.reshape((b, t, hidden))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: SelfAttention,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
}

impl Block {
    fn new(cfg: &Config, local: bool, b: &Builder) -> Result<Self> {
        let (h, eps, std) = (cfg.hidden_size, cfg.layer_norm_epsilon, cfg.initializer_range);
        let inner = cfg.intermediate_size.unwrap_or(4 * h);
        let mlp = b.pp("mlp");
        Ok(Self {
            ln_1: b.pp("ln_1").layer_norm(h, eps)?,
            attn: SelfAttention::new(cfg, local, &b.pp("attn").pp("attention"))?,
            ln_2: b.pp("ln_2").layer_norm(h, eps)?,
            c_fc: mlp.pp("c_fc").linear(h, inner, true, std)?,
            c_proj: mlp.pp("c_proj").linear(inner, h, true, std)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        inp: &AttentionInputs,
        cache: Option<&mut (Tensor, Tensor)>,
        past: usize,
    ) -> Result<Tensor> {
        let h = ops::add(x, &self.attn.forward(&self.ln_1.forward(x)?, inp, cache, past)?)?;
        let m = self.c_proj.forward(&gelu_new(&self.c_fc.forward(&self.ln_2.forward(&h)?)?)?)?;
        Ok(ops::add(&h, &m)?)
    }
}

/// The decoder with its LM head (`GPTNeoForCausalLM`).
pub struct GptNeo {
    wte: Embedding,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    cfg: Config,
}

impl GptNeo {
    /// Builds the model from `b` (HF names under `transformer.`; `lm_head.weight` when untied).
    pub fn new(cfg: &Config, b: &Builder) -> Result<Self> {
        cfg.validate().map_err(Error::Invalid)?;
        let local = cfg.local_layers().map_err(Error::Invalid)?;
        let m = b.pp("transformer");
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let wte = m.pp("wte").embedding(cfg.vocab_size, h, std)?;
        let wpe = m.pp("wpe").get((cfg.max_position_embeddings, h), "weight", crate::nn::Init::Normal(std))?;
        let blocks = local
            .iter()
            .enumerate()
            .map(|(i, &l)| Block::new(cfg, l, &m.pp(format!("h.{i}"))))
            .collect::<Result<_>>()?;
        let ln_f = m.pp("ln_f").layer_norm(h, cfg.layer_norm_epsilon)?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.as_linear()
        } else {
            b.pp("lm_head").linear(h, cfg.vocab_size, false, std)?
        };
        Ok(Self { wte, wpe, blocks, ln_f, lm_head, cfg: cfg.clone() })
    }
}

impl CausalLm for GptNeo {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn num_layers(&self) -> usize {
        self.cfg.num_layers
    }

    fn num_heads(&self) -> usize {
        self.cfg.num_heads
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
        let (h, d) = (self.cfg.num_heads, self.cfg.hidden_size / self.cfg.num_heads);
        super::zero_cache(self.blocks.len(), (batch, capacity, h, d), capacity, device)
    }
}
