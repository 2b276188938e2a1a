//! Causal language-model cross-entropy on the response tokens, each example under its control:
//! `L = −Σ_t log p(y_t | c, x, y_<t)`, averaged over response tokens. The loss of SFT, of
//! MEET's two steps, of control tokens and of Chain-of-Hindsight; here it also serves plain
//! fine-tuning, LoRA and prompt tuning.

use crate::data::Example;
use crate::objectives::logps::label_logps;
use crate::objectives::{Objective, StepOutput};
use crate::policy::{Batch, Policy};
use crate::Result;

/// Cross-entropy on the labelled (response) tokens.
pub struct LanguageModeling {
    /// Token that right-pads a batch (never a label).
    pub pad_id: u32,
}

/// Collates examples into a right-padded batch with their controls.
pub fn collate(examples: &[&Example], pad_id: u32) -> Result<Batch> {
    let rows: Vec<(Vec<u32>, usize)> = examples.iter().map(|e| (e.ids.clone(), e.start)).collect();
    let mut batch = Batch::from_rows(&rows, pad_id)?;
    for (r, e) in examples.iter().enumerate() {
        for &(a, b) in &e.unlabelled {
            batch.labels[r * batch.t + a.min(batch.t)..r * batch.t + b.min(batch.t)].fill(-100);
        }
    }
    if examples.iter().any(|e| !e.controls.is_empty()) {
        batch.controls = Some(examples.iter().map(|e| e.controls.iter().map(|&c| (c, 1.0)).collect()).collect());
    }
    Ok(batch)
}

impl Objective<Example> for LanguageModeling {
    fn units(&self, examples: &[&Example]) -> usize {
        examples
            .iter()
            .map(|e| {
                let skipped: usize = e.unlabelled.iter().map(|&(a, b)| b.min(e.ids.len()).saturating_sub(a)).sum();
                e.ids.len().saturating_sub(e.start.max(1)) - skipped
            })
            .sum()
    }

    fn loss(&self, policy: &Policy, examples: &[&Example]) -> Result<StepOutput> {
        let lp = label_logps(policy, &collate(examples, self.pad_id)?)?;
        let sum = lp.logps.sum_all()?.neg()?;
        Ok(StepOutput { sum, metrics: vec![] })
    }
}
