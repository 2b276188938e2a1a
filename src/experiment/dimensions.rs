//! The two-dimensions experiment: one model holding two preference dimensions at once —
//! sentiment (`positive` / `negative`, judged by VADER) and length (`concise` / `verbose`, in
//! response tokens) — trained together and combined at inference, against one DPO model per
//! target combination and against Rewards-in-Context.
//!
//! 1. Task: continuation prompts from the rated snippets (as the sentiment experiment's).
//! 2. Data: `[pairs] samples` base-model responses per training prompt (stopping at `stop_strings`:
//!    `"\n"` makes a response one paragraph, which this base model often ends within the budget,
//!    where it seldom emits EOS), each with its VADER score and length. From the same responses: a sentiment pair (best / worst by VADER, `"dimension":
//!    "sentiment"`), a length pair (the shortest response that ended before the budget against the
//!    longest, at least `min_length_gap` tokens apart, `"dimension": "length"`), RiC's scored rows
//!    (every response with both scores), and for each of the four combinations a DPO file holding
//!    both pair sets oriented toward it (no dimension: one preference per run).
//! 3. Training: every method with every seed; `dpo` trains four models per seed (from the base
//!    model, as every other method here).
//! 4. Evaluation: every model under every combination (a DPO model under its own), the base model
//!    once, and the trade-off fronts: MEET-LoRA with `sentiment=positive:w,length=concise:1-w` and
//!    RiC with requested scores moved the same way (RiC's mapping of preference weights to the
//!    normalised scores' range seen in training), for each `[fronts] weights` w.
//! 5. `report.md` ([`super::report`]'s sibling tables here), figures and `results.jsonl`.
//!
//! Every step's outputs are kept in `output_dir` and reused when the experiment is run again.

use super::plots::{xy_errors, XyPoint, XySeries};
use super::{merge, record_time, ExperimentConfig, Timing};
use crate::controls::Controlled;
use crate::data::sentiment::{read_snippets, sentiment_task, write_task, TaskOptions};
use crate::eval::sample::{evaluate, paired_scores, read_prompts, summarize, EvalOptions, Sample, Summary};
use crate::eval::stats::{mean_ci, win_rate, Estimate};
use crate::eval::{judge_by_name, Judge};
use crate::files::{atomic_write, read_jsonl, write_jsonl};
use crate::generate::SamplingParams;
use crate::methods::config::RunConfig;
use crate::{ui, Error, LoadOptions, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const SENTIMENT: &str = "sentiment";
pub const LENGTH: &str = "length";
/// Each dimension's controls: the first is what a pair's chosen response trains.
pub const SENTIMENT_CONTROLS: [&str; 2] = ["positive", "negative"];
pub const LENGTH_CONTROLS: [&str; 2] = ["concise", "verbose"];

/// The value of the top-level `experiment` key that selects this experiment.
pub const KIND: &str = "two-dimensions";

/// A target combination: one control of each dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Combination {
    /// Index into [`SENTIMENT_CONTROLS`] and [`LENGTH_CONTROLS`].
    pub sentiment: usize,
    pub length: usize,
}

impl Combination {
    pub fn all() -> [Combination; 4] {
        [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(sentiment, length)| Combination { sentiment, length })
    }
    /// `positive+concise`.
    pub fn name(&self) -> String {
        format!("{}+{}", SENTIMENT_CONTROLS[self.sentiment], LENGTH_CONTROLS[self.length])
    }
    /// The `--control` selection of a model with both dimensions.
    pub fn selection(&self) -> String {
        format!("{},{}", SENTIMENT_CONTROLS[self.sentiment], LENGTH_CONTROLS[self.length])
    }
}

/// The experiment file (`examples/two-dimensions.toml`). Every section is required: the file says
/// what ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DimensionsConfig {
    /// `"two-dimensions"`.
    pub experiment: String,
    pub output_dir: PathBuf,
    /// The base model every method starts from.
    pub model: String,
    pub snippets: PathBuf,
    pub seeds: Vec<u64>,
    /// Sampling temperature of the evaluations.
    pub temperature: f64,
    /// `meet-prompt`, `meet-lora` (and their `-nN` / `-rR` sizes), `control-token`, `coh`, `ric`,
    /// `dpo` (four models per seed).
    pub methods: Vec<String>,
    /// `[method.NAME]` run options over the built-in ones (as in the sentiment experiment).
    #[serde(default)]
    pub method: toml::Table,
    pub task: TaskSection,
    pub pairs: PairsSection,
    pub eval: EvalSection,
    /// `[train]` options of every method.
    pub train: toml::Table,
    pub fronts: FrontsSection,
}

/// `[task]`: prompts of `words` words from disjoint snippets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    pub words: usize,
    pub train: usize,
    pub eval: usize,
    pub seed: u64,
}

/// `[pairs]`: the base model's samples the data is built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairsSection {
    pub samples: usize,
    /// The token budget: large enough that short answers end on their own.
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// The sentiment judge: `vader` or `vader-full`.
    pub judge: String,
    /// Smallest length difference (tokens) of a length pair.
    pub min_length_gap: usize,
    /// Generation stops at these (`["\n"]`: a response is one paragraph, which the base model
    /// often ends before the budget, where it seldom emits EOS).
    pub stop_strings: Vec<String>,
    pub batch: usize,
}

/// `[eval]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub samples: usize,
    pub max_new_tokens: usize,
    pub stop_strings: Vec<String>,
    pub batch: usize,
}

/// `[fronts]`: the weights `w` of the trade-off fronts (sentiment `w`, conciseness `1 − w`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontsSection {
    pub weights: Vec<f64>,
}

/// How a method takes the two dimensions.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// `model.dimensions` with the dimension-labelled pairs (MEET, control tokens, CoH).
    Controls,
    /// Scored rows (RiC).
    Scores,
    /// One model per combination on oriented pairs (DPO).
    PerCombination,
}

/// One training run of the experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Experiment method name (`meet-lora`, `dpo`, ...).
    pub method: String,
    /// The combination a DPO run targets.
    pub combination: Option<Combination>,
    pub seed: u64,
}

impl Run {
    /// `meet-lora-seed0`, `dpo-positive+concise-seed1`.
    pub fn name(&self) -> String {
        match self.combination {
            Some(c) => format!("{}-{}-seed{}", self.method, c.name(), self.seed),
            None => format!("{}-seed{}", self.method, self.seed),
        }
    }
}

impl DimensionsConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))?;
        cfg.check().map_err(|e| Error::parse(path, e.to_string()))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if self.experiment != KIND {
            return Err(Error::Invalid(format!("experiment = {:?}: this file type is {KIND:?}", self.experiment)));
        }
        if self.seeds.is_empty() || self.methods.is_empty() {
            return Err(Error::Invalid("seeds and methods must not be empty".into()));
        }
        if !matches!(self.pairs.judge.as_str(), "vader" | "vader-full") {
            return Err(Error::Invalid(format!("[pairs] judge {:?}: vader or vader-full", self.pairs.judge)));
        }
        if self.pairs.samples < 2 {
            return Err(Error::Invalid("[pairs] samples: at least 2 per prompt make a pair".into()));
        }
        if let Some(w) = self.fronts.weights.iter().find(|w| !(0.0..=1.0).contains(*w)) {
            return Err(Error::Invalid(format!("[fronts] weights: {w} is outside 0..1")));
        }
        for r in self.runs()? {
            self.run_config(&r).map_err(|e| Error::Invalid(format!("method '{}': {e}", r.method)))?;
        }
        Ok(())
    }

    /// The `--quick` profile: the same steps on a few prompts, one seed and a few optimizer steps
    /// per method, in `output_dir/quick`.
    pub fn quick(&mut self) {
        self.output_dir = self.output_dir.join("quick");
        self.seeds.truncate(1);
        self.task.train = self.task.train.min(16);
        self.task.eval = self.task.eval.min(8);
        self.pairs.samples = self.pairs.samples.min(3);
        self.pairs.max_new_tokens = self.pairs.max_new_tokens.min(16);
        self.pairs.min_length_gap = self.pairs.min_length_gap.min(2);
        self.eval.samples = 1;
        self.eval.max_new_tokens = self.eval.max_new_tokens.min(16);
        if self.fronts.weights.len() > 3 {
            self.fronts.weights = vec![0.0, 0.5, 1.0];
        }
        super::quick_training(&mut self.train, &mut self.method);
    }

    fn dir(&self, parts: &[&str]) -> PathBuf {
        parts.iter().fold(self.output_dir.clone(), |p, s| p.join(s))
    }

    fn kind(method: &str) -> Result<Kind> {
        let (base, _) = ExperimentConfig::variant(method)?;
        let (registered, _) = ExperimentConfig::entry(base)?;
        match registered {
            "meet" | "control-token" | "coh" => Ok(Kind::Controls),
            "ric" => Ok(Kind::Scores),
            "dpo" => Ok(Kind::PerCombination),
            other => Err(Error::Invalid(format!(
                "method '{method}' ({other}) has no control of two dimensions: this experiment takes meet-prompt, \
                 meet-lora (and their -nN / -rR sizes), control-token, coh, ric and dpo"
            ))),
        }
    }

    /// Every training run: methods by seed, four per seed for DPO.
    pub fn runs(&self) -> Result<Vec<Run>> {
        let mut out = Vec::new();
        for &seed in &self.seeds {
            for m in &self.methods {
                if Self::kind(m)? == Kind::PerCombination {
                    for c in Combination::all() {
                        out.push(Run { method: m.clone(), combination: Some(c), seed });
                    }
                } else {
                    out.push(Run { method: m.clone(), combination: None, seed });
                }
            }
        }
        Ok(out)
    }

    fn dpo_data(&self, c: Combination) -> PathBuf {
        self.dir(&["data", &format!("dpo_{}.jsonl", c.name())])
    }

    /// The `meet train` configuration of a run.
    pub fn run_config(&self, r: &Run) -> Result<RunConfig> {
        let (base, size) = ExperimentConfig::variant(&r.method)?;
        let mut t = ExperimentConfig::defaults(base)?;
        merge(&mut t, &toml::Table::from_iter([("train".to_string(), toml::Value::Table(self.train.clone()))]));
        if let Some(toml::Value::Table(own)) = self.method.get(base) {
            merge(&mut t, own);
        }
        if let Some(size) = size {
            merge(&mut t, &size);
        }
        let kind = Self::kind(&r.method)?;
        let data = match (kind, r.combination) {
            (Kind::Controls, _) => {
                let model = t.entry("model").or_insert_with(|| toml::Value::Table(Default::default()));
                let toml::Value::Table(model) = model else {
                    return Err(Error::Invalid("[model] must be a table".into()));
                };
                model.remove("controls");
                let dims: toml::Table = [(LENGTH, LENGTH_CONTROLS), (SENTIMENT, SENTIMENT_CONTROLS)]
                    .into_iter()
                    .map(|(d, cs)| (d.to_string(), toml::Value::Array(cs.iter().map(|c| (*c).into()).collect())))
                    .collect();
                model.insert("dimensions".into(), toml::Value::Table(dims));
                self.dir(&["data", "pairs.jsonl"])
            }
            (Kind::Scores, _) => {
                let ric = t.entry("ric").or_insert_with(|| toml::Value::Table(Default::default()));
                if let toml::Value::Table(ric) = ric {
                    ric.insert("objectives".into(), toml::Value::Array(vec![SENTIMENT.into(), LENGTH.into()]));
                }
                self.dir(&["data", "ric.jsonl"])
            }
            (Kind::PerCombination, Some(c)) => self.dpo_data(c),
            (Kind::PerCombination, None) => {
                return Err(Error::Invalid(format!("'{}' trains one model per combination", r.method)))
            }
        };
        let q = |p: &Path| format!("{:?}", p.to_string_lossy());
        let over = vec![
            ("output_dir".to_string(), q(&self.dir(&["runs", &r.name()]))),
            ("model.source".to_string(), format!("{:?}", self.model)),
            ("data.train".to_string(), q(&data)),
            ("train.seed".to_string(), r.seed.to_string()),
        ];
        RunConfig::from_table(t, &over)
    }
}

/// A base-model response with both dimensions' scores.
fn usable(s: &Sample) -> bool {
    !s.response.trim().is_empty()
}

/// The training data built from the base model's scored samples (grouped by prompt).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BuiltData {
    /// Dimension-labelled preference records (sentiment, then length pairs per prompt).
    pub pairs: Vec<Value>,
    /// RiC's rows: every usable response with its scores.
    pub ric: Vec<Value>,
    /// Each combination's DPO records: both pair sets oriented toward it.
    pub dpo: Vec<(Combination, Vec<Value>)>,
    pub sentiment_pairs: usize,
    pub length_pairs: usize,
}

/// Builds every data file's records from `samples` (see the module documentation for the rules).
pub fn build_records(samples: &[Sample], min_length_gap: usize) -> BuiltData {
    let mut out = BuiltData::default();
    // (prompt, more positive, more negative) and (prompt, shorter, longer).
    let mut sentiment: Vec<(&str, &Sample, &Sample)> = Vec::new();
    let mut length: Vec<(&str, &Sample, &Sample)> = Vec::new();
    for group in samples.chunk_by(|a, b| a.prompt_index == b.prompt_index) {
        let ok: Vec<&Sample> = group.iter().filter(|s| usable(s)).collect();
        let prompt = group[0].prompt.as_str();
        let best = ok.iter().max_by(|a, b| a.score.total_cmp(&b.score));
        let worst = ok.iter().min_by(|a, b| a.score.total_cmp(&b.score));
        if let (Some(b), Some(w)) = (best, worst) {
            if b.score > w.score && b.response != w.response {
                out.pairs.push(json!({"prompt": prompt, "chosen": b.response, "rejected": w.response,
                    "dimension": SENTIMENT, "chosen_score": b.score, "rejected_score": w.score}));
                sentiment.push((prompt, b, w));
            }
        }
        // The shortest response that ended on its own, against the longest.
        let short = ok.iter().filter(|s| !s.cut).min_by_key(|s| s.tokens);
        let long = ok.iter().max_by_key(|s| s.tokens);
        if let (Some(s), Some(l)) = (short, long) {
            if l.tokens >= s.tokens + min_length_gap.max(1) && s.response != l.response {
                out.pairs.push(json!({"prompt": prompt, "chosen": s.response, "rejected": l.response,
                    "dimension": LENGTH, "chosen_tokens": s.tokens, "rejected_tokens": l.tokens}));
                length.push((prompt, s, l));
            }
        }
        for s in &ok {
            out.ric.push(json!({"prompt": prompt, "completion": s.response,
                "scores": {SENTIMENT: s.score, LENGTH: s.tokens as f64}}));
        }
    }
    out.sentiment_pairs = sentiment.len();
    out.length_pairs = length.len();
    for c in Combination::all() {
        let orient = |first: bool, p: &str, a: &Sample, b: &Sample| {
            let (ch, rj) = if first { (a, b) } else { (b, a) };
            json!({"prompt": p, "chosen": ch.response, "rejected": rj.response})
        };
        let mut recs: Vec<Value> = sentiment.iter().map(|(p, a, b)| orient(c.sentiment == 0, p, a, b)).collect();
        recs.extend(length.iter().map(|(p, a, b)| orient(c.length == 0, p, a, b)));
        out.dpo.push((c, recs));
    }
    out
}

/// RiC's normalised score range of each objective over its training rows: `[(min, max)]` of the
/// z-scores (population std, as RiC's normalisation), in `[sentiment, length]` order.
pub fn ric_ranges(rows: &[Value]) -> Result<[(f64, f64); 2]> {
    let mut out = [(0.0, 0.0); 2];
    for (j, name) in [SENTIMENT, LENGTH].into_iter().enumerate() {
        let v: Vec<f64> = rows.iter().filter_map(|r| r["scores"][name].as_f64()).collect();
        if v.len() != rows.len() || v.is_empty() {
            return Err(Error::Invalid(format!("RiC rows without a '{name}' score")));
        }
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        if std == 0.0 {
            return Err(Error::Invalid(format!("every RiC row has the same '{name}' score")));
        }
        let z = |x: f64| (x - mean) / std;
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(z(x)), b.max(z(x))));
        out[j] = (lo, hi);
    }
    Ok(out)
}

/// RiC's requested scores for preference weights (`w_sentiment` toward positive, `w_concise` toward
/// short): each objective's `min + w (max − min)` of its normalised range, length read backwards.
pub fn ric_selection(ranges: &[(f64, f64); 2], w_sentiment: f64, w_concise: f64) -> String {
    let (s, l) = (ranges[0], ranges[1]);
    let sentiment = s.0 + w_sentiment * (s.1 - s.0);
    let length = l.1 - w_concise * (l.1 - l.0);
    format!("{SENTIMENT}={sentiment:.1},{LENGTH}={length:.1}")
}

/// One evaluation of the experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DimCell {
    /// Experiment method name, or `base`.
    pub method: String,
    pub seed: u64,
    /// The combination asked for (none: the base model).
    pub combination: Option<String>,
    /// The front weight `w` (sentiment `w`, conciseness `1 − w`), for front points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front: Option<f64>,
    /// The `--control` the responses were drawn under.
    pub control: Option<String>,
    pub summary: Summary,
}

#[derive(Debug, Clone)]
struct Evaluated {
    cell: DimCell,
    samples: Vec<Sample>,
}

/// Runs (or continues) the experiment; returns the path of `report.md`.
pub fn run(cfg: &DimensionsConfig) -> Result<PathBuf> {
    let started = Instant::now();
    std::fs::create_dir_all(cfg.dir(&["data"])).map_err(|e| Error::io(&cfg.output_dir, e))?;
    build_task(cfg)?;
    let mut base = build_data(cfg)?;
    let runs = train_all(cfg)?;
    let base = match base.take() {
        Some(b) => b,
        None => Controlled::load(&cfg.model, &LoadOptions::default())?,
    };
    let judge = judge_by_name(&cfg.pairs.judge)?;
    let cells = evaluate_all(cfg, &runs, &base, judge.as_ref())?;
    ui::header("[5/5] report and figures");
    let provenance = crate::provenance::Provenance::current();
    let md = report(cfg, &cells, &provenance)?;
    let path = cfg.dir(&["report.md"]);
    atomic_write(&path, md.as_bytes())?;
    let mut lines = vec![json!({ "provenance": provenance })];
    for c in &cells {
        lines.push(serde_json::to_value(&c.cell).map_err(|e| Error::Invalid(e.to_string()))?);
    }
    write_jsonl(&cfg.dir(&["results.jsonl"]), &lines)?;
    ui::note(&format!("{} and its figures", path.display()));
    ui::note(&format!("this pass took {}", ui::duration(started.elapsed().as_secs_f64())));
    Ok(path)
}

fn build_task(cfg: &DimensionsConfig) -> Result<()> {
    let prompts_path = cfg.dir(&["data", "eval_prompts.jsonl"]);
    ui::header(&format!("[1/5] task: prompts from {}", cfg.snippets.display()));
    if prompts_path.is_file() {
        ui::note(&format!("kept from an earlier pass: {}", cfg.dir(&["data"]).display()));
        return Ok(());
    }
    let t0 = Instant::now();
    let snippets = read_snippets(&cfg.snippets)?;
    let t = &cfg.task;
    let o = TaskOptions {
        words: t.words,
        train: t.train,
        eval: t.eval,
        pairs: 0,
        seed: t.seed,
        instruction: super::INSTRUCTION.into(),
        ..Default::default()
    };
    let task = sentiment_task(&snippets, &o)?;
    write_task(&task, &cfg.dir(&["data"]))?;
    ui::note(&format!("{} training prompts, {} held-out prompts", task.train_prompts.len(), task.eval_prompts.len()));
    record_time(&cfg.output_dir, "data", "task", t0)
}

/// Phase 2: the base model's scored samples and every data file built from them. Returns the base
/// model when it was loaded.
fn build_data(cfg: &DimensionsConfig) -> Result<Option<Controlled>> {
    let p = &cfg.pairs;
    ui::header(&format!(
        "[2/5] data: {} samples per training prompt from {} (up to {} tokens), judged by {} and length",
        p.samples, cfg.model, p.max_new_tokens, p.judge
    ));
    // The DPO files are written last: their presence marks a whole data phase.
    let done = Combination::all().iter().all(|c| cfg.dpo_data(*c).is_file());
    if done {
        ui::note(&format!("kept from an earlier pass: {}", cfg.dir(&["data"]).display()));
        return Ok(None);
    }
    let t0 = Instant::now();
    let samples_path = cfg.dir(&["data", "samples.jsonl"]);
    let mut base = None;
    let samples: Vec<Sample> = if samples_path.is_file() {
        read_jsonl(&samples_path)?
    } else {
        let model = base.insert(Controlled::load(&cfg.model, &LoadOptions::default())?);
        let opts = EvalOptions {
            control: None,
            chat: false,
            samples: p.samples,
            params: SamplingParams {
                temperature: p.temperature,
                max_new_tokens: p.max_new_tokens,
                stop_strings: p.stop_strings.clone(),
                seed: 7,
                ..Default::default()
            },
            batch: p.batch,
            progress: Some("sampling".into()),
        };
        let prompts = read_prompts(&cfg.dir(&["data", "train_prompts.jsonl"]))?;
        let s = evaluate(model, None, judge_by_name(&p.judge)?.as_ref(), &prompts, &opts)?;
        write_jsonl(&samples_path, &s)?;
        s
    };
    let built = checked_records(&samples, p.min_length_gap)?;
    write_jsonl(&cfg.dir(&["data", "pairs.jsonl"]), &built.pairs)?;
    write_jsonl(&cfg.dir(&["data", "ric.jsonl"]), &built.ric)?;
    for (c, recs) in &built.dpo {
        write_jsonl(&cfg.dpo_data(*c), recs)?;
    }
    let cut = samples.iter().filter(|s| s.cut).count();
    ui::note(&format!(
        "{} samples ({cut} cut at the budget): {} sentiment pairs, {} length pairs, {} RiC rows, 4 DPO files of {} pairs",
        samples.len(),
        built.sentiment_pairs,
        built.length_pairs,
        built.ric.len(),
        built.sentiment_pairs + built.length_pairs
    ));
    record_time(&cfg.output_dir, "data", "samples", t0)?;
    Ok(base)
}

fn checked_records(samples: &[Sample], gap: usize) -> Result<BuiltData> {
    let built = build_records(samples, gap);
    if built.sentiment_pairs == 0 || built.length_pairs == 0 {
        return Err(Error::Invalid(format!(
            "the base model's samples gave {} sentiment and {} length pairs: more samples per prompt, or a larger \
             [pairs] max_new_tokens (length pairs need a response that ends before it)",
            built.sentiment_pairs, built.length_pairs
        )));
    }
    Ok(built)
}

/// Phase 3: every run (kept when finished).
fn train_all(cfg: &DimensionsConfig) -> Result<Vec<Run>> {
    let runs = cfg.runs()?;
    ui::header(&format!(
        "[3/5] training: {} runs ({} methods x {} seed(s); dpo: one model per combination)",
        runs.len(),
        cfg.methods.len(),
        cfg.seeds.len()
    ));
    let t3 = Instant::now();
    let mut trained = 0;
    for (k, r) in runs.iter().enumerate() {
        let rc = cfg.run_config(r)?;
        if crate::methods::stage::finished(&rc).is_none() {
            let t0 = Instant::now();
            ui::header(&format!("run {}/{}: {} -> {}", k + 1, runs.len(), r.name(), rc.output_dir.display()));
            crate::methods::run(&rc, true)?;
            record_time(&cfg.output_dir, "train", &r.name(), t0)?;
            trained += 1;
        }
    }
    ui::header("[3/5] training done");
    ui::note(&format!(
        "{trained} runs trained in {}, {} kept from an earlier pass",
        ui::duration(t3.elapsed().as_secs_f64()),
        runs.len() - trained
    ));
    Ok(runs)
}

/// One evaluation to run: which cell, which model folder, under which control.
struct Job {
    cell_name: String,
    method: String,
    seed: u64,
    model: Option<String>,
    combination: Option<Combination>,
    front: Option<f64>,
    control: Option<String>,
}

/// Phase 4: the evaluations (each kept in `eval/NAME.jsonl`).
fn evaluate_all(cfg: &DimensionsConfig, runs: &[Run], base: &Controlled, judge: &dyn Judge) -> Result<Vec<Evaluated>> {
    let prompts = read_prompts(&cfg.dir(&["data", "eval_prompts.jsonl"]))?;
    let ranges = ric_ranges(&read_jsonl::<Value>(&cfg.dir(&["data", "ric.jsonl"]))?)?;
    let mut jobs = Vec::new();
    for &seed in &cfg.seeds {
        jobs.push(Job {
            cell_name: format!("base-seed{seed}"),
            method: "base".into(),
            seed,
            model: None,
            combination: None,
            front: None,
            control: None,
        });
    }
    for r in runs {
        let dir = cfg.run_config(r)?.output_dir.join("final").to_string_lossy().into_owned();
        let kind = DimensionsConfig::kind(&r.method)?;
        let job = |combination: Option<Combination>, front: Option<f64>, control: Option<String>| {
            let label = match (front, combination) {
                (Some(w), _) => format!("front-w{w}"),
                (None, Some(c)) => c.name(),
                (None, None) => "plain".into(),
            };
            Job {
                cell_name: match r.combination {
                    Some(_) => r.name(),
                    None => format!("{}-{label}", r.name()),
                },
                method: r.method.clone(),
                seed: r.seed,
                model: Some(dir.clone()),
                combination,
                front,
                control,
            }
        };
        match kind {
            Kind::PerCombination => jobs.push(job(r.combination, None, None)),
            Kind::Controls | Kind::Scores => {
                for c in Combination::all() {
                    let sel = match kind {
                        Kind::Scores => {
                            ric_selection(&ranges, (c.sentiment == 0) as u8 as f64, (c.length == 0) as u8 as f64)
                        }
                        _ => c.selection(),
                    };
                    jobs.push(job(Some(c), None, Some(sel)));
                }
                let front = match kind {
                    Kind::Scores => true,
                    _ => r.method == "meet-lora",
                };
                if front {
                    for &w in &cfg.fronts.weights {
                        let sel = match kind {
                            Kind::Scores => ric_selection(&ranges, w, 1.0 - w),
                            _ => format!(
                                "{SENTIMENT}={}:{w},{LENGTH}={}:{}",
                                SENTIMENT_CONTROLS[0],
                                LENGTH_CONTROLS[0],
                                1.0 - w
                            ),
                        };
                        jobs.push(job(None, Some(w), Some(sel)));
                    }
                }
            }
        }
    }
    std::fs::create_dir_all(cfg.dir(&["eval"])).map_err(|e| Error::io(&cfg.output_dir, e))?;
    ui::header(&format!(
        "[4/5] evaluations: {} on {} held-out prompts x {} samples, up to {} tokens at T = {}",
        jobs.len(),
        prompts.len(),
        cfg.eval.samples,
        cfg.eval.max_new_tokens,
        cfg.temperature
    ));
    let t4 = Instant::now();
    let mut out = Vec::new();
    let mut loaded: Option<(String, Controlled)> = None;
    let mut computed_count = 0;
    for (k, j) in jobs.iter().enumerate() {
        let path = cfg.dir(&["eval", &format!("{}.jsonl", j.cell_name)]);
        let samples: Vec<Sample> = if path.is_file() {
            read_jsonl(&path)?
        } else {
            let t0 = Instant::now();
            let model = match &j.model {
                None => base,
                Some(dir) => {
                    if loaded.as_ref().map(|(d, _)| d != dir).unwrap_or(true) {
                        loaded = Some((dir.clone(), Controlled::load(dir, &LoadOptions::default())?));
                    }
                    &loaded.as_ref().expect("loaded above").1
                }
            };
            let opts = EvalOptions {
                control: j.control.clone(),
                chat: false,
                samples: cfg.eval.samples,
                params: SamplingParams {
                    temperature: cfg.temperature,
                    max_new_tokens: cfg.eval.max_new_tokens,
                    stop_strings: cfg.eval.stop_strings.clone(),
                    seed: 1000 + j.seed,
                    ..Default::default()
                },
                batch: cfg.eval.batch,
                progress: Some(format!("eval {}/{}: {}", k + 1, jobs.len(), j.cell_name)),
            };
            let s = evaluate(model, Some(base), judge, &prompts, &opts)?;
            write_jsonl(&path, &s)?;
            record_time(&cfg.output_dir, "eval", &j.cell_name, t0)?;
            computed_count += 1;
            s
        };
        let cell = DimCell {
            method: j.method.clone(),
            seed: j.seed,
            combination: j.combination.map(|c| c.name()),
            front: j.front,
            control: j.control.clone(),
            summary: summarize(&samples, j.seed)?,
        };
        out.push(Evaluated { cell, samples });
    }
    ui::note(&format!(
        "{} evaluations ({computed_count} computed in {}, the rest kept from an earlier pass)",
        out.len(),
        ui::duration(t4.elapsed().as_secs_f64())
    ));
    Ok(out)
}

fn fmt(e: &Estimate) -> String {
    format!("{:.3} [{:.3}, {:.3}]", e.value, e.lo, e.hi)
}

fn fmt_len(e: &Estimate) -> String {
    format!("{:.1} [{:.1}, {:.1}]", e.value, e.lo, e.hi)
}

/// A sample's value on a dimension: VADER score or response tokens.
fn value(s: &Sample, dim: &str) -> f64 {
    if dim == SENTIMENT {
        s.score
    } else {
        s.tokens as f64
    }
}

/// The cells of one method (pooled over seeds) and the base model's, paired by seed.
struct Grid<'a> {
    all: &'a [Evaluated],
}

impl<'a> Grid<'a> {
    fn cells(&self, method: &str, combination: Option<&str>, front: Option<f64>) -> Vec<&'a Evaluated> {
        self.all
            .iter()
            .filter(|e| {
                e.cell.method == method && e.cell.combination.as_deref() == combination && e.cell.front == front
            })
            .collect()
    }

    fn pooled(cells: &[&Evaluated]) -> Vec<Sample> {
        cells.iter().flat_map(|e| e.samples.iter().cloned()).collect()
    }

    /// `f` of `a`'s and `b`'s responses paired by (seed, prompt, sample), through
    /// [`paired_scores`] (which refuses evaluations of different prompts).
    fn paired(a: &[&Evaluated], b: &[&Evaluated], f: impl Fn(&Sample) -> f64) -> Result<(Vec<f64>, Vec<f64>)> {
        let valued =
            |e: &Evaluated| -> Vec<Sample> { e.samples.iter().map(|s| Sample { score: f(s), ..s.clone() }).collect() };
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for ea in a {
            let Some(eb) = b.iter().find(|x| x.cell.seed == ea.cell.seed) else { continue };
            let p = paired_scores(&valued(ea), &valued(eb))?;
            x.extend(p.a);
            y.extend(p.b);
        }
        Ok((x, y))
    }

    /// `f(a) − f(b)` per (seed, prompt, sample) both have.
    fn differences(a: &[&Evaluated], b: &[&Evaluated], f: impl Fn(&Sample) -> f64) -> Result<Vec<f64>> {
        let (x, y) = Self::paired(a, b, f)?;
        Ok(x.iter().zip(&y).map(|(x, y)| x - y).collect())
    }
}

/// A combination's name with its mean VADER and mean length.
type Labelled = (String, Estimate, Estimate);

/// Mean and interval of pooled samples on a dimension.
fn estimate(samples: &[Sample], dim: &str, seed: u64) -> Result<Estimate> {
    mean_ci(&samples.iter().map(|s| value(s, dim)).collect::<Vec<_>>(), seed)
}

fn report(cfg: &DimensionsConfig, all: &[Evaluated], provenance: &crate::provenance::Provenance) -> Result<String> {
    let g = Grid { all };
    let seed = cfg.seeds[0];
    let mut r = String::new();
    let count = |name: &str| read_jsonl::<Value>(&cfg.dir(&["data", name])).map(|v| v.len()).unwrap_or(0);
    let pairs: Vec<Value> = read_jsonl(&cfg.dir(&["data", "pairs.jsonl"])).unwrap_or_default();
    let n_dim = |d: &str| pairs.iter().filter(|p| p["dimension"] == d).count();
    let _ = writeln!(r, "# Two preference dimensions in one model: sentiment × length\n");
    let _ = writeln!(
        r,
        "Base model {}; seeds {:?}. Data: {} base-model samples per training prompt ({} prompts, up to {} tokens, \
         stopping at {:?}, T = {}) give {} sentiment pairs (best / worst by {}) and {} length pairs (the shortest response that ended \
         before the budget / the longest, ≥ {} tokens apart), {} RiC rows (every response with both scores) and, \
         per combination, a DPO file of both pair sets oriented toward it. Evaluation: {} held-out prompts × {} \
         samples per seed at T = {}, up to {} new tokens, stopping at {:?}. Sentiment = VADER compound ({}), length = response \
         tokens. Intervals: 95% bootstrap over responses pooled over seeds; differences and win rates are paired \
         by (seed, prompt, sample).\n",
        cfg.model,
        cfg.seeds,
        cfg.pairs.samples,
        cfg.task.train,
        cfg.pairs.max_new_tokens,
        cfg.pairs.stop_strings,
        cfg.pairs.temperature,
        n_dim(SENTIMENT),
        cfg.pairs.judge,
        n_dim(LENGTH),
        cfg.pairs.min_length_gap,
        count("ric.jsonl"),
        cfg.task.eval,
        cfg.eval.samples,
        cfg.temperature,
        cfg.eval.max_new_tokens,
        cfg.eval.stop_strings,
        cfg.pairs.judge,
    );
    let base = g.cells("base", None, None);
    let base_pooled = Grid::pooled(&base);
    // The base model's point in every figure.
    let base_series = match base.is_empty() {
        true => None,
        false => Some(XySeries {
            name: "base".into(),
            points: vec![XyPoint {
                x: estimate(&base_pooled, SENTIMENT, seed)?,
                y: estimate(&base_pooled, LENGTH, seed)?,
                label: "base".into(),
            }],
        }),
    };
    if !base.is_empty() {
        let _ = writeln!(
            r,
            "Base model: VADER {}, length {} tokens, cut share {:.2}.\n",
            fmt(&estimate(&base_pooled, SENTIMENT, seed)?),
            fmt_len(&estimate(&base_pooled, LENGTH, seed)?),
            base_pooled.iter().filter(|s| s.cut).count() as f64 / base_pooled.len() as f64
        );
    }

    // Every combination of every method.
    let _ = writeln!(r, "## Each combination\n");
    let _ = writeln!(
        r,
        "Win vs base: the share of responses better than the base model's paired response in the combination's \
         direction on that dimension (ties half): more positive (or negative) VADER, fewer (or more) tokens.\n"
    );
    let _ = writeln!(
        r,
        "| method | combination | VADER | length | cut share | KL to base | win vs base: sentiment | win vs base: length |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|");
    let mut grid_points: Vec<(String, Vec<Labelled>)> = Vec::new();
    for m in &cfg.methods {
        let mut pts = Vec::new();
        for c in Combination::all() {
            let cells = g.cells(m, Some(&c.name()), None);
            if cells.is_empty() {
                continue;
            }
            let pooled = Grid::pooled(&cells);
            let s = summarize(&pooled, seed)?;
            let sign_s = if c.sentiment == 0 { 1.0 } else { -1.0 };
            let sign_l = if c.length == 0 { -1.0 } else { 1.0 };
            let (a, b) = Grid::paired(&cells, &base, |x| sign_s * x.score)?;
            let ws = win_rate(&a, &b, seed)?;
            let (a, b) = Grid::paired(&cells, &base, |x| sign_l * x.tokens as f64)?;
            let wl = win_rate(&a, &b, seed)?;
            let _ = writeln!(
                r,
                "| {m} | {} | {} | {} | {:.2} | {} | {} | {} |",
                c.name(),
                fmt(&s.score),
                fmt_len(&s.length),
                s.cut_share.value,
                s.kl.as_ref().map(|k| format!("{:.2}", k.value)).unwrap_or("–".into()),
                fmt(&ws),
                fmt(&wl)
            );
            pts.push((c.name(), s.score, s.length));
        }
        grid_points.push((m.clone(), pts));
    }

    // 2 × 2 grids.
    let _ = writeln!(r, "\n## The 2 × 2 grid of each method\n");
    let _ = writeln!(
        r,
        "Mean VADER / mean length (tokens) per combination; rows: sentiment control, columns: length control.\n"
    );
    for (m, pts) in &grid_points {
        if pts.is_empty() {
            continue;
        }
        let _ = writeln!(r, "**{m}**\n\n| | {} | {} |\n|---|---|---|", LENGTH_CONTROLS[0], LENGTH_CONTROLS[1]);
        for s in SENTIMENT_CONTROLS {
            let cell = |l: &str| {
                pts.iter()
                    .find(|(n, _, _)| *n == format!("{s}+{l}"))
                    .map(|(_, v, t)| format!("{:.3} / {:.1}", v.value, t.value))
                    .unwrap_or("–".into())
            };
            let _ = writeln!(r, "| {s} | {} | {} |", cell(LENGTH_CONTROLS[0]), cell(LENGTH_CONTROLS[1]));
        }
        let _ = writeln!(r);
        let path = cfg.dir(&[&format!("grid-{m}.png")]);
        let mut series = vec![XySeries {
            name: m.clone(),
            points: pts.iter().map(|(n, v, t)| XyPoint { x: *v, y: *t, label: n.clone() }).collect(),
        }];
        series.extend(base_series.clone());
        xy_errors(&path, &format!("{m}: the four combinations"), "mean VADER", "mean length (tokens)", &series, false)?;
        let _ = writeln!(r, "![{m}](grid-{m}.png)\n");
    }

    // Own and cross effects.
    let _ = writeln!(r, "## What each control moves: own effect and cross-effect\n");
    let _ = writeln!(
        r,
        "Sentiment switch: (positive − negative) with the length control held, pooled over both length controls; \
         length switch: (concise − verbose) with the sentiment control held. A control that works moves its own \
         dimension (VADER up under positive, tokens down under concise) and leaves the other one (cross-effect \
         interval containing 0). For DPO the cells are four different models.\n"
    );
    let _ = writeln!(
        r,
        "| method | sentiment switch: Δ VADER (own) | Δ length (cross) | length switch: Δ length (own) | Δ VADER (cross) |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|");
    for m in &cfg.methods {
        let cell = |s: usize, l: usize| g.cells(m, Some(&Combination { sentiment: s, length: l }.name()), None);
        if Combination::all().iter().any(|c| cell(c.sentiment, c.length).is_empty()) {
            continue;
        }
        let diffs = |dim: &str, switch_sentiment: bool| -> Result<Vec<f64>> {
            let mut out = Vec::new();
            for held in 0..2 {
                let (a, b) =
                    if switch_sentiment { (cell(0, held), cell(1, held)) } else { (cell(held, 0), cell(held, 1)) };
                out.extend(Grid::differences(&a, &b, |s| value(s, dim))?);
            }
            Ok(out)
        };
        let _ = writeln!(
            r,
            "| {m} | {} | {} | {} | {} |",
            fmt(&mean_ci(&diffs(SENTIMENT, true)?, seed)?),
            fmt_len(&mean_ci(&diffs(LENGTH, true)?, seed)?),
            fmt_len(&mean_ci(&diffs(LENGTH, false)?, seed)?),
            fmt(&mean_ci(&diffs(SENTIMENT, false)?, seed)?)
        );
    }

    // Fronts.
    let fronts: Vec<&String> =
        cfg.methods.iter().filter(|m| all.iter().any(|e| &e.cell.method == *m && e.cell.front.is_some())).collect();
    if !fronts.is_empty() {
        let _ = writeln!(r, "\n## Trade-off fronts: positive against concise\n");
        let _ = writeln!(
            r,
            "Weight w on positive and 1 − w on concise: MEET-LoRA as `--control sentiment=positive:w,length=concise:1-w` \
             (both adapters active, scaled); RiC with the requested normalised scores `min + w (max − min)` for \
             sentiment and `max − (1 − w)(max − min)` for length over the ranges seen in its training rows (RiC's \
             mapping of preferences to rewards). Higher VADER and fewer tokens are better on both axes.\n"
        );
        let _ = writeln!(r, "| method | w | control | VADER | length | cut share |\n|---|---|---|---|---|---|");
        let mut series = Vec::new();
        let mut front_points: Vec<(String, Vec<(Estimate, Estimate)>)> = Vec::new();
        for m in &fronts {
            let mut pts = Vec::new();
            let mut fp = Vec::new();
            for &w in &cfg.fronts.weights {
                let cells = g.cells(m, None, Some(w));
                if cells.is_empty() {
                    continue;
                }
                let s = summarize(&Grid::pooled(&cells), seed)?;
                let _ = writeln!(
                    r,
                    "| {m} | {w} | `{}` | {} | {} | {:.2} |",
                    cells[0].cell.control.as_deref().unwrap_or(""),
                    fmt(&s.score),
                    fmt_len(&s.length),
                    s.cut_share.value
                );
                pts.push(XyPoint { x: s.score, y: s.length, label: format!("w={w}") });
                fp.push((s.score, s.length));
            }
            series.push(XySeries { name: (*m).clone(), points: pts });
            front_points.push(((*m).clone(), fp));
        }
        series.extend(base_series.clone());
        xy_errors(
            &cfg.dir(&["fronts.png"]),
            "Trade-off fronts: positive (w) against concise (1 - w)",
            "mean VADER",
            "mean length (tokens)",
            &series,
            true,
        )?;
        let _ = writeln!(r, "\n![fronts](fronts.png)\n");
        let _ = writeln!(r, "{}", dominance(&front_points));
    }

    // Training cost.
    let timings: Vec<Timing> = read_jsonl(&cfg.dir(&["timings.jsonl"])).unwrap_or_default();
    let runs = cfg.runs()?;
    let _ = writeln!(r, "## Training cost\n");
    let _ = writeln!(
        r,
        "Wall time of training (2 threads unless the provenance says otherwise), summed over a method's runs; DPO \
         trains one model per combination, every other method one model for all four.\n"
    );
    let _ = writeln!(
        r,
        "| method | models per seed | training minutes per seed (mean) | total minutes |\n|---|---|---|---|"
    );
    for m in &cfg.methods {
        let names: Vec<String> = runs.iter().filter(|x| &x.method == m).map(|x| x.name()).collect();
        let secs: f64 =
            timings.iter().filter(|t| t.kind == "train" && names.contains(&t.name)).map(|t| t.seconds).sum();
        let per_seed = names.len() / cfg.seeds.len();
        let _ = writeln!(r, "| {m} | {per_seed} | {:.1} | {:.1} |", secs / 60.0 / cfg.seeds.len() as f64, secs / 60.0);
    }
    let sum = |k: &str| timings.iter().filter(|t| t.kind == k).map(|t| t.seconds).sum::<f64>() / 60.0;
    let _ = writeln!(
        r,
        "\n## Wall time\n\n| step | minutes |\n|---|---|\n| task and data | {:.1} |\n| training | {:.1} |\n\
         | evaluation | {:.1} |\n| **total** | **{:.1}** |\n\nSummed over the passes that computed each step \
         (`timings.jsonl`).\n",
        sum("data"),
        sum("train"),
        sum("eval"),
        sum("data") + sum("train") + sum("eval")
    );
    let _ = writeln!(r, "Raw figures: `results.jsonl`; every scored response: `eval/`; training runs: `runs/`.\n");
    let _ = writeln!(r, "Made by {}.", provenance.line());
    Ok(r)
}

/// Which front dominates: for each front, how many of its points another front's point beats on
/// both axes (higher VADER, fewer tokens) by the means, and by intervals that do not overlap.
fn dominance(fronts: &[(String, Vec<(Estimate, Estimate)>)]) -> String {
    let mut out = String::new();
    for (i, (a, pa)) in fronts.iter().enumerate() {
        for (j, (b, pb)) in fronts.iter().enumerate() {
            if i == j {
                continue;
            }
            let by_means =
                pa.iter().filter(|(v, l)| pb.iter().any(|(v2, l2)| v2.value >= v.value && l2.value <= l.value)).count();
            let by_intervals =
                pa.iter().filter(|(v, l)| pb.iter().any(|(v2, l2)| v2.lo > v.hi && l2.hi < l.lo)).count();
            let _ = writeln!(
                out,
                "- {by_means} of {a}'s {} points are dominated by a point of {b} by the means ({by_intervals} with \
                 both intervals apart).",
                pa.len()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(p: usize, s: usize, score: f64, tokens: usize, cut: bool) -> Sample {
        Sample {
            prompt_index: p,
            sample_index: s,
            prompt: format!("prompt {p}"),
            response: format!("response {p}.{s}"),
            score,
            tokens,
            cut,
            kl: None,
        }
    }

    #[test]
    fn data_follows_the_rules() {
        let samples = vec![
            sample(0, 0, 0.5, 10, false),
            sample(0, 1, -0.2, 30, true),
            sample(0, 2, 0.1, 4, false),
            // Prompt 1: all cut, one score: neither pair.
            sample(1, 0, 0.0, 30, true),
            sample(1, 1, 0.0, 30, true),
        ];
        let b = build_records(&samples, 4);
        assert_eq!((b.sentiment_pairs, b.length_pairs), (1, 1));
        assert_eq!(b.pairs[0]["chosen"], "response 0.0");
        assert_eq!(b.pairs[0]["rejected"], "response 0.1");
        assert_eq!(b.pairs[0]["dimension"], SENTIMENT);
        // Shortest that ended (4 tokens) against the longest (30, cut).
        assert_eq!(b.pairs[1]["chosen"], "response 0.2");
        assert_eq!(b.pairs[1]["rejected"], "response 0.1");
        assert_eq!(b.pairs[1]["dimension"], LENGTH);
        assert_eq!(b.ric.len(), 5);
        assert_eq!(b.ric[1]["scores"][LENGTH], 30.0);
        // negative+verbose: both pairs reversed.
        let (c, recs) = &b.dpo[3];
        assert_eq!(c.name(), "negative+verbose");
        assert_eq!(
            (recs[0]["chosen"].as_str(), recs[1]["chosen"].as_str()),
            (Some("response 0.1"), Some("response 0.1"))
        );
        let (c, recs) = &b.dpo[0];
        assert_eq!(c.name(), "positive+concise");
        assert_eq!(
            (recs[0]["chosen"].as_str(), recs[1]["chosen"].as_str()),
            (Some("response 0.0"), Some("response 0.2"))
        );
        // A gap below the minimum gives no length pair.
        assert_eq!(build_records(&samples, 27).length_pairs, 0);
    }

    #[test]
    fn ric_requests_span_the_training_range() {
        let rows: Vec<Value> = [(-1.0, 10.0), (1.0, 30.0)]
            .iter()
            .map(|(s, l)| json!({"prompt": "p", "completion": "c", "scores": {SENTIMENT: s, LENGTH: l}}))
            .collect();
        let r = ric_ranges(&rows).unwrap();
        assert_eq!(r, [(-1.0, 1.0), (-1.0, 1.0)]);
        assert_eq!(ric_selection(&r, 1.0, 1.0), "sentiment=1.0,length=-1.0");
        assert_eq!(ric_selection(&r, 0.0, 0.0), "sentiment=-1.0,length=1.0");
        assert_eq!(ric_selection(&r, 0.5, 0.5), "sentiment=0.0,length=0.0");
    }

    fn config(methods: &str) -> std::result::Result<DimensionsConfig, String> {
        let text = format!(
            "experiment = \"two-dimensions\"\noutput_dir = \"x\"\nmodel = \"m\"\nsnippets = \"s\"\nseeds = [0, 1]\n\
             temperature = 1.0\nmethods = {methods}\n[task]\nwords = 4\ntrain = 8\neval = 4\nseed = 0\n\
             [pairs]\nsamples = 4\nmax_new_tokens = 32\ntemperature = 1.0\njudge = \"vader-full\"\nmin_length_gap = 4\nstop_strings = []\n\
             batch = 8\n[eval]\nsamples = 1\nmax_new_tokens = 32\nstop_strings = []\nbatch = 8\n[train]\nlr = 1e-5\n[fronts]\nweights = [0.0, 1.0]\n"
        );
        let cfg: DimensionsConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.check().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn runs_and_their_configs() {
        let cfg = config(r#"["meet-lora", "ric", "dpo"]"#).unwrap();
        let runs = cfg.runs().unwrap();
        // Per seed: meet-lora, ric, four DPO models.
        assert_eq!(runs.len(), 12);
        assert_eq!(runs[2].name(), "dpo-positive+concise-seed0");
        let lora = cfg.run_config(&runs[0]).unwrap();
        let dims: Vec<(String, Vec<String>)> = lora.dimensions().into_iter().map(|d| (d.name, d.controls)).collect();
        assert_eq!(dims[0], ("length".to_string(), vec!["concise".to_string(), "verbose".to_string()]));
        assert!(lora.data.train.ends_with("data/pairs.jsonl"));
        let ric = cfg.run_config(&runs[1]).unwrap();
        assert!(ric.data.train.ends_with("data/ric.jsonl"));
        let dpo = cfg.run_config(&runs[5]).unwrap();
        assert!(dpo.data.train.ends_with("data/dpo_negative+verbose.jsonl"), "{:?}", dpo.data.train);
        assert_eq!(dpo.model.source, "m");
        let e = config(r#"["sft"]"#).unwrap_err();
        assert!(e.contains("no control of two dimensions"), "{e}");
    }
}
