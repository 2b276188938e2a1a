//! The model under training with its controls: a pretrained decoder, optionally wrapped by LoRA
//! adapters and preceded by soft prompts, and the one forward pass every objective uses —
//! log-probabilities of the labelled tokens of a batch, each row under its own control.

use crate::models::AttentionInputs;
use crate::peft::lora::{Adapters, Routing};
use crate::peft::prompt::SoftPrompts;
use crate::{Error, Pretrained, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// A tokenised batch, right-padded to `t` (as the HF trainers collate for training).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    /// `b * t` token ids.
    pub ids: Vec<u32>,
    /// `b * t` labels, `-100` where no loss is taken (prompt, padding); shifted inside.
    pub labels: Vec<i64>,
    /// `b * t`, 1 for tokens, 0 for padding.
    pub attention: Vec<u8>,
    /// The controls of each row (see [`RowControls`]); `None`: the plain model, or the only
    /// adapter / prompt when there is one.
    pub controls: Option<Vec<RowControls>>,
}

pub use crate::peft::RowControls;

impl Batch {
    /// Rows of token ids, each with the position its labels start at (earlier tokens are the
    /// prompt), right-padded with `pad`.
    pub fn from_rows(rows: &[(Vec<u32>, usize)], pad: u32) -> Result<Self> {
        let b = rows.len();
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        if b == 0 || t == 0 {
            return Err(Error::Invalid("empty batch".into()));
        }
        let mut batch = Batch { b, t, ..Default::default() };
        for (ids, start) in rows {
            for j in 0..t {
                let real = j < ids.len();
                batch.ids.push(if real { ids[j] } else { pad });
                batch.labels.push(if real && j >= *start { ids[j] as i64 } else { -100 });
                batch.attention.push(real as u8);
            }
        }
        Ok(batch)
    }
}

/// A pretrained model with the controls that train on it.
pub struct Policy {
    pub pretrained: Pretrained,
    /// The LoRA adapters wrapping the model's layers, if any.
    pub lora: Option<Arc<Adapters>>,
    pub prompts: Option<SoftPrompts>,
}

impl Policy {
    /// The model alone, without controls.
    pub fn plain(pretrained: Pretrained) -> Self {
        Self { pretrained, lora: None, prompts: None }
    }

    /// Final hidden states `(b, n + t, hidden)`, `n` soft-prompt tokens first when prompts exist.
    pub fn hidden(&self, batch: &Batch) -> Result<(Tensor, usize)> {
        let (b, t) = (batch.b, batch.t);
        if batch.ids.len() != b * t || batch.labels.len() != b * t || batch.attention.len() != b * t {
            return Err(Error::Invalid(format!("batch arrays do not all hold {b} x {t} entries")));
        }
        let model = &self.pretrained.model;
        let dev = &self.pretrained.device;
        let embeds = model.embed(&Tensor::from_vec(batch.ids.clone(), (b, t), dev)?)?;
        if let Some(lora) = &self.lora {
            lora.route(match &batch.controls {
                Some(c) => Routing::of_rows(c),
                None if lora.names.len() == 1 => Routing::All(0),
                None => Routing::Off,
            });
        }
        // Per row, the soft prompts before its tokens, and how many positions of the prefix are
        // padding (rows with fewer prompts than the longest are left-padded, masked).
        let (embeds, n, pads) = match &self.prompts {
            Some(p) => {
                let choice: Vec<Vec<usize>> = match &batch.controls {
                    Some(c) => c
                        .iter()
                        .map(|row| {
                            row.iter()
                                .map(|&(i, w)| {
                                    if w == 1.0 {
                                        Ok(i)
                                    } else {
                                        Err(Error::Invalid(format!(
                                            "soft prompt '{}' given weight {w}: soft prompts take no weights",
                                            p.names.get(i).map_or("?", |s| s.as_str())
                                        )))
                                    }
                                })
                                .collect::<Result<Vec<_>>>()
                        })
                        .collect::<Result<_>>()?,
                    None if p.names.len() == 1 => vec![vec![0]; b],
                    None => return Err(Error::Invalid("soft prompts need a control per row".into())),
                };
                let (embeds, pads) = p.prepend_rows(&embeds, &choice)?;
                let n = embeds.dims()[1] - t;
                (embeds, n, pads)
            }
            None => (embeds, 0, vec![0; b]),
        };
        let total = n + t;
        if total > model.max_positions() {
            return Err(Error::Invalid(format!(
                "{n} virtual + {t} tokens exceed the model's context of {}",
                model.max_positions()
            )));
        }
        let padded = batch.attention.contains(&0) || pads.iter().any(|&p| p > 0);
        let mask: Option<Vec<Vec<u8>>> = padded.then(|| {
            (0..b)
                .map(|r| {
                    std::iter::repeat_n(0u8, pads[r])
                        .chain(std::iter::repeat_n(1u8, n - pads[r]))
                        .chain(batch.attention[r * t..(r + 1) * t].iter().copied())
                        .collect()
                })
                .collect()
        });
        let inp = AttentionInputs::new(b, total, 0, mask.as_deref())?;
        Ok((model.forward_embeds(&embeds, &inp, None)?, n))
    }
}
