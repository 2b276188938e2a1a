//! Supervised fine-tuning: cross-entropy on the chosen responses of preference data (or on
//! supervised rows). The usual first step, and the reference model of DPO.

use crate::data::Example;
use crate::methods::{adapter_spec, load_data, pad_id, stage, Stage, TrainingData};
use crate::objectives::lm::LanguageModeling;
use crate::run::{build, RunConfig};
use crate::train::StepLog;
use crate::Result;

pub fn run(cfg: &RunConfig, resume: bool) -> Result<Vec<StepLog>> {
    let mut built = build(cfg)?;
    let p = &built.policy.pretrained;
    let default_control = (cfg.lora.is_some() || cfg.prompt.is_some()).then_some(0);
    let examples = match load_data(cfg, p)? {
        TrainingData::Supervised(ex) => ex,
        TrainingData::Pairs(pairs) => pairs
            .into_iter()
            .map(|p| Example {
                start: p.prompt.len(),
                ids: [p.prompt, p.chosen].concat(),
                control: default_control,
                ..Default::default()
            })
            .collect(),
    };
    let objective = LanguageModeling { pad_id: pad_id(p) };
    let st = Stage { name: "sft", label: "SFT: supervised fine-tuning on the chosen responses", dir: &cfg.output_dir };
    stage(cfg, &st, &mut built, &objective, &examples, resume, adapter_spec(cfg))
}
