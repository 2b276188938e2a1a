//! Supervised fine-tuning: cross-entropy on the chosen responses of preference data (or on
//! supervised rows). The usual first step, and the reference model of DPO.

use crate::data::Example;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_data, TrainingData};
use crate::methods::spec::adapter_spec;
use crate::methods::stage::{stage, Stage};
use crate::methods::{ExperimentEntry, NoOptions, Recipe};
use crate::objectives::lm::LanguageModeling;
use crate::train::StepLog;
use crate::Result;

pub struct Sft;

impl Recipe for Sft {
    const NAME: &'static str = "sft";
    const SECTION: Option<&'static str> = None;
    type Options = NoOptions;

    fn default_controls(&self) -> Vec<String> {
        vec!["default".into()]
    }

    /// Supervised rows may name a control each: one adapter / prompt per control.
    fn adapter_per_control(&self) -> bool {
        true
    }

    fn run(&self, cfg: &RunConfig, _: &NoOptions, resume: bool) -> Result<Vec<StepLog>> {
        run(cfg, resume)
    }

    fn experiments(&self) -> Vec<ExperimentEntry> {
        vec![ExperimentEntry { name: "sft", options: "[model]\ntrain_weights = true", starts_from: None }]
    }
}

fn run(cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
    let mut built = setup::standard(cfg)?;
    let p = &built.policy.pretrained;
    let default_control = (cfg.lora.is_some() || cfg.prompt.is_some()).then_some(0);
    let (examples, eval) = load_data(cfg, p)?.map(|d| {
        Ok(match d {
            TrainingData::Supervised(ex) => ex,
            TrainingData::Pairs(pairs) => pairs
                .into_iter()
                .map(|p| Example {
                    start: p.prompt.len(),
                    ids: [p.prompt, p.chosen].concat(),
                    controls: default_control.into_iter().collect(),
                    ..Default::default()
                })
                .collect(),
        })
    })?;
    let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
    let st = Stage { name: "sft", label: "SFT: supervised fine-tuning on the chosen responses", dir: &cfg.output_dir };
    stage(cfg, &st, &mut built, &objective, &examples, &eval, resume, adapter_spec(cfg))
}
