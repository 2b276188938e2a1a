//! Causal language model architectures, one file each, behind the small [`CausalLm`] trait.
//! A new architecture is a new file plus one line in [`build`].

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
    /// Token ids `(b, t)` to embeddings `(b, t, hidden)`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// Embeddings `(b, t, hidden)` to final, normalised hidden states `(b, t, hidden)`; with a cache
    /// the new keys and values are appended to it.
    fn forward_embeds(&self, x: &Tensor, inp: &AttentionInputs, cache: Option<&mut KvCache>) -> Result<Tensor>;
    /// Hidden states to logits `(.., vocab)`.
    fn lm_head(&self, h: &Tensor) -> Result<Tensor>;
    /// The LM head's weight `[vocab, hidden]` when it is a frozen dense matrix without bias, so
    /// that a loss may fuse it (see [`crate::objectives::logps::frozen_head_logps`]).
    fn frozen_lm_head(&self) -> Option<Tensor> {
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

/// Architectures `meet` implements, by HF `model_type`.
pub const SUPPORTED: &[&str] = &["llama", "qwen2"];

/// Builds the model an HF `config.json` describes. `path` names the config in errors.
pub fn build(config: &serde_json::Value, b: &Builder, path: &Path) -> Result<Box<dyn CausalLm>> {
    let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    match model_type {
        "llama" | "qwen2" => {
            let cfg: llama::Config = serde_json::from_value(config.clone())
                .map_err(|e| Error::parse(path, format!("invalid {model_type} config: {e}")))?;
            cfg.validate().map_err(|e| Error::parse(path, e))?;
            Ok(Box::new(llama::Llama::new(&cfg, b)?))
        }
        "" => Err(Error::parse(path, "missing field 'model_type'")),
        other => Err(Error::format(
            path,
            format!("unsupported model_type '{other}' (meet supports: {})", SUPPORTED.join(", ")),
        )),
    }
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
