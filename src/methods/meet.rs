//! MEET — alignMEnt with parameter-Efficient Tuning. Each preference has a control (a soft prompt
//! of n virtual tokens, or a LoRA adapter): chosen responses train under `good`, rejected ones
//! under `bad`, with the cross-entropy of the response tokens, `L = −Σ log p(y_t | c, x, y_<t)`.
//!
//! 1. Step 1, control optimisation: the model is frozen, only the controls train.
//! 2. Step 2, conditional fine-tuning: the full model trains on the same objective, starting from
//!    step 1's controls (which keep training unless `freeze_controls`).
//!
//! Several preference dimensions (`model.dimensions`): step 1 trains each dimension's controls on
//! that dimension's pairs (each response under its own dimension's control, the model frozen).
//! Step 2 then conditions every response on a whole combination, one control per dimension: its
//! own dimension's control from its pair, and for each other dimension the control under which
//! step 1's controls give the response the higher likelihood, `argmax_c log p(y | c, x)` (step 1's
//! controls used as that dimension's classifier, so no judge or extra labels are needed). Why:
//! at inference the model runs under combinations, which single-dimension examples never show
//! it; labelled this way, each response still teaches every dimension what it is. The
//! alternative, `combinations = "single"`, keeps step 2 on single-dimension examples (the
//! other dimensions unset), so an experiment can compare the two. Step 2 alone (`steps =
//! "step2"`) has no trained controls to label with and always uses single-dimension examples.
//!
//! `steps` gives the ablations on the same code path: `step1` only, `step2` only (controls
//! fresh and trained jointly with the model), or `both`. Step 1's outputs go to
//! `output_dir/step1/final` (or `output_dir/final` when it is the only step), step 2's to
//! `output_dir/final`.

use crate::data::Example;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_data, pair_controls_of, Built, TrainingData};
use crate::methods::spec::adapter_spec;
use crate::methods::stage::{stage, Stage};
use crate::methods::{ExperimentEntry, Recipe};
use crate::objectives::lm::LanguageModeling;
use crate::objectives::logps::label_logps;
use crate::policy::{Batch, Policy};
use crate::train::StepLog;
use crate::{ui, Error, Result};
use serde::{Deserialize, Serialize};

/// Which steps run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeetSteps {
    #[default]
    Both,
    Step1,
    Step2,
}

/// Per-step changes to `[train]` (unset: `[train]`'s value).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StepOverrides {
    pub epochs: Option<usize>,
    pub max_steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub grad_accum: Option<usize>,
    pub lr: Option<f64>,
    pub control_lr: Option<f64>,
    pub warmup_steps: Option<usize>,
}

/// With several preference dimensions: what step 2 conditions each response on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Combinations {
    /// A whole combination: its own dimension's control, and for every other dimension the one
    /// step 1's controls find the more likely.
    #[default]
    Labelled,
    /// Its own dimension's control only.
    Single,
}

impl Combinations {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `[meet]` options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeetConfig {
    pub steps: MeetSteps,
    /// Keep step 1's controls fixed during step 2.
    pub freeze_controls: bool,
    pub step1: StepOverrides,
    pub step2: StepOverrides,
    /// Several dimensions: step 2's examples (see the module docs). Left out of saved configs
    /// when it is the default, so one-dimension runs keep their fingerprints.
    #[serde(skip_serializing_if = "Combinations::is_default")]
    pub combinations: Combinations,
}

pub struct Meet;

impl Recipe for Meet {
    const NAME: &'static str = "meet";
    const SECTION: Option<&'static str> = Some("meet");
    type Options = MeetConfig;

    /// Each control is its own soft prompt / LoRA adapter.
    fn adapter_per_control(&self) -> bool {
        true
    }

    fn check(&self, cfg: &RunConfig, m: &MeetConfig) -> Result<()> {
        if cfg.lora.is_some() == cfg.prompt.is_some() {
            return Err(Error::Invalid(
                "method meet needs its controls: add exactly one of a [prompt] or a [lora] section".into(),
            ));
        }
        for (step, o) in [("step1", &m.step1), ("step2", &m.step2)] {
            for (k, v) in [("lr", o.lr), ("control_lr", o.control_lr)] {
                if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                    return Err(Error::Invalid(format!("meet.{step}: {k} {v} must be a non-negative number")));
                }
            }
            if o.max_steps == Some(0) || o.epochs == Some(0) || o.batch_size == Some(0) || o.grad_accum == Some(0) {
                return Err(Error::Invalid(format!(
                    "meet.{step}: epochs, max_steps, batch_size and grad_accum must be at least 1"
                )));
            }
        }
        Ok(())
    }

    fn run(&self, cfg: &RunConfig, m: &MeetConfig, resume: bool) -> Result<Vec<StepLog>> {
        run(cfg, m, resume)
    }

    fn experiments(&self) -> Vec<ExperimentEntry> {
        vec![
            ExperimentEntry {
                name: "meet-prompt",
                options: "[prompt]\nn = 20\ninit = \"sample_vocab\"",
                starts_from: None,
            },
            ExperimentEntry {
                name: "meet-lora",
                options: "[lora]\nr = 16\nalpha = 32.0\ntarget_modules = \"all-linear\"",
                starts_from: None,
            },
        ]
    }
}

/// `cfg` for one step: what trains and the step's loop settings.
fn step_config(cfg: &RunConfig, train_weights: bool, o: &StepOverrides) -> RunConfig {
    let mut c = cfg.clone();
    c.model.train_weights = train_weights;
    let t = &mut c.train;
    if o.max_steps.is_some() {
        t.max_steps = o.max_steps;
    }
    t.epochs = o.epochs.unwrap_or(t.epochs);
    t.batch_size = o.batch_size.unwrap_or(t.batch_size);
    t.grad_accum = o.grad_accum.unwrap_or(t.grad_accum);
    t.lr = o.lr.unwrap_or(t.lr);
    t.control_lr = o.control_lr.or(t.control_lr);
    t.warmup_steps = o.warmup_steps.unwrap_or(t.warmup_steps);
    c
}

/// Training examples: each pair gives (good, x, y_w) and (bad, x, y_l); supervised rows keep the
/// control they name (any number of preferences).
fn examples(cfg: &RunConfig, data: TrainingData) -> Result<Vec<Example>> {
    Ok(match data {
        TrainingData::Supervised(ex) => ex,
        TrainingData::Pairs(pairs) => {
            let mut out = Vec::with_capacity(2 * pairs.len());
            for p in pairs {
                // A pair of a dimension trains that dimension's two controls.
                let (good, bad) = pair_controls_of(cfg, &p)?;
                let start = p.prompt.len();
                out.extend([(p.chosen, good), (p.rejected, bad)].map(|(r, c)| Example {
                    ids: [p.prompt.as_slice(), &r].concat(),
                    start,
                    controls: vec![c],
                    ..Default::default()
                }));
            }
            out
        }
    })
}

/// Gives every example a control of each dimension it has none of: the one under which `policy`
/// (step 1's controls on the frozen model) gives its response the highest log-likelihood.
fn label_other_dimensions(cfg: &RunConfig, policy: &Policy, ex: &mut [Example], pad: u32) -> Result<()> {
    const BATCH: usize = 16;
    for (name, controls) in cfg.dimension_indices() {
        let todo: Vec<usize> =
            (0..ex.len()).filter(|&i| !ex[i].controls.iter().any(|c| controls.contains(c))).collect();
        ui::note(&format!(
            "MEET step 2: labelling {} responses with dimension '{}' by step 1's controls",
            todo.len(),
            name
        ));
        for chunk in todo.chunks(BATCH) {
            let rows: Vec<(Vec<u32>, usize)> = chunk.iter().map(|&i| (ex[i].ids.clone(), ex[i].start)).collect();
            let mut best: Vec<(f32, usize)> = vec![(f32::NEG_INFINITY, controls[0]); chunk.len()];
            let mut batch = Batch::from_rows(&rows, pad)?;
            for &c in &controls {
                batch.controls = Some(vec![vec![(c, 1.0)]; chunk.len()]);
                let lp = label_logps(policy, &batch)?.per_sequence_sum()?.detach().to_vec1::<f32>()?;
                for (b, &l) in best.iter_mut().zip(&lp) {
                    // Strictly greater: ties keep the dimension's first control.
                    if l > b.0 {
                        *b = (l, c);
                    }
                }
            }
            for (&i, &(_, c)) in chunk.iter().zip(&best) {
                ex[i].controls.push(c);
                // Index order is dimension order (the control list holds the dimensions in order).
                ex[i].controls.sort_unstable();
            }
        }
    }
    Ok(())
}

fn run(cfg: &RunConfig, m: &MeetConfig, resume: bool) -> Result<Vec<StepLog>> {
    let mut logs = Vec::new();
    let step1_dir = cfg.output_dir.join("step1");
    if m.steps != MeetSteps::Step2 {
        let c = step_config(cfg, false, &m.step1);
        let mut built = setup::standard(&c)?;
        let p = &built.policy.pretrained;
        let (ex, eval) = load_data(cfg, p)?.map(|d| examples(cfg, d))?;
        let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
        let (dir, label) = if m.steps == MeetSteps::Step1 {
            (cfg.output_dir.clone(), "MEET step 1 (alone): the controls, model frozen")
        } else {
            (step1_dir.clone(), "MEET step 1/2: the controls, model frozen")
        };
        let st = Stage { name: "meet-step1", label, dir: &dir };
        logs.extend(stage(&c, &st, &mut built, &objective, &ex, &eval, resume, adapter_spec(cfg))?);
    }
    if m.steps != MeetSteps::Step1 {
        let mut c = step_config(cfg, true, &m.step2);
        if m.steps == MeetSteps::Both {
            c.model.init_adapters = Some(step1_dir.join("final"));
        }
        let policy = setup::policy(&c, setup::raw_model(&c)?)?;
        let mut params = setup::model_params(&policy)?;
        if !m.freeze_controls {
            params.extend(setup::control_params(&policy)?);
        }
        let optimizer = setup::optimizer(&c, params)?;
        let mut built = Built { policy, optimizer };
        let p = &built.policy.pretrained;
        let (mut ex, mut eval) = load_data(cfg, p)?.map(|d| examples(cfg, d))?;
        let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
        if m.steps == MeetSteps::Both && m.combinations == Combinations::Labelled && cfg.dimensions().len() > 1 {
            label_other_dimensions(cfg, &built.policy, &mut ex, objective.pad_id)?;
            label_other_dimensions(cfg, &built.policy, &mut eval, objective.pad_id)?;
        }
        let label = match (m.steps, m.freeze_controls) {
            (MeetSteps::Step2, _) => "MEET step 2 (alone): the full model with fresh controls",
            (_, false) => "MEET step 2/2: the full model conditioned on the controls (both train)",
            (_, true) => "MEET step 2/2: the full model conditioned on the frozen controls",
        };
        let st = Stage { name: "meet-step2", label, dir: &cfg.output_dir };
        logs.extend(stage(&c, &st, &mut built, &objective, &ex, &eval, resume, adapter_spec(cfg))?);
    }
    Ok(logs)
}
