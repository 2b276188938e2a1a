//! Controls at inference: how a trained model is told which preference to follow. A run saves
//! `meet_controls.json` next to its outputs; [`Controlled::load`] reads the folder back (the
//! model, its LoRA adapters / soft prompts) and [`Controlled::generate`] generates under a named
//! control, so switching `--control good` to `--control bad` switches the behaviour of one model.

use crate::generate::{generate_with_prefix, Generation, SamplingParams};
use crate::io::atomic_write;
use crate::peft::folder;
use crate::peft::lora::{Adapters, Routing};
use crate::peft::prompt::SoftPrompts;
use crate::{Error, LoadOptions, Pretrained, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file a run writes into its output folder.
pub const FILE: &str = "meet_controls.json";

/// How a control reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlKind {
    /// A soft prompt per control placed before the prompt (`prompts/`).
    SoftPrompt,
    /// A LoRA adapter per control (`lora/`).
    Lora,
    /// A special token per control placed before the prompt.
    Token,
    /// A natural-language phrase per control after the prompt (Chain-of-Hindsight).
    Text,
}

/// What `meet_controls.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlSpec {
    /// The training method that made the folder.
    pub method: String,
    pub kind: ControlKind,
    /// Control names (`good`, `bad`, ...).
    pub names: Vec<String>,
    /// For [`ControlKind::Token`] the token, for [`ControlKind::Text`] the phrase, of each name.
    #[serde(default)]
    pub markers: Vec<String>,
    /// The model the adapters / prompts belong to, for folders without weights of their own.
    pub base_model: String,
    /// Generation stops at these strings (Chain-of-Hindsight: every feedback phrase).
    #[serde(default)]
    pub stop_strings: Vec<String>,
}

impl ControlSpec {
    /// Writes the spec into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        atomic_write(&dir.join(FILE), text.as_bytes())
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.names.iter().position(|n| n == name).ok_or_else(|| {
            Error::Invalid(format!("unknown control '{name}' (this model has: {})", self.names.join(", ")))
        })
    }
}

/// A model with the controls it was trained with.
pub struct Controlled {
    pub pretrained: Pretrained,
    pub prompts: Option<SoftPrompts>,
    pub spec: Option<ControlSpec>,
}

impl Controlled {
    /// Loads `model`: a run's output folder (with `meet_controls.json`), or any model `meet`
    /// reads (no controls).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = Path::new(model);
        let spec_path = dir.join(FILE);
        if !spec_path.is_file() {
            return Ok(Self { pretrained: Pretrained::load(model, opts)?, prompts: None, spec: None });
        }
        let text = std::fs::read_to_string(&spec_path).map_err(|e| Error::io(&spec_path, e))?;
        let spec: ControlSpec = serde_json::from_str(&text).map_err(|e| Error::parse(&spec_path, e.to_string()))?;
        let source = if dir.join("config.json").is_file() { model.to_string() } else { spec.base_model.clone() };
        let mut opts = opts.clone();
        let lora_dir = dir.join("lora");
        if lora_dir.is_dir() {
            let adapters = folder::adapter_names(&lora_dir)?
                .iter()
                .map(|n| Ok((n.clone(), folder::read_lora(&folder::adapter_dir(&lora_dir, n))?.0)))
                .collect::<Result<Vec<_>>>()?;
            opts.lora = Some(Adapters::new(adapters, 0)?);
        }
        let pretrained = Pretrained::load(&source, &opts)?;
        if let Some(l) = &pretrained.lora {
            folder::load_lora(l, &lora_dir)?;
        }
        let prompts = if spec.kind == ControlKind::SoftPrompt {
            let pdir = dir.join("prompts");
            let first = spec.names.first().ok_or_else(|| Error::format(&spec_path, "no control names"))?;
            let (cfg, _) = folder::read_prompt(&folder::adapter_dir(&pdir, first))?;
            let p = SoftPrompts::new(
                &spec.names,
                &cfg,
                pretrained.model.as_ref(),
                &pretrained.tokenizer,
                0,
                &pretrained.device,
            )?;
            folder::load_prompts(&p, &pdir)?;
            Some(p)
        } else {
            None
        };
        Ok(Self { pretrained, prompts, spec: Some(spec) })
    }

    /// Generates continuations of `prompts` (token ids, as [`crate::generate::prompt_ids`] gives
    /// them) under `control` (`None`: the plain model, which a model with soft prompts or
    /// control tokens was not trained for).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        control: Option<&str>,
        params: &SamplingParams,
        on_token: impl FnMut(usize, u32) -> Result<()>,
    ) -> Result<Vec<Generation>> {
        let p = &self.pretrained;
        let mut ids = prompts.to_vec();
        let mut prefix = None;
        let mut params = params.clone();
        if let Some(l) = &p.lora {
            l.set_training_step(None);
            l.route(if l.names.len() == 1 { Routing::All(0) } else { Routing::Off });
        }
        match (control, &self.spec) {
            (None, _) => {}
            (Some(c), None) => {
                return Err(Error::Invalid(format!(
                    "control '{c}' asked for, but this model has no {FILE} (not a meet run's output folder)"
                )))
            }
            (Some(c), Some(spec)) => {
                let i = spec.index(c)?;
                params.stop_strings.extend(spec.stop_strings.iter().cloned());
                match spec.kind {
                    ControlKind::Lora => {
                        let l = p.lora.as_ref().ok_or_else(|| Error::Invalid("no LoRA adapters loaded".into()))?;
                        let j = l.names.iter().position(|n| n == c).ok_or_else(|| {
                            Error::Invalid(format!("no LoRA adapter named '{c}' in {}", spec.base_model))
                        })?;
                        l.route(Routing::All(j));
                    }
                    ControlKind::SoftPrompt => {
                        let sp =
                            self.prompts.as_ref().ok_or_else(|| Error::Invalid("no soft prompts loaded".into()))?;
                        prefix = Some(sp.vars[i].as_tensor().clone());
                    }
                    ControlKind::Token => {
                        let tok = p.tokenizer.token_id(&spec.markers[i]).ok_or_else(|| {
                            Error::Invalid(format!("control token '{}' is not in the tokenizer", spec.markers[i]))
                        })?;
                        ids.iter_mut().for_each(|x| x.insert(0, tok));
                    }
                    ControlKind::Text => {
                        let m = p.tokenizer.encode(&crate::methods::coh::marker_text(&spec.markers[i]), false)?;
                        ids.iter_mut().for_each(|x| x.extend(&m));
                    }
                }
            }
        }
        generate_with_prefix(
            p.model.as_ref(),
            &p.tokenizer,
            &ids,
            prefix.as_ref(),
            &params,
            &p.generation,
            &p.device,
            on_token,
        )
    }
}
