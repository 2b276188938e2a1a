//! Training methods, one file each, written as recipes (as torchtune's). A method's file owns
//! everything about it: its options (its own section of a run file), which runs it accepts, its
//! default controls, its recipe (read the data, set up the policy and optimizer, make its training
//! items, train with the shared loop, save), how its controls are applied at inference, and its
//! defaults in `meet experiment`. It implements [`Recipe`]; `pub mod` here and one line in
//! [`builtins`] register it (code outside the crate calls [`register`]). Code outside this folder
//! only sees [`Method`], found by name with [`find`].
//!
//! Shared pieces: [`config`] (the run file), [`setup`] (data, policy, optimizer), [`stage`]
//! (train and save one stage), [`spec`] (the controls' inference spec).

pub mod coh;
pub mod config;
pub mod control_token;
pub mod dpo;
pub mod meet;
pub mod reward;
pub mod ric;
pub mod setup;
pub mod sft;
pub mod spec;
pub mod stage;

use crate::methods::config::{Document, RunConfig};
use crate::methods::spec::ControlSpec;
use crate::methods::stage::{finished, write_finished, Finished, FINISHED};
use crate::tokenizer::Tokenizer;
use crate::train::{config_hash, StepLog};
use crate::{ui, Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, LazyLock, RwLock};

/// A training method, written against its typed options. Implement this in one file and register
/// it (one line in [`builtins`], or [`register`] from outside the crate).
pub trait Recipe: Send + Sync + 'static {
    /// Its name in run files (`method = "dpo"`).
    const NAME: &'static str;
    /// Its own section of a run file (`[dpo]`), read into [`Self::Options`]; `None`: it takes
    /// none (a section of another method is an error either way).
    const SECTION: Option<&'static str>;
    /// The section's contents; unknown keys should be errors (`#[serde(deny_unknown_fields)]`).
    type Options: Serialize + DeserializeOwned + Default;

    /// Control names when `model.controls` is not given.
    fn default_controls(&self) -> Vec<String> {
        vec!["good".into(), "bad".into()]
    }

    /// Whether each control is a LoRA adapter / soft prompt of its own (else the run's adapter
    /// or prompt is one, named `default`).
    fn adapter_per_control(&self) -> bool {
        false
    }

    /// Rejects runs the method cannot do (what must train, which sections it takes, option
    /// values), before anything is read or written.
    fn check(&self, _cfg: &RunConfig, _options: &Self::Options) -> Result<()> {
        Ok(())
    }

    /// Checks that the files its options name are there.
    fn check_sources(&self, _cfg: &RunConfig, _options: &Self::Options) -> Result<()> {
        Ok(())
    }

    /// Trains; with `resume`, continues every stage from its newest checkpoint. The last stage
    /// writes its outputs into `cfg.output_dir/final` and marks the stage finished.
    fn run(&self, cfg: &RunConfig, options: &Self::Options, resume: bool) -> Result<Vec<StepLog>>;

    /// Applies the controls `selected` of `spec` (a token, phrase or score kind, which the method
    /// wrote: `(index, value)` pairs as [`ControlSpec::select`] gives them, one per dimension in
    /// dimension order; the value is a requested score for score controls, else 1) to prompts at
    /// inference. LoRA adapters and soft prompts are applied by the caller.
    fn apply_control(
        &self,
        spec: &ControlSpec,
        _selected: &[(usize, f32)],
        _tok: &Tokenizer,
        _ids: &mut [Vec<u32>],
    ) -> Result<()> {
        Err(Error::Invalid(format!("method {} does not apply {:?} controls", Self::NAME, spec.kind)))
    }

    /// Tokens never to generate under the model it trained (its control tokens).
    fn suppressed_tokens(&self, _spec: &ControlSpec, _tok: &Tokenizer) -> Vec<u32> {
        vec![]
    }

    /// Its entries in `meet experiment`.
    fn experiments(&self) -> Vec<ExperimentEntry> {
        vec![]
    }
}

/// A method as an experiment runs it: a name, the run options (TOML) it starts from, and the
/// experiment run whose final model it starts from, when it continues another (DPO from SFT).
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentEntry {
    pub name: &'static str,
    pub options: &'static str,
    pub starts_from: Option<&'static str>,
}

/// A registered method, whatever its options' type (see [`Recipe`], which every `Method` is).
pub trait Method: Send + Sync {
    fn name(&self) -> &'static str;
    fn section(&self) -> Option<&'static str>;
    /// Reads the method's section of a run file into its options, defaults filled in (absent
    /// section: the defaults). Errors from a file's text carry toml's line and column.
    fn read_options(&self, doc: Document) -> std::result::Result<toml::Table, String>;
    fn default_controls(&self) -> Vec<String>;
    fn adapter_per_control(&self) -> bool;
    fn check(&self, cfg: &RunConfig) -> Result<()>;
    fn check_sources(&self, cfg: &RunConfig) -> Result<()>;
    fn run(&self, cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>>;
    fn apply_control(
        &self,
        spec: &ControlSpec,
        selected: &[(usize, f32)],
        tok: &Tokenizer,
        ids: &mut [Vec<u32>],
    ) -> Result<()>;
    fn suppressed_tokens(&self, spec: &ControlSpec, tok: &Tokenizer) -> Vec<u32>;
    fn experiments(&self) -> Vec<ExperimentEntry>;
}

impl<R: Recipe> Method for R {
    fn name(&self) -> &'static str {
        R::NAME
    }
    fn section(&self) -> Option<&'static str> {
        R::SECTION
    }
    fn read_options(&self, doc: Document) -> std::result::Result<toml::Table, String> {
        let options: R::Options = match R::SECTION {
            Some(s) => doc.get(s)?.unwrap_or_default(),
            None => R::Options::default(),
        };
        toml::Table::try_from(&options).map_err(|e| e.to_string())
    }
    fn default_controls(&self) -> Vec<String> {
        Recipe::default_controls(self)
    }
    fn adapter_per_control(&self) -> bool {
        Recipe::adapter_per_control(self)
    }
    fn check(&self, cfg: &RunConfig) -> Result<()> {
        Recipe::check(self, cfg, &cfg.options()?)
    }
    fn check_sources(&self, cfg: &RunConfig) -> Result<()> {
        Recipe::check_sources(self, cfg, &cfg.options()?)
    }
    fn run(&self, cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
        Recipe::run(self, cfg, &cfg.options()?, resume)
    }
    fn apply_control(
        &self,
        spec: &ControlSpec,
        selected: &[(usize, f32)],
        tok: &Tokenizer,
        ids: &mut [Vec<u32>],
    ) -> Result<()> {
        Recipe::apply_control(self, spec, selected, tok, ids)
    }
    fn suppressed_tokens(&self, spec: &ControlSpec, tok: &Tokenizer) -> Vec<u32> {
        Recipe::suppressed_tokens(self, spec, tok)
    }
    fn experiments(&self) -> Vec<ExperimentEntry> {
        Recipe::experiments(self)
    }
}

/// Options of a method without a section of its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

/// The methods `meet` ships, one line each, in the order they are listed to users.
fn builtins() -> Vec<Arc<dyn Method>> {
    vec![
        Arc::new(sft::Sft),
        Arc::new(coh::Coh),
        Arc::new(control_token::ControlToken),
        Arc::new(meet::Meet),
        Arc::new(dpo::Dpo),
        Arc::new(reward::Reward),
        Arc::new(ric::Ric),
    ]
}

static REGISTRY: LazyLock<RwLock<Vec<Arc<dyn Method>>>> = LazyLock::new(|| RwLock::new(builtins()));

/// Adds a method (one of a downstream crate, or a test's); its name and section must be new.
pub fn register(method: Arc<dyn Method>) -> Result<()> {
    let mut all = REGISTRY.write().map_err(|_| Error::Invalid("poisoned method registry".into()))?;
    if let Some(m) = all.iter().find(|m| {
        m.name() == method.name()
            || (method.section().is_some() && m.section() == method.section())
            || Some(m.name()) == method.section()
    }) {
        return Err(Error::Invalid(format!(
            "method '{}' (section {:?}) clashes with the registered method '{}'",
            method.name(),
            method.section(),
            m.name()
        )));
    }
    all.push(method);
    Ok(())
}

/// Every registered method.
pub fn all() -> Vec<Arc<dyn Method>> {
    REGISTRY.read().map(|r| r.clone()).unwrap_or_default()
}

/// Their names.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|m| m.name()).collect()
}

/// The method called `name`.
pub fn find(name: &str) -> Result<Arc<dyn Method>> {
    all()
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| Error::Invalid(format!("unknown method '{name}' (one of {})", names().join(", "))))
}

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
    crate::files::atomic_write(&cfg.output_dir.join("config.toml"), text.as_bytes())?;
    let logs = cfg.recipe()?.run(cfg, resume)?;
    // The last stage of every method writes into output_dir: its marker now stands for the run.
    let mut f: Finished = serde_json::from_value(crate::files::read_json(&marker)?)
        .map_err(|e| Error::parse(&marker, format!("not a meet stage marker: {e}")))?;
    f.run_hash = Some(config_hash(cfg));
    write_finished(&cfg.output_dir, &f)?;
    Ok(logs)
}
