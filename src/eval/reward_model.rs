//! A trained reward model (`meet train` with `method = "reward"`, or any transformers
//! `LlamaForSequenceClassification` folder with one label) as a judge: the score head on the
//! last token of prompt + response, tokenised as the reward model was trained.

use crate::data::preference::text_pair_ids;
use crate::eval::Judge;
use crate::objectives::reward::rewards;
use crate::policy::{Batch, Policy};
use crate::{Error, LoadOptions, Pretrained, Result};
use candle_core::Tensor;

/// A reward-model judge.
pub struct RewardModel {
    pub policy: Policy,
    /// `score.weight`, `[1, hidden]`.
    pub head: Tensor,
    /// Rows scored at once.
    pub batch: usize,
    /// The config's `pad_token_id`: the reward sits on the last token that is not this one.
    pub pad: u32,
    /// Judge prompt + response as one text under this instruction (how a reward model trained on
    /// instruction → whole-review pairs reads a continuation); `None` scores (prompt, response).
    pub instruction: Option<String>,
}

impl RewardModel {
    /// Loads a reward-model folder (it must hold `score.weight` with one label).
    pub fn load(model: &str) -> Result<Self> {
        let mut raw = crate::models::pretrained::read(model, &LoadOptions::default())?;
        let head = raw.tensors.remove("score.weight").ok_or_else(|| {
            Error::format(model, "no score.weight: not a reward model (train one with method = \"reward\")")
        })?;
        if head.dims2()?.0 != 1 {
            return Err(Error::format(model, format!("score.weight {:?}: one label expected", head.dims())));
        }
        let pad = raw.config.get("pad_token_id").and_then(|v| v.as_u64()).map(|v| v as u32);
        let pretrained = Pretrained::from_raw(raw, &LoadOptions::default())?;
        let pad = match pad {
            Some(p) => p,
            None => pretrained.generation.pad_id()?,
        };
        Ok(Self { policy: Policy::plain(pretrained), head, batch: 16, pad, instruction: None })
    }
}

impl Judge for RewardModel {
    fn name(&self) -> &str {
        "reward-model"
    }

    fn score(&self, items: &[(&str, &str)]) -> Result<Vec<f64>> {
        let tok = &self.policy.pretrained.tokenizer;
        let pad = self.pad;
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.batch.max(1)) {
            let rows = chunk
                .iter()
                .map(|(p, r)| {
                    let (p, r) = match &self.instruction {
                        Some(i) => text_pair_ids(tok, i, &format!("{p}{r}"))?,
                        None => text_pair_ids(tok, p, r)?,
                    };
                    Ok(([p.as_slice(), &r].concat(), p.len()))
                })
                .collect::<Result<Vec<_>>>()?;
            let b = Batch::from_rows(&rows, pad)?;
            out.extend(rewards(&self.policy, &self.head, &b, pad)?.to_vec1::<f32>()?.iter().map(|&x| x as f64));
        }
        Ok(out)
    }
}
