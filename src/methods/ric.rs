//! Rewards-in-Context (RiC; Yang et al., ICML 2024, arXiv 2402.10207): supervised fine-tuning on
//! responses written behind their scores on every objective, so that at inference the scores
//! asked for steer the response. One model, any trade-off, no reinforcement learning.
//!
//! As the RiC code's offline stage (`prepare_dataset_with_rewards.py`, `training.py`): each
//! objective's scores are z-normalised over the training rows (population std), rounded to one
//! decimal, and written in objective order after the prompt as ` {tag} {score}` — here on a line of
//! their own, `"\n<sentiment> 0.3 <length> -1.2\n"`, with RiC's `<rm1_score>`-style tags named after
//! the objectives (`[ric] tag`); the loss is on the response only. At inference `--control
//! sentiment=1.0,length=-0.5` writes the requested scores (in the same normalised units, rounded the
//! same way). RiC's online stage (rejection sampling on new targets) is not done here.
//!
//! Data: supervised rows with `"scores": {"objective": number, ...}` for every objective of
//! `[ric] objectives` (the experiments write them from their judges).

use crate::data::Example;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_scored_data, TrainingData};
use crate::methods::spec::{spec, ControlKind, ControlSpec};
use crate::methods::stage::{stage, Stage};
use crate::methods::Recipe;
use crate::objectives::lm::LanguageModeling;
use crate::tokenizer::Tokenizer;
use crate::train::StepLog;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// `[ric]` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RicConfig {
    /// The objectives every row scores, in the order their scores are written.
    pub objectives: Vec<String>,
    /// The tag before an objective's score (`{name}`: the objective).
    pub tag: String,
}

impl Default for RicConfig {
    fn default() -> Self {
        Self { objectives: vec![], tag: "<{name}>".into() }
    }
}

pub struct Ric;

impl Recipe for Ric {
    const NAME: &'static str = "ric";
    const SECTION: Option<&'static str> = Some("ric");
    type Options = RicConfig;

    fn default_controls(&self) -> Vec<String> {
        vec!["default".into()]
    }

    fn check(&self, cfg: &RunConfig, o: &RicConfig) -> Result<()> {
        if o.objectives.is_empty() {
            return Err(Error::Invalid(
                "method ric needs its objectives: ric.objectives = [\"sentiment\", \"length\"], the keys of each row's \"scores\"".into(),
            ));
        }
        if let Some((i, _)) =
            o.objectives.iter().enumerate().find(|(i, n)| n.is_empty() || o.objectives[..*i].contains(n))
        {
            return Err(Error::Invalid(format!("ric.objectives: '{}' is empty or repeated", o.objectives[i])));
        }
        if !o.tag.contains("{name}") {
            return Err(Error::Invalid(format!("ric.tag {:?} must contain {{name}}", o.tag)));
        }
        if cfg.prompt.is_some() || cfg.model.dimensions.is_some() {
            return Err(Error::Invalid(
                "method ric conditions on scores written in the text: drop [prompt] and model.dimensions".into(),
            ));
        }
        Ok(())
    }

    fn experiments(&self) -> Vec<crate::methods::ExperimentEntry> {
        vec![crate::methods::ExperimentEntry {
            name: "ric",
            options: "[model]\ntrain_weights = true",
            starts_from: None,
        }]
    }

    fn run(&self, cfg: &RunConfig, o: &RicConfig, resume: bool) -> Result<Vec<StepLog>> {
        run(cfg, o, resume)
    }

    /// The requested scores, behind their tags, follow the prompt (as in training).
    fn apply_control(
        &self,
        spec: &ControlSpec,
        selected: &[(usize, f32)],
        tok: &Tokenizer,
        ids: &mut [Vec<u32>],
    ) -> Result<()> {
        let scores: Vec<f64> = selected.iter().map(|&(_, v)| v as f64).collect();
        let text = score_text(&spec.markers, &scores);
        let m = tok.encode(&text, false)?;
        ids.iter_mut().for_each(|x| x.extend(&m));
        Ok(())
    }
}

/// The text written after a prompt: `"\n{tag} {score:.1} {tag} {score:.1}\n"` (scores rounded to
/// one decimal as RiC's).
pub fn score_text(tags: &[String], scores: &[f64]) -> String {
    let parts: Vec<String> = tags
        .iter()
        .zip(scores)
        .map(|(t, s)| {
            // Round half away from zero to one decimal (numpy's round is half-to-even on the
            // binary value; the difference is invisible at this precision), and no "-0.0".
            let r = (s * 10.0).round() / 10.0;
            format!("{t} {:.1}", if r == 0.0 { 0.0 } else { r })
        })
        .collect();
    format!("\n{}\n", parts.join(" "))
}

/// `[mean, std]` of each objective over the rows (population std, as numpy's `np.std`).
pub fn score_stats(objectives: &[String], examples: &[Example]) -> Result<Vec<[f64; 2]>> {
    (0..objectives.len())
        .map(|j| {
            let v: Vec<f64> = examples.iter().map(|e| e.scores[j]).collect();
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
            if std.is_nan() || std == 0.0 {
                return Err(Error::Invalid(format!(
                    "ric: objective '{}' has the same score on every row: it cannot be normalised or steered",
                    objectives[j]
                )));
            }
            Ok([mean, std])
        })
        .collect()
}

fn run(cfg: &RunConfig, o: &RicConfig, resume: bool) -> Result<Vec<StepLog>> {
    let mut built = setup::standard(cfg)?;
    let p = &built.policy.pretrained;
    let (rows, eval_rows) = load_scored_data(cfg, p, &o.objectives)?.map(|d| match d {
        TrainingData::Supervised(ex) => Ok(ex),
        TrainingData::Pairs(_) => Err(Error::parse(
            cfg.data.shown(),
            "method ric needs supervised rows with \"scores\" (prompt, completion, scores per objective), not preference pairs",
        )),
    })?;
    // Held-out rows are normalised with the training rows' statistics.
    let stats = score_stats(&o.objectives, &rows)?;
    let tags: Vec<String> = o.objectives.iter().map(|n| o.tag.replace("{name}", n)).collect();
    let to_examples = |rows: Vec<Example>| -> Result<Vec<Example>> {
        rows.into_iter()
            .map(|e| {
                let z: Vec<f64> = e.scores.iter().zip(&stats).map(|(s, [m, sd])| (s - m) / sd).collect();
                let mark = p.tokenizer.encode(&score_text(&tags, &z), false)?;
                let mut ids = e.ids[..e.start].to_vec();
                ids.extend(&mark);
                ids.extend(&e.ids[e.start..]);
                Ok(Example { ids, start: e.start + mark.len(), controls: e.controls, ..Default::default() })
            })
            .collect::<Result<_>>()
    };
    let examples = to_examples(rows)?;
    let eval = to_examples(eval_rows)?;
    let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
    let mut s = spec(cfg, ControlKind::Scores, tags);
    s.names = o.objectives.clone();
    s.score_stats = stats;
    let st =
        Stage { name: "ric", label: "RiC: the responses behind their scores on every objective", dir: &cfg.output_dir };
    stage(cfg, &st, &mut built, &objective, &examples, &eval, resume, Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_written_rounded_behind_their_tags() {
        let tags = vec!["<a>".to_string(), "<b>".to_string()];
        assert_eq!(score_text(&tags, &[0.26, -1.24]), "\n<a> 0.3 <b> -1.2\n");
        assert_eq!(score_text(&tags, &[-0.04, 2.0]), "\n<a> 0.0 <b> 2.0\n");
        let ex = |s: f64| Example { scores: vec![s], ..Default::default() };
        let stats = score_stats(&["a".into()], &[ex(1.0), ex(3.0)]).unwrap();
        assert_eq!(stats, vec![[2.0, 1.0]]);
        let err = score_stats(&["a".into()], &[ex(1.0), ex(1.0)]).err().unwrap().to_string();
        assert!(err.contains("same score on every row"), "{err}");
    }
}
