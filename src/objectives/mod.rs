//! Training objectives, one file per method, each a loss over the [`Policy`]'s log-probabilities.
//! The training loop only sees the [`Objective`] trait and never branches on the method.

pub mod dpo;
pub mod lm;
pub mod logps;
pub mod reward;

use crate::data::Example;
use crate::policy::Policy;
use crate::Result;
use candle_core::Tensor;

/// What one micro-batch contributes to a step.
pub struct StepOutput {
    /// The loss summed over the micro-batch's units (tokens, pairs), differentiable.
    pub sum: Tensor,
    /// Extra figures to log, summed over units like `sum` (averaged by the loop).
    pub metrics: Vec<(&'static str, f64)>,
}

/// What an objective trains on: supervised [`Example`]s, preference pairs.
pub trait Item {
    /// Tokens the item puts through the model (for throughput and length grouping).
    fn tokens(&self) -> usize;
}

impl Item for Example {
    fn tokens(&self) -> usize {
        self.ids.len()
    }
}

/// A training objective over items of type `T`.
pub trait Objective<T> {
    /// Units the loss of `items` is averaged over (labelled tokens for cross-entropy, pairs for
    /// DPO). The loop divides every micro-batch's sum by the whole step's count, so that
    /// accumulated gradients equal those of one large batch (transformers' `num_items_in_batch`).
    fn units(&self, items: &[&T]) -> usize;
    /// The summed loss of a micro-batch.
    fn loss(&self, policy: &Policy, items: &[&T]) -> Result<StepOutput>;
}
