//! Chain-of-Hindsight (Liu et al. 2023): both responses of a pair in one sequence, each behind a
//! natural-language feedback phrase — `x, "A helpful answer:", y_w, "An unhelpful answer:", y_l`
//! (or negative first) — with the loss on the response tokens only. At inference the positive
//! phrase follows the prompt.
//!
//! Several preference dimensions (`model.dimensions`): every control has a phrase of its own
//! (`[coh] phrases`, else `template` with the control's name: "A concise answer:"); a pair of a
//! dimension puts that dimension's two phrases before its two responses. At inference a
//! combination's phrases follow the prompt one after another, in dimension order (the baseline
//! as published composes no other way).

use crate::data::preference::Pair;
use crate::data::Example;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_pairs, pair_controls, pair_controls_of};
use crate::methods::spec::{spec, ControlKind, ControlSpec};
use crate::methods::stage::{stage, Stage};
use crate::methods::{ExperimentEntry, Recipe};
use crate::objectives::lm::LanguageModeling;
use crate::tokenizer::Tokenizer;
use crate::train::StepLog;
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which response comes first in a sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Each pair draws its order (seeded): both orderings in the data.
    #[default]
    Random,
    PositiveFirst,
    NegativeFirst,
}

/// `[coh]` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CohConfig {
    /// Phrases before a chosen response (one drawn per sequence); the first is used at inference.
    pub positive: Vec<String>,
    /// Phrases before a rejected response.
    pub negative: Vec<String>,
    pub order: Order,
    /// Several dimensions: the phrase of each control by name; a control not listed gets
    /// `template` with `{name}` replaced by its name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub phrases: BTreeMap<String, String>,
    /// Several dimensions: the phrase of a control that `phrases` does not list.
    #[serde(skip_serializing_if = "is_default_template")]
    pub template: String,
}

const TEMPLATE: &str = "A {name} answer:";

fn is_default_template(t: &String) -> bool {
    t == TEMPLATE
}

impl Default for CohConfig {
    fn default() -> Self {
        Self {
            positive: vec!["A helpful answer:".into()],
            negative: vec!["An unhelpful answer:".into()],
            order: Order::Random,
            phrases: BTreeMap::new(),
            template: TEMPLATE.into(),
        }
    }
}

impl CohConfig {
    /// The phrase of each control of a run with several dimensions.
    fn dimension_phrases(&self, cfg: &RunConfig) -> Vec<String> {
        cfg.controls()
            .iter()
            .map(|n| self.phrases.get(n).cloned().unwrap_or_else(|| self.template.replace("{name}", n)))
            .collect()
    }
}

pub struct Coh;

impl Recipe for Coh {
    const NAME: &'static str = "coh";
    const SECTION: Option<&'static str> = Some("coh");
    type Options = CohConfig;

    fn check(&self, cfg: &RunConfig, c: &CohConfig) -> Result<()> {
        if let Some(unknown) = c.phrases.keys().find(|k| !cfg.controls().contains(k)) {
            return Err(Error::Invalid(format!(
                "coh.phrases names '{unknown}', which is not a control of this run ({})",
                cfg.controls().join(", ")
            )));
        }
        if !c.phrases.is_empty() && cfg.model.dimensions.is_none() {
            return Err(Error::Invalid(
                "coh.phrases is for runs with model.dimensions; one dimension uses coh.positive / coh.negative".into(),
            ));
        }
        if cfg.model.dimensions.is_some() {
            let phrases = c.dimension_phrases(cfg);
            if let Some(p) = phrases.iter().find(|p| p.trim().is_empty()) {
                return Err(Error::Invalid(format!("coh: a control's phrase is empty ({p:?})")));
            }
            if let Some((i, _)) = phrases.iter().enumerate().find(|(i, p)| phrases[..*i].contains(p)) {
                return Err(Error::Invalid(format!(
                    "coh: controls '{}' and another have the same phrase {:?}: each control needs its own",
                    cfg.controls()[i],
                    phrases[i]
                )));
            }
        }
        if cfg.prompt.is_some() {
            return Err(Error::Invalid("method coh does not take a [prompt] section".into()));
        }
        if c.positive.is_empty() || c.negative.is_empty() {
            return Err(Error::Invalid("coh: positive and negative phrase lists must not be empty".into()));
        }
        Ok(())
    }

    fn run(&self, cfg: &RunConfig, c: &CohConfig, resume: bool) -> Result<Vec<StepLog>> {
        run(cfg, c, resume)
    }

    /// The controls' feedback phrases follow the prompt (one per dimension, in dimension order),
    /// as in training.
    fn apply_control(
        &self,
        spec: &ControlSpec,
        selected: &[(usize, f32)],
        tok: &Tokenizer,
        ids: &mut [Vec<u32>],
    ) -> Result<()> {
        for &(i, _) in selected {
            let m = tok.encode(&marker_text(&spec.markers[i]), false)?;
            ids.iter_mut().for_each(|x| x.extend(&m));
        }
        Ok(())
    }

    fn experiments(&self) -> Vec<ExperimentEntry> {
        vec![ExperimentEntry { name: "coh", options: "[model]\ntrain_weights = true", starts_from: None }]
    }
}

/// The text of a feedback phrase as placed in a sequence (on its own line).
pub fn marker_text(phrase: &str) -> String {
    format!("\n{phrase}\n")
}

/// The sequence `prompt, first marker, first response, second marker, second response`, with
/// labels on the two responses only.
pub fn sequence(prompt: &[u32], first: (&[u32], &[u32]), second: (&[u32], &[u32])) -> Example {
    let mut ids = prompt.to_vec();
    ids.extend(first.0);
    let start = ids.len();
    ids.extend(first.1);
    let gap = (ids.len(), ids.len() + second.0.len());
    ids.extend(second.0);
    ids.extend(second.1);
    Example { ids, start, unlabelled: vec![gap], ..Default::default() }
}

fn run(cfg: &RunConfig, c: &CohConfig, resume: bool) -> Result<Vec<StepLog>> {
    let several = cfg.model.dimensions.is_some();
    if !several {
        pair_controls(cfg)?;
    }
    let mut built = setup::standard(cfg)?;
    let p = &built.policy.pretrained;
    let encode = |ph: &String| p.tokenizer.encode(&marker_text(ph), false);
    let pos = c.positive.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let neg = c.negative.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let per_control = if several { c.dimension_phrases(cfg) } else { vec![] };
    let per_control_ids = per_control.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.train.seed ^ 0xC0C0);
    let (pairs, eval_pairs) = load_pairs(cfg, p)?;
    let mut to_examples = |pairs: &[Pair]| -> Result<Vec<Example>> {
        pairs
            .iter()
            .map(|pair| {
                let (good, bad) = if several {
                    // The pair's dimension's two phrases.
                    let (g, b) = pair_controls_of(cfg, pair)?;
                    (
                        (per_control_ids[g].as_slice(), pair.chosen.as_slice()),
                        (per_control_ids[b].as_slice(), pair.rejected.as_slice()),
                    )
                } else {
                    (
                        (pos[rng.gen_range(0..pos.len())].as_slice(), pair.chosen.as_slice()),
                        (neg[rng.gen_range(0..neg.len())].as_slice(), pair.rejected.as_slice()),
                    )
                };
                let positive_first = match c.order {
                    Order::Random => rng.gen_bool(0.5),
                    Order::PositiveFirst => true,
                    Order::NegativeFirst => false,
                };
                if positive_first {
                    Ok(sequence(&pair.prompt, good, bad))
                } else {
                    Ok(sequence(&pair.prompt, bad, good))
                }
            })
            .collect::<Result<_>>()
    };
    let examples = to_examples(&pairs)?;
    let eval = to_examples(&eval_pairs)?;
    let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
    let s = if several {
        let mut s = spec(cfg, ControlKind::Text, per_control.clone());
        s.stop_strings = per_control;
        s
    } else {
        let mut s = spec(cfg, ControlKind::Text, vec![c.positive[0].clone(), c.negative[0].clone()]);
        s.stop_strings = c.positive.iter().chain(&c.negative).cloned().collect();
        s
    };
    let st = Stage {
        name: "coh",
        label: "Chain-of-Hindsight: both responses behind feedback phrases",
        dir: &cfg.output_dir,
    };
    stage(cfg, &st, &mut built, &objective, &examples, &eval, resume, Some(s))
}
