//! One training stage of a recipe, from items to finished outputs: train with the shared loop in
//! the stage's folder, save what trained (an HF folder, PEFT adapter folders, the controls'
//! inference spec), and mark the stage finished so that `--resume` skips it.

use crate::methods::config::RunConfig;
use crate::methods::setup::Built;
use crate::methods::spec::ControlSpec;
use crate::models::pretrained::{save_hf_folder, RawModel};
use crate::objectives::{Item, Objective};
use crate::peft::folder;
use crate::policy::Policy;
use crate::train::{checkpoint, config_hash, train, RunDir, StepLog};
use crate::{ui, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The marker a stage writes into its folder once its outputs (`final/`) are complete.
pub(crate) const FINISHED: &str = "finished.json";

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

pub(crate) fn read_finished(dir: &Path) -> Option<Finished> {
    let text = std::fs::read_to_string(dir.join(FINISHED)).ok()?;
    serde_json::from_str(&text).ok()
}

pub(crate) fn write_finished(dir: &Path, f: &Finished) -> Result<()> {
    let text = serde_json::to_string_pretty(f).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::files::atomic_write(&dir.join(FINISHED), text.as_bytes())
}

/// Whether the run of `cfg` (this very configuration) finished: its outputs are complete.
pub fn finished(cfg: &RunConfig) -> Option<Finished> {
    read_finished(&cfg.output_dir).filter(|f| f.run_hash.as_deref() == Some(config_hash(cfg).as_str()))
}

/// One training stage of a run: its checkpoint name (part of the checkpoints' fingerprint), what
/// the user is shown, and its folder (`metrics.jsonl`, `checkpoint-*`, `final/`).
pub struct Stage<'a> {
    pub name: &'a str,
    pub label: &'a str,
    pub dir: &'a Path,
}

/// Trains `built` on `items` with the loss on `eval` logged (see [`stage_train`]), then saves
/// the outputs under `dir/final` with `spec` and marks the stage finished. With `resume`, a stage
/// that finished earlier is skipped and its outputs are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn stage<T: Item>(
    cfg: &RunConfig,
    st: &Stage,
    built: &mut Built,
    objective: &dyn Objective<T>,
    items: &[T],
    eval: &[T],
    resume: bool,
    spec: Option<ControlSpec>,
) -> Result<Vec<StepLog>> {
    if resume && finished_stage(cfg, st).is_some() {
        return Ok(vec![]);
    }
    let logs = stage_train(cfg, st, built, objective, items, eval, resume)?;
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
    eval: &[T],
    resume: bool,
) -> Result<Vec<StepLog>> {
    // A stage trained anew must not look finished if it is stopped part-way.
    let marker = st.dir.join(FINISHED);
    if marker.is_file() {
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
    }
    let total = cfg.train.total_steps(items.len());
    ui::header(st.label);
    let held_out = if eval.is_empty() { String::new() } else { format!(" ({} held out)", eval.len()) };
    ui::note(&format!("{} training items{held_out}, {total} optimizer steps, in {}", items.len(), st.dir.display()));
    let run_dir =
        RunDir { dir: st.dir.to_path_buf(), config_hash: config_hash(&(cfg, st.name)), label: st.name.into() };
    train(&built.policy, objective, items, eval, &mut built.optimizer, &cfg.train, &run_dir, resume)
}

/// Writes what trained: the model as an HF folder at `out` when its weights are trainable, LoRA
/// adapters under `out/lora`, soft prompts under `out/prompts` (PEFT layouts).
pub fn save_outputs(policy: &Policy, base: &str, out: &Path) -> Result<()> {
    let p = &policy.pretrained;
    if let Some(raw) = trained_model(policy, base)? {
        save_hf_folder(&raw, out)?;
    }
    let (layers, heads) = (p.model.num_layers(), p.model.num_heads());
    if let Some(l) = &policy.lora {
        folder::save_lora(l, &out.join("lora"), base)?;
    }
    if let Some(pr) = &policy.prompts {
        folder::save_prompts(pr, &out.join("prompts"), base, layers, heads)?;
    }
    Ok(())
}

/// The current weights of `policy` as a model to save, when its weights train (`None` when they
/// are frozen: then only adapters / prompts are outputs). `base` is where it came from.
pub fn trained_model(policy: &Policy, base: &str) -> Result<Option<RawModel>> {
    let p = &policy.pretrained;
    let Some(vm) = &p.varmap else { return Ok(None) };
    let tensors = vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    Ok(Some(RawModel {
        config: p.config.clone(),
        tensors,
        packed: Default::default(),
        tokenizer: p.tokenizer.clone(),
        generation: p.generation.clone(),
        origin: PathBuf::from(base),
    }))
}
