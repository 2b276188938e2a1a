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
    /// Requested scores, one per objective (`names`), written after the prompt behind their tags
    /// (`markers`): Rewards-in-Context. A selection gives `objective=score` for every objective.
    Scores,
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
    /// The preference dimensions and their controls (names of `names`), in dimension order; empty:
    /// one dimension holding every name (a run without `model.dimensions`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<Dimension>,
    /// Score controls: `[mean, std]` of each objective's training scores (the written scores are
    /// `(score − mean) / std`; requested scores are in those units).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub score_stats: Vec<[f64; 2]>,
}

pub use crate::methods::config::Dimension;
/// A row's controls as indices into [`ControlSpec::names`] with weights, in dimension order.
pub use crate::peft::RowControls;

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
            ControlKind::Scores if spec.markers.len() != spec.names.len() || spec.score_stats.len() != spec.names.len() => {
                return bad(format!(
                    "{} objectives in 'names' but {} tags in 'markers' and {} entries in 'score_stats': a score control needs one of each per objective",
                    spec.names.len(),
                    spec.markers.len(),
                    spec.score_stats.len()
                ))
            }
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
        let mut seen: Vec<&str> = Vec::new();
        for d in &spec.dimensions {
            if d.name.is_empty() || spec.dimensions.iter().filter(|e| e.name == d.name).count() > 1 {
                return bad(format!("dimension name '{}' is empty or repeated in 'dimensions'", d.name));
            }
            for c in &d.controls {
                if !spec.names.contains(c) {
                    return bad(format!("dimension '{}' lists '{c}', which is not in 'names'", d.name));
                }
                if seen.contains(&c.as_str()) {
                    return bad(format!("control '{c}' is in two dimensions"));
                }
                seen.push(c);
            }
        }
        if !spec.dimensions.is_empty() && seen.len() != spec.names.len() {
            let missing: Vec<&String> = spec.names.iter().filter(|n| !seen.contains(&n.as_str())).collect();
            return bad(format!("controls {missing:?} are in no dimension of 'dimensions'"));
        }
        Ok(spec)
    }

    /// The dimensions, each with the indices of its controls in `names` (one unnamed dimension,
    /// `control`, holding every name when the spec has no `dimensions`).
    pub fn dimension_indices(&self) -> Vec<(String, Vec<usize>)> {
        if self.dimensions.is_empty() {
            return vec![("control".into(), (0..self.names.len()).collect())];
        }
        self.dimensions
            .iter()
            .map(|d| {
                (d.name.clone(), d.controls.iter().filter_map(|c| self.names.iter().position(|n| n == c)).collect())
            })
            .collect()
    }

    /// Parses a control selection: comma-separated `[DIMENSION=]NAME[:WEIGHT]` items
    /// (`good`; `positive,concise`; `sentiment=positive:1.0,length=concise:0.5`), at most one
    /// control per dimension. Returns them in dimension order. Weights other than 1 are for LoRA
    /// controls only (their deltas are scaled); they must be finite.
    pub fn select(&self, text: &str) -> Result<RowControls> {
        if self.kind == ControlKind::Scores {
            return self.select_scores(text);
        }
        let dims = self.dimension_indices();
        let mut picked: Vec<(usize, usize, f32)> = Vec::new(); // (dimension, control, weight)
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(Error::Invalid(format!(
                    "control '{text}': an empty item (write NAME or DIMENSION=NAME[:WEIGHT], comma-separated)"
                )));
            }
            let (dim, rest) = match item.split_once('=') {
                Some((d, r)) => (Some(d.trim()), r.trim()),
                None => (None, item),
            };
            let (name, weight) = match rest.rsplit_once(':') {
                Some((n, w)) => {
                    let w: f32 = w
                        .trim()
                        .parse()
                        .map_err(|_| Error::Invalid(format!("control '{item}': weight '{w}' is not a number")))?;
                    if !w.is_finite() {
                        return Err(Error::Invalid(format!("control '{item}': weight {w} is not finite")));
                    }
                    (n.trim(), w)
                }
                None => (rest, 1.0),
            };
            let i = self.index(name)?;
            let d = dims
                .iter()
                .position(|(_, cs)| cs.contains(&i))
                .ok_or_else(|| Error::Invalid(format!("control '{name}' belongs to no dimension of this model")))?;
            if let Some(dim) = dim {
                if dims[d].0 != dim {
                    let known: Vec<&str> = dims.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(Error::Invalid(if known.contains(&dim) {
                        format!("control '{name}' is of dimension '{}', not '{dim}'", dims[d].0)
                    } else {
                        format!("unknown dimension '{dim}' (this model has: {})", known.join(", "))
                    }));
                }
            }
            if weight != 1.0 && self.kind != ControlKind::Lora {
                return Err(Error::Invalid(format!(
                    "control '{item}': weights are for LoRA controls; this model's controls are {:?}",
                    self.kind
                )));
            }
            if let Some(other) = picked.iter().find(|p| p.0 == d) {
                return Err(Error::Invalid(format!(
                    "controls '{}' and '{name}' are both of dimension '{}': give at most one per dimension",
                    self.names[other.1], dims[d].0
                )));
            }
            picked.push((d, i, weight));
        }
        picked.sort_by_key(|p| p.0);
        Ok(picked.into_iter().map(|(_, i, w)| (i, w)).collect())
    }

    /// Score controls: `objective=score` for every objective (in its normalised units), returned
    /// in objective order.
    fn select_scores(&self, text: &str) -> Result<RowControls> {
        let mut out: Vec<(usize, f32)> = Vec::new();
        for item in text.split(',').map(str::trim) {
            let (name, value) = item.split_once('=').ok_or_else(|| {
                Error::Invalid(format!(
                    "control '{item}': this model takes requested scores, OBJECTIVE=SCORE for each of {}",
                    self.names.join(", ")
                ))
            })?;
            let i = self.names.iter().position(|n| n == name.trim()).ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown objective '{}' (this model has: {})",
                    name.trim(),
                    self.names.join(", ")
                ))
            })?;
            let v: f32 = value.trim().parse().ok().filter(|v: &f32| v.is_finite()).ok_or_else(|| {
                Error::Invalid(format!("control '{item}': '{}' is not a finite number", value.trim()))
            })?;
            if out.iter().any(|&(j, _)| j == i) {
                return Err(Error::Invalid(format!("objective '{}' is given twice", self.names[i])));
            }
            out.push((i, v));
        }
        if out.len() != self.names.len() {
            let missing: Vec<&str> = (0..self.names.len())
                .filter(|i| !out.iter().any(|o| o.0 == *i))
                .map(|i| self.names[i].as_str())
                .collect();
            return Err(Error::Invalid(format!(
                "no requested score for {} (give one per objective)",
                missing.join(", ")
            )));
        }
        out.sort_by_key(|o| o.0);
        Ok(out)
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
        dimensions: cfg.dimensions(),
        score_stats: vec![],
    }
}
