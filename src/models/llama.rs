//! Llama-family decoder: Llama 2/3, SmolLM, TinyLlama, Mistral-style GQA, Qwen2 (q/k/v bias).
//!
//! Mirrors transformers' `models/llama/modeling_llama.py` (and `qwen2/modeling_qwen2.py` for the
//! biases): pre-norm RMSNorm blocks, rotary embeddings in the "rotate_half" layout, grouped-query
//! attention, SwiGLU MLP. Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models".
//! Fields are named like the HF tensors they load.

use crate::models::{parse_config, Architecture, AttentionInputs, CausalLm, KvCache};
use crate::nn::attention::attention;
use crate::nn::linear::Linear;
use crate::nn::ops::{self, rms_norm, rope, swiglu, swiglu_packed, RopeTables};
use crate::nn::{Builder, Embedding, Init};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Llama-family checkpoints (and Qwen2's, which differ in their biases).
pub const ARCHITECTURE: Architecture = Architecture {
    model_types: &["llama", "qwen2"],
    build: |config, b, path| {
        let cfg: Config = parse_config(config, path)?;
        cfg.validate().map_err(|e| crate::Error::parse(path, e))?;
        Ok(Box::new(Llama::new(&cfg, b)?))
    },
    vocab_tensors: &["model.embed_tokens.weight", "lm_head.weight"],
    lora_targets: &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    fan_in_fan_out: false,
};

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) of an HF config
/// (`{"rope_type": "llama3", "factor": 8.0, ...}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type", default = "default_rope_type")]
    pub rope_type: String,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// The fields of an HF `config.json` this model reads (unknown fields are ignored, as
/// transformers does).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
}

fn default_rope_type() -> String {
    "default".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}
fn default_init() -> f64 {
    0.02
}

impl Config {
    /// Key/value heads (GQA); equal to the query heads when absent.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 always has q/k/v biases; Llama has them when `attention_bias` says so.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// Llama's `attention_bias` covers o_proj too (modeling_llama.py); Qwen2's o_proj has none.
    pub fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias == Some(true)
    }

    /// Checks what the model cannot run.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act '{}' is not supported (only silu)", self.hidden_act));
        }
        if self.num_attention_heads == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return Err(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        self.inv_freq().map(|_| ())
    }

    /// RoPE base: `rope_parameters.rope_theta` (transformers 5), else `rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10000.0)
    }

    /// Rotary inverse frequencies in f32, as transformers' `_compute_default_rope_parameters` and
    /// `_compute_llama3_parameters`.
    pub fn inv_freq(&self) -> std::result::Result<Vec<f32>, String> {
        let dim = self.head_dim();
        let base = self.theta() as f32;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        let Some(s) = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()) else { return Ok(inv) };
        let factor = s.factor.unwrap_or(1.0) as f32;
        match s.rope_type.as_str() {
            "default" => Ok(inv),
            "linear" => Ok(inv.iter().map(|f| f / factor).collect()),
            "llama3" => {
                let low = s.low_freq_factor.unwrap_or(1.0) as f32;
                let high = s.high_freq_factor.unwrap_or(4.0) as f32;
                let old = s.original_max_position_embeddings.unwrap_or(8192) as f32;
                let (low_wl, high_wl) = (old / low, old / high);
                Ok(inv
                    .iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f32::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wl - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect())
            }
            other => Err(format!("rope_scaling type '{other}' is not supported (default, linear, llama3)")),
        }
    }
}

/// The q, k, v projections: separate (trainable), or stacked into one product when their
/// weights are frozen and packed (inference), which saves a pass over the input and a barrier.
enum Qkv {
    Separate { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    Fused(Linear),
}

struct Attention {
    qkv: Qkv,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, b: &Builder) -> Result<Self> {
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let (bias, std) = (cfg.qkv_bias(), cfg.initializer_range);
        let q_proj = b.pp("q_proj").linear(cfg.hidden_size, h * d, bias, std)?;
        let k_proj = b.pp("k_proj").linear(cfg.hidden_size, kvh * d, bias, std)?;
        let v_proj = b.pp("v_proj").linear(cfg.hidden_size, kvh * d, bias, std)?;
        let qkv = match Linear::fuse_packed(&[&q_proj, &k_proj, &v_proj]) {
            Some(fused) => Qkv::Fused(fused),
            None => Qkv::Separate { q_proj, k_proj, v_proj },
        };
        Ok(Self {
            qkv,
            o_proj: b.pp("o_proj").linear(h * d, cfg.hidden_size, cfg.o_bias(), std)?,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rt: &Arc<RopeTables>,
        inp: &AttentionInputs,
        cache: Option<&mut (Tensor, Tensor)>,
        past: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x)?; // (b, t, (h + 2 kvh) d)
                (y.narrow(2, 0, h * d)?, y.narrow(2, h * d, kvh * d)?, y.narrow(2, (h + kvh) * d, kvh * d)?)
            }
            Qkv::Separate { q_proj, k_proj, v_proj } => (q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?),
        };
        let q = q.reshape((b, t, h, d))?;
        let k = k.reshape((b, t, kvh, d))?;
        let v = v.reshape((b, t, kvh, d))?;
        let q = rope(&q, rt, &inp.positions)?; // (b, t, h, d)
        let k = rope(&k, rt, &inp.positions)?; // (b, t, kvh, d)
        let (k, v) = super::with_cache(cache, k, v, past)?; // (b, T, kvh, d)
        let out = attention(&q, &k, &v, inp.mask.as_ref(), 1.0 / (d as f64).sqrt())?; // (b, t, h, d)
        let out = out.reshape((b, t, h * d))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// gate and up projections: separate, or stacked into one product as [`Qkv`].
enum GateUp {
    Separate { gate_proj: Linear, up_proj: Linear },
    Fused(Linear),
}

struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Config, b: &Builder) -> Result<Self> {
        let (hs, is, bias, std) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.initializer_range);
        let gate_proj = b.pp("gate_proj").linear(hs, is, bias, std)?;
        let up_proj = b.pp("up_proj").linear(hs, is, bias, std)?;
        let gate_up = match Linear::fuse_packed(&[&gate_proj, &up_proj]) {
            Some(fused) => GateUp::Fused(fused),
            None => GateUp::Separate { gate_proj, up_proj },
        };
        Ok(Self { gate_up, down_proj: b.pp("down_proj").linear(is, hs, bias, std)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_up {
            GateUp::Fused(gu) => swiglu_packed(&gu.forward(x)?)?, // (.., 2 * intermediate) -> (.., intermediate)
            GateUp::Separate { gate_proj, up_proj } => swiglu(&gate_proj.forward(x)?, &up_proj.forward(x)?)?,
        };
        Ok(self.down_proj.forward(&h)?)
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(cfg: &Config, b: &Builder) -> Result<Self> {
        Ok(Self { weight: b.get(cfg.hidden_size, "weight", Init::Const(1.0))?, eps: cfg.rms_norm_eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.weight, self.eps)?)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &Config, b: &Builder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(cfg, &b.pp("self_attn"))?,
            mlp: Mlp::new(cfg, &b.pp("mlp"))?,
            input_layernorm: RmsNorm::new(cfg, &b.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(cfg, &b.pp("post_attention_layernorm"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rt: &Arc<RopeTables>,
        inp: &AttentionInputs,
        cache: Option<&mut (Tensor, Tensor)>,
        past: usize,
    ) -> Result<Tensor> {
        let h = ops::add(x, &self.self_attn.forward(&self.input_layernorm.forward(x)?, rt, inp, cache, past)?)?;
        Ok(ops::add(&h, &self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

/// The decoder with its LM head (`LlamaForCausalLM`).
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Arc<RopeTables>,
    cfg: Config,
}

impl Llama {
    /// Builds the model from `b` (HF names: `model.embed_tokens.weight`, `model.layers.{i}...`,
    /// `model.norm.weight`, `lm_head.weight` unless tied).
    pub fn new(cfg: &Config, b: &Builder) -> Result<Self> {
        cfg.validate().map_err(Error::Invalid)?;
        let m = b.pp("model");
        let embed_tokens = m.pp("embed_tokens").embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, &m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg, &m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.as_linear()
        } else {
            b.pp("lm_head").linear(cfg.hidden_size, cfg.vocab_size, false, cfg.initializer_range)?
        };
        let inv = cfg.inv_freq().map_err(Error::Invalid)?;
        let rope = Arc::new(RopeTables::new(&inv, cfg.max_position_embeddings, b.device())?);
        Ok(Self { embed_tokens, layers, norm, lm_head, rope, cfg: cfg.clone() })
    }

    /// The parsed configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl CausalLm for Llama {
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
        self.cfg.num_hidden_layers
    }

    fn num_heads(&self) -> usize {
        self.cfg.num_attention_heads
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    fn forward_embeds(&self, x: &Tensor, inp: &AttentionInputs, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let past = match cache.as_ref() {
            Some(c) if c.len + t > c.capacity => {
                return Err(Error::Invalid(format!(
                    "{} cached + {t} new tokens exceed the KV cache capacity of {}",
                    c.len, c.capacity
                )))
            }
            Some(c) => c.len,
            None => 0,
        };
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let c = cache.as_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, &self.rope, inp, c, past)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.norm.forward(&h)
    }

    fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(h)?)
    }

    fn dense_lm_head(&self) -> Option<crate::nn::linear::DenseWeight> {
        self.lm_head.dense_cpu()
    }

    fn new_cache(&self, batch: usize, capacity: usize, device: &Device) -> Result<KvCache> {
        let shape = (batch, capacity, self.cfg.kv_heads(), self.cfg.head_dim());
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, candle_core::DType::F32, device)?,
                    Tensor::zeros(shape, candle_core::DType::F32, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers, len: 0, capacity })
    }
}
