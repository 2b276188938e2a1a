//! Evaluation: judges that score responses, and the statistics that turn scores into claims
//! (means and win rates with bootstrap confidence intervals). A judge is one file behind the
//! [`Judge`] trait: VADER's sentiment today; a learned reward model and an LLM judge over an
//! OpenAI-compatible endpoint slot in the same way.

pub mod llm_judge;
pub mod pairs;
pub mod reward_model;
pub mod sample;
pub mod stats;
pub mod vader;

use crate::{Error, Result};

/// Something that scores a response to a prompt (higher = better by its measure).
pub trait Judge {
    /// Short name for reports (`vader`, `reward-model`, ...).
    fn name(&self) -> &str;

    /// Scores of `(prompt, response)` pairs, in order. Batched, since model-based judges run
    /// many at once.
    fn score(&self, items: &[(&str, &str)]) -> Result<Vec<f64>>;
}

/// A judge by name: `vader` (the response's compound sentiment), `vader-full` (of prompt +
/// response), `reward:PATH` (a reward-model folder).
pub fn judge_by_name(name: &str) -> Result<Box<dyn Judge>> {
    use vader::{Scope, Vader};
    Ok(match name {
        "vader" => Box::new(Vader::new(Scope::Response)),
        "vader-full" => Box::new(Vader::new(Scope::Full)),
        other if other.starts_with("llm:") => {
            return Err(Error::Invalid(format!(
                "judge '{other}': an LLM judge compares two responses rather than scoring one (meet eval \
                 --judge {other} --reference R, meet compare A.jsonl B.jsonl --judge {other}, or the \
                 experiment's [llm_judge])"
            )))
        }
        other => match other.strip_prefix("reward:") {
            Some(path) => Box::new(reward_model::RewardModel::load(path)?),
            None => return Err(Error::Invalid(format!("unknown judge '{other}' (vader, vader-full, reward:PATH)"))),
        },
    })
}
