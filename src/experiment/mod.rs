//! The controlled-sentiment experiment in one resumable command: build the task from the rated
//! snippets, build judge-scored preference pairs from the base model, train every method with
//! every seed, evaluate each on the held-out prompts at every sampling temperature (under `good`,
//! and under `bad` for the controllable ones), and write `report.md` with the tables.
//!
//! Besides the methods it sweeps the control size of MEET (soft-prompt length, LoRA rank) and
//! trains a Bradley–Terry reward model on the human-rating pairs, which judges every response next
//! to VADER. `report.md` holds the tables and the PNG figures sit beside it (see [`report`] and
//! [`plots`]).
//!
//! Every step writes its outputs into `output_dir` and a step whose outputs exist is skipped, so
//! an interrupted experiment continues where it stopped (a finished training run is kept, an
//! unfinished one resumes from its checkpoints when `save_every` wrote any).

pub mod dimensions;
pub mod plots;
pub mod report;

use crate::controls::Controlled;
use crate::data::sentiment::{read_snippets, sentiment_task, write_task, TaskOptions};
use crate::eval::reward_model::RewardModel;
use crate::eval::sample::{evaluate, read_prompts, summarize, EvalOptions, Sample, Summary};
use crate::eval::stats::{mean_ci, Estimate};
use crate::eval::{judge_by_name, Judge};
use crate::files::{atomic_write, read_jsonl, write_jsonl};
use crate::generate::SamplingParams;
use crate::methods::config::RunConfig;
use crate::methods::{self, ExperimentEntry};
use crate::{ui, Error, LoadOptions, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An experiment file of either kind, by its top-level `experiment` key: `"sentiment"` (the
/// default: [`ExperimentConfig`]) or `"two-dimensions"` ([`dimensions::DimensionsConfig`]).
pub enum Experiment {
    Sentiment(ExperimentConfig),
    Dimensions(dimensions::DimensionsConfig),
}

impl Experiment {
    /// Reads and checks the file (every method's run configuration must build).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))?;
        match table.get("experiment") {
            None => Ok(Self::Sentiment(ExperimentConfig::from_file(path)?)),
            Some(toml::Value::String(k)) if k == "sentiment" => Ok(Self::Sentiment(ExperimentConfig::from_file(path)?)),
            Some(toml::Value::String(k)) if k == dimensions::KIND => {
                Ok(Self::Dimensions(dimensions::DimensionsConfig::from_file(path)?))
            }
            Some(other) => Err(Error::parse(
                path,
                format!("experiment = {other}: \"sentiment\" (the default) or \"{}\"", dimensions::KIND),
            )),
        }
    }

    /// Switches to the `--quick` profile.
    pub fn quick(&mut self) {
        match self {
            Self::Sentiment(c) => c.quick(),
            Self::Dimensions(c) => c.quick(),
        }
    }

    /// Runs (or continues) the experiment; returns the path of `report.md`.
    pub fn run(&self) -> Result<PathBuf> {
        match self {
            Self::Sentiment(c) => run(c),
            Self::Dimensions(c) => dimensions::run(c),
        }
    }
}

/// `[task]`, `[pairs]`, `[eval]` and the method list of an experiment file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// `"sentiment"` when given (see [`Experiment`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    pub output_dir: PathBuf,
    /// The base model every method starts from.
    pub model: String,
    #[serde(default = "default_snippets")]
    pub snippets: PathBuf,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default = "default_temperatures")]
    pub temperatures: Vec<f64>,
    /// Methods by experiment name; each is a `[method.NAME]` table of run options (as in `meet
    /// train`), over the built-in defaults of that name.
    pub methods: Vec<String>,
    #[serde(default)]
    pub method: toml::Table,
    #[serde(default)]
    pub task: TaskSection,
    #[serde(default)]
    pub pairs: SampleSection,
    #[serde(default)]
    pub eval: SampleSection,
    /// `[train]` defaults for every method.
    #[serde(default)]
    pub train: toml::Table,
    /// `[sweep]`: MEET's control sizes, trained with the first seed.
    #[serde(default)]
    pub sweep: SweepSection,
    /// `[reward_model]`: run options of the reward model trained on the human-rating pairs (over
    /// `method = "reward"` and `[train]`); without the table no reward model is trained.
    #[serde(default)]
    pub reward_model: Option<toml::Table>,
    /// `[llm_judge]`: also judge each method against the base model with an LLM; without the
    /// table no LLM is asked.
    #[serde(default)]
    pub llm_judge: Option<LlmJudgeSection>,
}

/// `[llm_judge]`: the LLM judge of the report (see [`crate::eval::llm_judge`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmJudgeSection {
    /// `llm:URL[#MODEL]`.
    pub judge: String,
    /// `dialogue` or `summary`: which of the DPO paper's prompts.
    pub task: String,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Where answers are cached; default as `meet compare --judge` (`$MEET_JUDGE_CACHE`, else
    /// `~/.cache/meet/llm-judge`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

/// `[sweep]`: the soft-prompt lengths and LoRA ranks MEET is trained with (besides its main
/// `meet-prompt` / `meet-lora` runs, whose size is reused when it is in the list).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepSection {
    pub prompt_n: Vec<usize>,
    pub lora_r: Vec<usize>,
}

/// One point of the control-size sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// `meet-prompt` or `meet-lora`.
    pub family: &'static str,
    /// Virtual tokens or rank.
    pub size: usize,
    /// The experiment method name that trains it (`meet-prompt-n50`, or the main `meet-prompt`).
    pub method: String,
}

fn default_snippets() -> PathBuf {
    PathBuf::from("data/sentiment/movieReviewSnippets_GroundTruth.txt")
}
fn default_seeds() -> Vec<u64> {
    vec![0, 1]
}
fn default_temperatures() -> Vec<f64> {
    vec![0.25, 0.5, 0.75, 1.0]
}

/// `[task]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskSection {
    pub words: usize,
    pub train: usize,
    pub eval: usize,
    pub human_pairs: usize,
    pub seed: u64,
}

impl Default for TaskSection {
    fn default() -> Self {
        Self { words: 4, train: 400, eval: 100, human_pairs: 400, seed: 0 }
    }
}

/// `[pairs]` / `[eval]`: how responses are sampled and judged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSection {
    pub samples: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// `vader` (the response) or `vader-full` (prompt + response).
    pub judge: String,
    pub batch: usize,
}

/// The instruction the human-rating pairs are written under (the reward model judges a prompt +
/// response as a review under it).
pub const INSTRUCTION: &str = "Write a short movie review.";

impl Default for SampleSection {
    fn default() -> Self {
        Self { samples: 4, max_new_tokens: 32, temperature: 1.0, judge: "vader-full".into(), batch: 16 }
    }
}

impl ExperimentConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))?;
        let sweep = cfg.sweep_points().map_err(|e| Error::parse(path, e.to_string()))?;
        for m in cfg.methods.iter().chain(sweep.iter().map(|p| &p.method)) {
            cfg.run_config(m, 0).map_err(|e| Error::parse(path, format!("method '{m}': {e}")))?;
        }
        if cfg.reward_model.is_some() {
            cfg.reward_config().map_err(|e| Error::parse(path, format!("[reward_model]: {e}")))?;
        }
        Ok(cfg)
    }

    /// The control-size sweep: every `[sweep]` size, mapped to the main run where it is its size.
    pub fn sweep_points(&self) -> Result<Vec<SweepPoint>> {
        let mut out = Vec::new();
        for (family, sizes, key) in [("meet-prompt", &self.sweep.prompt_n, "n"), ("meet-lora", &self.sweep.lora_r, "r")]
        {
            if sizes.is_empty() {
                continue;
            }
            let main = self.run_config(family, 0)?;
            let main_size = if family == "meet-prompt" { main.prompt.map(|p| p.n) } else { main.lora.map(|l| l.r) };
            for &size in sizes {
                if size == 0 {
                    return Err(Error::Invalid(format!("[sweep]: a {family} size of 0")));
                }
                let method = if Some(size) == main_size && self.methods.iter().any(|m| m == family) {
                    family.to_string()
                } else {
                    format!("{family}-{key}{size}")
                };
                out.push(SweepPoint { family, size, method });
            }
        }
        Ok(out)
    }

    /// The `meet train` configuration of the reward model judge (the human-rating pairs, the first
    /// seed).
    pub fn reward_config(&self) -> Result<RunConfig> {
        let mut t: toml::Table = toml::from_str("method = \"reward\"\n[model]\ntrain_weights = true")
            .map_err(|e| Error::Invalid(e.to_string()))?;
        merge(&mut t, &toml::Table::from_iter([("train".to_string(), toml::Value::Table(self.train.clone()))]));
        if let Some(own) = &self.reward_model {
            merge(&mut t, own);
        }
        let q = |p: PathBuf| format!("{:?}", p.to_string_lossy());
        let over = vec![
            ("output_dir".to_string(), q(self.dir(&["runs", "reward-model"]))),
            ("model.source".to_string(), format!("{:?}", self.model)),
            ("data.train".to_string(), q(self.dir(&["data", "human_pairs.jsonl"]))),
            ("train.seed".to_string(), self.seeds.first().copied().unwrap_or(0).to_string()),
        ];
        RunConfig::from_table(t, &over)
    }

    /// `meet-prompt-n50` → (`meet-prompt`, options setting n = 50); `meet-lora-r8` likewise with
    /// the rank (alpha kept at twice the rank, as in the main run); other names stand alone.
    pub(crate) fn variant(name: &str) -> Result<(&str, Option<toml::Table>)> {
        for (family, key) in [("meet-prompt", "-n"), ("meet-lora", "-r")] {
            if let Some(size) = name.strip_prefix(family).and_then(|r| r.strip_prefix(key)) {
                let size: usize = size
                    .parse()
                    .map_err(|_| Error::Invalid(format!("'{name}': {family}{key} takes a whole number")))?;
                let text = if family == "meet-prompt" {
                    format!("[prompt]\nn = {size}")
                } else {
                    format!("[lora]\nr = {size}\nalpha = {}.0", 2 * size)
                };
                return Ok((family, Some(toml::from_str(&text).map_err(|e| Error::Invalid(e.to_string()))?)));
            }
        }
        Ok((name, None))
    }

    /// The registered method and experiment entry (see [`crate::methods::Recipe::experiments`])
    /// of an experiment method name.
    pub(crate) fn entry(name: &str) -> Result<(&'static str, ExperimentEntry)> {
        let all = methods::all();
        let found =
            all.iter().find_map(|m| m.experiments().into_iter().find(|e| e.name == name).map(|e| (m.name(), e)));
        found.ok_or_else(|| {
            let names: Vec<&str> = all.iter().flat_map(|m| m.experiments()).map(|e| e.name).collect();
            Error::Invalid(format!(
                "unknown experiment method '{name}' ({}, meet-prompt-nN, meet-lora-rR)",
                names.join(", ")
            ))
        })
    }

    /// The built-in options of an experiment method name, before `[method.NAME]`.
    pub(crate) fn defaults(name: &str) -> Result<toml::Table> {
        let (method, e) = Self::entry(name)?;
        let text = format!("method = {method:?}\n{}", e.options);
        toml::from_str(&text).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// The `--quick` profile: the same steps on a few prompts, one seed, two temperatures and a
    /// handful of optimizer steps per method, in its own folder (`output_dir/quick`).
    pub fn quick(&mut self) {
        self.output_dir = self.output_dir.join("quick");
        self.seeds.truncate(1);
        self.temperatures = vec![0.5, 1.0];
        self.task = TaskSection { train: 24, eval: 8, human_pairs: 24, ..self.task.clone() };
        self.pairs.samples = self.pairs.samples.min(2);
        self.pairs.max_new_tokens = self.pairs.max_new_tokens.min(16);
        self.eval.samples = 1;
        self.eval.max_new_tokens = self.eval.max_new_tokens.min(16);
        // One size besides the main one per sweep.
        for sizes in [&mut self.sweep.prompt_n, &mut self.sweep.lora_r] {
            sizes.truncate(2);
        }
        quick_training(&mut self.train, &mut self.method);
    }

    fn dir(&self, parts: &[&str]) -> PathBuf {
        parts.iter().fold(self.output_dir.clone(), |p, s| p.join(s))
    }

    /// The `meet train` configuration of `name` with `seed`.
    pub fn run_config(&self, name: &str, seed: u64) -> Result<RunConfig> {
        let (base, size) = Self::variant(name)?;
        let mut t = Self::defaults(base)?;
        merge(&mut t, &toml::Table::from_iter([("train".to_string(), toml::Value::Table(self.train.clone()))]));
        if let Some(toml::Value::Table(own)) = self.method.get(base) {
            merge(&mut t, own);
        }
        if let Some(size) = size {
            merge(&mut t, &size);
        }
        let run = self.dir(&["runs", &format!("{name}-seed{seed}")]);
        let pairs = self.dir(&["data", "pairs.jsonl"]);
        let model = match Self::entry(base)?.1.starts_from {
            // The run continues another's final model of the same seed (DPO from SFT).
            Some(from) => self.dir(&["runs", &format!("{from}-seed{seed}"), "final"]).to_string_lossy().into_owned(),
            None => self.model.clone(),
        };
        let q = |s: &str| format!("{s:?}");
        let over = vec![
            ("output_dir".to_string(), q(&run.to_string_lossy())),
            ("model.source".to_string(), q(&model)),
            ("data.train".to_string(), q(&pairs.to_string_lossy())),
            ("train.seed".to_string(), seed.to_string()),
        ];
        RunConfig::from_table(t, &over)
    }
}

/// The quick profiles' training: two optimizer steps per run (per MEET step too), no warmup.
pub(crate) fn quick_training(train: &mut toml::Table, methods: &mut toml::Table) {
    train.insert("max_steps".into(), toml::Value::Integer(2));
    train.insert("warmup_steps".into(), toml::Value::Integer(0));
    for (_, m) in methods.iter_mut() {
        if let toml::Value::Table(t) = m {
            if let Some(toml::Value::Table(meet)) = t.get_mut("meet") {
                meet.remove("step1");
                meet.remove("step2");
            }
        }
    }
}

/// Deep-merges `src` into `dst` (tables key by key, other values replaced).
pub(crate) fn merge(dst: &mut toml::Table, src: &toml::Table) {
    for (k, v) in src {
        match (dst.get_mut(k), v) {
            (Some(toml::Value::Table(d)), toml::Value::Table(s)) => merge(d, s),
            _ => {
                dst.insert(k.clone(), v.clone());
            }
        }
    }
}

/// One evaluation: method, seed, control, temperature, and its figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub method: String,
    pub seed: u64,
    pub control: Option<String>,
    pub temperature: f64,
    pub summary: Summary,
    /// Mean reward-model score with its interval, when the experiment trains one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<Estimate>,
}

/// A cell with its scored responses and, aligned with them, the reward model's scores.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub cell: Cell,
    pub samples: Vec<Sample>,
    pub rm: Option<Vec<f64>>,
}

/// Runs (or continues) the experiment; returns the path of `report.md`. Each of its five phases
/// gets a header, progress and a one-line summary on stderr.
pub fn run(cfg: &ExperimentConfig) -> Result<PathBuf> {
    let started = Instant::now();
    std::fs::create_dir_all(cfg.dir(&["data"])).map_err(|e| Error::io(&cfg.output_dir, e))?;
    build_task(cfg)?;
    let base = build_pairs(cfg)?;
    let trained = train_all(cfg)?;
    let base = match base {
        Some(b) => b,
        None => Controlled::load(&cfg.model, &LoadOptions::default())?,
    };
    let judge = judge_by_name(&cfg.eval.judge)?;
    let cells = evaluate_all(cfg, &trained, &base, judge.as_ref())?;
    let llm = match &cfg.llm_judge {
        Some(l) => {
            let task = crate::eval::llm_judge::Task::parse(&l.task)?;
            let mut j = crate::eval::llm_judge::LlmJudge::from_spec(&l.judge, task, l.concurrency)?;
            if let Some(d) = &l.cache_dir {
                j.cache_dir = d.clone();
            }
            Some(j)
        }
        None => None,
    };
    let path = write_report(cfg, &cells, &trained.sweep, judge.name(), llm.as_ref())?;
    ui::note(&format!("this pass took {}", ui::duration(started.elapsed().as_secs_f64())));
    Ok(path)
}

/// Phase 1: the task — training and held-out prompts and the human-rating pairs.
fn build_task(cfg: &ExperimentConfig) -> Result<()> {
    let prompts_path = cfg.dir(&["data", "eval_prompts.jsonl"]);
    ui::header(&format!("[1/5] task: prompts and human-rating pairs from {}", cfg.snippets.display()));
    if !prompts_path.is_file() {
        let t0 = Instant::now();
        let snippets = read_snippets(&cfg.snippets)?;
        let t = &cfg.task;
        let o = TaskOptions {
            words: t.words,
            train: t.train,
            eval: t.eval,
            pairs: t.human_pairs,
            seed: t.seed,
            instruction: INSTRUCTION.into(),
            ..Default::default()
        };
        let task = sentiment_task(&snippets, &o)?;
        write_task(&task, &cfg.dir(&["data"]))?;
        ui::note(&format!(
            "{} training prompts, {} held-out prompts, {} human-rating pairs (from {} snippets) in {}",
            task.train_prompts.len(),
            task.eval_prompts.len(),
            task.rating_pairs.len(),
            snippets.len(),
            cfg.dir(&["data"]).display()
        ));
        record_time(&cfg.output_dir, "data", "task", t0)?;
    } else {
        ui::note(&format!("kept from an earlier pass: {}", cfg.dir(&["data"]).display()));
    }
    Ok(())
}

/// Phase 2: judge-scored preference pairs from the base model. Returns the base model when it
/// was loaded for them (it is every evaluation's reference too: loaded once).
fn build_pairs(cfg: &ExperimentConfig) -> Result<Option<Controlled>> {
    let train_prompts_path = cfg.dir(&["data", "train_prompts.jsonl"]);
    let pairs_path = cfg.dir(&["data", "pairs.jsonl"]);
    let p = &cfg.pairs;
    ui::header(&format!(
        "[2/5] preference pairs: best and worst of {} samples per training prompt from {}, judged by {}",
        p.samples, cfg.model, p.judge
    ));
    let mut base: Option<Controlled> = None;
    if !pairs_path.is_file() {
        let t0 = Instant::now();
        let base = base.insert(Controlled::load(&cfg.model, &LoadOptions::default())?);
        let opts = EvalOptions {
            control: None,
            chat: false,
            samples: p.samples,
            params: SamplingParams {
                temperature: p.temperature,
                max_new_tokens: p.max_new_tokens,
                seed: 7,
                ..Default::default()
            },
            batch: p.batch,
            progress: Some("sampling".into()),
        };
        let (pairs, ties) = crate::eval::pairs::best_worst_pairs(
            base,
            judge_by_name(&p.judge)?.as_ref(),
            &read_prompts(&train_prompts_path)?,
            &opts,
        )?;
        ui::note(&format!(
            "{} pairs ({ties} prompts without a score difference left out) in {}",
            pairs.len(),
            pairs_path.display()
        ));
        write_jsonl(&pairs_path, &pairs)?;
        record_time(&cfg.output_dir, "data", "pairs", t0)?;
    } else {
        ui::note(&format!("kept from an earlier pass: {}", pairs_path.display()));
    }
    Ok(base)
}

/// What phase 3 trained: every (method, seed) run, the control-size sweep, the reward model.
struct Trained {
    runs: Vec<(String, u64)>,
    sweep: Vec<SweepPoint>,
    reward_model: Option<RewardModel>,
}

/// Phase 3: every method with every seed (those another starts from first: SFT before DPO), then
/// the sweep's extra sizes with the first seed, then the reward-model judge. Finished runs are kept.
fn train_all(cfg: &ExperimentConfig) -> Result<Trained> {
    let bases: Vec<&str> = methods::all().iter().flat_map(|m| m.experiments()).filter_map(|e| e.starts_from).collect();
    let mut order: Vec<&String> = cfg.methods.iter().collect();
    order.sort_by_key(|m| !bases.contains(&m.as_str()));
    let mut trainings: Vec<(String, u64)> =
        cfg.seeds.iter().flat_map(|&s| order.iter().map(move |m| (m.to_string(), s))).collect();
    let sweep = cfg.sweep_points()?;
    let first_seed = cfg.seeds.first().copied().unwrap_or(0);
    for p in &sweep {
        if !trainings.contains(&(p.method.clone(), first_seed)) {
            trainings.push((p.method.clone(), first_seed));
        }
    }
    let total_runs = trainings.len() + cfg.reward_model.is_some() as usize;
    ui::header(&format!(
        "[3/5] training: {total_runs} runs ({} methods x {} seed(s), {} sweep sizes{})",
        cfg.methods.len(),
        cfg.seeds.len(),
        trainings.len() - cfg.methods.len() * cfg.seeds.len(),
        if cfg.reward_model.is_some() { ", the reward-model judge" } else { "" }
    ));
    let t3 = Instant::now();
    let mut trained = 0;
    for (k, (m, seed)) in trainings.iter().enumerate() {
        let rc = cfg.run_config(m, *seed)?;
        if crate::methods::stage::finished(&rc).is_none() {
            let t0 = Instant::now();
            ui::header(&format!("run {}/{total_runs}: {m} (seed {seed}) -> {}", k + 1, rc.output_dir.display()));
            crate::methods::run(&rc, true)?;
            record_time(&cfg.output_dir, "train", &format!("{m}-seed{seed}"), t0)?;
            trained += 1;
        }
    }
    let reward_model = match &cfg.reward_model {
        Some(_) => {
            let rc = cfg.reward_config()?;
            if crate::methods::stage::finished(&rc).is_none() {
                let t0 = Instant::now();
                ui::header(&format!(
                    "run {total_runs}/{total_runs}: the reward model on the human-rating pairs -> {}",
                    rc.output_dir.display()
                ));
                crate::methods::run(&rc, true)?;
                record_time(&cfg.output_dir, "train", "reward-model", t0)?;
                trained += 1;
            }
            let path = rc.output_dir.join("final");
            let mut rm = RewardModel::load(&path.to_string_lossy())?;
            rm.instruction = Some(INSTRUCTION.into());
            Some(rm)
        }
        None => None,
    };
    ui::header("[3/5] training done");
    ui::note(&format!(
        "{trained} runs trained in {}, {} kept from an earlier pass",
        ui::duration(t3.elapsed().as_secs_f64()),
        total_runs - trained
    ));
    Ok(Trained { runs: trainings, sweep, reward_model })
}

/// Phase 4: each run × temperature under `good` (and `bad` at the last temperature for the
/// controllable methods), the sweep's sizes at the last temperature, and the base model; every
/// response scored by the judge and the reward model. Finished evaluations are read back.
fn evaluate_all(
    cfg: &ExperimentConfig,
    trained: &Trained,
    base: &Controlled,
    judge: &dyn Judge,
) -> Result<Vec<Evaluated>> {
    let (trainings, reward_model) = (&trained.runs, &trained.reward_model);
    let prompts_path = cfg.dir(&["data", "eval_prompts.jsonl"]);
    let ev = &cfg.eval;
    let prompts = read_prompts(&prompts_path)?;
    let last_t = *cfg.temperatures.last().unwrap_or(&1.0);
    let mut jobs: Vec<(String, u64, String, Vec<f64>)> =
        cfg.seeds.iter().map(|&s| ("base".to_string(), s, cfg.model.clone(), cfg.temperatures.clone())).collect();
    for (m, seed) in trainings {
        let dir = cfg.run_config(m, *seed)?.output_dir.join("final");
        let temps = if cfg.methods.contains(m) { cfg.temperatures.clone() } else { vec![last_t] };
        jobs.push((m.clone(), *seed, dir.to_string_lossy().into_owned(), temps));
    }
    std::fs::create_dir_all(cfg.dir(&["eval"])).map_err(|e| Error::io(&cfg.output_dir, e))?;
    ui::header(&format!(
        "[4/5] evaluations: {} models on {} held-out prompts x {} samples, judged by {}{}",
        jobs.len(),
        prompts.len(),
        ev.samples,
        ev.judge,
        if reward_model.is_some() { " and the reward model" } else { "" }
    ));
    let t4 = Instant::now();
    let mut cells = Vec::new();
    let mut computed_cells = 0;
    for (k, (m, seed, path, temps)) in jobs.iter().enumerate() {
        let (t0, mut computed) = (Instant::now(), false);
        let model = if m == "base" { None } else { Some(Controlled::load(path, &LoadOptions::default())?) };
        let model = model.as_ref().unwrap_or(base);
        let controls: Vec<Option<String>> = match &model.spec {
            Some(s) if s.names.len() == 2 && s.names[0] == "good" => vec![Some("good".into()), Some("bad".into())],
            _ => vec![None],
        };
        for &temp in temps {
            for c in &controls {
                if c.as_deref() == Some("bad") && temp != last_t {
                    continue;
                }
                let name = format!("{m}-seed{seed}-{}-t{temp}", c.as_deref().unwrap_or("plain"));
                let out = cfg.dir(&["eval", &format!("{name}.jsonl")]);
                let samples: Vec<Sample> = if out.is_file() {
                    read_jsonl(&out)?
                } else {
                    computed = true;
                    computed_cells += 1;
                    let opts = EvalOptions {
                        control: c.clone(),
                        chat: false,
                        samples: ev.samples,
                        params: SamplingParams {
                            temperature: temp,
                            max_new_tokens: ev.max_new_tokens,
                            seed: 1000 + seed,
                            ..Default::default()
                        },
                        batch: ev.batch,
                        progress: Some(format!("eval {}/{}: {name}", k + 1, jobs.len())),
                    };
                    let s = evaluate(model, Some(base), judge, &prompts, &opts)?;
                    write_jsonl(&out, &s)?;
                    s
                };
                let rm = match &reward_model {
                    Some(rm) => Some(reward_scores(rm, &samples, &cfg.dir(&["eval", &format!("{name}.rm.json")]))?),
                    None => None,
                };
                let cell = Cell {
                    method: m.clone(),
                    seed: *seed,
                    control: c.clone(),
                    temperature: temp,
                    summary: summarize(&samples, *seed)?,
                    reward_model: rm.as_ref().map(|r| mean_ci(r, *seed)).transpose()?,
                };
                cells.push(Evaluated { cell, samples, rm });
            }
        }
        if computed {
            record_time(&cfg.output_dir, "eval", &format!("{m}-seed{seed}"), t0)?;
        }
    }
    ui::note(&format!(
        "{} evaluations ({computed_cells} computed in {}, the rest kept from an earlier pass)",
        cells.len(),
        ui::duration(t4.elapsed().as_secs_f64())
    ));
    Ok(cells)
}

/// Phase 5: `report.md`, its figures and `results.jsonl`.
fn write_report(
    cfg: &ExperimentConfig,
    cells: &[Evaluated],
    sweep: &[SweepPoint],
    judge: &str,
    llm: Option<&crate::eval::llm_judge::LlmJudge>,
) -> Result<PathBuf> {
    ui::header("[5/5] report and figures");
    let provenance = crate::provenance::Provenance::current();
    let md = report::write(cfg, cells, sweep, judge, llm, &provenance)?;
    let path = cfg.dir(&["report.md"]);
    atomic_write(&path, md.as_bytes())?;
    // The first line says which build, machine and kernels made the numbers; one cell per line
    // after it.
    let mut lines = vec![serde_json::json!({ "provenance": provenance })];
    for c in cells {
        lines.push(serde_json::to_value(&c.cell).map_err(|e| Error::Invalid(e.to_string()))?);
    }
    write_jsonl(&cfg.dir(&["results.jsonl"]), &lines)?;
    ui::note(&format!("{} and its figures", path.display()));
    Ok(path)
}

/// The wall time of one step of the experiment (`timings.jsonl`, kept across resumed passes so
/// that the report can give what the whole experiment cost).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    /// `data`, `train` or `eval`.
    pub kind: String,
    pub name: String,
    pub seconds: f64,
}

fn record_time(output_dir: &Path, kind: &str, name: &str, started: Instant) -> Result<()> {
    let path = output_dir.join("timings.jsonl");
    let mut all: Vec<Timing> = if path.is_file() { read_jsonl(&path)? } else { Vec::new() };
    all.push(Timing { kind: kind.into(), name: name.into(), seconds: started.elapsed().as_secs_f64() });
    write_jsonl(&path, &all)
}

/// The reward model's scores of `samples` (cached in `path`, a JSON array aligned with them).
fn reward_scores(rm: &RewardModel, samples: &[Sample], path: &Path) -> Result<Vec<f64>> {
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Vec<f64> = serde_json::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))?;
        if v.len() == samples.len() {
            return Ok(v);
        }
    }
    let items: Vec<(&str, &str)> = samples.iter().map(|s| (s.prompt.as_str(), s.response.as_str())).collect();
    let v = rm.score(&items)?;
    atomic_write(path, serde_json::to_string(&v).map_err(|e| Error::Invalid(e.to_string()))?.as_bytes())?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> ExperimentConfig {
        let text = format!(
            "output_dir = \"x\"\nmodel = \"m\"\nmethods = [\"meet-prompt\", \"meet-lora\"]\n\
             [method.meet-lora]\ntrain = {{ control_lr = 2e-4 }}\n{extra}"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn sweep_sizes_reuse_the_main_runs_and_set_the_size() {
        let c = cfg("[sweep]\nprompt_n = [1, 20, 50]\nlora_r = [8, 16]");
        let names: Vec<String> = c.sweep_points().unwrap().into_iter().map(|p| p.method).collect();
        assert_eq!(names, ["meet-prompt-n1", "meet-prompt", "meet-prompt-n50", "meet-lora-r8", "meet-lora"]);
        let p = c.run_config("meet-prompt-n50", 3).unwrap();
        assert_eq!(p.prompt.unwrap().n, 50);
        assert!(p.output_dir.ends_with("runs/meet-prompt-n50-seed3"));
        let l = c.run_config("meet-lora-r8", 0).unwrap();
        let lora = l.lora.unwrap();
        assert_eq!((lora.r, lora.alpha), (8, 16.0));
        // The family's own table still applies to its sweep runs.
        assert_eq!(l.train.control_lr, Some(2e-4));
        let e = c.run_config("meet-lora-rx", 0).unwrap_err().to_string();
        assert!(e.contains("whole number"), "{e}");
        assert!(cfg("[sweep]\nprompt_n = [0]").sweep_points().is_err());
    }

    #[test]
    fn the_reward_model_trains_on_the_human_pairs() {
        let c = cfg("[train]\nlr = 1e-5\n[reward_model]\ntrain = { epochs = 2 }");
        let r = c.reward_config().unwrap();
        assert!(r.data.train.ends_with("data/human_pairs.jsonl"));
        assert_eq!((r.train.lr, r.train.epochs), (1e-5, 2));
        assert!(r.output_dir.ends_with("runs/reward-model"));
    }
}
