//! DPO (see [`crate::objectives::dpo`] for the loss): read the pairs, compute the reference
//! log-probabilities once (cached in `output_dir/reference_logps.json`, keyed by the reference
//! and the tokenised data, so a resumed run does not redo them), drop the reference, train the
//! policy — full weights, or a LoRA adapter whose disabled state is the reference.

use crate::data::preference::Pair;
use crate::methods::{adapter_spec, load_pairs, pad_id, stage, Stage};
use crate::objectives::dpo::{reference_logps, Dpo, DpoPair};
use crate::policy::Policy;
use crate::run::{build, RunConfig};
use crate::train::{config_hash, StepLog};
use crate::{Error, LoadOptions, Pretrained, Result};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Cache {
    reference: String,
    fingerprint: String,
    /// `(chosen, rejected)` summed response log-probabilities per pair.
    logps: Vec<(f64, f64)>,
}

/// Reference log-probabilities of `pairs`, from the cache when it matches.
pub fn cached_reference_logps(cfg: &RunConfig, pairs: &[Pair], pad: u32) -> Result<Vec<(f64, f64)>> {
    let reference = cfg.dpo.reference.clone().unwrap_or_else(|| cfg.model.source.clone());
    let fingerprint = config_hash(&(&reference, pairs));
    let path = cfg.output_dir.join("reference_logps.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<Cache>(&text) {
            Ok(c) if c.fingerprint == fingerprint && c.logps.len() == pairs.len() => {
                crate::ui::header("DPO reference pass");
                crate::ui::note(&format!("log-probabilities of {} pairs read from {}", pairs.len(), path.display()));
                return Ok(c.logps);
            }
            _ => tracing::warn!("{}: stale or unreadable, recomputing", path.display()),
        }
    }
    crate::ui::header(&format!("DPO reference pass: log-probabilities of {} pairs under {reference}", pairs.len()));
    crate::ui::note(&format!("computed once, cached in {}", path.display()));
    let model = Pretrained::load(&reference, &LoadOptions::default())?;
    let logps = reference_logps(&Policy { pretrained: model, prompts: None }, pairs, cfg.train.batch_size, pad)?;
    let cache = Cache { reference, fingerprint, logps };
    let text = serde_json::to_string(&cache).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::io::atomic_write(&path, text.as_bytes())?;
    Ok(cache.logps)
}

pub fn run(cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
    let mut built = build(cfg)?;
    let p = &built.policy.pretrained;
    let pad = pad_id(p);
    let pairs = load_pairs(cfg, p)?;
    let refs = cached_reference_logps(cfg, &pairs, pad)?;
    let items: Vec<DpoPair> =
        pairs.into_iter().zip(refs).map(|(pair, (c, r))| DpoPair { pair, ref_chosen: c, ref_rejected: r }).collect();
    let objective = Dpo { config: cfg.dpo.clone(), pad_id: pad };
    let st = Stage {
        name: "dpo",
        label: "DPO: the policy against the cached reference log-probabilities",
        dir: &cfg.output_dir,
    };
    stage(cfg, &st, &mut built, &objective, &items, resume, adapter_spec(cfg))
}
