//! The model under training with its controls: a pretrained decoder, optionally wrapped by LoRA
//! adapters and preceded by soft prompts, and the one forward pass every objective uses —
//! log-probabilities of the labelled tokens of a batch, each row under its own control.

use crate::models::AttentionInputs;
use crate::peft::lora::Routing;
use crate::peft::prompt::SoftPrompts;
use crate::train::loss::{frozen_head_logps, shifted_targets, token_logps};
use crate::{Error, Pretrained, Result};
use candle_core::Tensor;

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
    /// The control (soft prompt / LoRA adapter index) of each row; `None` = the plain model.
    pub controls: Option<Vec<Option<usize>>>,
}

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

/// Log-probabilities of the labelled tokens of a batch.
pub struct LabelLogps {
    /// `(n,)`: one entry per labelled token, row-major.
    pub logps: Tensor,
    /// The batch row of each entry.
    pub rows: Vec<u32>,
    pub b: usize,
}

impl LabelLogps {
    /// Summed log-probability of each row's labels `(b,)`, differentiable.
    pub fn per_sequence_sum(&self) -> Result<Tensor> {
        let n = self.rows.len();
        let mut onehot = vec![0f32; self.b * n];
        for (i, &r) in self.rows.iter().enumerate() {
            onehot[r as usize * n + i] = 1.0;
        }
        let m = Tensor::from_vec(onehot, (self.b, n), self.logps.device())?;
        Ok(m.matmul(&self.logps.unsqueeze(1)?)?.squeeze(1)?)
    }

    /// Mean log-probability of each row's labels `(b,)` (0 for a row without labels).
    pub fn per_sequence_mean(&self) -> Result<Tensor> {
        let counts: Vec<f32> = self.counts().iter().map(|&c| 1.0 / c.max(1) as f32).collect();
        let inv = Tensor::from_vec(counts, self.b, self.logps.device())?;
        Ok((self.per_sequence_sum()? * inv)?)
    }

    /// Labelled tokens per row.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.b];
        self.rows.iter().for_each(|&r| c[r as usize] += 1);
        c
    }
}

/// A pretrained model with the controls that train on it.
pub struct Policy {
    pub pretrained: Pretrained,
    pub prompts: Option<SoftPrompts>,
}

impl Policy {
    /// Final hidden states `(b, n + t, hidden)`, `n` soft-prompt tokens first when prompts exist.
    pub fn hidden(&self, batch: &Batch) -> Result<(Tensor, usize)> {
        let (b, t) = (batch.b, batch.t);
        if batch.ids.len() != b * t || batch.labels.len() != b * t || batch.attention.len() != b * t {
            return Err(Error::Invalid(format!("batch arrays do not all hold {b} x {t} entries")));
        }
        let model = &self.pretrained.model;
        let dev = &self.pretrained.device;
        let embeds = model.embed(&Tensor::from_vec(batch.ids.clone(), (b, t), dev)?)?;
        if let Some(lora) = &self.pretrained.lora {
            lora.route(match &batch.controls {
                Some(c) => Routing::PerRow(c.clone()),
                None if lora.names.len() == 1 => Routing::All(0),
                None => Routing::Off,
            });
        }
        let (embeds, n) = match &self.prompts {
            Some(p) => {
                let choice = match &batch.controls {
                    Some(c) => c
                        .iter()
                        .map(|x| {
                            x.ok_or_else(|| {
                                Error::Invalid("a batch row has no control, but soft prompts need one".into())
                            })
                        })
                        .collect::<Result<Vec<_>>>()?,
                    None if p.names.len() == 1 => vec![0; b],
                    None => return Err(Error::Invalid("soft prompts need a control per row".into())),
                };
                (p.prepend(&embeds, &choice)?, p.n())
            }
            None => (embeds, 0),
        };
        let total = n + t;
        if total > model.max_positions() {
            return Err(Error::Invalid(format!(
                "{n} virtual + {t} tokens exceed the model's context of {}",
                model.max_positions()
            )));
        }
        let padded = batch.attention.contains(&0);
        let mask: Option<Vec<Vec<u8>>> = padded.then(|| {
            (0..b)
                .map(|r| {
                    std::iter::repeat_n(1u8, n).chain(batch.attention[r * t..(r + 1) * t].iter().copied()).collect()
                })
                .collect()
        });
        let inp = AttentionInputs::new(b, total, 0, mask.as_deref())?;
        Ok((model.forward_embeds(&embeds, &inp, None)?, n))
    }

    /// Log-probabilities of every labelled token. Only the labelled positions go through the LM
    /// head, which saves most of its cost when prompts are long.
    pub fn label_logps(&self, batch: &Batch) -> Result<LabelLogps> {
        let (h, n) = self.hidden(batch)?;
        let (pos, tgt) = shifted_targets(&batch.labels, batch.b, batch.t);
        if pos.is_empty() {
            return Err(Error::Invalid("the batch has no labelled tokens".into()));
        }
        let (b, total, hidden) = h.dims3()?;
        let rows: Vec<u32> = pos.iter().map(|&p| p / batch.t as u32).collect();
        // Position p = r * t + j sits at r * total + n + j once the prompt is in front.
        let idx: Vec<u32> =
            pos.iter().map(|&p| (p / batch.t as u32) * total as u32 + n as u32 + p % batch.t as u32).collect();
        let h = h.reshape((b * total, hidden))?.index_select(&Tensor::new(idx.as_slice(), h.device())?, 0)?;
        // The fused head computes its input gradient up front: only worth it when one is needed.
        let logps = match self.pretrained.model.frozen_lm_head().filter(|_| h.track_op()) {
            Some(w) => frozen_head_logps(&h, &w, &tgt)?,
            None => token_logps(&self.pretrained.model.lm_head(&h)?, &tgt)?, // logits (labelled, v)
        };
        Ok(LabelLogps { logps, rows, b })
    }
}
