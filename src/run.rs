//! A training run from a TOML configuration: which method, the model and what trains on it (the
//! weights, LoRA adapters, soft prompts — any combination), the data, the loop, and each
//! method's options. [`build`] loads the model with its trainable parts; the methods in
//! [`crate::methods`] do the rest.
//!
//! ```toml
//! method = "meet"                # sft | coh | control-token | meet | dpo | reward
//! output_dir = "runs/meet"
//! [model]
//! source = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! train_weights = false          # full fine-tuning of every weight
//! controls = ["good", "bad"]     # chosen responses train the first, rejected the second
//! [prompt]                       # present: one soft prompt per control ([lora]: one adapter)
//! n = 20
//! [data]
//! train = "data/prefs.jsonl"
//! [train]
//! lr = 1e-5
//! control_lr = 1e-3
//! ```

use crate::data::preference::{Format, PreferenceOptions};
use crate::io::{self, LoadOptions, Packing, RawModel};
use crate::methods::coh::CohConfig;
use crate::methods::control_token::{add_tokens, ControlTokenConfig};
use crate::methods::meet::MeetConfig;
use crate::methods::reward::RewardConfig;
use crate::objectives::dpo::DpoConfig;
use crate::peft::folder;
use crate::peft::lora::{Adapters, LoraConfig};
use crate::peft::prompt::{PromptConfig, SoftPrompts};
use crate::policy::Policy;
use crate::train::optim::AdamW;
use crate::train::{StepLog, TrainConfig};
use crate::{Error, Pretrained, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The training methods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Supervised fine-tuning (on chosen responses of preference data, or supervised data).
    #[default]
    Sft,
    /// Chain-of-Hindsight: both responses in one sequence behind feedback phrases.
    Coh,
    /// One special token per preference, trained with the full model.
    ControlToken,
    /// MEET: controls (soft prompts / LoRA) optimised on the frozen model, then the full model.
    Meet,
    /// Direct Preference Optimization.
    Dpo,
    /// A Bradley–Terry reward model (the backbone with a scalar head on the last token).
    Reward,
}

impl Method {
    /// Every method by its config name.
    pub const ALL: [(&'static str, Method); 6] = [
        ("sft", Method::Sft),
        ("coh", Method::Coh),
        ("control-token", Method::ControlToken),
        ("meet", Method::Meet),
        ("dpo", Method::Dpo),
        ("reward", Method::Reward),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, m)| *m == self).map_or("?", |(n, _)| n)
    }
}

/// `[model]`: what to load and what trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF folder, GGUF file or Hub repo id.
    pub source: String,
    /// Train every weight of the model (full fine-tuning).
    #[serde(default)]
    pub train_weights: bool,
    /// Names of the controls (LoRA adapters / soft prompts / control tokens / feedback phrases),
    /// one per preference; with preference data the chosen response trains the first and the
    /// rejected the second. Default: `["good", "bad"]` (`["default"]` for SFT and DPO).
    #[serde(default)]
    pub controls: Option<Vec<String>>,
    /// Start the adapters / prompts from PEFT folders saved earlier (this folder's `lora/` and
    /// `prompts/`, or a PEFT adapter folder directly).
    #[serde(default)]
    pub init_adapters: Option<PathBuf>,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL / JSON file: supervised rows (see [`crate::data`]) or preference records (see
    /// [`crate::data::preference`]).
    pub train: PathBuf,
    /// Longest sequence in tokens (virtual tokens not counted).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Preference layout; detected from the first record by default.
    #[serde(default)]
    pub format: Format,
    /// Longest prompt of preference data (its end is kept).
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: Option<usize>,
    /// Longest response of preference data.
    #[serde(default)]
    pub max_completion_length: Option<usize>,
    /// Skip invalid records (counted and listed in the log) instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid: bool,
}

fn default_max_length() -> usize {
    1024
}

fn default_max_prompt_length() -> Option<usize> {
    Some(512)
}

impl DataSection {
    /// The reading options of preference data.
    pub fn preference_options(&self) -> PreferenceOptions {
        PreferenceOptions {
            format: self.format,
            max_length: self.max_length,
            max_prompt_length: self.max_prompt_length,
            max_completion_length: self.max_completion_length,
            skip_invalid: self.skip_invalid,
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub method: Method,
    /// Where checkpoints, metrics and the outputs go.
    pub output_dir: PathBuf,
    pub model: ModelSection,
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub prompt: Option<PromptConfig>,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub meet: MeetConfig,
    #[serde(default)]
    pub dpo: DpoConfig,
    #[serde(default)]
    pub coh: CohConfig,
    #[serde(default)]
    pub control_token: ControlTokenConfig,
    #[serde(default)]
    pub reward: RewardConfig,
}

/// Sets `key` (dotted path, e.g. `train.lr`) in a TOML table to `value`, read as a TOML value
/// (`1e-4`, `true`, `["a", "b"]`) or else as a string.
pub fn set_key(table: &mut toml::Table, key: &str, value: &str) -> Result<()> {
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).ok_or_else(|| Error::Invalid(format!("empty key in '{key}'")))?;
    let mut t = table;
    for p in parts {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| Error::Invalid(format!("'{p}' in '{key}' is not a table")))?;
    }
    t.insert(last.to_string(), parsed);
    Ok(())
}

impl DataSection {
    /// `train` with the default reading options.
    pub fn new(train: impl Into<PathBuf>) -> Self {
        Self {
            train: train.into(),
            max_length: default_max_length(),
            format: Format::Auto,
            max_prompt_length: default_max_prompt_length(),
            max_completion_length: None,
            skip_invalid: false,
        }
    }
}

impl RunConfig {
    /// A run of `method` on `source` with `data`, every other option at its default.
    pub fn new(method: Method, source: &str, data: DataSection, output_dir: impl Into<PathBuf>) -> Self {
        Self {
            method,
            output_dir: output_dir.into(),
            model: ModelSection { source: source.into(), train_weights: false, controls: None, init_adapters: None },
            lora: None,
            prompt: None,
            data,
            train: TrainConfig::default(),
            meet: MeetConfig::default(),
            dpo: DpoConfig::default(),
            coh: CohConfig::default(),
            control_token: ControlTokenConfig::default(),
            reward: RewardConfig::default(),
        }
    }

    /// Reads a TOML file; unknown keys are errors naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_with(path, &[])
    }

    /// Reads a TOML file (or nothing: `path` = `None` in [`Self::from_table`]) with `key=value`
    /// overrides applied first.
    pub fn from_file_with(path: &Path, overrides: &[(String, String)]) -> Result<Self> {
        Self::from_table(Self::read_table(path)?, overrides).map_err(|e| Error::parse(path, e.to_string()))
    }

    /// The TOML table of a run file (syntax errors name the file and line).
    pub fn read_table(path: &Path) -> Result<toml::Table> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))
    }

    /// Builds a configuration from a TOML table and `key=value` overrides.
    pub fn from_table(mut table: toml::Table, overrides: &[(String, String)]) -> Result<Self> {
        for (k, v) in overrides {
            set_key(&mut table, k, v)?;
        }
        let cfg: Self =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| Error::Invalid(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// The control names (see [`ModelSection::controls`]).
    pub fn controls(&self) -> Vec<String> {
        match (&self.model.controls, self.method) {
            (Some(c), _) => c.clone(),
            (None, Method::Sft | Method::Dpo | Method::Reward) => vec!["default".into()],
            (None, _) => vec!["good".into(), "bad".into()],
        }
    }

    /// Names of the LoRA adapters / soft prompts: one per control for the methods whose controls
    /// they are (MEET, SFT with per-row controls), else the single `default` adapter.
    pub fn adapter_names(&self) -> Vec<String> {
        match self.method {
            Method::Meet | Method::Sft => self.controls(),
            _ => vec!["default".into()],
        }
    }

    /// Checks that something trains, the names are usable, and the method's needs are met.
    pub fn check(&self) -> Result<()> {
        let controls = self.controls();
        if controls.is_empty() {
            return Err(Error::Invalid("model.controls is empty".into()));
        }
        let adapters = self.lora.is_some() as usize + self.prompt.is_some() as usize;
        match self.method {
            Method::Meet if adapters != 1 => {
                return Err(Error::Invalid(
                    "method meet needs its controls: add exactly one of a [prompt] or a [lora] section".into(),
                ))
            }
            Method::Meet => {}
            Method::ControlToken if !self.model.train_weights || adapters > 0 => {
                return Err(Error::Invalid(
                    "method control-token trains the full model with its new token rows: set model.train_weights = true and drop [lora] / [prompt]".into(),
                ))
            }
            _ if !self.model.train_weights && adapters == 0 => {
                return Err(Error::Invalid(
                    "nothing to train: set model.train_weights = true, or add a [lora] or [prompt] section".into(),
                ))
            }
            _ => {}
        }
        if self.method == Method::Reward && (!self.model.train_weights || adapters > 0) {
            return Err(Error::Invalid(
                "method reward trains the full model with its score head: set model.train_weights = true and drop [lora] / [prompt]".into(),
            ));
        }
        if matches!(self.method, Method::Coh | Method::Dpo) && self.prompt.is_some() {
            return Err(Error::Invalid(format!("method {} does not take a [prompt] section", self.method.name())));
        }
        self.check_values()
    }

    /// Values the types allow but a run cannot use, found before anything is written.
    fn check_values(&self) -> Result<()> {
        self.train.check()?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if self.prompt.as_ref().is_some_and(|p| p.n == 0) {
            return Err(Error::Invalid("prompt: n (virtual tokens) must be at least 1".into()));
        }
        if self.data.max_length == 0 {
            return Err(Error::Invalid("data: max_length must be at least 1".into()));
        }
        for (step, o) in [("step1", &self.meet.step1), ("step2", &self.meet.step2)] {
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
        let d = &self.dpo;
        if !(d.beta.is_finite() && d.beta > 0.0) {
            return Err(Error::Invalid(format!("dpo: beta {} must be a positive number", d.beta)));
        }
        if !(0.0..0.5).contains(&d.label_smoothing) {
            return Err(Error::Invalid(format!("dpo: label_smoothing {} must be in [0, 0.5)", d.label_smoothing)));
        }
        if !(0.0..1.0).contains(&self.reward.eval_share) {
            return Err(Error::Invalid(format!("reward: eval_share {} must be in [0, 1)", self.reward.eval_share)));
        }
        Ok(())
    }

    /// Checks that the files the run reads are there: the model (and DPO's reference), the
    /// training data, a held-out file, adapters to start from. Run before anything is written.
    pub fn check_sources(&self) -> Result<()> {
        io::resolve(&self.model.source)?;
        if let Some(r) = &self.dpo.reference {
            io::resolve(r).map_err(|e| Error::Invalid(format!("dpo.reference: {e}")))?;
        }
        for (key, path) in [("data.train", Some(&self.data.train)), ("reward.eval", self.reward.eval.as_ref())] {
            if let Some(p) = path.filter(|p| !p.is_file()) {
                return Err(Error::Invalid(format!("{key}: {} is not a file", p.display())));
            }
        }
        if let Some(p) = self.model.init_adapters.as_ref().filter(|p| !p.is_dir()) {
            return Err(Error::Invalid(format!("model.init_adapters: {} is not a folder", p.display())));
        }
        Ok(())
    }
}

/// The policy with its trainable parameters, ready for [`crate::train::train`].
pub struct Built {
    pub policy: Policy,
    pub optimizer: AdamW,
}

/// Loads the model and attaches what `cfg` trains. Parameter groups: 0 = model weights,
/// 1 = controls (left out of the optimizer unless `train_controls`). `new_tokens` are added to
/// the vocabulary first (with new embedding rows).
pub fn build(cfg: &RunConfig) -> Result<Built> {
    build_with(cfg, &[], true)
}

/// [`build`] with new vocabulary tokens and the choice to freeze the controls.
pub fn build_with(cfg: &RunConfig, new_tokens: &[String], train_controls: bool) -> Result<Built> {
    build_full(cfg, new_tokens, train_controls, &|_| Ok(vec![]))
}

/// Parameters a method adds to the model it is given (a reward head), as `(name, var, group)`.
pub type ExtraParams<'a> = &'a dyn Fn(&Pretrained) -> Result<Vec<(String, candle_core::Var, usize)>>;

/// [`build_with`] plus parameters of the method's own.
pub fn build_full(cfg: &RunConfig, new_tokens: &[String], train_controls: bool, extra: ExtraParams) -> Result<Built> {
    let seed = cfg.train.seed;
    let names = cfg.adapter_names();
    let lora = match &cfg.lora {
        Some(l) => Some(Adapters::new(names.iter().map(|n| (n.clone(), l.clone())).collect(), seed)?),
        None => None,
    };
    let opts = LoadOptions {
        trainable: cfg.model.train_weights,
        packing: Packing::Dense,
        lora: lora.clone(),
        ..Default::default()
    };
    let pretrained = if new_tokens.is_empty() {
        Pretrained::load(&cfg.model.source, &opts)?
    } else {
        let mut raw = io::read(&cfg.model.source, &opts)?;
        add_tokens(&mut raw, new_tokens, seed)?;
        Pretrained::from_raw(raw, &opts)?
    };
    let prompts = match &cfg.prompt {
        Some(p) => Some(SoftPrompts::new(
            &names,
            p,
            pretrained.model.as_ref(),
            &pretrained.tokenizer,
            seed,
            &pretrained.device,
        )?),
        None => None,
    };
    if let Some(dir) = &cfg.model.init_adapters {
        if let Some(l) = &lora {
            let d = if dir.join("lora").is_dir() { dir.join("lora") } else { dir.clone() };
            folder::load_lora(l, &d)?;
        }
        if let Some(p) = &prompts {
            let d = if dir.join("prompts").is_dir() { dir.join("prompts") } else { dir.clone() };
            folder::load_prompts(p, &d)?;
        }
    }
    let mut params = Vec::new();
    if let Some(vm) = &pretrained.varmap {
        let data = vm.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
        params.extend(data.iter().map(|(k, v)| (k.clone(), v.clone(), 0)));
    }
    if train_controls {
        if let Some(l) = &lora {
            let data = l.varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
            params.extend(data.iter().map(|(k, v)| (format!("lora.{k}"), v.clone(), 1)));
        }
        if let Some(p) = &prompts {
            params.extend(p.names.iter().zip(&p.vars).map(|(n, v)| (format!("prompt.{n}"), v.clone(), 1)));
        }
    }
    params.extend(extra(&pretrained)?);
    if params.is_empty() {
        return Err(Error::Invalid("nothing trains: no model weights and the controls are frozen".into()));
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let optimizer = AdamW::new(params, cfg.train.adamw);
    Ok(Built { policy: Policy { pretrained, prompts }, optimizer })
}

/// Runs the configured method (see [`crate::methods`]); continues from the newest checkpoints
/// with `resume`. Returns the step logs of this invocation (of every stage).
pub fn run(cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
    crate::methods::run(cfg, resume)
}

/// Writes what trained: the model as an HF folder at `out` when its weights are trainable, LoRA
/// adapters under `out/lora`, soft prompts under `out/prompts` (PEFT layouts).
pub fn save_outputs(policy: &Policy, base: &str, out: &Path) -> Result<()> {
    let p = &policy.pretrained;
    if let Some(raw) = trained_model(policy, base)? {
        io::save_hf_folder(&raw, out)?;
    }
    let layers = p.config.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let heads = p.config.get("num_attention_heads").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    if let Some(l) = &p.lora {
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

/// The base model of `source` with a LoRA adapter (`config` and its tensors under model-relative
/// names, as [`folder::read_lora`] gives them) merged into its weights (`W + s B A`), as PEFT's
/// `merge_and_unload`; save it with [`io::save_hf_folder`]. The merged model is built once, so an
/// unusable result fails here.
pub fn merge_lora(source: &str, config: &LoraConfig, tensors: &HashMap<String, Tensor>) -> Result<RawModel> {
    let mut raw = io::read(source, &LoadOptions::default())?;
    let scale = config.scale();
    for (name, t) in tensors {
        let Some(path) = name.strip_suffix(".lora_A.weight") else {
            if name.ends_with(".lora_B.weight") {
                let a = name.replace(".lora_B.weight", ".lora_A.weight");
                if !tensors.contains_key(&a) {
                    return Err(Error::Invalid(format!("adapter has {name} without its {a}")));
                }
                continue;
            }
            return Err(Error::Invalid(format!("adapter tensor '{name}' is neither a lora_A nor a lora_B weight")));
        };
        let b = tensors
            .get(&format!("{path}.lora_B.weight"))
            .ok_or_else(|| Error::Invalid(format!("adapter has {name} without its lora_B")))?;
        let key = format!("{path}.weight");
        let w =
            raw.tensors.get(&key).ok_or_else(|| Error::Invalid(format!("base model has no '{key}' to merge into")))?;
        let (out_dim, in_dim) = w.dims2()?;
        if t.dims() != [config.r, in_dim] || b.dims() != [out_dim, config.r] {
            return Err(Error::Invalid(format!(
                "adapter '{path}': lora_A {:?} and lora_B {:?} do not fit r = {} and the weight [{out_dim}, {in_dim}]",
                t.dims(),
                b.dims(),
                config.r
            )));
        }
        let merged = (w + b.matmul(t)?.affine(scale, 0.0)?)?;
        raw.tensors.insert(key, merged);
    }
    Pretrained::from_raw(raw.clone(), &LoadOptions::default())?;
    Ok(raw)
}
