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
use crate::data::{first_value, read_records, supervised_from_records, Example, SupervisedOptions};
use crate::objectives::{Item, Objective};
use crate::run::{save_outputs, Built, Method, RunConfig};
use crate::train::{checkpoint, config_hash, train, RunDir, StepLog};
use crate::{ui, Error, Pretrained, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Runs `cfg.method`; with `resume`, every stage continues from its newest checkpoint, and a run
/// that finished earlier is left as it is. Nothing is written before the configuration is checked.
pub fn run(cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
    cfg.check()?;
    cfg.check_sources()?;
    if resume {
        if let Some(f) = finished(cfg) {
            ui::header(&format!("{}: finished earlier; nothing to do", cfg.output_dir.display()));
            ui::note(&format!(
                "{} steps{}; outputs in {} (start it again without --resume to train anew)",
                f.steps,
                f.loss.map(|l| format!(", final loss {l:.4}")).unwrap_or_default(),
                cfg.output_dir.join("final").display()
            ));
            return Ok(vec![]);
        }
    }
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;
    // A run started anew must not look finished (from an earlier run here) if it stops early.
    let marker = cfg.output_dir.join(FINISHED);
    if marker.is_file() {
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::io::atomic_write(&cfg.output_dir.join("config.toml"), text.as_bytes())?;
    let logs = match cfg.method {
        Method::Sft => sft::run(cfg, resume),
        Method::Coh => coh::run(cfg, resume),
        Method::ControlToken => control_token::run(cfg, resume),
        Method::Meet => meet::run(cfg, resume),
        Method::Dpo => dpo::run(cfg, resume),
        Method::Reward => reward::run(cfg, resume),
    }?;
    // The last stage of every method writes into output_dir: its marker now stands for the run.
    let path = cfg.output_dir.join(FINISHED);
    let mut f: Finished = serde_json::from_value(crate::io::read_json(&path)?)
        .map_err(|e| Error::parse(&path, format!("not a meet stage marker: {e}")))?;
    f.run_hash = Some(config_hash(cfg));
    write_finished(&cfg.output_dir, &f)?;
    Ok(logs)
}

/// The marker a stage writes into its folder once its outputs (`final/`) are complete.
const FINISHED: &str = "finished.json";

/// What [`FINISHED`] holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    pub stage: String,
    /// Fingerprint of the stage's configuration (as its checkpoints').
    pub config_hash: String,
    /// Fingerprint of the whole run's configuration, once every stage of the run is done.
    #[serde(default)]
    pub run_hash: Option<String>,
    pub steps: usize,
    pub loss: Option<f64>,
}

fn read_finished(dir: &Path) -> Option<Finished> {
    let text = std::fs::read_to_string(dir.join(FINISHED)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_finished(dir: &Path, f: &Finished) -> Result<()> {
    let text = serde_json::to_string_pretty(f).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::io::atomic_write(&dir.join(FINISHED), text.as_bytes())
}

/// Whether the run of `cfg` (this very configuration) finished: its outputs are complete.
pub fn finished(cfg: &RunConfig) -> Option<Finished> {
    read_finished(&cfg.output_dir).filter(|f| f.run_hash.as_deref() == Some(config_hash(cfg).as_str()))
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
    if first_value(&records).is_some_and(is_preference) {
        let (pairs, _) = preferences_from_records(path, records, &p.tokenizer, &cfg.data.preference_options())?;
        return Ok(TrainingData::Pairs(pairs));
    }
    let opts = SupervisedOptions {
        max_length: cfg.data.max_length,
        controls: cfg.controls(),
        default_control: (cfg.lora.is_some() || cfg.prompt.is_some()).then_some(0),
        eos_id: p.generation.eos_token_ids.first().copied(),
        skip_invalid: cfg.data.skip_invalid,
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

/// One training stage of a run: its checkpoint name (part of the checkpoints' fingerprint), what
/// the user is shown, and its folder (`metrics.jsonl`, `checkpoint-*`, `final/`).
pub struct Stage<'a> {
    pub name: &'a str,
    pub label: &'a str,
    pub dir: &'a Path,
}

/// Trains `built` on `items` (see [`stage_train`]), then saves the outputs under `dir/final` with
/// `spec` and marks the stage finished. With `resume`, a stage that finished earlier is skipped and
/// its outputs are left as they are.
pub fn stage<T: Item>(
    cfg: &RunConfig,
    st: &Stage,
    built: &mut Built,
    objective: &dyn Objective<T>,
    items: &[T],
    resume: bool,
    spec: Option<ControlSpec>,
) -> Result<Vec<StepLog>> {
    if resume && finished_stage(cfg, st).is_some() {
        return Ok(vec![]);
    }
    let logs = stage_train(cfg, st, built, objective, items, resume)?;
    let out = st.dir.join("final");
    save_outputs(&built.policy, &cfg.model.source, &out)?;
    if let Some(s) = spec {
        s.save(&out)?;
    }
    finish_stage(cfg, st, &logs)?;
    Ok(logs)
}

/// With `resume`: the marker of a stage that finished earlier (said to the user), if it did.
pub fn finished_stage(cfg: &RunConfig, st: &Stage) -> Option<Finished> {
    let f = read_finished(st.dir).filter(|f| f.stage == st.name && f.config_hash == config_hash(&(cfg, st.name)))?;
    ui::header(st.label);
    ui::note(&format!("finished earlier ({} steps); outputs kept in {}", f.steps, st.dir.join("final").display()));
    Some(f)
}

/// Marks a stage finished once its outputs are written, and removes its checkpoints (they exist
/// to resume an unfinished stage) unless `train.keep_checkpoints`.
pub fn finish_stage(cfg: &RunConfig, st: &Stage, logs: &[StepLog]) -> Result<()> {
    // A stage resumed at its last step trained nothing now: its last step is in metrics.jsonl.
    let last = logs.last().cloned().or_else(|| {
        let text = std::fs::read_to_string(st.dir.join("metrics.jsonl")).ok()?;
        text.lines().rev().find_map(|l| serde_json::from_str::<StepLog>(l).ok())
    });
    let f = Finished {
        stage: st.name.into(),
        config_hash: config_hash(&(cfg, st.name)),
        run_hash: None,
        steps: last.as_ref().map_or(0, |l| l.step),
        loss: last.map(|l| l.loss),
    };
    write_finished(st.dir, &f)?;
    if !cfg.train.keep_checkpoints {
        checkpoint::remove_all(st.dir)?;
    }
    ui::note(&format!("outputs in {}", st.dir.join("final").display()));
    Ok(())
}

/// Trains a stage in its folder (`metrics.jsonl`, `checkpoint-*`) without saving outputs: for
/// methods that save outputs of their own (then call [`finish_stage`]).
pub fn stage_train<T: Item>(
    cfg: &RunConfig,
    st: &Stage,
    built: &mut Built,
    objective: &dyn Objective<T>,
    items: &[T],
    resume: bool,
) -> Result<Vec<StepLog>> {
    // A stage trained anew must not look finished if it is stopped part-way.
    let marker = st.dir.join(FINISHED);
    if marker.is_file() {
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    let total = cfg.train.total_steps(items.len());
    ui::header(st.label);
    ui::note(&format!("{} training items, {total} optimizer steps, in {}", items.len(), st.dir.display()));
    let run_dir =
        RunDir { dir: st.dir.to_path_buf(), config_hash: config_hash(&(cfg, st.name)), label: st.name.into() };
    train(&built.policy, objective, items, &mut built.optimizer, &cfg.train, &run_dir, resume)
}
