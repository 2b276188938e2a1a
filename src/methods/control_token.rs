//! Vanilla controllable generation (the baseline MEET improves on): one new special token per
//! preference (`<|good|>`, `<|bad|>`), placed before the prompt, with a new embedding row, trained
//! jointly with the full model in one step.

use crate::data::Example;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_data, pair_controls_of, Built, TrainingData};
use crate::methods::spec::{spec, ControlKind, ControlSpec};
use crate::methods::stage::{stage, Stage};
use crate::methods::{ExperimentEntry, Recipe};
use crate::models::pretrained::RawModel;
use crate::objectives::lm::LanguageModeling;
use crate::tokenizer::Tokenizer;
use crate::train::StepLog;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};

/// `[control_token]` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlTokenConfig {
    /// The token of control `{name}`.
    pub template: String,
}

impl Default for ControlTokenConfig {
    fn default() -> Self {
        Self { template: "<|{name}|>".into() }
    }
}

pub struct ControlToken;

impl Recipe for ControlToken {
    const NAME: &'static str = "control-token";
    const SECTION: Option<&'static str> = Some("control_token");
    type Options = ControlTokenConfig;

    fn check(&self, cfg: &RunConfig, _: &ControlTokenConfig) -> Result<()> {
        if !cfg.model.train_weights || cfg.lora.is_some() || cfg.prompt.is_some() {
            return Err(Error::Invalid(
                "method control-token trains the full model with its new token rows: set model.train_weights = true and drop [lora] / [prompt]".into(),
            ));
        }
        Ok(())
    }

    fn run(&self, cfg: &RunConfig, o: &ControlTokenConfig, resume: bool) -> Result<Vec<StepLog>> {
        run(cfg, o, resume)
    }

    /// The controls' tokens go before the prompt (after the tokenizer's own BOS), in dimension
    /// order, as in training.
    fn apply_control(
        &self,
        spec: &ControlSpec,
        selected: &[(usize, f32)],
        tok: &Tokenizer,
        ids: &mut [Vec<u32>],
    ) -> Result<()> {
        let tokens = selected
            .iter()
            .map(|&(i, _)| {
                tok.token_id(&spec.markers[i]).ok_or_else(|| {
                    Error::Invalid(format!("control token '{}' is not in the tokenizer", spec.markers[i]))
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        let prefix = special_prefix(tok)?;
        for x in ids.iter_mut() {
            *x = with_tokens(&prefix, x, &tokens);
        }
        Ok(())
    }

    /// Control tokens are inputs: never generate them (the reference model does not know them).
    fn suppressed_tokens(&self, spec: &ControlSpec, tok: &Tokenizer) -> Vec<u32> {
        spec.markers.iter().filter_map(|m| tok.token_id(m)).collect()
    }

    fn experiments(&self) -> Vec<ExperimentEntry> {
        vec![ExperimentEntry { name: "control-token", options: "[model]\ntrain_weights = true", starts_from: None }]
    }
}

/// Grows a `[rows, hidden]` embedding to `rows_new` rows: each new row is the mean of the old
/// ones plus small seeded noise (transformers' `mean_resizing` samples near the mean too), so a
/// new token starts as an "average" token and the rows differ.
fn grow(t: &Tensor, rows_new: usize, seed: u64) -> Result<Tensor> {
    let (rows, hidden) = t.dims2()?;
    let mean = t.mean_keepdim(0)?;
    let std = t.broadcast_sub(&mean)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0, 0.01 * std.max(1e-6)).map_err(|e| Error::Invalid(e.to_string()))?;
    let noise: Vec<f32> = (0..(rows_new - rows) * hidden).map(|_| normal.sample(&mut rng) as f32).collect();
    let new = Tensor::from_vec(noise, (rows_new - rows, hidden), &Device::Cpu)?
        .broadcast_add(&mean.to_device(&Device::Cpu)?)?;
    Ok(Tensor::cat(&[t, &new.to_device(t.device())?], 0)?)
}

/// Adds `tokens` as special tokens to the model's tokenizer, with embedding rows (and LM-head
/// rows when untied) for those beyond the current matrix; `vocab_size` follows.
pub fn add_tokens(raw: &mut RawModel, tokens: &[String], seed: u64) -> Result<()> {
    let added: Vec<tokenizers::AddedToken> = tokens
        .iter()
        .filter(|t| raw.tokenizer.token_id(t).is_none())
        .map(|t| tokenizers::AddedToken::from(t.clone(), true))
        .collect();
    raw.tokenizer.inner.add_special_tokens(added)?;
    let needed = raw.tokenizer.vocab_size();
    let arch = crate::models::architecture(&raw.config, &raw.origin)?;
    let present: Vec<&str> = arch.vocab_tensors.iter().copied().filter(|n| raw.tensors.contains_key(*n)).collect();
    let Some(first) = present.first().copied() else {
        return Err(Error::Invalid(format!(
            "control tokens: the model has no dense token embeddings ({})",
            arch.vocab_tensors.join(" or ")
        )));
    };
    for name in &present {
        let t = &raw.tensors[*name];
        if t.dims2()?.0 < needed {
            let grown = grow(t, needed, seed)?;
            raw.tensors.insert(name.to_string(), grown);
        }
    }
    let rows = raw.tensors[first].dims2()?.0;
    raw.config["vocab_size"] = serde_json::json!(rows);
    Ok(())
}

/// The tokens the tokenizer itself puts before any text (a BOS, for Llama tokenizers).
pub fn special_prefix(tok: &Tokenizer) -> Result<Vec<u32>> {
    let (with, without) = (tok.encode("a", true)?, tok.encode("a", false)?);
    Ok(with[..with.len().saturating_sub(without.len())].to_vec())
}

/// `ids` with `tokens` in front, after `prefix` (see [`special_prefix`]) when `ids` starts with it.
pub fn with_tokens(prefix: &[u32], ids: &[u32], tokens: &[u32]) -> Vec<u32> {
    let at = if ids.starts_with(prefix) { prefix.len() } else { 0 };
    let mut out = ids[..at].to_vec();
    out.extend(tokens);
    out.extend(&ids[at..]);
    out
}

fn run(cfg: &RunConfig, o: &ControlTokenConfig, resume: bool) -> Result<Vec<StepLog>> {
    let names = cfg.controls();
    let tokens: Vec<String> = names.iter().map(|n| o.template.replace("{name}", n)).collect();
    let mut raw = setup::raw_model(cfg)?;
    add_tokens(&mut raw, &tokens, cfg.train.seed)?;
    let policy = setup::policy(cfg, raw)?;
    let params = [setup::model_params(&policy)?, setup::control_params(&policy)?].concat();
    let optimizer = setup::optimizer(cfg, params)?;
    let mut built = Built { policy, optimizer };
    let p = &built.policy.pretrained;
    let ids: Vec<u32> = tokens
        .iter()
        .map(|t| p.tokenizer.token_id(t).ok_or_else(|| Error::Invalid(format!("token {t} was not added"))))
        .collect::<Result<_>>()?;
    let prefix = special_prefix(&p.tokenizer)?;
    let prefixed = |seq: &[u32], start: usize, cs: &[usize]| -> Result<Example> {
        let tokens: Vec<u32> = cs.iter().map(|&c| ids[c]).collect();
        Ok(Example { ids: with_tokens(&prefix, seq, &tokens), start: start + tokens.len(), ..Default::default() })
    };
    let (examples, eval) = load_data(cfg, p)?.map(|d| match d {
        TrainingData::Pairs(pairs) => {
            let mut out = Vec::with_capacity(2 * pairs.len());
            for pr in &pairs {
                let (good, bad) = pair_controls_of(cfg, pr)?;
                out.push(prefixed(&[pr.prompt.as_slice(), &pr.chosen].concat(), pr.prompt.len(), &[good])?);
                out.push(prefixed(&[pr.prompt.as_slice(), &pr.rejected].concat(), pr.prompt.len(), &[bad])?);
            }
            Ok(out)
        }
        TrainingData::Supervised(ex) => ex
            .iter()
            .map(|e| {
                if e.controls.is_empty() {
                    return Err(Error::Invalid("control-token: a row names no control".into()));
                }
                prefixed(&e.ids, e.start, &e.controls)
            })
            .collect::<Result<_>>(),
    })?;
    let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
    let s = spec(cfg, ControlKind::Token, tokens);
    let st = Stage {
        name: "control-token",
        label: "control tokens: the full model with one new token per control",
        dir: &cfg.output_dir,
    };
    stage(cfg, &st, &mut built, &objective, &examples, &eval, resume, Some(s))
}
