//! `meet_controls.json`: what a run writes beside its outputs so that inference can apply its
//! controls — the method that trained them, how a control reaches the model, the control names
//! and their tokens or phrases. Written by the recipes, read by [`crate::controls`].

use crate::files::atomic_write;
use crate::methods::config::RunConfig;
use crate::{Error, Result};
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

    /// Reads and checks `dir/meet_controls.json`: names given and distinct, a token or phrase
    /// for every name of a token / text control, the adapters or prompts folder there for the
    /// kinds that need one. A hand-edited or older file gets an error naming what is wrong.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let spec: ControlSpec = serde_json::from_str(&text).map_err(|e| Error::parse(&path, e.to_string()))?;
        let bad = |msg: String| Err(Error::format(&path, msg));
        if spec.names.is_empty() {
            return bad("'names' is empty: the file lists no control".into());
        }
        if let Some(dup) = spec.names.iter().enumerate().find(|(i, n)| spec.names[..*i].contains(n)) {
            return bad(format!("control '{}' is listed twice in 'names'", dup.1));
        }
        match spec.kind {
            ControlKind::Token | ControlKind::Text if spec.markers.len() != spec.names.len() => {
                return bad(format!(
                    "{} controls in 'names' but {} in 'markers': a {} control needs one per name",
                    spec.names.len(),
                    spec.markers.len(),
                    if spec.kind == ControlKind::Token { "token" } else { "phrase" }
                ))
            }
            ControlKind::Lora if !dir.join("lora").is_dir() => {
                return bad(format!("kind 'lora' but no lora/ folder beside it in {}", dir.display()))
            }
            ControlKind::SoftPrompt if !dir.join("prompts").is_dir() => {
                return bad(format!("kind 'soft-prompt' but no prompts/ folder beside it in {}", dir.display()))
            }
            _ => {}
        }
        Ok(spec)
    }

    pub fn index(&self, name: &str) -> Result<usize> {
        self.names.iter().position(|n| n == name).ok_or_else(|| {
            Error::Invalid(format!("unknown control '{name}' (this model has: {})", self.names.join(", ")))
        })
    }
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
        method: cfg.method.clone(),
        kind,
        names: cfg.controls(),
        markers,
        base_model: base_model(cfg),
        stop_strings: vec![],
    }
}
