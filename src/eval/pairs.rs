//! Preference pairs from a judge: sample several responses per prompt, score them, and keep the
//! best and the worst as (chosen, rejected) — how the DPO paper builds its IMDb sentiment pairs.

use crate::controls::Controlled;
use crate::eval::sample::{evaluate, EvalOptions};
use crate::eval::Judge;
use crate::Result;
use serde::{Deserialize, Serialize};

/// A judged pair, written as a TRL preference record (the scores ride along).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_score: f64,
    pub rejected_score: f64,
}

/// The best and worst of `opts.samples` responses per prompt (empty responses left out, as
/// preference data refuses them). Prompts whose usable responses all score the same (or whose
/// best and worst texts are equal) give no pair; their count is returned.
pub fn best_worst_pairs(
    model: &Controlled,
    judge: &dyn Judge,
    prompts: &[String],
    opts: &EvalOptions,
) -> Result<(Vec<ScoredPair>, usize)> {
    let samples = evaluate(model, None, judge, prompts, opts)?;
    let mut pairs = Vec::new();
    let mut ties = 0;
    for group in samples.chunk_by(|a, b| a.prompt_index == b.prompt_index) {
        let usable = || group.iter().filter(|s| !s.response.trim().is_empty());
        let best = usable().max_by(|a, b| a.score.total_cmp(&b.score));
        let worst = usable().min_by(|a, b| a.score.total_cmp(&b.score));
        match (best, worst) {
            (Some(b), Some(w)) if b.score > w.score && b.response != w.response => pairs.push(ScoredPair {
                prompt: b.prompt.clone(),
                chosen: b.response.clone(),
                rejected: w.response.clone(),
                chosen_score: b.score,
                rejected_score: w.score,
            }),
            _ => ties += 1,
        }
    }
    Ok((pairs, ties))
}
