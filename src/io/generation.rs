//! Generation settings that come with a model: its special token ids and sampling defaults, from
//! `config.json` and `generation_config.json` (and written back to them).

use crate::{Error, Result};
use serde_json::json;

/// Token ids and sampling defaults from `config.json` / `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

fn ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl GenerationDefaults {
    /// Ids from the model config, plus the tokenizer's EOS token (`tokenizer_eos`).
    pub fn from_config(config: &serde_json::Value, tokenizer_eos: Option<u32>) -> Self {
        let mut d = Self::default();
        d.update_from(config);
        if let Some(id) = tokenizer_eos {
            if !d.eos_token_ids.contains(&id) {
                d.eos_token_ids.push(id);
            }
        }
        d
    }

    /// The token that pads batches: `pad_token_id`, else the first EOS token (transformers'
    /// `generate` does the same). A model with neither is an error, not a silent 0.
    pub fn pad_id(&self) -> Result<u32> {
        self.pad_token_id.or(self.eos_token_ids.first().copied()).ok_or_else(|| {
            Error::Invalid(
                "the model defines neither pad_token_id nor an EOS token: set pad_token_id in its generation_config.json"
                    .into(),
            )
        })
    }

    /// Overrides with the fields present in `g` (a `generation_config.json`).
    pub fn update_from(&mut self, g: &serde_json::Value) {
        if let Some(b) = ids(g.get("bos_token_id")).first() {
            self.bos_token_id = Some(*b);
        }
        let eos = ids(g.get("eos_token_id"));
        if !eos.is_empty() {
            self.eos_token_ids = eos;
        }
        if let Some(p) = ids(g.get("pad_token_id")).first() {
            self.pad_token_id = Some(*p);
        }
        if let Some(v) = g.get("do_sample").and_then(|v| v.as_bool()) {
            self.do_sample = v;
        }
        if let Some(v) = g.get("temperature").and_then(|v| v.as_f64()) {
            self.temperature = Some(v);
        }
        if let Some(v) = g.get("top_k").and_then(|v| v.as_u64()) {
            self.top_k = Some(v as usize);
        }
        if let Some(v) = g.get("top_p").and_then(|v| v.as_f64()) {
            self.top_p = Some(v);
        }
        if let Some(v) = g.get("max_new_tokens").and_then(|v| v.as_u64()) {
            self.max_new_tokens = Some(v as usize);
        }
    }

    /// `generation_config.json` content.
    pub fn to_json(&self) -> serde_json::Value {
        let mut g = json!({});
        if let Some(b) = self.bos_token_id {
            g["bos_token_id"] = json!(b);
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => g["eos_token_id"] = json!(one),
            many => g["eos_token_id"] = json!(many),
        }
        if let Some(p) = self.pad_token_id {
            g["pad_token_id"] = json!(p);
        }
        if self.do_sample {
            g["do_sample"] = json!(true);
        }
        for (k, v) in [("temperature", self.temperature), ("top_p", self.top_p)] {
            if let Some(v) = v {
                g[k] = json!(v);
            }
        }
        if let Some(k) = self.top_k {
            g["top_k"] = json!(k);
        }
        if let Some(n) = self.max_new_tokens {
            g["max_new_tokens"] = json!(n);
        }
        g
    }
}
