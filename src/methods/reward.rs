//! A Bradley–Terry reward model (the paper's learned judge): the backbone with a scalar score
//! head on the last token, trained on preference pairs with `−log σ(r_w − r_l)`; part of the pairs
//! is held out and the pairwise accuracy on them reported (`final/reward_eval.json`). The output is
//! an HF folder of `LlamaForSequenceClassification` (one label, `score.weight`), which
//! transformers loads, and which [`crate::eval::reward_model`] uses as a judge.

use crate::data::preference::Pair;
use crate::methods::config::RunConfig;
use crate::methods::setup::{self, load_pairs, Built};
use crate::methods::stage::{finish_stage, stage_train, trained_model, Stage};
use crate::methods::Recipe;
use crate::objectives::dpo::pair_batch;
use crate::objectives::reward::{rewards, RewardModelling};
use crate::policy::Policy;
use crate::train::StepLog;
use crate::{Error, Pretrained, Result};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[reward]` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Share of the pairs held out for the accuracy (seeded split); ignored with `eval`.
    pub eval_share: f64,
    /// A separate preference file to measure the accuracy on.
    pub eval: Option<PathBuf>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self { eval_share: 0.1, eval: None }
    }
}

pub struct Reward;

impl Recipe for Reward {
    const NAME: &'static str = "reward";
    const SECTION: Option<&'static str> = Some("reward");
    type Options = RewardConfig;

    fn default_controls(&self) -> Vec<String> {
        vec!["default".into()]
    }

    fn check(&self, cfg: &RunConfig, r: &RewardConfig) -> Result<()> {
        if !cfg.model.train_weights || cfg.lora.is_some() || cfg.prompt.is_some() {
            return Err(Error::Invalid(
                "method reward trains the full model with its score head: set model.train_weights = true and drop [lora] / [prompt]".into(),
            ));
        }
        if !(0.0..1.0).contains(&r.eval_share) {
            return Err(Error::Invalid(format!("reward: eval_share {} must be in [0, 1)", r.eval_share)));
        }
        Ok(())
    }

    fn check_sources(&self, _: &RunConfig, r: &RewardConfig) -> Result<()> {
        match &r.eval {
            Some(p) => crate::data::source::check("reward.eval", p, "train"),
            None => Ok(()),
        }
    }

    fn run(&self, cfg: &RunConfig, r: &RewardConfig, resume: bool) -> Result<Vec<StepLog>> {
        run(cfg, r, resume)
    }
}

/// A new score head `(1, hidden)`: transformers' `LlamaForSequenceClassification` initialises
/// `score` from N(0, initializer_range).
fn score_head(p: &Pretrained, seed: u64) -> Result<Var> {
    let hidden = p.model.hidden_size();
    let std = p.config.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0, std).map_err(|e| Error::Invalid(e.to_string()))?;
    let w: Vec<f32> = (0..hidden).map(|_| rand_distr::Distribution::sample(&normal, &mut rng) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(w, (1, hidden), &p.device)?)?)
}

/// Pairwise accuracy (chosen rewarded above rejected) and mean margin on `pairs`.
pub fn accuracy(policy: &Policy, head: &Tensor, pairs: &[Pair], batch: usize, pad: u32) -> Result<(f64, f64)> {
    let (mut right, mut margin) = (0usize, 0f64);
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let r = rewards(policy, head, &pair_batch(&refs, pad)?, pad)?.to_vec1::<f32>()?;
        let n = chunk.len();
        for i in 0..n {
            right += (r[i] > r[n + i]) as usize;
            margin += (r[i] - r[n + i]) as f64;
        }
    }
    Ok((right as f64 / pairs.len().max(1) as f64, margin / pairs.len().max(1) as f64))
}

fn run(cfg: &RunConfig, r: &RewardConfig, resume: bool) -> Result<Vec<StepLog>> {
    let policy = setup::policy(cfg, setup::raw_model(cfg)?)?;
    let head = score_head(&policy.pretrained, cfg.train.seed ^ 0x5C0E)?;
    let mut params = setup::model_params(&policy)?;
    params.push(("score.weight".into(), head.clone(), 0));
    let optimizer = setup::optimizer(cfg, params)?;
    let mut built = Built { policy, optimizer };
    let p = &built.policy.pretrained;
    let pad = p.generation.pad_id()?;
    let (mut pairs, eval_pairs) = load_pairs(cfg, p)?;
    let held_out = match &r.eval {
        Some(path) => {
            let mut c = cfg.clone();
            c.data = crate::methods::config::DataSection { train: path.clone(), ..cfg.data.clone() };
            (c.data.sources, c.data.max_records, c.data.eval, c.data.eval_share) = (vec![], None, None, None);
            load_pairs(&c, p)?.0
        }
        None => {
            pairs.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.train.seed));
            let k = ((pairs.len() as f64) * r.eval_share).round() as usize;
            if k >= pairs.len() {
                return Err(Error::Invalid("reward.eval_share leaves no training pairs".into()));
            }
            pairs.split_off(pairs.len() - k)
        }
    };
    let objective = RewardModelling { head: head.clone(), pad_id: pad };
    let before = accuracy(&built.policy, head.as_tensor(), &held_out, cfg.train.batch_size, pad)?;
    let st = Stage { name: "reward", label: "reward model: Bradley-Terry on the pairs", dir: &cfg.output_dir };
    let logs = stage_train(cfg, &st, &mut built, &objective, &pairs, &eval_pairs, resume)?;
    let after = accuracy(&built.policy, head.as_tensor(), &held_out, cfg.train.batch_size, pad)?;
    crate::ui::note(&format!(
        "held-out pairwise accuracy {:.3} -> {:.3} on {} pairs",
        before.0,
        after.0,
        held_out.len()
    ));
    save(&built.policy, head.as_tensor(), cfg, &cfg.output_dir.join("final"))?;
    let report = serde_json::json!({
        "held_out_pairs": held_out.len(),
        "accuracy_before": before.0, "margin_before": before.1,
        "accuracy": after.0, "margin": after.1,
    });
    crate::files::atomic_write(&cfg.output_dir.join("final/reward_eval.json"), report.to_string().as_bytes())?;
    finish_stage(cfg, &st, &logs)?;
    Ok(logs)
}

/// Writes the reward model as an HF `LlamaForSequenceClassification` folder.
fn save(policy: &Policy, head: &Tensor, cfg: &RunConfig, out: &std::path::Path) -> Result<()> {
    let mut raw = trained_model(policy, &cfg.model.source)?
        .ok_or_else(|| Error::Invalid("reward model weights are not trainable".into()))?;
    raw.tensors.insert("score.weight".into(), head.clone());
    let config = &mut raw.config;
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .unwrap_or("LlamaForCausalLM")
        .replace("ForCausalLM", "ForSequenceClassification")
        .replace("LMHeadModel", "ForSequenceClassification"); // GPT2LMHeadModel
    config["architectures"] = serde_json::json!([arch]);
    config["num_labels"] = serde_json::json!(1);
    config["id2label"] = serde_json::json!({"0": "LABEL_0"});
    config["label2id"] = serde_json::json!({"LABEL_0": 0});
    config["pad_token_id"] = serde_json::json!(policy.pretrained.generation.pad_id()?);
    crate::models::pretrained::save_hf_folder(&raw, out)
}
