//! Chain-of-Hindsight (Liu et al. 2023): both responses of a pair in one sequence, each behind a
//! natural-language feedback phrase — `x, "A helpful answer:", y_w, "An unhelpful answer:", y_l`
//! (or negative first) — with the loss on the response tokens only. At inference the positive
//! phrase follows the prompt.

use crate::data::Example;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_pairs, pair_controls};
use crate::methods::spec::{spec, ControlKind, ControlSpec};
use crate::methods::stage::{stage, Stage};
use crate::methods::{ExperimentEntry, Recipe};
use crate::objectives::lm::LanguageModeling;
use crate::tokenizer::Tokenizer;
use crate::train::StepLog;
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

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
}

impl Default for CohConfig {
    fn default() -> Self {
        Self {
            positive: vec!["A helpful answer:".into()],
            negative: vec!["An unhelpful answer:".into()],
            order: Order::Random,
        }
    }
}

pub struct Coh;

impl Recipe for Coh {
    const NAME: &'static str = "coh";
    const SECTION: Option<&'static str> = Some("coh");
    type Options = CohConfig;

    fn check(&self, cfg: &RunConfig, c: &CohConfig) -> Result<()> {
        if cfg.model.dimensions.is_some() {
            return Err(Error::Invalid(
                "method coh takes one preference dimension (its positive and negative phrases); \
                 model.dimensions is not supported by coh yet"
                    .into(),
            ));
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
        indices: &[usize],
        tok: &Tokenizer,
        ids: &mut [Vec<u32>],
    ) -> Result<()> {
        for &i in indices {
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
    Example { ids, start, controls: vec![], unlabelled: vec![gap] }
}

fn run(cfg: &RunConfig, c: &CohConfig, resume: bool) -> Result<Vec<StepLog>> {
    pair_controls(cfg)?;
    let mut built = setup::standard(cfg)?;
    let p = &built.policy.pretrained;
    let encode = |ph: &String| p.tokenizer.encode(&marker_text(ph), false);
    let pos = c.positive.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let neg = c.negative.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.train.seed ^ 0xC0C0);
    let examples: Vec<Example> = load_pairs(cfg, p)?
        .iter()
        .map(|pair| {
            let good = (pos[rng.gen_range(0..pos.len())].as_slice(), pair.chosen.as_slice());
            let bad = (neg[rng.gen_range(0..neg.len())].as_slice(), pair.rejected.as_slice());
            let positive_first = match c.order {
                Order::Random => rng.gen_bool(0.5),
                Order::PositiveFirst => true,
                Order::NegativeFirst => false,
            };
            if positive_first {
                sequence(&pair.prompt, good, bad)
            } else {
                sequence(&pair.prompt, bad, good)
            }
        })
        .collect();
    let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
    let mut s = spec(cfg, ControlKind::Text, vec![c.positive[0].clone(), c.negative[0].clone()]);
    s.stop_strings = c.positive.iter().chain(&c.negative).cloned().collect();
    let st = Stage {
        name: "coh",
        label: "Chain-of-Hindsight: both responses behind feedback phrases",
        dir: &cfg.output_dir,
    };
    stage(cfg, &st, &mut built, &objective, &examples, resume, Some(s))
}
