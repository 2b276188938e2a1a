//! Checkpoints: trainable weights, AdamW moments and the loop's position, written as a folder
//! `checkpoint-{step}` that appears by one rename once every file is on disk, so a run killed at
//! any moment leaves either a whole checkpoint or none.
//!
//! Layout (like the HF Trainer's): `trainable.safetensors` (weights by name),
//! `optimizer.safetensors` (`{name}.exp_avg`, `{name}.exp_avg_sq`), `trainer_state.json`.

use crate::files::{atomic_write, read_json};
use crate::io::safetensors;
use crate::train::optim::AdamW;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the loop stands; enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Examples of the current epoch's order consumed.
    pub epoch: usize,
    pub position: usize,
    /// AdamW's step counter (bias correction).
    pub adam_step: u64,
    /// The run's seed; data order and dropout streams derive from it and the step.
    pub seed: u64,
    /// Fingerprint of the resolved run configuration; a checkpoint of another run is refused.
    pub config_hash: String,
    /// Trainable tensors and shapes, to refuse a checkpoint of another model.
    pub params: Vec<(String, Vec<usize>)>,
}

const STATE: &str = "trainer_state.json";

/// Writes `checkpoint-{step}` under `dir` atomically and returns its path.
pub fn save(dir: &Path, opt: &AdamW, state: &TrainerState) -> Result<PathBuf> {
    let final_dir = dir.join(format!("checkpoint-{}", state.step));
    let tmp = dir.join(format!(".checkpoint-{}.tmp-{}", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut weights = BTreeMap::new();
    let mut moments = BTreeMap::new();
    for p in &opt.params {
        weights.insert(p.name.clone(), p.var.as_tensor().clone());
        let dims = p.var.dims().to_vec();
        moments.insert(format!("{}.exp_avg", p.name), Tensor::from_slice(&p.m, dims.as_slice(), &Device::Cpu)?);
        moments.insert(format!("{}.exp_avg_sq", p.name), Tensor::from_slice(&p.v, dims.as_slice(), &Device::Cpu)?);
    }
    safetensors::save(&weights, &tmp.join("trainable.safetensors"))?;
    safetensors::save(&moments, &tmp.join("optimizer.safetensors"))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    atomic_write(&tmp.join(STATE), text.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(final_dir)
}

/// Removes the temporary folders (`.checkpoint-N.tmp-PID`) that a run killed while writing a
/// checkpoint leaves in `dir`; returns how many there were. Called when a run starts or resumes,
/// so they do not stay forever (gigabytes each for a full model).
pub fn remove_stale(dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut n = 0;
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Removes every `checkpoint-N` folder in `dir` (once a stage's outputs are written).
pub fn remove_all(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_prefix("checkpoint-").is_some_and(|s| s.parse::<usize>().is_ok()) && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// The newest complete checkpoint under `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(None) };
    let mut best: Option<(usize, PathBuf)> = None;
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) else { continue };
        if e.path().join(STATE).is_file() && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Restores weights and moments into `opt` from `ckpt`, checking that it belongs to this run.
pub fn load(ckpt: &Path, opt: &mut AdamW, config_hash: &str) -> Result<TrainerState> {
    let state_path = ckpt.join(STATE);
    let state: TrainerState = serde_json::from_value(read_json(&state_path)?)
        .map_err(|e| Error::parse(&state_path, format!("not a meet trainer state: {e}")))?;
    if state.config_hash != config_hash {
        return Err(Error::format(
            &state_path,
            "this checkpoint was written by a run with a different configuration; refusing to resume from it",
        ));
    }
    let want: Vec<(String, Vec<usize>)> = opt.params.iter().map(|p| (p.name.clone(), p.var.dims().to_vec())).collect();
    if state.params != want {
        return Err(Error::format(&state_path, "the checkpoint's trainable tensors differ from this model's"));
    }
    let wpath = ckpt.join("trainable.safetensors");
    let opath = ckpt.join("optimizer.safetensors");
    let weights = safetensors::load(std::slice::from_ref(&wpath), &Device::Cpu)?;
    let moments = safetensors::load(std::slice::from_ref(&opath), &Device::Cpu)?;
    for p in &mut opt.params {
        let get = |map: &std::collections::HashMap<String, Tensor>, k: &str, file: &Path| -> Result<Vec<f32>> {
            let t = map.get(k).ok_or_else(|| Error::format(file, format!("missing tensor '{k}'")))?;
            if t.dims() != p.var.dims() {
                return Err(Error::format(
                    file,
                    format!("tensor '{k}' has shape {:?}, expected {:?}", t.dims(), p.var.dims()),
                ));
            }
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let w = get(&weights, &p.name, &wpath)?;
        p.m = get(&moments, &format!("{}.exp_avg", p.name), &opath)?;
        p.v = get(&moments, &format!("{}.exp_avg_sq", p.name), &opath)?;
        p.var.set(&Tensor::from_vec(w, p.var.dims(), p.var.device())?)?;
    }
    opt.step = state.adam_step;
    Ok(state)
}
