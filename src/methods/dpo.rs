//! DPO (see [`crate::objectives::dpo`] for the loss): read the pairs, compute the reference
//! log-probabilities once (cached in `output_dir/reference_logps.json`, keyed by the reference
//! and the tokenised data, so a resumed run does not redo them), drop the reference, train the
//! policy — full weights, or a LoRA adapter whose disabled state is the reference.

use crate::data::preference::Pair;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_pairs};
use crate::methods::spec::adapter_spec;
use crate::methods::stage::{stage, Stage};
use crate::methods::{ExperimentEntry, Recipe};
use crate::objectives::dpo::{reference_logps, Dpo as DpoLoss, DpoConfig, DpoPair};
use crate::policy::Policy;
use crate::train::{config_hash, StepLog};
use crate::{io, Error, LoadOptions, Pretrained, Result};
use serde::{Deserialize, Serialize};

pub struct Dpo;

impl Recipe for Dpo {
    const NAME: &'static str = "dpo";
    const SECTION: Option<&'static str> = Some("dpo");
    type Options = DpoConfig;

    fn default_controls(&self) -> Vec<String> {
        vec!["default".into()]
    }

    fn check(&self, cfg: &RunConfig, d: &DpoConfig) -> Result<()> {
        if cfg.prompt.is_some() {
            return Err(Error::Invalid("method dpo does not take a [prompt] section".into()));
        }
        if !(d.beta.is_finite() && d.beta > 0.0) {
            return Err(Error::Invalid(format!("dpo: beta {} must be a positive number", d.beta)));
        }
        if !(0.0..0.5).contains(&d.label_smoothing) {
            return Err(Error::Invalid(format!("dpo: label_smoothing {} must be in [0, 0.5)", d.label_smoothing)));
        }
        Ok(())
    }

    fn check_sources(&self, _: &RunConfig, d: &DpoConfig) -> Result<()> {
        if let Some(r) = &d.reference {
            io::resolve(r).map_err(|e| Error::Invalid(format!("dpo.reference: {e}")))?;
        }
        Ok(())
    }

    fn run(&self, cfg: &RunConfig, d: &DpoConfig, resume: bool) -> Result<Vec<StepLog>> {
        run(cfg, d, resume)
    }

    /// In an experiment, DPO starts from (and is anchored to) the SFT model of the same seed.
    fn experiments(&self) -> Vec<ExperimentEntry> {
        vec![ExperimentEntry { name: "dpo", options: "[model]\ntrain_weights = true", starts_from: Some("sft") }]
    }
}

#[derive(Serialize, Deserialize)]
struct Cache {
    reference: String,
    fingerprint: String,
    /// `(chosen, rejected)` summed response log-probabilities per pair.
    logps: Vec<(f64, f64)>,
}

/// Reference log-probabilities of `pairs`, from the cache when it matches.
/// `file` is the cache's name in the output folder (one per set: training, held-out).
pub fn cached_reference_logps(
    cfg: &RunConfig,
    d: &DpoConfig,
    pairs: &[Pair],
    pad: u32,
    file: &str,
) -> Result<Vec<(f64, f64)>> {
    let reference = d.reference.clone().unwrap_or_else(|| cfg.model.source.clone());
    // bf16 reference log-probabilities differ from f32 ones; f32 keeps its old fingerprint.
    let bf16 = cfg.train.dtype == crate::train::Dtype::Bf16;
    let fingerprint = if bf16 { config_hash(&(&reference, pairs, "bf16")) } else { config_hash(&(&reference, pairs)) };
    let path = cfg.output_dir.join(file);
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
    let logps = {
        let _autocast = crate::nn::bf16::autocast(bf16);
        reference_logps(&Policy::plain(model), pairs, cfg.train.batch_size, pad)?
    };
    let cache = Cache { reference, fingerprint, logps };
    let text = serde_json::to_string(&cache).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::files::atomic_write(&path, text.as_bytes())?;
    Ok(cache.logps)
}

fn run(cfg: &RunConfig, d: &DpoConfig, resume: bool) -> Result<Vec<StepLog>> {
    let mut built = setup::standard(cfg)?;
    let p = &built.policy.pretrained;
    let pad = p.generation.pad_id()?;
    let (pairs, eval_pairs) = load_pairs(cfg, p)?;
    let with_refs = |pairs: Vec<Pair>, file: &str| -> Result<Vec<DpoPair>> {
        if pairs.is_empty() {
            return Ok(vec![]);
        }
        let refs = cached_reference_logps(cfg, d, &pairs, pad, file)?;
        Ok(pairs.into_iter().zip(refs).map(|(pair, (c, r))| DpoPair { pair, ref_chosen: c, ref_rejected: r }).collect())
    };
    let items = with_refs(pairs, "reference_logps.json")?;
    let eval = with_refs(eval_pairs, "reference_logps_eval.json")?;
    let objective = DpoLoss { config: d.clone(), pad_id: pad };
    let st = Stage {
        name: "dpo",
        label: "DPO: the policy against the cached reference log-probabilities",
        dir: &cfg.output_dir,
    };
    stage(cfg, &st, &mut built, &objective, &items, &eval, resume, adapter_spec(cfg))
}
