//! The training loop: seeded data order, micro-batches with gradient accumulation, global
//! gradient clipping, AdamW with a learning-rate schedule per parameter group, metrics (JSON
//! lines), a progress bar, and atomic checkpoints that `resume` continues bit-exactly.
//! It reads top to bottom like nanoGPT's `train.py`; what is optimised comes from an
//! [`Objective`].

pub mod checkpoint;
pub mod optim;

use crate::objectives::{Item, Objective};
use crate::policy::Policy;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use checkpoint::TrainerState;
use optim::{lr_at, AdamW, AdamWConfig, Schedule};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Loop hyper-parameters (HF `TrainingArguments` names where one exists).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the data (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Optimizer steps to run; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate of the model's weights (group 0).
    pub lr: f64,
    /// Peak learning rate of the controls (soft prompts, adapters; group 1); `lr` when unset.
    pub control_lr: Option<f64>,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (HF default 1.0); `None` or 0 = no clipping.
    pub max_grad_norm: Option<f64>,
    pub adamw: AdamWConfig,
    /// Seeds data order, fresh adapters/prompts and dropout.
    pub seed: u64,
    /// Shuffle the data each epoch (seeded).
    pub shuffle: bool,
    /// Put items of similar length in the same micro-batch to cut padding (transformers'
    /// `group_by_length`: sorted within shuffled groups of 50 micro-batches).
    pub group_by_length: bool,
    /// Write a checkpoint every this many steps, to resume an unfinished run from; unset or 0:
    /// none. A stage's checkpoints are removed once its outputs (`final/`) are written.
    pub save_every: Option<usize>,
    /// Keep the checkpoints of a finished stage, including one of its last step.
    pub keep_checkpoints: bool,
    /// `"f32"` (default) or `"bf16"`: mixed precision as PyTorch's CPU autocast — products with
    /// bf16 operands and f32 sums; weights, AdamW state, norms, softmax and losses in f32.
    /// Left out of the serialised config when f32, so run fingerprints made before it existed
    /// still match.
    #[serde(skip_serializing_if = "Dtype::is_f32")]
    pub dtype: Dtype,
    /// With held-out data (`[data] eval` / `eval_share`): its loss every this many steps (and
    /// always after the last), as TRL's `eval_steps`; unset: after the last step only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
}

/// The precision of the products in training (`[train] dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
}

impl Dtype {
    pub fn is_f32(&self) -> bool {
        *self == Dtype::F32
    }

    /// Parses `f32` or `bf16` (a CLI flag's value).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            other => Err(Error::Invalid(format!("unknown dtype '{other}' (f32, bf16)"))),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            lr: 1e-5,
            control_lr: None,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            max_grad_norm: Some(1.0),
            adamw: AdamWConfig::default(),
            seed: 0,
            shuffle: true,
            group_by_length: true,
            save_every: None,
            keep_checkpoints: false,
            dtype: Dtype::F32,
            eval_every: None,
        }
    }
}

/// One optimizer step's figures (a line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// Seconds in forward, backward and optimizer.
    pub fwd_s: f64,
    pub bwd_s: f64,
    pub opt_s: f64,
    /// The objective's own figures (DPO's rewards, accuracies, margins), averaged over its units.
    #[serde(flatten, default)]
    pub extra: std::collections::BTreeMap<String, f64>,
}

impl TrainConfig {
    /// Optimizer steps in a run over `n` examples.
    pub fn total_steps(&self, n: usize) -> usize {
        let per_step = self.batch_size * self.grad_accum;
        self.max_steps.unwrap_or(self.epochs * n.div_ceil(per_step.max(1)))
    }

    /// Checks the values that the types allow but training cannot use.
    pub fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::Invalid("train: batch_size and grad_accum must be at least 1".into()));
        }
        for (k, v) in [("lr", Some(self.lr)), ("control_lr", self.control_lr)] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(Error::Invalid(format!("train: {k} {v} must be a non-negative number")));
            }
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return Err(Error::Invalid("train: epochs or max_steps must be at least 1".into()));
        }
        if let Some(g) = self.max_grad_norm.filter(|g| !(g.is_finite() && *g >= 0.0)) {
            return Err(Error::Invalid(format!("train: max_grad_norm {g} must be a non-negative number")));
        }
        if self.eval_every == Some(0) {
            return Err(Error::Invalid("train: eval_every must be at least 1".into()));
        }
        Ok(())
    }
}

/// Order of the items in `epoch`: a seeded shuffle, so a resumed run sees the same order; with
/// `group` > 0, sorted by length (longest first) within consecutive groups of `group` items.
fn epoch_order(lengths: &[usize], seed: u64, epoch: usize, shuffle: bool, group: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if shuffle {
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            seed ^ (epoch as u64).wrapping_mul(0x9E3779B97F4A7C15),
        ));
    }
    if group > 1 {
        for g in order.chunks_mut(group) {
            g.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    order
}

fn add_grads(into: &mut GradStore, from: GradStore, opt: &AdamW) -> Result<()> {
    for p in &opt.params {
        let t = p.var.as_tensor();
        if let Some(g) = from.get(t) {
            let sum = match into.get(t) {
                Some(old) => (old + g)?,
                None => g.clone(),
            };
            into.insert(t, sum);
        }
    }
    Ok(())
}

/// A fingerprint of a configuration's JSON (FNV-1a), stored in checkpoints.
pub fn config_hash(config: &impl Serialize) -> String {
    let s = serde_json::to_string(config).unwrap_or_default();
    format!("{:016x}", s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)))
}

/// Where a run writes: `checkpoint-{step}/` folders and `metrics.jsonl`.
pub struct RunDir {
    pub dir: PathBuf,
    /// Checkpoint/resume fingerprint of the run's configuration.
    pub config_hash: String,
    /// What the progress lines call the loop (the stage: `sft`, `meet-step1`, ...).
    pub label: String,
}

/// The progress message of a step: loss, learning rate, speed and the objective's headline figures.
fn step_message(log: &StepLog) -> String {
    let mut msg = format!("loss {:.4}  lr {:.2e}  {:.0} tok/s", log.loss, log.lr, log.tokens_per_s);
    for (key, short) in [
        ("rewards/accuracies", "acc"),
        ("rewards/margins", "margin"),
        ("eval_loss", "eval_loss"),
        ("eval_rewards/accuracies", "eval_acc"),
    ] {
        if let Some(v) = log.extra.get(key) {
            msg.push_str(&format!("  {short} {v:.3}"));
        }
    }
    msg
}

/// Warns when many trainable weights sit exactly halfway between two bf16 values (weights
/// dequantized from a quantized GGUF): under autocast each of them moves by half a bf16 step on
/// its first update whatever the learning rate, as it would under PyTorch's autocast. Random f32
/// weights have a share of about 2^-16.
fn warn_bf16_ties(opt: &AdamW) -> Result<()> {
    let (mut ties, mut total) = (0usize, 0usize);
    for p in &opt.params {
        let t = p.var.as_tensor();
        ties += crate::nn::ops::with_f32(t, crate::nn::bf16::tie_count)?;
        total += t.elem_count();
    }
    let share = ties as f64 / total.max(1) as f64;
    if share > 1e-3 {
        tracing::warn!(
            "dtype = \"bf16\": {:.1}% of the trainable weights lie exactly halfway between two bf16 \
             values (as weights dequantized from a quantized GGUF do); rounding to nearest even moves \
             each by half a bf16 step on its first update, whatever the learning rate. Train such \
             weights with dtype = \"f32\" (or start from a dense checkpoint)",
            100.0 * share
        );
    }
    Ok(())
}

/// The loss of `objective` over `items` (and its figures), averaged over its units, in
/// micro-batches of `batch_size`, without training: what `metrics.jsonl` logs as `eval_loss`
/// (and `eval_` + each figure). Adapter dropout is off.
pub fn evaluate<T: Item>(
    policy: &Policy,
    objective: &dyn Objective<T>,
    items: &[T],
    batch_size: usize,
) -> Result<std::collections::BTreeMap<String, f64>> {
    if let Some(l) = &policy.lora {
        l.set_training_step(None);
    }
    let refs: Vec<&T> = items.iter().collect();
    let (mut sum, mut units) = (0.0, 0usize);
    let mut figures = std::collections::BTreeMap::new();
    for mb in refs.chunks(batch_size.max(1)) {
        let out = objective.loss(policy, mb)?;
        sum += out.sum.detach().to_scalar::<f32>()? as f64;
        units += objective.units(mb);
        for (k, v) in out.metrics {
            *figures.entry(format!("eval_{k}")).or_insert(0.0) += v;
        }
    }
    let units = units.max(1) as f64;
    figures.values_mut().for_each(|v| *v /= units);
    figures.insert("eval_loss".into(), sum / units);
    Ok(figures)
}

/// Trains `opt`'s parameters on `examples` under `objective`, logging the loss on `eval` (none
/// when empty) every `cfg.eval_every` steps and after the last. With `resume`, continues from
/// the newest checkpoint in `run.dir` (a fresh start when there is none). Returns the step logs
/// of this invocation.
#[allow(clippy::too_many_arguments)]
pub fn train<T: Item>(
    policy: &Policy,
    objective: &dyn Objective<T>,
    examples: &[T],
    eval: &[T],
    opt: &mut AdamW,
    cfg: &TrainConfig,
    run: &RunDir,
    resume: bool,
) -> Result<Vec<StepLog>> {
    cfg.check()?;
    if examples.is_empty() {
        return Err(Error::Invalid("no training examples".into()));
    }
    let _autocast = crate::nn::bf16::autocast(cfg.dtype == Dtype::Bf16);
    if cfg.dtype == Dtype::Bf16 {
        warn_bf16_ties(opt)?;
    }
    let n = examples.len();
    let total = cfg.total_steps(n);
    let lrs_base = [cfg.lr, cfg.control_lr.unwrap_or(cfg.lr)];
    // The learning rate logged: the model's, or the controls' when only they train.
    let logged_group = if opt.params.iter().any(|p| p.group == 0) { 0 } else { 1 };
    let params = opt.params.iter().map(|p| (p.name.clone(), p.var.dims().to_vec())).collect();
    let mut state = TrainerState {
        step: 0,
        epoch: 0,
        position: 0,
        adam_step: 0,
        seed: cfg.seed,
        config_hash: run.config_hash.clone(),
        params,
    };
    let metrics_path = run.dir.join("metrics.jsonl");
    std::fs::create_dir_all(&run.dir).map_err(|e| Error::io(&run.dir, e))?;
    let stale = checkpoint::remove_stale(&run.dir)?;
    if stale > 0 {
        tracing::warn!(
            "{}: removed {stale} unfinished checkpoint folder(s) of a run stopped while saving",
            run.dir.display()
        );
    }
    if resume {
        if let Some(ckpt) = checkpoint::latest(&run.dir)? {
            state = checkpoint::load(&ckpt, opt, &run.config_hash)?;
            crate::ui::note(&format!("resuming from {} (step {} of {total})", ckpt.display(), state.step));
        }
    }
    // Keep the metrics of the steps the checkpoint covers (none on a fresh start, at step 0);
    // later lines belong to a lost run.
    let kept: String = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step <= state.step))
        .map(|l| format!("{l}\n"))
        .collect();
    crate::files::atomic_write(&metrics_path, kept.as_bytes())?;
    let mut metrics =
        std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;

    let mut progress = crate::ui::Progress::new(&run.label, total, "steps", state.step);
    let mut logs = Vec::new();
    let lengths: Vec<usize> = examples.iter().map(Item::tokens).collect();
    let group = if cfg.group_by_length { 50 * cfg.batch_size } else { 0 };
    let mut order = epoch_order(&lengths, cfg.seed, state.epoch, cfg.shuffle, group);
    while state.step < total {
        if state.position >= n {
            state.epoch += 1;
            state.position = 0;
            order = epoch_order(&lengths, cfg.seed, state.epoch, cfg.shuffle, group);
        }
        let take = (cfg.batch_size * cfg.grad_accum).min(n - state.position);
        let step_examples: Vec<&T> =
            order[state.position..state.position + take].iter().map(|&i| &examples[i]).collect();
        let units = objective.units(&step_examples).max(1) as f64;
        let lrs: Vec<f64> =
            lrs_base.iter().map(|&b| lr_at(b, cfg.schedule, state.step, cfg.warmup_steps, total)).collect();
        if let Some(l) = &policy.lora {
            l.set_training_step(Some(state.step as u64));
        }

        let t0 = Instant::now();
        let (mut fwd_s, mut bwd_s, mut loss) = (0.0, 0.0, 0.0);
        let mut grads: Option<GradStore> = None;
        let mut extra = std::collections::BTreeMap::new();
        for mb in step_examples.chunks(cfg.batch_size) {
            let a = Instant::now();
            let out = objective.loss(policy, mb)?;
            let scaled = out.sum.affine(1.0 / units, 0.0)?;
            loss += scaled.to_scalar::<f32>()? as f64;
            for (k, v) in out.metrics {
                *extra.entry(k.to_string()).or_insert(0.0) += v / units;
            }
            let b = Instant::now();
            let g = scaled.backward()?;
            match grads.as_mut() {
                Some(acc) => add_grads(acc, g, opt)?,
                None => grads = Some(g),
            }
            fwd_s += (b - a).as_secs_f64();
            bwd_s += b.elapsed().as_secs_f64();
        }
        let grads = grads.ok_or_else(|| Error::Invalid("empty step".into()))?;
        let c = Instant::now();
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "step {}: loss {loss} is not finite; lower the learning rate",
                state.step + 1
            )));
        }
        let grad_norm = opt
            .step(&grads, &lrs, cfg.max_grad_norm)
            .map_err(|e| Error::Invalid(format!("step {}: {e}", state.step + 1)))?;
        drop(grads);
        let opt_s = c.elapsed().as_secs_f64();
        state.step += 1;
        state.position += take;
        state.adam_step = opt.step;

        let tokens: usize = step_examples.iter().map(|e| e.tokens()).sum();
        let secs = t0.elapsed().as_secs_f64();
        if !eval.is_empty() && (state.step == total || cfg.eval_every.is_some_and(|k| state.step.is_multiple_of(k))) {
            extra.extend(evaluate(policy, objective, eval, cfg.batch_size)?);
        }
        let log = StepLog {
            step: state.step,
            epoch: state.epoch,
            loss,
            lr: lrs[logged_group],
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            fwd_s,
            bwd_s,
            opt_s,
            extra,
        };
        let line = serde_json::to_string(&log).map_err(|e| Error::Invalid(e.to_string()))?;
        writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        progress.update(state.step, &step_message(&log));
        logs.push(log);
        // The last step's checkpoint only when it is to be kept: the stage's outputs replace it.
        let save = match cfg.save_every {
            Some(k) if k > 0 => {
                (state.step.is_multiple_of(k) && state.step < total) || (state.step == total && cfg.keep_checkpoints)
            }
            _ => state.step == total && cfg.keep_checkpoints,
        };
        if save {
            checkpoint::save(&run.dir, opt, &state)?;
        }
    }
    if let Some(l) = &policy.lora {
        l.set_training_step(None);
    }
    let summary = match logs.last() {
        Some(l) => format!("final loss {:.4}", l.loss),
        None => "nothing left to train".into(),
    };
    progress.finish(&summary);
    Ok(logs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_grouping_sorts_within_groups_and_keeps_every_item() {
        let lengths: Vec<usize> = (0..40).map(|i| (i * 37) % 23).collect();
        let plain = epoch_order(&lengths, 3, 0, true, 0);
        let grouped = epoch_order(&lengths, 3, 0, true, 10);
        let mut a = grouped.clone();
        a.sort();
        assert_eq!(a, (0..40).collect::<Vec<_>>());
        for (g, p) in grouped.chunks(10).zip(plain.chunks(10)) {
            // Same members as the shuffled group, longest first.
            let (mut gs, mut ps) = (g.to_vec(), p.to_vec());
            gs.sort();
            ps.sort();
            assert_eq!(gs, ps);
            assert!(g.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
        assert_ne!(epoch_order(&lengths, 3, 1, true, 10), grouped, "each epoch reshuffles");
    }
}
