//! Training methods, one file each, written as recipes (as torchtune's): read the data, build the
//! policy, make the method's training items, train with the shared loop, save. A new method is a
//! new file here plus one arm in [`run`] and one name in [`crate::run::Method`].
//!
//! Shared pieces: [`load_data`] (supervised rows or preference pairs), [`stage`] (train and save
//! one stage of a run, with its controls' inference spec), [`adapter_spec`].

pub mod coh;
pub mod control_token;
pub mod dpo;
pub mod meet;
pub mod reward;
pub mod sft;

use crate::controls::{ControlKind, ControlSpec};
use crate::data::preference::{preferences_from_records, Pair};
use crate::data::{read_records, supervised_from_records, Example, SupervisedOptions};
use crate::objectives::{Item, Objective};
use crate::run::{save_outputs, Built, Method, RunConfig};
use crate::train::{config_hash, train, RunDir, StepLog};
use crate::{Error, Pretrained, Result};
use std::path::Path;

/// Runs `cfg.method`; with `resume`, every stage continues from its newest checkpoint.
pub fn run(cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
    cfg.check()?;
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::io::atomic_write(&cfg.output_dir.join("config.toml"), text.as_bytes())?;
    match cfg.method {
        Method::Sft => sft::run(cfg, resume),
        Method::Coh => coh::run(cfg, resume),
        Method::ControlToken => control_token::run(cfg, resume),
        Method::Meet => meet::run(cfg, resume),
        Method::Dpo => dpo::run(cfg, resume),
        Method::Reward => reward::run(cfg, resume),
    }
}

/// Training data as read: supervised rows, or preference pairs.
pub enum TrainingData {
    Supervised(Vec<Example>),
    Pairs(Vec<Pair>),
}

/// Whether a record is a preference (it has a rejected response).
fn is_preference(v: &serde_json::Value) -> bool {
    v.get("rejected").is_some() || (v.get("info").is_some() && v.get("summaries").is_some())
}

/// Reads `cfg.data.train` with the policy's tokenizer: preference records (any format of
/// [`crate::data::preference`]) as pairs, otherwise supervised rows (controls by name).
pub fn load_data(cfg: &RunConfig, p: &Pretrained) -> Result<TrainingData> {
    let path = &cfg.data.train;
    let records = read_records(path)?;
    if records.first().is_some_and(|(_, v)| is_preference(v)) {
        let (pairs, _) = preferences_from_records(path, records, &p.tokenizer, &cfg.data.preference_options())?;
        return Ok(TrainingData::Pairs(pairs));
    }
    let opts = SupervisedOptions {
        max_length: cfg.data.max_length,
        controls: cfg.controls(),
        default_control: (cfg.lora.is_some() || cfg.prompt.is_some()).then_some(0),
        eos_id: p.generation.eos_token_ids.first().copied(),
    };
    Ok(TrainingData::Supervised(supervised_from_records(path, records, &p.tokenizer, &opts)?.0))
}

/// Pairs only: the methods that learn from a chosen and a rejected response.
pub fn load_pairs(cfg: &RunConfig, p: &Pretrained) -> Result<Vec<Pair>> {
    match load_data(cfg, p)? {
        TrainingData::Pairs(pairs) => Ok(pairs),
        TrainingData::Supervised(_) => Err(Error::parse(
            &cfg.data.train,
            format!("method {} needs preference records (chosen and rejected responses)", cfg.method.name()),
        )),
    }
}

/// The control indices of the chosen and the rejected response (the first two control names).
pub fn pair_controls(cfg: &RunConfig) -> Result<(usize, usize)> {
    match cfg.controls().len() {
        2 => Ok((0, 1)),
        n => Err(Error::Invalid(format!(
            "preference data needs two controls (chosen, rejected), model.controls has {n}: {:?}",
            cfg.controls()
        ))),
    }
}

/// The token that pads batches.
pub fn pad_id(p: &Pretrained) -> u32 {
    p.generation.pad_token_id.or(p.generation.eos_token_ids.first().copied()).unwrap_or(0)
}

/// The base model path as written into saved specs (absolute when it is a local path, so the
/// output folder works from anywhere).
fn base_model(cfg: &RunConfig) -> String {
    std::fs::canonicalize(&cfg.model.source)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| cfg.model.source.clone())
}

/// The inference spec of a run whose controls are its LoRA adapters or soft prompts.
pub fn adapter_spec(cfg: &RunConfig) -> Option<ControlSpec> {
    let kind = if cfg.prompt.is_some() {
        ControlKind::SoftPrompt
    } else if cfg.lora.is_some() {
        ControlKind::Lora
    } else {
        return None;
    };
    Some(spec(cfg, kind, vec![]))
}

/// A spec of `kind` for `cfg`'s controls.
pub fn spec(cfg: &RunConfig, kind: ControlKind, markers: Vec<String>) -> ControlSpec {
    ControlSpec {
        method: cfg.method.name().to_string(),
        kind,
        names: cfg.controls(),
        markers,
        base_model: base_model(cfg),
        stop_strings: vec![],
    }
}

/// Trains `built` on `items` in `dir` (`metrics.jsonl`, `checkpoint-*`), then saves the outputs
/// under `dir/final` with `spec`. `name` tells the stages of one run apart in checkpoints.
#[allow(clippy::too_many_arguments)]
pub fn stage<T: Item>(
    cfg: &RunConfig,
    name: &str,
    built: &mut Built,
    objective: &dyn Objective<T>,
    items: &[T],
    dir: &Path,
    resume: bool,
    spec: Option<ControlSpec>,
) -> Result<Vec<StepLog>> {
    let logs = stage_train(cfg, name, built, objective, items, dir, resume)?;
    let out = dir.join("final");
    save_outputs(&built.policy, &cfg.model.source, &out)?;
    if let Some(s) = spec {
        s.save(&out)?;
    }
    Ok(logs)
}

/// [`stage`] without saving: for methods that save outputs of their own.
pub fn stage_train<T: Item>(
    cfg: &RunConfig,
    name: &str,
    built: &mut Built,
    objective: &dyn Objective<T>,
    items: &[T],
    dir: &Path,
    resume: bool,
) -> Result<Vec<StepLog>> {
    tracing::info!("{name}: {} items, {} steps", items.len(), cfg.train.total_steps(items.len()));
    let run_dir = RunDir { dir: dir.to_path_buf(), config_hash: config_hash(&(cfg, name)) };
    train(&built.policy, objective, items, &mut built.optimizer, &cfg.train, &run_dir, resume)
}
