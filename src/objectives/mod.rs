//! Training objectives, one file per method, each a loss over the [`Policy`]'s log-probabilities.
//! The training loop only sees the [`Objective`] trait and never branches on the method.

pub mod lm;

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

/// A training objective.
pub trait Objective {
    /// Units the loss of `examples` is averaged over (labelled tokens for cross-entropy). The loop
    /// divides every micro-batch's sum by the whole step's count, so that accumulated gradients
    /// equal those of one large batch (transformers' `num_items_in_batch`).
    fn units(&self, examples: &[&Example]) -> usize;
    /// The summed loss of a micro-batch.
    fn loss(&self, policy: &Policy, examples: &[&Example]) -> Result<StepOutput>;
}
