//! A training run from a TOML configuration: load the model, attach what trains (the weights,
//! LoRA adapters, soft prompts — any combination), read the data, train, save what users load
//! elsewhere (an HF folder for trained weights, PEFT folders for adapters and prompts).
//!
//! ```toml
//! [model]
//! source = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! train_weights = false          # full fine-tuning of every weight
//! controls = ["good", "bad"]     # names of the adapters / prompts
//! [lora]                         # present: one LoRA adapter per control
//! r = 16
//! alpha = 32
//! target_modules = ["q_proj", "v_proj"]
//! [prompt]                       # present: one soft prompt per control
//! n = 20
//! [data]
//! train = "data/train.jsonl"
//! [train]
//! lr = 1e-4
//! ```

use crate::data::{read_supervised, Example, SupervisedOptions};
use crate::io::{self, LoadOptions, Packing, RawModel};
use crate::objectives::lm::LanguageModeling;
use crate::peft::folder;
use crate::peft::lora::{Adapters, LoraConfig};
use crate::peft::prompt::{PromptConfig, SoftPrompts};
use crate::policy::Policy;
use crate::train::optim::AdamW;
use crate::train::{config_hash, train, RunDir, StepLog, TrainConfig};
use crate::{Error, Pretrained, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `[model]`: what to load and what trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF folder, GGUF file or Hub repo id.
    pub source: String,
    /// Train every weight of the model (full fine-tuning).
    #[serde(default)]
    pub train_weights: bool,
    /// Names of the controls (LoRA adapters / soft prompts), one per preference.
    #[serde(default = "default_controls")]
    pub controls: Vec<String>,
    /// Start the adapters / prompts from PEFT folders saved earlier (this folder's `lora/` and
    /// `prompts/`, or a PEFT adapter folder directly).
    #[serde(default)]
    pub init_adapters: Option<PathBuf>,
}

fn default_controls() -> Vec<String> {
    vec!["default".into()]
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Supervised JSONL (see [`crate::data`]).
    pub train: PathBuf,
    /// Longest sequence in tokens (virtual tokens not counted).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
}

fn default_max_length() -> usize {
    1024
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub prompt: Option<PromptConfig>,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainConfig,
    /// Where checkpoints, metrics and the outputs go.
    pub output_dir: PathBuf,
}

impl RunConfig {
    /// Reads a TOML file; unknown keys are errors naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))?;
        cfg.check().map_err(|e| Error::parse(path, e.to_string()))?;
        Ok(cfg)
    }

    /// Checks that something trains and the names are usable.
    pub fn check(&self) -> Result<()> {
        if !self.model.train_weights && self.lora.is_none() && self.prompt.is_none() {
            return Err(Error::Invalid(
                "nothing to train: set model.train_weights = true, or add a [lora] or [prompt] section".into(),
            ));
        }
        if self.model.controls.is_empty() {
            return Err(Error::Invalid("model.controls is empty".into()));
        }
        Ok(())
    }
}

/// The policy with its trainable parameters, ready for [`train`].
pub struct Built {
    pub policy: Policy,
    pub optimizer: AdamW,
}

/// Loads the model and attaches what `cfg` trains. Parameter groups: 0 = model weights,
/// 1 = controls.
pub fn build(cfg: &RunConfig) -> Result<Built> {
    let seed = cfg.train.seed;
    let lora = match &cfg.lora {
        Some(l) => Some(Adapters::new(cfg.model.controls.iter().map(|n| (n.clone(), l.clone())).collect(), seed)?),
        None => None,
    };
    let opts = LoadOptions {
        trainable: cfg.model.train_weights,
        packing: Packing::Dense,
        lora: lora.clone(),
        ..Default::default()
    };
    let pretrained = Pretrained::load(&cfg.model.source, &opts)?;
    let prompts = match &cfg.prompt {
        Some(p) => Some(SoftPrompts::new(
            &cfg.model.controls,
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
    if let Some(l) = &lora {
        let data = l.varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
        params.extend(data.iter().map(|(k, v)| (format!("lora.{k}"), v.clone(), 1)));
    }
    if let Some(p) = &prompts {
        params.extend(p.names.iter().zip(&p.vars).map(|(n, v)| (format!("prompt.{n}"), v.clone(), 1)));
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let optimizer = AdamW::new(params, cfg.train.adamw);
    Ok(Built { policy: Policy { pretrained, prompts }, optimizer })
}

/// Reads the run's training data with the policy's tokenizer.
pub fn examples(cfg: &RunConfig, policy: &Policy) -> Result<Vec<Example>> {
    let p = &policy.pretrained;
    let opts = SupervisedOptions {
        max_length: cfg.data.max_length,
        controls: cfg.model.controls.clone(),
        default_control: (cfg.lora.is_some() || cfg.prompt.is_some()).then_some(0),
        eos_id: p.generation.eos_token_ids.first().copied(),
    };
    Ok(read_supervised(&cfg.data.train, &p.tokenizer, &opts)?.0)
}

/// Trains as `cfg` says (continuing from the newest checkpoint with `resume`) and saves the
/// outputs under `output_dir/final`. Returns the step logs of this invocation.
pub fn run(cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
    let mut built = build(cfg)?;
    let data = examples(cfg, &built.policy)?;
    let pad = built
        .policy
        .pretrained
        .generation
        .pad_token_id
        .or(built.policy.pretrained.generation.eos_token_ids.first().copied())
        .unwrap_or(0);
    let objective = LanguageModeling { pad_id: pad };
    let run_dir = RunDir { dir: cfg.output_dir.clone(), config_hash: config_hash(cfg) };
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    io::atomic_write(&cfg.output_dir.join("run.toml"), text.as_bytes())?;
    let logs = train(&built.policy, &objective, &data, &mut built.optimizer, &cfg.train, &run_dir, resume)?;
    save_outputs(&built.policy, &cfg.model.source, &cfg.output_dir.join("final"))?;
    Ok(logs)
}

/// Writes what trained: the model as an HF folder at `out` when its weights are trainable, LoRA
/// adapters under `out/lora`, soft prompts under `out/prompts` (PEFT layouts).
pub fn save_outputs(policy: &Policy, base: &str, out: &Path) -> Result<()> {
    let p = &policy.pretrained;
    if let Some(vm) = &p.varmap {
        let tensors = vm
            .data()
            .lock()
            .map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let raw = RawModel {
            config: p.config.clone(),
            tensors,
            packed: Default::default(),
            tokenizer: p.tokenizer.clone(),
            generation: p.generation.clone(),
            origin: PathBuf::from(base),
        };
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
