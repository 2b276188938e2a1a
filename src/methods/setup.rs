//! The small steps a recipe builds its training from, as torchtune's `_setup_model` /
//! `_setup_optimizer`: read the model, attach the run's controls, collect the parameters that
//! train, make the optimizer. A recipe with parameters of its own (the reward head) adds them to
//! the list it passes to [`optimizer`]. And the training data: [`load_data`], [`load_pairs`].

use crate::data::preference::{preferences_from_records, Pair};
use crate::data::{supervised_from_records, Example, Records, SupervisedOptions};
use crate::methods::config::RunConfig;
use crate::models;
use crate::models::pretrained::{self, LoadOptions, Packing, RawModel};
use crate::peft::folder;
use crate::peft::lora::Adapters;
use crate::peft::prompt::SoftPrompts;
use crate::policy::Policy;
use crate::train::optim::AdamW;
use crate::{Error, Pretrained, Result};
use candle_core::Var;
use std::path::Path;

/// A trainable parameter: its name, its variable, its group (0 = model weights at `train.lr`,
/// 1 = controls at `train.control_lr`).
pub type Param = (String, Var, usize);

/// The policy with the optimizer over what trains, ready for [`crate::train::train`].
pub struct Built {
    pub policy: Policy,
    pub optimizer: AdamW,
}

/// Reads the model `cfg.model.source` names (to edit before [`policy`] builds it, e.g. to add
/// vocabulary).
pub fn raw_model(cfg: &RunConfig) -> Result<RawModel> {
    pretrained::read(&cfg.model.source, &load_options(cfg, None))
}

fn load_options(cfg: &RunConfig, lora: Option<&std::sync::Arc<Adapters>>) -> LoadOptions {
    LoadOptions {
        trainable: cfg.model.train_weights,
        packing: Packing::Dense,
        adapters: lora.map(Adapters::source),
        ..Default::default()
    }
}

/// Builds `raw` — its weights trainable when `model.train_weights` — with the run's controls:
/// LoRA adapters wrapping it (`[lora]`), soft prompts before it (`[prompt]`), one per
/// [`RunConfig::adapter_names`], started from `model.init_adapters` when given.
pub fn policy(cfg: &RunConfig, raw: RawModel) -> Result<Policy> {
    let seed = cfg.train.seed;
    let names = cfg.adapter_names();
    let lora = match &cfg.lora {
        Some(l) => {
            let model_type = raw.config.get("model_type").and_then(|v| v.as_str()).unwrap_or("?");
            let l = l.for_architecture(models::architecture(&raw.config, &raw.origin)?, model_type)?;
            Some(Adapters::new(names.iter().map(|n| (n.clone(), l.clone())).collect(), seed)?)
        }
        None => None,
    };
    let pretrained = Pretrained::from_raw(raw, &load_options(cfg, lora.as_ref()))?;
    let prompts = match &cfg.prompt {
        Some(p) => Some(SoftPrompts::new(
            &names,
            p,
            pretrained.model.as_ref(),
            &pretrained.tokenizer,
            seed,
            &pretrained.device,
        )?),
        None => None,
    };
    if let Some(dir) = &cfg.model.init_adapters {
        if let Some(l) = &lora {
            let d = if dir.join("lora").is_dir() { dir.join("lora") } else { dir.clone() };
            folder::load_lora(l, &d)?;
        }
        if let Some(p) = &prompts {
            let d = if dir.join("prompts").is_dir() { dir.join("prompts") } else { dir.clone() };
            folder::load_prompts(p, &d)?;
        }
    }
    Ok(Policy { pretrained, lora, prompts })
}

/// The model's weights (group 0), by HF name; none when they are frozen.
pub fn model_params(policy: &Policy) -> Result<Vec<Param>> {
    let Some(vm) = &policy.pretrained.varmap else { return Ok(vec![]) };
    let data = vm.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.clone(), 0)).collect())
}

/// The controls' parameters (group 1): LoRA matrices (`lora.…`), soft prompts (`prompt.NAME`).
pub fn control_params(policy: &Policy) -> Result<Vec<Param>> {
    let mut params = Vec::new();
    if let Some(l) = &policy.lora {
        let data = l.varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
        params.extend(data.iter().map(|(k, v)| (format!("lora.{k}"), v.clone(), 1)));
    }
    if let Some(p) = &policy.prompts {
        params.extend(p.names.iter().zip(&p.vars).map(|(n, v)| (format!("prompt.{n}"), v.clone(), 1)));
    }
    Ok(params)
}

/// AdamW with `cfg.train`'s settings over `params`, in name order (the order checkpoints keep).
pub fn optimizer(cfg: &RunConfig, mut params: Vec<Param>) -> Result<AdamW> {
    if params.is_empty() {
        return Err(Error::Invalid("nothing trains: no model weights and the controls are frozen".into()));
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(AdamW::new(params, cfg.train.adamw))
}

/// The usual setup: the policy of `cfg`, with the model weights (when `model.train_weights`) and
/// the controls training.
pub fn standard(cfg: &RunConfig) -> Result<Built> {
    let policy = policy(cfg, raw_model(cfg)?)?;
    let params = [model_params(&policy)?, control_params(&policy)?].concat();
    let optimizer = optimizer(cfg, params)?;
    Ok(Built { policy, optimizer })
}

/// Training data as read: supervised rows, or preference pairs.
pub enum TrainingData {
    Supervised(Vec<Example>),
    Pairs(Vec<Pair>),
}

impl TrainingData {
    fn kind(&self) -> &'static str {
        match self {
            TrainingData::Supervised(_) => "supervised rows",
            TrainingData::Pairs(_) => "preference pairs",
        }
    }

    fn len(&self) -> usize {
        match self {
            TrainingData::Supervised(v) => v.len(),
            TrainingData::Pairs(v) => v.len(),
        }
    }

    /// The items at `at`, in that order (an index may repeat).
    fn pick(&self, at: impl Iterator<Item = usize>) -> TrainingData {
        match self {
            TrainingData::Supervised(v) => TrainingData::Supervised(at.map(|i| v[i].clone()).collect()),
            TrainingData::Pairs(v) => TrainingData::Pairs(at.map(|i| v[i].clone()).collect()),
        }
    }
}

/// The training data and the held-out data (`[data] eval` or `eval_share`), when there is any.
pub struct Loaded {
    pub train: TrainingData,
    pub eval: Option<TrainingData>,
}

impl Loaded {
    /// Turns both sets into a method's items the same way (the training set first).
    pub fn map<T>(self, mut f: impl FnMut(TrainingData) -> Result<Vec<T>>) -> Result<(Vec<T>, Vec<T>)> {
        let train = f(self.train)?;
        let eval = match self.eval {
            Some(e) => f(e)?,
            None => vec![],
        };
        Ok((train, eval))
    }
}

/// Whether a record is a preference (it has a rejected response).
fn is_preference(v: &serde_json::Value) -> bool {
    v.get("rejected").is_some() || (v.get("info").is_some() && v.get("summaries").is_some())
}

/// Reads the training data of `cfg` (`data.train` or the mixture of `data.sources`) and its
/// held-out data with the policy's tokenizer: preference records (any format of
/// [`crate::data::preference`]) as pairs, otherwise supervised rows (controls by name).
pub fn load_data(cfg: &RunConfig, p: &Pretrained) -> Result<Loaded> {
    load_scored_data(cfg, p, &[])
}

/// One source, read and tokenised.
fn read_source(
    cfg: &RunConfig,
    p: &Pretrained,
    source: &Path,
    split: &str,
    max_records: Option<usize>,
    objectives: &[String],
) -> Result<TrainingData> {
    let mut records = Records::open(source, split)?.limit(max_records);
    if records.first_value()?.is_some_and(|v| is_preference(&v)) {
        let mut opts = cfg.data.preference_options();
        opts.dimensions = cfg.dimensions().into_iter().map(|d| d.name).collect();
        let (pairs, _) = preferences_from_records(records, &p.tokenizer, &opts)?;
        return Ok(TrainingData::Pairs(pairs));
    }
    let opts = SupervisedOptions {
        max_length: cfg.data.max_length,
        controls: cfg.controls(),
        dimensions: cfg.dimensions().into_iter().map(|d| (d.name, d.controls)).collect(),
        scores: objectives.to_vec(),
        default_control: (cfg.lora.is_some() || cfg.prompt.is_some()).then_some(0),
        eos_id: p.generation.eos_token_ids.first().copied(),
        skip_invalid: cfg.data.skip_invalid,
    };
    Ok(TrainingData::Supervised(supervised_from_records(records, &p.tokenizer, &opts)?.0))
}

/// [`load_data`] where every supervised row must score `objectives` (`"scores"`, read into
/// [`Example::scores`]).
pub fn load_scored_data(cfg: &RunConfig, p: &Pretrained, objectives: &[String]) -> Result<Loaded> {
    let d = &cfg.data;
    let seed = cfg.train.seed;
    let sources = d.training_sources();
    let mut parts = Vec::with_capacity(sources.len());
    let mut held_out = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let data = read_source(cfg, p, &s.path, "train", s.max_records, objectives)?;
        if let Some(first) = parts.first().map(TrainingData::kind).filter(|k| *k != data.kind()) {
            return Err(Error::parse(
                &s.path,
                format!("holds {}, the first source {first}: every source must hold the same kind", data.kind()),
            ));
        }
        match d.eval_share {
            Some(share) => {
                let (train, eval) = crate::data::mix::split_share(data.len(), share, seed ^ i as u64)
                    .map_err(|e| Error::parse(&s.path, e))?;
                parts.push(data.pick(train.into_iter()));
                held_out.push(data.pick(eval.into_iter()));
            }
            None => parts.push(data),
        }
    }
    let train = if parts.len() == 1 {
        parts.pop().expect("one source")
    } else {
        // One pass of the mixture draws as many examples as the sources hold.
        let sizes: Vec<usize> = parts.iter().map(TrainingData::len).collect();
        let weights: Vec<f64> = sources.iter().map(|s| s.weight).collect();
        let draws = crate::data::mix::mixture(&sizes, &weights, sizes.iter().sum(), seed);
        concat(draws.iter().map(|&(s, i)| parts[s].pick(std::iter::once(i))).collect())
    };
    let eval = match (&d.eval, held_out.is_empty()) {
        (Some(path), _) => {
            let e = read_source(cfg, p, path, "test", d.eval_max_records, objectives)?;
            if e.kind() != train.kind() {
                return Err(Error::parse(
                    path,
                    format!("holds {}, the training data {}: they must be of one kind", e.kind(), train.kind()),
                ));
            }
            Some(e)
        }
        (None, false) => Some(concat(held_out)),
        (None, true) => None,
    };
    if let Some(e) = &eval {
        crate::ui::note(&format!("{} training and {} held-out {}", train.len(), e.len(), train.kind()));
    }
    Ok(Loaded { train, eval })
}

/// Sets of one kind, one after another.
fn concat(parts: Vec<TrainingData>) -> TrainingData {
    let mut it = parts.into_iter();
    let first = it.next().unwrap_or(TrainingData::Pairs(vec![]));
    it.fold(first, |acc, d| match (acc, d) {
        (TrainingData::Supervised(mut a), TrainingData::Supervised(b)) => {
            a.extend(b);
            TrainingData::Supervised(a)
        }
        (TrainingData::Pairs(mut a), TrainingData::Pairs(b)) => {
            a.extend(b);
            TrainingData::Pairs(a)
        }
        // Kinds are checked as the sources are read.
        (acc, _) => acc,
    })
}

/// Pairs only, training and held-out (empty when none): the methods that learn from a chosen
/// and a rejected response.
pub fn load_pairs(cfg: &RunConfig, p: &Pretrained) -> Result<(Vec<Pair>, Vec<Pair>)> {
    load_data(cfg, p)?.map(|d| match d {
        TrainingData::Pairs(pairs) => Ok(pairs),
        TrainingData::Supervised(_) => Err(Error::parse(
            cfg.data.shown(),
            format!("method {} needs preference records (chosen and rejected responses)", cfg.method),
        )),
    })
}

/// The control indices of a pair's chosen and rejected response: with several dimensions the
/// first two controls of the pair's dimension, else the run's two controls.
pub fn pair_controls_of(cfg: &RunConfig, pair: &Pair) -> Result<(usize, usize)> {
    let Some(dim) = &pair.dimension else { return pair_controls(cfg) };
    let dims = cfg.dimension_indices();
    let (_, at) = dims.iter().find(|(name, _)| name == dim).ok_or_else(|| {
        Error::Invalid(format!("a preference names dimension '{dim}', which model.dimensions does not have"))
    })?;
    match at.as_slice() {
        [good, bad] => Ok((*good, *bad)),
        at => {
            let all = cfg.controls();
            let names: Vec<&String> = at.iter().map(|&i| &all[i]).collect();
            Err(Error::Invalid(format!(
                "preference data of dimension '{dim}' needs two controls (chosen, rejected), it has {}: {names:?}",
                at.len()
            )))
        }
    }
}

/// The control indices of the chosen and the rejected response (the first two control names).
pub fn pair_controls(cfg: &RunConfig) -> Result<(usize, usize)> {
    match cfg.controls().len() {
        2 => Ok((0, 1)),
        n => Err(Error::Invalid(format!(
            "preference data needs two controls (chosen, rejected), model.controls has {n}: {:?}",
            cfg.controls()
        ))),
    }
}
