//! `meet bench generate`: prefill and decode throughput, measured the way the Python reference's
//! `bench_generate.py` does (a run of N new tokens and a run of 1; decode rate from the difference).

use crate::generate::{generate, SamplingParams};
use crate::io::generation::GenerationDefaults;
use crate::models::CausalLm;
use crate::tokenizer::Tokenizer;
use crate::Result;
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

/// Figures for one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateFigures {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub sampling: String,
    /// Real (unpadded) prompt tokens per second in the prefill pass.
    pub prefill_tokens_per_s: f64,
    /// New tokens per second over all rows, prefill excluded.
    pub decode_tokens_per_s: f64,
    pub seconds_total_median: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times generation of `new_tokens` tokens for `prompts` (one batch), `reps` times after a warm-up.
#[allow(clippy::too_many_arguments)]
pub fn bench_generate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    defaults: &GenerationDefaults,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    temperature: f64,
    reps: usize,
    device: &Device,
) -> Result<GenerateFigures> {
    let params =
        |n: usize| SamplingParams { temperature, seed: 0, max_new_tokens: n, min_new_tokens: n, ..Default::default() };
    let run = |n: usize| -> Result<f64> {
        let t = Instant::now();
        let out = generate(model, tokenizer, prompts, &params(n), defaults, device, |_, _| Ok(()))?;
        debug_assert!(out.iter().all(|g| g.tokens.len() == n));
        Ok(t.elapsed().as_secs_f64())
    };
    run(new_tokens)?; // warm-up
    let (mut full, mut one) = (vec![], vec![]);
    for _ in 0..reps.max(1) {
        full.push(run(new_tokens)?);
        one.push(run(1)?);
    }
    let (tn, t1) = (median(full), median(one));
    let b = prompts.len();
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum();
    Ok(GenerateFigures {
        batch: b,
        prompt_tokens,
        new_tokens,
        sampling: if temperature == 0.0 { "greedy".into() } else { format!("temperature {temperature}") },
        prefill_tokens_per_s: prompt_tokens as f64 / t1,
        decode_tokens_per_s: (b * (new_tokens - 1)) as f64 / (tn - t1),
        seconds_total_median: tn,
    })
}

/// Sixteen varied prompts for batched runs (different lengths exercise left padding).
pub const BATCH_PROMPTS: [&str; 16] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about photosynthesis are",
    "Write a short poem about autumn leaves:",
    "In computer science, a hash table is",
    "My favourite recipe for a rainy day is",
    "The history of the Roman Empire began",
    "Here is a list of tips for learning a new language:",
    "The weather today",
    "Explain to a child why the sky is blue.",
    "The best way to start a morning routine is",
    "A good movie review should mention",
    "def fibonacci(n):",
    "Dear hiring manager, I am writing to apply for",
    "The main causes of the French Revolution were",
    "Q: What is the boiling point of water? A:",
];

/// `meet bench generate`: [`bench_generate`] at each batch size — batch 1 greedy on `prompt` (the
/// Python reference's), larger batches sampled at `temperature` over [`BATCH_PROMPTS`].
pub fn bench_generate_batches(
    p: &crate::Pretrained,
    prompt: &str,
    batches: &[usize],
    new_tokens: usize,
    temperature: f64,
    reps: usize,
) -> Result<Vec<GenerateFigures>> {
    batches
        .iter()
        .map(|&b| {
            let prompts = if b == 1 {
                vec![p.tokenizer.encode(prompt, true)?]
            } else {
                (0..b)
                    .map(|i| p.tokenizer.encode(BATCH_PROMPTS[i % BATCH_PROMPTS.len()], true))
                    .collect::<Result<_>>()?
            };
            let temp = if b == 1 { 0.0 } else { temperature };
            bench_generate(p.model.as_ref(), &p.tokenizer, &p.generation, &prompts, new_tokens, temp, reps, &p.device)
        })
        .collect()
}

/// Figures of one prompt length in `meet bench prefill`.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillFigures {
    pub prompt_tokens: usize,
    /// Median seconds of prefill plus one greedy token (transformers' `generate(max_new_tokens=1)`).
    pub seconds_median: f64,
    pub seconds_all: Vec<f64>,
    pub tokens_per_s: f64,
}

/// Long-prompt prefill: for each length, a prompt of that many tokens (`pool` repeated end to
/// end) and one greedy token, `reps` times; the first length is also run once untimed first.
pub fn bench_prefill(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    defaults: &GenerationDefaults,
    pool: &[u32],
    lengths: &[usize],
    reps: usize,
    device: &Device,
) -> Result<Vec<PrefillFigures>> {
    if pool.is_empty() {
        return Err(crate::Error::Invalid("no token ids to build prompts from".into()));
    }
    let params = SamplingParams { max_new_tokens: 1, min_new_tokens: 1, ..Default::default() };
    let mut out = Vec::new();
    for (i, &n) in lengths.iter().enumerate() {
        let prompt: Vec<u32> = pool.iter().copied().cycle().take(n).collect();
        let run = || -> Result<f64> {
            let t = Instant::now();
            generate(model, tokenizer, std::slice::from_ref(&prompt), &params, defaults, device, |_, _| Ok(()))?;
            Ok(t.elapsed().as_secs_f64())
        };
        if i == 0 {
            run()?; // warm-up
        }
        let all: Vec<f64> = (0..reps.max(1)).map(|_| run()).collect::<Result<_>>()?;
        let med = median(all.clone());
        out.push(PrefillFigures {
            prompt_tokens: n,
            seconds_median: med,
            seconds_all: all,
            tokens_per_s: n as f64 / med,
        });
    }
    Ok(out)
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    peak_rss_mib_of("self")
}

/// Peak resident memory of process `pid` (`self`: this one), MiB, from `/proc/PID/status`.
pub fn peak_rss_mib_of(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Figures of `meet bench train`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainFigures {
    pub mode: String,
    pub batch: usize,
    pub seq: usize,
    pub trainable_params: usize,
    pub lr: f64,
    pub sec_per_step_median: f64,
    pub fwd_median: f64,
    pub bwd_median: f64,
    pub opt_median: f64,
    pub tokens_per_s_median: f64,
    pub losses: Vec<f64>,
    pub peak_rss_mib: Option<f64>,
}

/// The Python reference's training benchmark (`bench_train.py`): forward, backward and AdamW on
/// the fixed batch in `batch_file` (`{"input_ids": [[..], ..]}`, loss on every token), `warmup`
/// untimed steps then `steps` timed ones. Modes: `full` (lr 1e-5), `lora` (r 64, alpha 128, all
/// seven projections, lr 1e-4), `prompt` (20 virtual tokens, lr 1e-3); AdamW without weight decay
/// or clipping, as the reference.
pub fn bench_train(
    model: &str,
    mode: &str,
    batch_file: &std::path::Path,
    steps: usize,
    warmup: usize,
    dtype: crate::train::Dtype,
) -> Result<TrainFigures> {
    use crate::methods::config::{DataSection, RunConfig};
    use crate::methods::setup::standard as build;
    use crate::peft::lora::LoraConfig;
    use crate::peft::prompt::PromptConfig;
    use crate::train::TrainConfig;
    use crate::Error;

    let v = crate::files::read_json(batch_file)?;
    let rows: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone())
        .map_err(|e| Error::parse(batch_file, format!("'input_ids' must be rows of token ids: {e}")))?;
    let (lora, prompt, lr) = match mode {
        "full" => (None, None, 1e-5),
        "lora" => (
            Some(LoraConfig {
                r: 64,
                alpha: 128.0,
                dropout: 0.0,
                // Every projection of the architecture.
                target_modules: lora_targets(model)?.iter().map(|s| s.to_string()).collect(),
                use_rslora: false,
                fan_in_fan_out: false,
            }),
            None,
            1e-4,
        ),
        "prompt" => (None, Some(PromptConfig { n: 20, ..Default::default() }), 1e-3),
        other => return Err(Error::Invalid(format!("unknown bench mode '{other}' (full, lora, prompt)"))),
    };
    let dir = std::env::temp_dir().join(format!("meet-bench-train-{}", std::process::id()));
    let mut data = DataSection::new(batch_file);
    data.max_length = 4096;
    let mut cfg = RunConfig::new("sft", model, data, dir.clone())?;
    cfg.model.train_weights = mode == "full";
    cfg.lora = lora;
    cfg.prompt = prompt;
    cfg.train = TrainConfig {
        max_steps: Some(warmup + steps),
        batch_size: rows.len(),
        lr,
        max_grad_norm: None,
        shuffle: false,
        save_every: Some(0),
        dtype,
        ..Default::default()
    };
    let mut built = build(&cfg)?;
    let examples: Vec<crate::data::Example> =
        rows.iter().map(|r| crate::data::Example { ids: r.clone(), ..Default::default() }).collect();
    let objective = crate::objectives::lm::LanguageModeling { pad_id: 0 };
    let t = timed_train(&mut built, &objective, &examples, &cfg, warmup)?;
    let tokens: usize = rows.iter().map(|r| r.len()).sum();
    Ok(TrainFigures {
        mode: mode.into(),
        batch: rows.len(),
        seq: rows.first().map_or(0, |r| r.len()),
        trainable_params: built.optimizer.num_params(),
        lr,
        sec_per_step_median: t.step,
        fwd_median: t.fwd,
        bwd_median: t.bwd,
        opt_median: t.opt,
        tokens_per_s_median: tokens as f64 / t.step,
        losses: t.losses,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Step-time medians of a benchmark run (the steps after `warmup`) and every loss.
struct Timed {
    step: f64,
    fwd: f64,
    bwd: f64,
    opt: f64,
    losses: Vec<f64>,
}

/// Trains `built` on `items` as `cfg` says in a scratch folder (removed after) and times it.
fn timed_train<T: crate::objectives::Item>(
    built: &mut crate::methods::setup::Built,
    objective: &dyn crate::objectives::Objective<T>,
    items: &[T],
    cfg: &crate::methods::config::RunConfig,
    warmup: usize,
) -> Result<Timed> {
    let dir = &cfg.output_dir;
    let run = crate::train::RunDir { dir: dir.clone(), config_hash: String::new(), label: "bench".into() };
    let logs = crate::train::train(&built.policy, objective, items, &[], &mut built.optimizer, &cfg.train, &run, false);
    let _ = std::fs::remove_dir_all(dir);
    let logs = logs?;
    let timed = &logs[warmup.min(logs.len())..];
    let med = |f: &dyn Fn(&crate::train::StepLog) -> f64| median(timed.iter().map(f).collect());
    Ok(Timed {
        step: med(&|l| l.fwd_s + l.bwd_s + l.opt_s),
        fwd: med(&|l| l.fwd_s),
        bwd: med(&|l| l.bwd_s),
        opt: med(&|l| l.opt_s),
        losses: logs.iter().map(|l| l.loss).collect(),
    })
}

/// Figures of `meet bench dpo`.
#[derive(Debug, Clone, Serialize)]
pub struct DpoFigures {
    pub pairs: usize,
    pub seq: usize,
    pub beta: f64,
    /// The one reference pass over the pairs (done once per dataset, not per step).
    pub reference_s: f64,
    pub sec_per_step_median: f64,
    pub fwd_median: f64,
    pub bwd_median: f64,
    pub opt_median: f64,
    /// Pairs per second of one step plus one reference pass over its pairs (what a single
    /// epoch costs per step).
    pub pairs_per_s_with_reference: f64,
    pub losses: Vec<f64>,
    pub peak_rss_mib: Option<f64>,
}

/// The layers LoRA may target in `model`'s architecture (a GGUF file holds a Llama-family model).
fn lora_targets(model: &str) -> Result<&'static [&'static str]> {
    match crate::io::resolve(model)? {
        crate::io::Source::Folder(dir) => {
            let path = dir.join("config.json");
            Ok(crate::models::architecture(&crate::files::read_json(&path)?, &path)?.lora_targets)
        }
        crate::io::Source::Gguf(_) => Ok(crate::models::llama::ARCHITECTURE.lora_targets),
    }
}

/// The Python reference's DPO benchmark (`bench_dpo_manual.py`): sigmoid DPO, beta 0.1, the full
/// f32 model, AdamW lr 1e-6 without clipping, all pairs of `pairs_file` (`[{"prompt_ids",
/// "chosen_ids", "rejected_ids"}]`) in one step; `warmup` untimed steps then `steps` timed ones.
/// Unlike the reference, the reference log-probabilities are computed once, before training.
pub fn bench_dpo(
    model: &str,
    pairs_file: &std::path::Path,
    steps: usize,
    warmup: usize,
    dtype: crate::train::Dtype,
) -> Result<DpoFigures> {
    use crate::data::preference::Pair;
    use crate::methods::config::{DataSection, RunConfig};
    use crate::methods::setup::standard as build;
    use crate::objectives::dpo::{Dpo, DpoConfig, DpoPair};
    use crate::Error;

    let v = crate::files::read_json(pairs_file)?;
    let ids = |x: &serde_json::Value, k: &str| -> Result<Vec<u32>> {
        serde_json::from_value(x[k].clone()).map_err(|e| Error::parse(pairs_file, format!("'{k}': {e}")))
    };
    let pairs: Vec<Pair> = v
        .as_array()
        .ok_or_else(|| Error::parse(pairs_file, "expected a list of pairs"))?
        .iter()
        .map(|p| {
            Ok(Pair {
                prompt: ids(p, "prompt_ids")?,
                chosen: ids(p, "chosen_ids")?,
                rejected: ids(p, "rejected_ids")?,
                dimension: None,
            })
        })
        .collect::<Result<_>>()?;
    let dir = std::env::temp_dir().join(format!("meet-bench-dpo-{}", std::process::id()));
    let mut cfg = RunConfig::new("dpo", model, DataSection::new(pairs_file), dir.clone())?;
    cfg.model.train_weights = true;
    cfg.train.lr = 1e-6;
    cfg.train.max_grad_norm = None;
    cfg.train.batch_size = pairs.len();
    cfg.train.max_steps = Some(warmup + steps);
    cfg.train.shuffle = false;
    cfg.train.save_every = Some(0);
    cfg.train.dtype = dtype;
    let d = DpoConfig::default();
    let t = Instant::now();
    let refs = crate::methods::dpo::cached_reference_logps(&cfg, &d, &pairs, 0, "reference_logps.json")?;
    let reference_s = t.elapsed().as_secs_f64();
    let mut built = build(&cfg)?;
    let items: Vec<DpoPair> = pairs
        .iter()
        .cloned()
        .zip(refs)
        .map(|(pair, (c, r))| DpoPair { pair, ref_chosen: c, ref_rejected: r })
        .collect();
    let objective = Dpo { config: d.clone(), pad_id: 0 };
    let t = timed_train(&mut built, &objective, &items, &cfg, warmup)?;
    Ok(DpoFigures {
        pairs: pairs.len(),
        seq: pairs.first().map_or(0, |p| p.prompt.len() + p.chosen.len()),
        beta: d.beta,
        reference_s,
        sec_per_step_median: t.step,
        fwd_median: t.fwd,
        bwd_median: t.bwd,
        opt_median: t.opt,
        pairs_per_s_with_reference: pairs.len() as f64 / (t.step + reference_s),
        losses: t.losses,
        peak_rss_mib: peak_rss_mib(),
    })
}
