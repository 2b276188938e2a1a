//! Causal language model architectures, one file each, behind the small [`CausalLm`] trait.
//! A new architecture is a new file (with its [`Architecture`]) plus one line in
//! [`ARCHITECTURES`].

pub mod gpt2;
pub mod gpt_neo;
pub mod llama;
pub mod pretrained;

use crate::nn::attention::Mask;
use crate::nn::Builder;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::Arc;

/// What a decoder needs besides the hidden states: the position of every token (for rotary
/// embeddings) and the additive attention mask (causal and padding).
#[derive(Debug, Clone)]
pub struct AttentionInputs {
    /// Position of each (row, step), `b * t` entries, row-major.
    pub positions: Arc<Vec<u32>>,
    /// Causal with the padding hidden (see [`Mask`]); `None` when every key is visible (a single
    /// step without padding).
    pub mask: Option<Mask>,
}

impl AttentionInputs {
    /// Inputs for `t` new tokens per row after `past` cached ones.
    ///
    /// `attention_mask` (`b` rows of `past + t` entries, 1 = token, 0 = padding) marks left
    /// padding. Positions then count real tokens only, as transformers' `generate` does
    /// (`cumsum(mask) - 1`, padding at position 1).
    pub fn new(b: usize, t: usize, past: usize, attention_mask: Option<&[Vec<u8>]>) -> Result<Self> {
        let total = past + t;
        let mut positions = Vec::with_capacity(b * t);
        match attention_mask {
            Some(am) => {
                if am.len() != b || am.iter().any(|r| r.len() != total) {
                    return Err(Error::Invalid(format!("attention mask must be {b} rows of {total} entries")));
                }
                for row in am {
                    let mut count = 0u32;
                    for (j, &m) in row.iter().enumerate() {
                        count += (m != 0) as u32;
                        if j >= past {
                            positions.push(if m != 0 { count - 1 } else { 1 });
                        }
                    }
                }
            }
            None => (0..b).for_each(|_| positions.extend(past as u32..total as u32)),
        }
        let padded = attention_mask.is_some_and(|am| am.iter().any(|r| r.contains(&0)));
        let mask = if t == 1 && !padded {
            None
        } else {
            let hidden = attention_mask.filter(|_| padded).map(|am| am.iter().flatten().map(|&m| m == 0).collect());
            Some(Mask::causal(b, t, past, hidden))
        };
        Ok(Self { positions: Arc::new(positions), mask })
    }
}

/// Per-layer key/value tensors `(b, capacity, kv_heads, head_dim)`, filled up to `len`.
pub struct KvCache {
    pub layers: Vec<(Tensor, Tensor)>,
    pub len: usize,
    pub capacity: usize,
}

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// Width of the hidden states and token embeddings.
    fn hidden_size(&self) -> usize;
    /// Longest sequence the model accepts (`max_position_embeddings`).
    fn max_positions(&self) -> usize;
    /// Decoder layers.
    fn num_layers(&self) -> usize;
    /// Attention (query) heads per layer.
    fn num_heads(&self) -> usize;
    /// Token ids `(b, t)` to embeddings `(b, t, hidden)`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// Embeddings `(b, t, hidden)` to final, normalised hidden states `(b, t, hidden)`; with a cache
    /// the new keys and values are appended to it.
    fn forward_embeds(&self, x: &Tensor, inp: &AttentionInputs, cache: Option<&mut KvCache>) -> Result<Tensor>;
    /// Hidden states to logits `(.., vocab)`.
    fn lm_head(&self, h: &Tensor) -> Result<Tensor>;
    /// The LM head's weight `[vocab, hidden]` when it is a dense CPU matrix without bias or adapter
    /// (a `Var` when it trains; frozen, with its bf16 packing inside autocast), so that a loss may
    /// fuse it (see [`crate::objectives::logps`]).
    fn dense_lm_head(&self) -> Option<crate::nn::linear::DenseWeight> {
        None
    }
    /// An empty cache for `batch` rows of up to `capacity` tokens.
    fn new_cache(&self, batch: usize, capacity: usize, device: &Device) -> Result<KvCache>;

    /// Logits `(b, t, vocab)` for every position of unpadded ids `(b, t)`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.max_positions() {
            return Err(Error::Invalid(format!(
                "sequence of {t} tokens is longer than the model's context of {}",
                self.max_positions()
            )));
        }
        let inp = AttentionInputs::new(b, t, 0, None)?;
        let h = self.forward_embeds(&self.embed(ids)?, &inp, None)?;
        self.lm_head(&h)
    }
}

/// What the code above the models knows of an architecture, besides the [`CausalLm`] it builds.
pub struct Architecture {
    /// HF `model_type`s it reads.
    pub model_types: &'static [&'static str],
    /// Builds the model a config describes (`path` names the config in errors).
    pub build: fn(&serde_json::Value, &Builder, &Path) -> Result<Box<dyn CausalLm>>,
    /// Tensors with one row per vocabulary entry (input embeddings, an untied LM head), by every
    /// name checkpoints use; a new token grows those present.
    pub vocab_tensors: &'static [&'static str],
    /// The linear layers LoRA may target, by PEFT's module names.
    pub lora_targets: &'static [&'static str],
    /// Projection weights stored `[in, out]` (GPT-2's `Conv1D`): PEFT's `fan_in_fan_out`.
    pub fan_in_fan_out: bool,
}

/// Every architecture `meet` implements, one line each.
pub const ARCHITECTURES: &[&Architecture] = &[&llama::ARCHITECTURE, &gpt_neo::ARCHITECTURE, &gpt2::ARCHITECTURE];

/// The `model_type`s `meet` reads.
pub fn supported() -> Vec<&'static str> {
    ARCHITECTURES.iter().flat_map(|a| a.model_types.iter().copied()).collect()
}

/// The architecture of an HF `config.json`. `path` names the config in errors.
pub fn architecture(config: &serde_json::Value, path: &Path) -> Result<&'static Architecture> {
    let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if model_type.is_empty() {
        return Err(Error::parse(path, "missing field 'model_type'"));
    }
    ARCHITECTURES.iter().copied().find(|a| a.model_types.contains(&model_type)).ok_or_else(|| {
        Error::format(
            path,
            format!("unsupported model_type '{model_type}' (meet supports: {})", supported().join(", ")),
        )
    })
}

/// Builds the model an HF `config.json` describes. `path` names the config in errors.
pub fn build(config: &serde_json::Value, b: &Builder, path: &Path) -> Result<Box<dyn CausalLm>> {
    (architecture(config, path)?.build)(config, b, path)
}

/// Reads a config into an architecture's typed `Config` (unknown fields ignored, as transformers).
pub fn parse_config<T: serde::de::DeserializeOwned>(config: &serde_json::Value, path: &Path) -> Result<T> {
    let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    serde_json::from_value(config.clone()).map_err(|e| Error::parse(path, format!("invalid {model_type} config: {e}")))
}

/// Tokens already in a cache of `t` more, checked against its capacity.
fn cache_past(cache: Option<&KvCache>, t: usize) -> Result<usize> {
    match cache {
        Some(c) if c.len + t > c.capacity => Err(Error::Invalid(format!(
            "{} cached + {t} new tokens exceed the KV cache capacity of {}",
            c.len, c.capacity
        ))),
        Some(c) => Ok(c.len),
        None => Ok(0),
    }
}

/// Learned absolute position embeddings `(b, t, h)` of `inp`'s positions (which follow left
/// padding, as transformers' position ids from the attention mask).
fn position_embeddings(wpe: &Tensor, inp: &AttentionInputs, b: usize, t: usize, h: usize) -> Result<Tensor> {
    let rows = wpe.dim(0)?;
    if let Some(&p) = inp.positions.iter().find(|&&p| p as usize >= rows) {
        return Err(Error::Invalid(format!("position {p} is beyond the model's {rows} learned positions")));
    }
    let idx = Tensor::from_vec(inp.positions.as_ref().clone(), b * t, wpe.device())?;
    Ok(wpe.index_select(&idx, 0)?.reshape((b, t, h))?)
}

/// Keys and values `(b, t, heads, d)` of `t` new steps written into a layer's cache after `past`
/// cached ones: all `past + t` of them, as views of the cache (or the new ones without a cache).
fn with_cache(cache: Option<&mut (Tensor, Tensor)>, k: Tensor, v: Tensor, past: usize) -> Result<(Tensor, Tensor)> {
    let Some((kc, vc)) = cache else { return Ok((k, v)) };
    let t = k.dim(1)?;
    kc.slice_set(&k.contiguous()?, 1, past)?;
    vc.slice_set(&v.contiguous()?, 1, past)?;
    Ok((kc.narrow(1, 0, past + t)?, vc.narrow(1, 0, past + t)?))
}

/// A cache of `layers` zeroed key/value pairs of `shape` `(b, capacity, heads, head_dim)`.
fn zero_cache(layers: usize, shape: (usize, usize, usize, usize), capacity: usize, device: &Device) -> Result<KvCache> {
    let zeros = || Tensor::zeros(shape, candle_core::DType::F32, device);
    let layers = (0..layers).map(|_| Ok((zeros()?, zeros()?))).collect::<Result<Vec<_>>>()?;
    Ok(KvCache { layers, len: 0, capacity })
}

/// Fresh weights for `config`, by HF name, drawn from `seed` (normal with the config's
/// `initializer_range`, norms at 1), as transformers' `_init_weights` does.
pub fn random_weights(
    config: &serde_json::Value,
    seed: u64,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let varmap = candle_nn::VarMap::new();
    build(config, &Builder::init(&varmap, seed, device), Path::new("<random init>"))?;
    let data = varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect())
}
