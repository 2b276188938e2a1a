//! The controlled-sentiment experiment in one resumable command: build the task from the rated
//! snippets, build judge-scored preference pairs from the base model, train every method with
//! every seed, evaluate each on the held-out prompts at every sampling temperature (under `good`,
//! and under `bad` for the controllable ones), and write `report.md` with the tables.
//!
//! Every step writes its outputs into `output_dir` and a step whose outputs exist is skipped, so
//! an interrupted experiment continues where it stopped (training runs resume from checkpoints).

use crate::controls::Controlled;
use crate::data::sentiment::{read_snippets, sentiment_task, write_task, TaskOptions};
use crate::eval::judge_by_name;
use crate::eval::sample::{evaluate, paired_scores, read_prompts, summarize, EvalOptions, Sample, Summary};
use crate::eval::stats::{across_seeds, win_rate, Estimate};
use crate::generate::SamplingParams;
use crate::io::{atomic_write, read_jsonl, write_jsonl};
use crate::run::RunConfig;
use crate::{Error, LoadOptions, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// `[task]`, `[pairs]`, `[eval]` and the method list of an experiment file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
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

impl Default for SampleSection {
    fn default() -> Self {
        Self { samples: 4, max_new_tokens: 32, temperature: 1.0, judge: "vader-full".into(), batch: 16 }
    }
}

impl ExperimentConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| Error::parse(path, e.to_string()))?;
        for m in &cfg.methods {
            cfg.run_config(m, 0).map_err(|e| Error::parse(path, format!("method '{m}': {e}")))?;
        }
        Ok(cfg)
    }

    /// The built-in options of an experiment method name, before `[method.NAME]`.
    fn defaults(name: &str) -> Result<toml::Table> {
        let text = match name {
            "sft" => "method = \"sft\"\n[model]\ntrain_weights = true",
            "control-token" => "method = \"control-token\"\n[model]\ntrain_weights = true",
            "coh" => "method = \"coh\"\n[model]\ntrain_weights = true",
            "dpo" => "method = \"dpo\"\n[model]\ntrain_weights = true",
            "meet-prompt" => "method = \"meet\"\n[prompt]\nn = 20\ninit = \"sample_vocab\"",
            "meet-lora" => "method = \"meet\"\n[lora]\nr = 16\nalpha = 32.0\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]",
            other => {
                return Err(Error::Invalid(format!(
                    "unknown experiment method '{other}' (sft, control-token, coh, dpo, meet-prompt, meet-lora)"
                )))
            }
        };
        toml::from_str(text).map_err(|e| Error::Invalid(e.to_string()))
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
        self.train.insert("max_steps".into(), toml::Value::Integer(2));
        self.train.insert("warmup_steps".into(), toml::Value::Integer(0));
        for (_, m) in self.method.iter_mut() {
            if let toml::Value::Table(t) = m {
                if let Some(toml::Value::Table(meet)) = t.get_mut("meet") {
                    meet.remove("step1");
                    meet.remove("step2");
                }
            }
        }
    }

    fn dir(&self, parts: &[&str]) -> PathBuf {
        parts.iter().fold(self.output_dir.clone(), |p, s| p.join(s))
    }

    /// The `meet train` configuration of `name` with `seed`.
    pub fn run_config(&self, name: &str, seed: u64) -> Result<RunConfig> {
        let mut t = Self::defaults(name)?;
        merge(&mut t, &toml::Table::from_iter([("train".to_string(), toml::Value::Table(self.train.clone()))]));
        if let Some(toml::Value::Table(own)) = self.method.get(name) {
            merge(&mut t, own);
        }
        let run = self.dir(&["runs", &format!("{name}-seed{seed}")]);
        let pairs = self.dir(&["data", "pairs.jsonl"]);
        let model = if name == "dpo" {
            // DPO starts from, and is anchored to, the SFT model of the same seed.
            self.dir(&["runs", &format!("sft-seed{seed}"), "final"]).to_string_lossy().into_owned()
        } else {
            self.model.clone()
        };
        let q = |s: &str| format!("{s:?}");
        let mut over = vec![
            ("output_dir".to_string(), q(&run.to_string_lossy())),
            ("model.source".to_string(), q(&model)),
            ("data.train".to_string(), q(&pairs.to_string_lossy())),
            ("train.seed".to_string(), seed.to_string()),
        ];
        if name == "dpo" {
            over.push(("dpo.reference".to_string(), q(&model)));
        }
        RunConfig::from_table(t, &over)
    }
}

/// Deep-merges `src` into `dst` (tables key by key, other values replaced).
fn merge(dst: &mut toml::Table, src: &toml::Table) {
    for (k, v) in src {
        match (dst.get_mut(k), v) {
            (Some(toml::Value::Table(d)), toml::Value::Table(s)) => merge(d, s),
            _ => {
                dst.insert(k.clone(), v.clone());
            }
        }
    }
}

/// One evaluation: method, seed, control, temperature.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub method: String,
    pub seed: u64,
    pub control: Option<String>,
    pub temperature: f64,
    pub summary: Summary,
}

/// Runs (or continues) the experiment; returns the path of `report.md`.
pub fn run(cfg: &ExperimentConfig) -> Result<PathBuf> {
    std::fs::create_dir_all(cfg.dir(&["data"])).map_err(|e| Error::io(&cfg.output_dir, e))?;
    // 1. The task: prompts and human-rating pairs.
    let prompts_path = cfg.dir(&["data", "eval_prompts.jsonl"]);
    let train_prompts_path = cfg.dir(&["data", "train_prompts.jsonl"]);
    if !prompts_path.is_file() {
        let snippets = read_snippets(&cfg.snippets)?;
        let t = &cfg.task;
        let o = TaskOptions {
            words: t.words,
            train: t.train,
            eval: t.eval,
            pairs: t.human_pairs,
            seed: t.seed,
            ..Default::default()
        };
        write_task(&sentiment_task(&snippets, &o)?, &cfg.dir(&["data"]))?;
    }
    // 2. Judge-scored pairs from the base model.
    let pairs_path = cfg.dir(&["data", "pairs.jsonl"]);
    if !pairs_path.is_file() {
        tracing::info!("building preference pairs from {}", cfg.model);
        let base = Controlled::load(&cfg.model, &LoadOptions::default())?;
        let p = &cfg.pairs;
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
        };
        let (pairs, ties) = crate::eval::pairs::best_worst_pairs(
            &base,
            judge_by_name(&p.judge)?.as_ref(),
            &read_prompts(&train_prompts_path)?,
            &opts,
        )?;
        tracing::info!("{} pairs ({ties} prompts without a score difference)", pairs.len());
        write_jsonl(&pairs_path, &pairs)?;
    }
    // 3. Every method with every seed (SFT first: DPO starts from it).
    let mut order: Vec<&String> = cfg.methods.iter().collect();
    order.sort_by_key(|m| (m.as_str() != "sft") as u8);
    for seed in &cfg.seeds {
        for m in &order {
            let rc = cfg.run_config(m, *seed)?;
            if !rc.output_dir.join("final").is_dir() {
                tracing::info!("training {m} (seed {seed})");
                crate::methods::run(&rc, true)?;
            }
        }
    }
    // 4. Evaluations: each run × temperature under `good` (and `bad` at the last temperature for
    // the controllable methods), and the base model.
    let ev = &cfg.eval;
    let judge = judge_by_name(&ev.judge)?;
    let prompts = read_prompts(&prompts_path)?;
    let base = Controlled::load(&cfg.model, &LoadOptions::default())?;
    let mut cells = Vec::new();
    let mut jobs: Vec<(String, u64, String)> =
        cfg.seeds.iter().map(|&s| ("base".to_string(), s, cfg.model.clone())).collect();
    for seed in &cfg.seeds {
        for m in &cfg.methods {
            let dir = cfg.run_config(m, *seed)?.output_dir.join("final");
            jobs.push((m.clone(), *seed, dir.to_string_lossy().into_owned()));
        }
    }
    for (m, seed, path) in &jobs {
        let model = if m == "base" { None } else { Some(Controlled::load(path, &LoadOptions::default())?) };
        let model = model.as_ref().unwrap_or(&base);
        let controls: Vec<Option<String>> = match &model.spec {
            Some(s) if s.names.len() == 2 && s.names[0] == "good" => vec![Some("good".into()), Some("bad".into())],
            _ => vec![None],
        };
        for (ti, &temp) in cfg.temperatures.iter().enumerate() {
            for c in &controls {
                if c.as_deref() == Some("bad") && ti + 1 != cfg.temperatures.len() {
                    continue;
                }
                let name = format!("{m}-seed{seed}-{}-t{temp}.jsonl", c.as_deref().unwrap_or("plain"));
                let out = cfg.dir(&["eval", &name]);
                let samples: Vec<Sample> = if out.is_file() {
                    read_jsonl(&out)?
                } else {
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
                    };
                    let s = evaluate(model, Some(&base), judge.as_ref(), &prompts, &opts)?;
                    std::fs::create_dir_all(cfg.dir(&["eval"])).map_err(|e| Error::io(&cfg.output_dir, e))?;
                    write_jsonl(&out, &s)?;
                    s
                };
                cells.push((
                    Cell {
                        method: m.clone(),
                        seed: *seed,
                        control: c.clone(),
                        temperature: temp,
                        summary: summarize(&samples, *seed)?,
                    },
                    samples,
                ));
            }
        }
    }
    // 5. The report.
    let report = report(cfg, &cells, judge.name())?;
    let path = cfg.dir(&["report.md"]);
    atomic_write(&path, report.as_bytes())?;
    write_jsonl(&cfg.dir(&["results.jsonl"]), &cells.iter().map(|(c, _)| c).collect::<Vec<_>>())?;
    Ok(path)
}

fn fmt(e: &Estimate) -> String {
    format!("{:.3} [{:.3}, {:.3}]", e.value, e.lo, e.hi)
}

fn report(cfg: &ExperimentConfig, cells: &[(Cell, Vec<Sample>)], judge: &str) -> Result<String> {
    let mut r = String::new();
    let _ = writeln!(r, "# Controlled sentiment: {} methods, seeds {:?}\n", cfg.methods.len(), cfg.seeds);
    let _ = writeln!(
        r,
        "Judge: {judge} ({}). {} held-out prompts × {} samples per seed; base model {}. \
         Intervals: 95% bootstrap over responses (pooled over seeds); ± is the spread (sd) of the per-seed means.\n",
        cfg.eval.judge, cfg.task.eval, cfg.eval.samples, cfg.model
    );
    let mut names: Vec<String> = vec!["base".into()];
    names.extend(cfg.methods.iter().cloned());
    let pooled = |m: &str, c: Option<&str>, t: f64| -> Vec<&(Cell, Vec<Sample>)> {
        cells.iter().filter(|(x, _)| x.method == m && x.control.as_deref() == c && x.temperature == t).collect()
    };
    let main_control = |m: &str| -> Option<&'static str> {
        cells.iter().any(|(x, _)| x.method == m && x.control.as_deref() == Some("good")).then_some("good")
    };
    // Score per method and temperature.
    let _ = writeln!(r, "## Mean {judge} score by sampling temperature\n");
    let _ = write!(r, "| method |");
    cfg.temperatures.iter().for_each(|t| {
        let _ = write!(r, " T = {t} |");
    });
    let _ = writeln!(r, "\n|---|{}", "---|".repeat(cfg.temperatures.len()));
    for m in &names {
        let _ = write!(r, "| {m}{} |", main_control(m).map(|c| format!(" ({c})")).unwrap_or_default());
        for &t in &cfg.temperatures {
            let group = pooled(m, main_control(m), t);
            let all: Vec<f64> = group.iter().flat_map(|(_, s)| s.iter().map(|x| x.score)).collect();
            let per_seed: Vec<f64> = group.iter().map(|(c, _)| c.summary.score.value).collect();
            if all.is_empty() {
                let _ = write!(r, " – |");
                continue;
            }
            let e = crate::eval::stats::mean_ci(&all, 0)?;
            let (_, sd) = across_seeds(&per_seed);
            let _ = write!(r, " {} ± {sd:.3} |", fmt(&e));
        }
        let _ = writeln!(r);
    }
    // Length, cut share, KL and win rate over the base model at the last temperature.
    let t = *cfg.temperatures.last().unwrap_or(&1.0);
    let _ = writeln!(r, "\n## At T = {t}: length, cut share, KL to the base model, win rate over the base model\n");
    let _ = writeln!(r, "| method | length (tokens) | cut at max | KL | win rate vs base |\n|---|---|---|---|---|");
    for m in &names {
        let group = pooled(m, main_control(m), t);
        if group.is_empty() {
            continue;
        }
        let samples: Vec<Sample> = group.iter().flat_map(|(_, s)| s.clone()).collect();
        let s = summarize(&samples, 0)?;
        // Paired with the base model's responses of the same seed, prompt and sample.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (c, own) in &group {
            if let Some((_, base)) = pooled("base", None, t).into_iter().find(|(x, _)| x.seed == c.seed) {
                let (x, y) = paired_scores(own, base)?;
                a.extend(x);
                b.extend(y);
            }
        }
        let w = if m == "base" { "–".to_string() } else { fmt(&win_rate(&a, &b, 0)?) };
        let _ = writeln!(
            r,
            "| {m} | {} | {:.1}% | {} | {w} |",
            fmt(&s.length),
            100.0 * s.cut_share,
            s.kl.as_ref().map(fmt).unwrap_or_else(|| "–".into())
        );
    }
    // Controllability.
    let _ = writeln!(r, "\n## Controllability at T = {t}: the same model under `good` and `bad`\n");
    let _ = writeln!(r, "| method | good | bad | gap | win rate good vs bad |\n|---|---|---|---|---|");
    for m in &names {
        let (g, b) = (pooled(m, Some("good"), t), pooled(m, Some("bad"), t));
        if g.is_empty() || b.is_empty() {
            continue;
        }
        let gs: Vec<Sample> = g.iter().flat_map(|(_, s)| s.clone()).collect();
        let bs: Vec<Sample> = b.iter().flat_map(|(_, s)| s.clone()).collect();
        let (sg, sb) = (summarize(&gs, 0)?, summarize(&bs, 0)?);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (c, own) in &g {
            if let Some((_, other)) = b.iter().find(|(d, _)| d.seed == c.seed) {
                let (p, q) = paired_scores(own, other)?;
                x.extend(p);
                y.extend(q);
            }
        }
        let _ = writeln!(
            r,
            "| {m} | {} | {} | {:.3} | {} |",
            fmt(&sg.score),
            fmt(&sb.score),
            sg.score.value - sb.score.value,
            fmt(&win_rate(&x, &y, 0)?)
        );
    }
    let _ = writeln!(r, "\nRaw figures: `results.jsonl`; every scored response: `eval/`; training runs: `runs/`.");
    Ok(r)
}
