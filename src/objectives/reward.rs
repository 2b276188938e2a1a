//! Bradley–Terry reward modelling, as TRL's `RewardTrainer`: the reward of a sequence is a scalar
//! head on the final hidden state of its last token (transformers'
//! `LlamaForSequenceClassification` with one label), and the loss of a pair is
//! `−log σ(r(x, y_w) − r(x, y_l))`.

use crate::data::preference::Pair;
use crate::objectives::dpo::{neg_log_sigmoid, pair_batch};
use crate::objectives::{Item, Objective, StepOutput};
use crate::policy::{Batch, Policy};
use crate::{Error, Result};
use candle_core::{Tensor, Var};

impl Item for Pair {
    fn tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.len() + self.rejected.len()
    }
}

/// Rewards `(b,)` of a right-padded batch: `head: [1, hidden]` on each row's last token that is
/// not `pad` — transformers' rule for sequence classifiers, so that when the pad token is also
/// EOS (SmolLM2) the reward sits on the last token before the closing EOS, as in HF and TRL.
pub fn rewards(policy: &Policy, head: &Tensor, batch: &Batch, pad: u32) -> Result<Tensor> {
    let (h, n) = policy.hidden(batch)?;
    let (b, total, hidden) = h.dims3()?;
    let last: Vec<u32> = (0..b)
        .map(|r| {
            let ids = &batch.ids[r * batch.t..(r + 1) * batch.t];
            let j = ids.iter().rposition(|&t| t != pad).unwrap_or(0);
            (r * total + n + j) as u32
        })
        .collect();
    let idx = Tensor::new(last.as_slice(), h.device())?;
    let h = h.reshape((b * total, hidden))?.index_select(&idx, 0)?;
    Ok(h.matmul(&head.t()?)?.squeeze(1)?)
}

/// The pairwise loss; its unit is a pair.
pub struct RewardModelling {
    /// The score head `[1, hidden]`, trainable.
    pub head: Var,
    pub pad_id: u32,
}

impl Objective<Pair> for RewardModelling {
    fn units(&self, items: &[&Pair]) -> usize {
        items.len()
    }

    fn loss(&self, policy: &Policy, items: &[&Pair]) -> Result<StepOutput> {
        let n = items.len();
        if n == 0 {
            return Err(Error::Invalid("empty reward batch".into()));
        }
        let r = rewards(policy, self.head.as_tensor(), &pair_batch(items, self.pad_id)?, self.pad_id)?;
        let (chosen, rejected) = (r.narrow(0, 0, n)?, r.narrow(0, n, n)?);
        let m = (&chosen - &rejected)?.detach().to_vec1::<f32>()?;
        let metrics = vec![
            ("accuracy", m.iter().filter(|&&x| x > 0.0).count() as f64),
            ("margin", m.iter().map(|&x| x as f64).sum()),
        ];
        Ok(StepOutput { sum: bradley_terry_loss(&chosen, &rejected)?.sum_all()?, metrics })
    }
}

/// The Bradley–Terry loss of each pair, `−log σ(r_w − r_l)` (Ouyang et al. 2022, eq. 1), from
/// the rewards `(n,)` of the chosen and the rejected responses: a pure function of them.
pub fn bradley_terry_loss(chosen_rewards: &Tensor, rejected_rewards: &Tensor) -> Result<Tensor> {
    neg_log_sigmoid(&(chosen_rewards - rejected_rewards)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bradley_terry_loss_by_hand() {
        // Margins 1.5 − 0.5 = 1 and 0 − 2 = −2:
        //   −log σ(1) = ln(1 + e^−1) = ln 1.3678794 = 0.3132617,
        //   −log σ(−2) = ln(1 + e^2) = ln 8.3890561 = 2.1269280; equal rewards give ln 2.
        let t = |v: [f32; 3]| Tensor::new(&v, &Device::Cpu).unwrap();
        let l = bradley_terry_loss(&t([1.5, 0.0, 3.0]), &t([0.5, 2.0, 3.0])).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in l.iter().zip([0.313_261_7, 2.126_928, std::f32::consts::LN_2]) {
            assert!((a - b).abs() < 1e-6, "{l:?}");
        }
    }
}
