//! `report.md` and its figures from the evaluated cells: scores by temperature, length / KL / win
//! rates at the last temperature, head-to-head win rates of MEET, controllability, the control-
//! size sweep and the training curves — each table under both judges where a reward model exists.

use super::plots::{bars, lines, Point, Series};
use super::{Evaluated, ExperimentConfig, SweepPoint, Timing};
use crate::eval::llm_judge::{summarize as summarize_judgements, LlmJudge};
use crate::eval::sample::{paired_samples, paired_scores, summarize, Sample};
use crate::eval::stats::{across_seeds, mean_ci, win_rate, Estimate};
use crate::files::read_jsonl;
use crate::train::StepLog;
use crate::Result;
use std::fmt::Write as _;

/// Which judge's scores a table reads.
#[derive(Clone, Copy, PartialEq)]
enum Judge {
    Main,
    RewardModel,
}

fn fmt(e: &Estimate) -> String {
    format!("{:.3} [{:.3}, {:.3}]", e.value, e.lo, e.hi)
}

/// The samples of a cell with the chosen judge's scores.
fn scored(e: &Evaluated, j: Judge) -> Vec<Sample> {
    match (j, &e.rm) {
        (Judge::RewardModel, Some(rm)) => {
            e.samples.iter().zip(rm).map(|(s, &r)| Sample { score: r, ..s.clone() }).collect()
        }
        _ => e.samples.clone(),
    }
}

struct Cells<'a> {
    all: &'a [Evaluated],
}

impl<'a> Cells<'a> {
    fn group(&self, m: &str, c: Option<&str>, t: f64) -> Vec<&'a Evaluated> {
        self.all
            .iter()
            .filter(|x| x.cell.method == m && x.cell.control.as_deref() == c && x.cell.temperature == t)
            .collect()
    }

    /// `good` for the controllable methods, none for the others.
    fn main_control(&self, m: &str) -> Option<&'static str> {
        self.all.iter().any(|x| x.cell.method == m && x.cell.control.as_deref() == Some("good")).then_some("good")
    }

    /// A method with its main control: `meet-lora (good)`.
    fn label(&self, m: &str) -> String {
        format!("{m}{}", self.main_control(m).map(|c| format!(" ({c})")).unwrap_or_default())
    }

    fn main(&self, m: &str, t: f64) -> Vec<&'a Evaluated> {
        self.group(m, self.main_control(m), t)
    }

    /// Pooled scores over seeds.
    fn pooled(group: &[&Evaluated], j: Judge) -> Vec<Sample> {
        group.iter().flat_map(|e| scored(e, j)).collect()
    }

    /// Scores of `a` and `b` paired by seed, prompt and sample.
    fn paired(a: &[&Evaluated], b: &[&Evaluated], j: Judge) -> Result<(Vec<f64>, Vec<f64>)> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for ea in a {
            if let Some(eb) = b.iter().find(|eb| eb.cell.seed == ea.cell.seed) {
                let p = paired_scores(&scored(ea, j), &scored(eb, j))?;
                x.extend(p.a);
                y.extend(p.b);
            }
        }
        Ok((x, y))
    }

    /// Response texts of `a` and `b` paired by seed, prompt and sample: (prompt, a's, b's).
    fn paired_texts(a: &[&Evaluated], b: &[&Evaluated]) -> Result<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        for ea in a {
            if let Some(eb) = b.iter().find(|eb| eb.cell.seed == ea.cell.seed) {
                let (pairs, _, _) = paired_samples(&ea.samples, &eb.samples)?;
                out.extend(pairs.iter().map(|(x, y)| (x.prompt.clone(), x.response.clone(), y.response.clone())));
            }
        }
        Ok(out)
    }

    fn has_rm(&self) -> bool {
        self.all.iter().any(|e| e.rm.is_some())
    }
}

/// The LLM judge's verdicts on each method's responses against the base model's (same seed,
/// prompt and sample), both orders asked; judgements in `llm_judge/METHOD.jsonl`.
fn llm_section(
    r: &mut String,
    cfg: &ExperimentConfig,
    cells: &Cells,
    names: &[String],
    t: f64,
    j: &LlmJudge,
) -> Result<()> {
    let _ = writeln!(
        r,
        "## LLM judge at T = {t}: win rate over the base model\n\nJudge {} with the DPO paper's {:?} prompt; each \
         pair asked in both orders (the first drawn at random). Win rate: a pair scores the mean of its parsed \
         verdicts; agreement: both orders name the same response; position A: share of verdicts for the first \
         position (0.5 = no bias).\n",
        j.name(),
        j.task
    );
    let _ = writeln!(r, "| method | win vs base | first order only | agreement | position A | unparseable | pairs |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|");
    let base_t = cells.group("base", None, t);
    let share = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.2}"));
    for m in names.iter().filter(|m| *m != "base") {
        let group = cells.main(m, t);
        let items = Cells::paired_texts(&group, &base_t)?;
        if items.is_empty() {
            continue;
        }
        let (js, cached) = j.judge_pairs(&items, 0)?;
        crate::files::write_jsonl(&cfg.output_dir.join("llm_judge").join(format!("{m}.jsonl")), &js)?;
        let c = summarize_judgements(j.name(), j.task, &js, cached, 0)?;
        let est = |e: &Option<Estimate>| e.as_ref().map_or("–".into(), fmt);
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} | {} | {} of {} | {} |",
            cells.label(m),
            est(&c.win_rate),
            est(&c.first_order_win_rate),
            share(c.agreement),
            share(c.position_a_share),
            c.unparseable,
            2 * c.pairs,
            c.pairs
        );
    }
    let _ = writeln!(r);
    Ok(())
}

/// Mean loss of the last fifth of the steps (at least one).
fn final_loss(logs: &[StepLog]) -> f64 {
    let k = (logs.len() / 5).max(1);
    logs[logs.len() - k..].iter().map(|l| l.loss).sum::<f64>() / k as f64
}

/// Writes the figures into `output_dir` and returns the Markdown of the report.
pub fn write(
    cfg: &ExperimentConfig,
    all: &[Evaluated],
    sweep: &[SweepPoint],
    judge: &str,
    llm: Option<&LlmJudge>,
    provenance: &crate::provenance::Provenance,
) -> Result<String> {
    let cells = Cells { all };
    let out = &cfg.output_dir;
    let rm = cells.has_rm();
    let judges: Vec<(Judge, &str)> =
        if rm { vec![(Judge::Main, judge), (Judge::RewardModel, "reward model")] } else { vec![(Judge::Main, judge)] };
    let mut r = String::new();
    let _ = writeln!(r, "# Controlled sentiment: {} methods, seeds {:?}\n", cfg.methods.len(), cfg.seeds);
    let _ = writeln!(
        r,
        "Judge: {judge} ({}). {} held-out prompts × {} samples per seed, up to {} new tokens; base model {}. \
         Intervals: 95% bootstrap over responses (pooled over seeds); ± is the spread (sd) of the per-seed means.",
        cfg.eval.judge, cfg.task.eval, cfg.eval.samples, cfg.eval.max_new_tokens, cfg.model
    );
    if rm {
        let path = cfg.dir(&["runs", "reward-model", "final", "reward_eval.json"]);
        let acc = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| {
                format!(
                    "held-out pairwise accuracy {:.3} (before training {:.3}) on {} pairs",
                    v["accuracy"].as_f64().unwrap_or(f64::NAN),
                    v["accuracy_before"].as_f64().unwrap_or(f64::NAN),
                    v["held_out_pairs"]
                )
            })
            .unwrap_or_else(|| "accuracy not found".into());
        let _ = writeln!(
            r,
            "Second judge: a Bradley–Terry reward model trained from {} on {} human-rating pairs (higher- over \
             lower-rated snippet, rating gap ≥ 2), which reads prompt + response as a review; {acc}.",
            cfg.model, cfg.task.human_pairs
        );
    }
    let _ = writeln!(r);
    let mut names: Vec<String> = vec!["base".into()];
    names.extend(cfg.methods.iter().cloned());
    let label = |m: &str| cells.label(m);
    let t = *cfg.temperatures.last().unwrap_or(&1.0);

    // Score by temperature.
    for &(j, jname) in &judges {
        let _ = writeln!(r, "## Mean {jname} score by sampling temperature\n");
        let _ = write!(r, "| method |");
        for t in &cfg.temperatures {
            let _ = write!(r, " T = {t} |");
        }
        let _ = writeln!(r, "\n|---|{}", "---|".repeat(cfg.temperatures.len()));
        let mut series = Vec::new();
        for m in &names {
            let _ = write!(r, "| {} |", label(m));
            let mut points = Vec::new();
            for &temp in &cfg.temperatures {
                let group = cells.main(m, temp);
                let all: Vec<f64> = Cells::pooled(&group, j).iter().map(|s| s.score).collect();
                if all.is_empty() {
                    let _ = write!(r, " – |");
                    continue;
                }
                let per_seed: Vec<f64> = group
                    .iter()
                    .map(|e| crate::eval::stats::mean(&scored(e, j).iter().map(|s| s.score).collect::<Vec<_>>()))
                    .collect();
                let e = mean_ci(&all, 0)?;
                let (_, sd) = across_seeds(&per_seed);
                let _ = write!(r, " {} ± {sd:.3} |", fmt(&e));
                points.push(Point { x: temp, y: e.value, lo: e.lo, hi: e.hi });
            }
            let _ = writeln!(r);
            series.push(Series { name: label(m), points });
        }
        let file = if j == Judge::Main { "score_vs_temperature.png" } else { "rm_score_vs_temperature.png" };
        lines(&out.join(file), &format!("{jname} score by temperature"), "sampling temperature", jname, &series, true)?;
        let _ = writeln!(r, "\n![]({file})\n");
    }

    // Length, cut share, KL, win rates over the base model at the last temperature.
    let _ = writeln!(r, "## At T = {t}: length, cut share, KL to the base model, win rate over the base model\n");
    let _ = write!(r, "| method | length (tokens) | cut at max | KL |");
    for (_, jname) in &judges {
        let _ = write!(r, " win vs base ({jname}) |");
    }
    let _ = writeln!(r, "\n|---|---|---|---|{}", "---|".repeat(judges.len()));
    let mut win_bars = Vec::new();
    let mut kl_series = Vec::new();
    let base_t = cells.group("base", None, t);
    for m in &names {
        let group = cells.main(m, t);
        if group.is_empty() {
            continue;
        }
        let s = summarize(&Cells::pooled(&group, Judge::Main), 0)?;
        let _ = write!(
            r,
            "| {} | {} | {:.1}% | {} |",
            label(m),
            fmt(&s.length),
            100.0 * s.cut_share.value,
            s.kl.as_ref().map(fmt).unwrap_or_else(|| "–".into())
        );
        for &(j, _) in &judges {
            if m == "base" {
                let _ = write!(r, " – |");
                continue;
            }
            let (a, b) = Cells::paired(&group, &base_t, j)?;
            let w = win_rate(&a, &b, 0)?;
            let _ = write!(r, " {} |", fmt(&w));
            if j == Judge::Main {
                win_bars.push((label(m), w.value, w.lo, w.hi));
            }
        }
        let _ = writeln!(r);
        // Reward against KL over the temperatures.
        let mut points = Vec::new();
        for &temp in &cfg.temperatures {
            let pooled = Cells::pooled(&cells.main(m, temp), Judge::Main);
            if let Ok(s) = summarize(&pooled, 0) {
                if let Some(kl) = s.kl {
                    points.push(Point { x: kl.value, y: s.score.value, lo: s.score.lo, hi: s.score.hi });
                }
            }
        }
        kl_series.push(Series { name: label(m), points });
    }
    bars(
        &out.join("win_rates.png"),
        &format!("win rate over the base model ({judge}, T = {t})"),
        "win rate",
        &win_bars,
        0.5,
    )?;
    lines(
        &out.join("score_vs_kl.png"),
        &format!("{judge} score against KL to the base model (one point per temperature)"),
        "KL (nats per response)",
        judge,
        &kl_series,
        true,
    )?;
    let _ = writeln!(r, "\nLengths are of `good` / plain responses; ties count half in win rates.\n");
    let _ = writeln!(r, "![](win_rates.png)\n\n![](score_vs_kl.png)\n");
    if let Some(j) = llm {
        llm_section(&mut r, cfg, &cells, &names, t, j)?;
    }

    // MEET head to head.
    let meet: Vec<&String> = cfg.methods.iter().filter(|m| m.starts_with("meet")).collect();
    let others: Vec<&String> = names.iter().filter(|m| !m.starts_with("meet") && *m != "base").collect();
    if !meet.is_empty() && !others.is_empty() {
        for &(j, jname) in &judges {
            let _ = writeln!(r, "## Head to head at T = {t} ({jname}): win rate of MEET over each method\n");
            let _ = write!(r, "| |");
            for o in &others {
                let _ = write!(r, " vs {} |", label(o));
            }
            let _ = writeln!(r, "\n|---|{}", "---|".repeat(others.len()));
            for m in &meet {
                let _ = write!(r, "| {} |", label(m));
                for o in &others {
                    let (ga, gb) = (cells.main(m, t), cells.main(o, t));
                    let (a, b) = Cells::paired(&ga, &gb, j)?;
                    let len = |g: &[&Evaluated]| {
                        let s = Cells::pooled(g, j);
                        s.iter().map(|x| x.tokens as f64).sum::<f64>() / s.len().max(1) as f64
                    };
                    let cell = if a.is_empty() {
                        "–".into()
                    } else {
                        format!("{} ({:.1} vs {:.1} tok)", fmt(&win_rate(&a, &b, 0)?), len(&ga), len(&gb))
                    };
                    let _ = write!(r, " {cell} |");
                }
                let _ = writeln!(r);
            }
            let _ = writeln!(r, "\nIn brackets: mean response length of MEET and of the other method.\n");
        }
    }

    // Controllability.
    for &(j, jname) in &judges {
        let _ = writeln!(r, "## Controllability at T = {t} ({jname}): the same model under `good` and `bad`\n");
        let _ = writeln!(r, "| method | good | bad | gap | win rate good vs bad |\n|---|---|---|---|---|");
        for m in &names {
            let (g, b) = (cells.group(m, Some("good"), t), cells.group(m, Some("bad"), t));
            if g.is_empty() || b.is_empty() {
                continue;
            }
            let (sg, sb) = (summarize(&Cells::pooled(&g, j), 0)?, summarize(&Cells::pooled(&b, j), 0)?);
            let (x, y) = Cells::paired(&g, &b, j)?;
            let _ = writeln!(
                r,
                "| {m} | {} | {} | {:.3} | {} |",
                fmt(&sg.score),
                fmt(&sb.score),
                sg.score.value - sb.score.value,
                fmt(&win_rate(&x, &y, 0)?)
            );
        }
        let _ = writeln!(r);
    }

    // The control-size sweep.
    if !sweep.is_empty() {
        let seed = cfg.seeds.first().copied().unwrap_or(0);
        let _ = writeln!(r, "## Control size at T = {t} (seed {seed}): soft-prompt length n, LoRA rank r\n");
        let _ = write!(r, "| control | size |");
        for (_, jname) in &judges {
            let _ = write!(r, " good ({jname}) | bad ({jname}) |");
        }
        let _ = writeln!(r, "\n|---|---|{}", "---|---|".repeat(judges.len()));
        let mut series: Vec<Series> = Vec::new();
        for p in sweep {
            let _ = write!(r, "| {} | {} |", p.family, p.size);
            for &(j, _) in &judges {
                for c in ["good", "bad"] {
                    let g: Vec<&Evaluated> =
                        cells.group(&p.method, Some(c), t).into_iter().filter(|e| e.cell.seed == seed).collect();
                    let scores: Vec<f64> = Cells::pooled(&g, j).iter().map(|s| s.score).collect();
                    if scores.is_empty() {
                        let _ = write!(r, " – |");
                        continue;
                    }
                    let e = mean_ci(&scores, 0)?;
                    let _ = write!(r, " {} |", fmt(&e));
                    if j == Judge::Main {
                        let name = format!("{} {c}", p.family);
                        let point = Point { x: p.size as f64, y: e.value, lo: e.lo, hi: e.hi };
                        match series.iter_mut().find(|s| s.name == name) {
                            Some(s) => s.points.push(point),
                            None => series.push(Series { name, points: vec![point] }),
                        }
                    }
                }
            }
            let _ = writeln!(r);
        }
        for s in &mut series {
            s.points.sort_by(|a, b| a.x.total_cmp(&b.x));
        }
        lines(
            &out.join("control_size.png"),
            &format!("{judge} score by control size (T = {t})"),
            "soft-prompt tokens n / LoRA rank r",
            judge,
            &series,
            true,
        )?;
        let _ = writeln!(r, "\n![](control_size.png)\n");
    }

    // Training.
    let _ = writeln!(r, "## Training\n\n| run | steps | final loss | train time (s) |\n|---|---|---|---|");
    // The experiment's own runs (not whatever else sits in `runs/`): every method with every seed,
    // the sweep's extra sizes and the reward model; the curves show the first seed's methods.
    let first_seed = cfg.seeds.first().copied().unwrap_or(0);
    let first = format!("seed{first_seed}");
    let mut runs: Vec<(String, bool)> = cfg
        .seeds
        .iter()
        .flat_map(|&s| cfg.methods.iter().map(move |m| (format!("{m}-seed{s}"), s == first_seed)))
        .collect();
    for p in sweep.iter().filter(|p| !cfg.methods.contains(&p.method)) {
        runs.push((format!("{}-{first}", p.method), false));
    }
    if cfg.reward_model.is_some() {
        runs.push(("reward-model".into(), true));
    }
    runs.sort();
    let mut curves = Vec::new();
    for (run, curve) in &runs {
        for (stage, file) in [("step 1", "step1/metrics.jsonl"), ("", "metrics.jsonl")] {
            let path = cfg.dir(&["runs", run, file]);
            let logs: Vec<StepLog> = match path.is_file() {
                true => read_jsonl(&path)?,
                false => continue,
            };
            if logs.is_empty() {
                continue;
            }
            let name = if stage.is_empty() { run.clone() } else { format!("{run} {stage}") };
            let secs: f64 = logs.iter().map(|l| l.fwd_s + l.bwd_s + l.opt_s).sum();
            let _ = writeln!(r, "| {name} | {} | {:.4} | {secs:.0} |", logs.len(), final_loss(&logs));
            if *curve {
                curves.push(Series {
                    name: name.trim_end_matches(&format!("-{first}")).replace(&format!("-{first} "), " "),
                    points: logs.iter().map(|l| Point::exact(l.step as f64, l.loss)).collect(),
                });
            }
        }
    }
    lines(&out.join("loss_curves.png"), &format!("training loss ({first})"), "optimizer step", "loss", &curves, true)?;
    let _ = writeln!(
        r,
        "\nLosses are each method's own (cross-entropy on responses; DPO's and the reward model's pairwise loss).\n\n![](loss_curves.png)\n"
    );
    // Cost: the steps' wall times, summed over the passes that computed them.
    let tpath = cfg.dir(&["timings.jsonl"]);
    if tpath.is_file() {
        let times: Vec<Timing> = read_jsonl(&tpath)?;
        let sum = |k: &str| times.iter().filter(|t| t.kind == k).map(|t| t.seconds).sum::<f64>();
        let n = |k: &str| times.iter().filter(|t| t.kind == k).count();
        let total: f64 = times.iter().map(|t| t.seconds).sum();
        let _ = writeln!(
            r,
            "## Wall time\n\n| step | count | minutes |\n|---|---|---|\n\
             | task and pairs | {} | {:.1} |\n| training | {} | {:.1} |\n| evaluation (sampling, judges, KL) | {} | {:.1} |\n\
             | **total** | | **{:.1}** |\n\n\
             Summed over the passes that computed each step (`timings.jsonl`); model loading outside the \
             evaluations and the report itself are not counted.\n",
            n("data"),
            sum("data") / 60.0,
            n("train"),
            sum("train") / 60.0,
            n("eval"),
            sum("eval") / 60.0,
            total / 60.0
        );
    }
    let _ = writeln!(
        r,
        "Raw figures: `results.jsonl` (its first line: the provenance below); every scored response: `eval/`; \
         training runs: `runs/`.\n"
    );
    let _ = writeln!(
        r,
        "Made by {}. A rerun reproduces these numbers bit for bit with the same commit and kernels and thread \
         count; other kernels sum in another order and move them within their intervals.",
        provenance.line()
    );
    Ok(r)
}
