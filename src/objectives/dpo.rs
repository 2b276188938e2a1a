//! Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss as TRL's `DPOTrainer`:
//!
//! `L = −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])`
//!
//! with sequence log-probabilities summed over response tokens. `label_smoothing` ε gives the
//! conservative variant (cDPO): `(1−ε)·L(z) + ε·L(−z)`. The reference log-probabilities are
//! computed once, before training ([`reference_logps`]), and travel with each pair, so the
//! reference model is never held during training.

use crate::data::preference::Pair;
use crate::objectives::logps::label_logps;
use crate::objectives::{Item, Objective, StepOutput};
use crate::policy::{Batch, Policy};
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use serde::{Deserialize, Serialize};

/// `[dpo]` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// Strength of the KL penalty (TRL's `beta`).
    pub beta: f64,
    /// The reference model (folder / GGUF / Hub id): the SFT model, or by default the model
    /// training starts from (with LoRA: the base, adapters disabled).
    pub reference: Option<String>,
    /// cDPO's label noise ε (0 = the plain sigmoid loss).
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self { beta: 0.1, reference: None, label_smoothing: 0.0 }
    }
}

/// A preference pair with its reference log-probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoPair {
    pub pair: Pair,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

impl Item for DpoPair {
    fn tokens(&self) -> usize {
        2 * self.pair.prompt.len() + self.pair.chosen.len() + self.pair.rejected.len()
    }
}

/// The batch of `pairs`: every chosen sequence, then every rejected one (as TRL concatenates).
pub fn pair_batch(pairs: &[&Pair], pad_id: u32) -> Result<Batch> {
    let rows: Vec<(Vec<u32>, usize)> = [false, true]
        .iter()
        .flat_map(|&rej| {
            pairs.iter().map(move |p| {
                let r = if rej { &p.rejected } else { &p.chosen };
                ([p.prompt.as_slice(), r].concat(), p.prompt.len())
            })
        })
        .collect();
    Batch::from_rows(&rows, pad_id)
}

/// Summed response log-probabilities `(chosen, rejected)` of every pair under `model` with its
/// controls off, `batch_size` pairs at a time.
pub fn reference_logps(model: &Policy, pairs: &[Pair], batch_size: usize, pad_id: u32) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut progress = crate::ui::Progress::new("reference", pairs.len(), "pairs", 0);
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let mut batch = pair_batch(&refs, pad_id)?;
        batch.controls = Some(vec![vec![]; batch.b]);
        let lp = label_logps(model, &batch)?.per_sequence_sum()?.detach().to_vec1::<f32>()?;
        let n = chunk.len();
        out.extend((0..n).map(|i| (lp[i] as f64, lp[n + i] as f64)));
        progress.inc(n, "");
    }
    progress.finish("");
    Ok(out)
}

/// The DPO objective; its unit is a pair.
pub struct Dpo {
    pub config: DpoConfig,
    pub pad_id: u32,
}

/// `−log σ(x)` elementwise, stable for large |x| (`max(−x, 0) + log(1 + e^{−|x|})`), with the
/// smooth gradient `−σ(−x)`. Built from relu and abs, autograd would take a one-sided slope at
/// the kink x = 0 — exactly where DPO's first step sits (the policy equals the reference).
struct NegLogSigmoid;

impl CustomOp1 for NegLogSigmoid {
    fn name(&self) -> &'static str {
        "meet-neg-log-sigmoid"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = with_f32_storage(s, l, |x| (-x).max(0.0) + (-x.abs()).exp().ln_1p())?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d/dx −log σ(x) = −σ(−x)
        let s = candle_nn::ops::sigmoid(&x.neg()?)?;
        Ok(Some((dy * s.neg()?)?))
    }
}

fn with_f32_storage(s: &CpuStorage, l: &Layout, f: impl Fn(f32) -> f32) -> candle_core::Result<Vec<f32>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(v[a..b].iter().map(|&x| f(x)).collect()),
        _ => candle_core::bail!("neg_log_sigmoid: needs contiguous f32"),
    }
}

/// DPO's per-pair losses and implicit rewards.
pub struct DpoLoss {
    /// `(n,)`: `(1−ε)·(−log σ(z)) + ε·(−log σ(−z))`, `z = β[(π_w − ref_w) − (π_l − ref_l)]`.
    pub losses: Tensor,
    /// `(n,)`: `β (log π(y_w|x) − log π_ref(y_w|x))`, TRL's `rewards/chosen`.
    pub chosen_rewards: Tensor,
    /// `(n,)`: `β (log π(y_l|x) − log π_ref(y_l|x))`.
    pub rejected_rewards: Tensor,
}

/// The DPO loss (Rafailov et al. 2023, eq. 7; with `label_smoothing` ε the conservative cDPO)
/// from summed response log-probabilities, each `(n,)`: a pure function of its inputs, as
/// torchtune's `DPOLoss`.
pub fn dpo_loss(
    policy_chosen_logps: &Tensor,
    policy_rejected_logps: &Tensor,
    ref_chosen_logps: &Tensor,
    ref_rejected_logps: &Tensor,
    beta: f64,
    label_smoothing: f64,
) -> Result<DpoLoss> {
    let chosen_rewards = (policy_chosen_logps - ref_chosen_logps)?.affine(beta, 0.0)?;
    let rejected_rewards = (policy_rejected_logps - ref_rejected_logps)?.affine(beta, 0.0)?;
    let z = (&chosen_rewards - &rejected_rewards)?;
    let eps = label_smoothing;
    let mut losses = neg_log_sigmoid(&z)?.affine(1.0 - eps, 0.0)?;
    if eps > 0.0 {
        losses = (losses + neg_log_sigmoid(&z.neg()?)?.affine(eps, 0.0)?)?;
    }
    Ok(DpoLoss { losses, chosen_rewards, rejected_rewards })
}

/// `−log σ(x)` elementwise, stable for large |x|, with the smooth gradient `−σ(−x)`.
pub fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // log(1 + e^{−x}): smooth everywhere; overflows only for x < −88 (a hopeless pair).
        return Ok(x.neg()?.exp()?.affine(1.0, 1.0)?.log()?);
    }
    Ok(x.contiguous()?.apply_op1(NegLogSigmoid)?)
}

impl Objective<DpoPair> for Dpo {
    fn units(&self, items: &[&DpoPair]) -> usize {
        items.len()
    }

    fn loss(&self, policy: &Policy, items: &[&DpoPair]) -> Result<StepOutput> {
        let n = items.len();
        if n == 0 {
            return Err(Error::Invalid("empty DPO batch".into()));
        }
        let pairs: Vec<&Pair> = items.iter().map(|i| &i.pair).collect();
        let lp = label_logps(policy, &pair_batch(&pairs, self.pad_id)?)?.per_sequence_sum()?;
        let dev = lp.device();
        let (pc, pr) = (lp.narrow(0, 0, n)?, lp.narrow(0, n, n)?);
        let rc = Tensor::from_vec(items.iter().map(|i| i.ref_chosen as f32).collect(), n, dev)?;
        let rr = Tensor::from_vec(items.iter().map(|i| i.ref_rejected as f32).collect(), n, dev)?;
        let out = dpo_loss(&pc, &pr, &rc, &rr, self.config.beta, self.config.label_smoothing)?;
        let loss = out.losses;
        let cr = out.chosen_rewards.detach().to_vec1::<f32>()?;
        let rj = out.rejected_rewards.detach().to_vec1::<f32>()?;
        let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
        let metrics = vec![
            ("rewards/chosen", sum(&cr)),
            ("rewards/rejected", sum(&rj)),
            ("rewards/accuracies", cr.iter().zip(&rj).filter(|(c, r)| c > r).count() as f64),
            ("rewards/margins", sum(&cr) - sum(&rj)),
            ("logps/chosen", sum(&pc.detach().to_vec1::<f32>()?)),
            ("logps/rejected", sum(&pr.detach().to_vec1::<f32>()?)),
        ];
        Ok(StepOutput { sum: loss.sum_all()?, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn neg_log_sigmoid_has_the_smooth_gradient_at_zero() {
        let x = candle_core::Var::new(&[0f32, 3.0, -3.0], &Device::Cpu).unwrap();
        let g = neg_log_sigmoid(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        // −σ(−x): −0.5, −0.047426, −0.952574
        for (a, b) in g.iter().zip([-0.5, -0.047425874, -0.95257413]) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn dpo_loss_by_hand() {
        // Pair 1: policy (−10, −12), reference (−11, −11), β = 0.1:
        //   rewards 0.1·(−10+11) = 0.1 and 0.1·(−12+11) = −0.1, z = 0.2,
        //   −log σ(0.2) = ln(1 + e^−0.2) = ln 1.8187308 = 0.5981389.
        // Pair 2: policy = reference: z = 0, loss ln 2 = 0.6931472.
        // cDPO, ε = 0.1: 0.9·L(z) + 0.1·L(−z) = L(z) + 0.1·z (as L(−z) − L(z) = z):
        //   pair 1 0.5981389 + 0.02 = 0.6181389; pair 2 ln 2.
        let t = |v: [f32; 2]| Tensor::new(&v, &Device::Cpu).unwrap();
        let (pc, pr, rc, rr) = (t([-10.0, -5.0]), t([-12.0, -7.0]), t([-11.0, -5.0]), t([-11.0, -7.0]));
        let out = dpo_loss(&pc, &pr, &rc, &rr, 0.1, 0.0).unwrap();
        let close = |got: &Tensor, want: [f32; 2]| {
            let g = got.to_vec1::<f32>().unwrap();
            assert!(g.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{g:?} vs {want:?}");
        };
        close(&out.losses, [0.598_138_9, std::f32::consts::LN_2]);
        close(&out.chosen_rewards, [0.1, 0.0]);
        close(&out.rejected_rewards, [-0.1, 0.0]);
        close(&dpo_loss(&pc, &pr, &rc, &rr, 0.1, 0.1).unwrap().losses, [0.618_138_9, std::f32::consts::LN_2]);
        // β scales the margin: β = 1 gives z = 2, ln(1 + e^−2) = 0.1269280.
        close(&dpo_loss(&pc, &pr, &rc, &rr, 1.0, 0.0).unwrap().losses, [0.126_928, std::f32::consts::LN_2]);
    }

    #[test]
    fn neg_log_sigmoid_is_stable_and_right() {
        let x = Tensor::new(&[-100f32, -1.0, 0.0, 2.0, 100.0], &Device::Cpu).unwrap();
        let y = neg_log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        let want = [100.0, 1.3132617, std::f32::consts::LN_2, 0.12692805, 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}
