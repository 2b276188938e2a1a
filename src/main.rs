//! The `meet` command line: a thin layer over the library.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use meet::controls::Controlled;
use meet::generate::{prompt_ids, SamplingParams, TextStream};
use meet::nn::packed::PackedFormat;
use meet::{LoadOptions, Packing, Pretrained};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// The model `scripts/fetch-model.sh` puts in place.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "meet",
    version,
    about = "Align causal language models with human preferences (MEET and baselines) on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Write a model (GGUF, HF folder or Hub id) as a standard HF folder.
    Convert {
        /// Model: HF folder, GGUF file or Hub repo id.
        model: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train as a TOML run configuration says: sft, coh, control-token, meet or dpo.
    Train(TrainArgs),
    /// The controlled-sentiment experiment from an experiment file: task, judged pairs, every
    /// method × seed, evaluations × temperatures, report.md. Resumable: finished steps are kept.
    Experiment {
        /// The experiment file (examples/sentiment.toml).
        config: PathBuf,
        /// A small profile of the same steps (minutes), in output_dir/quick.
        #[arg(long)]
        quick: bool,
    },
    /// Sample responses to prompts (under a control), score them with a judge, report the mean
    /// score, length, cut share and KL to a reference with 95% bootstrap intervals.
    Eval(EvalArgs),
    /// Preference pairs from a judge: the best and worst of several sampled responses per prompt,
    /// written as TRL preference JSONL (with the scores).
    Pairs {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompts: JSONL with a "prompt" string per line, or one prompt per line.
        #[arg(long)]
        prompts: PathBuf,
        /// `vader`, `vader-full` or `reward:PATH`.
        #[arg(long, default_value = "vader-full")]
        judge: String,
        /// Responses sampled per prompt.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Build the sentiment task from the rated snippets (`scripts/fetch-data.sh`): train and
    /// held-out prompts (the first words of snippets) and human-rating preference pairs.
    PrepareSentiment {
        /// The snippets file.
        #[arg(long, default_value = "data/sentiment/movieReviewSnippets_GroundTruth.txt")]
        snippets: PathBuf,
        #[arg(long, default_value_t = 4)]
        words: usize,
        #[arg(long, default_value_t = 2000)]
        train: usize,
        #[arg(long, default_value_t = 200)]
        eval: usize,
        #[arg(long, default_value_t = 2000)]
        pairs: usize,
        /// Smallest rating gap (on -4..4) between the snippets of a pair.
        #[arg(long, default_value_t = 2.0)]
        min_gap: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder for train_prompts.jsonl, eval_prompts.jsonl, human_pairs.jsonl.
        #[arg(long, default_value = "data/sentiment-task")]
        out: PathBuf,
    },
    /// Win rate of one evaluation over another on the same prompts (ties half), with its 95% CI.
    Compare {
        /// `meet eval --out` file of method A.
        a: PathBuf,
        /// `meet eval --out` file of method B.
        b: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Merge a LoRA adapter into its base model and write an HF folder.
    Merge {
        /// Base model: HF folder, GGUF file or Hub repo id.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// PEFT LoRA adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model: HF folder, GGUF file, or Hub repo id (org/name[@revision]) from the HF cache.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Weight storage for inference: `auto` keeps a GGUF file's formats (exact) and f32 as f32;
    /// `f32` expands everything; `q8_0`, `q4_1`, `q4_0`, `f16`, `bf16` round matrices (lossy).
    #[arg(long, default_value = "auto")]
    weights: String,
}

impl ModelArgs {
    fn options(&self) -> anyhow::Result<LoadOptions> {
        let packing = match self.weights.as_str() {
            "auto" => Packing::Source,
            "f32" => Packing::Dense,
            other => Packing::Quantize(PackedFormat::parse(other)?),
        };
        Ok(LoadOptions { packing, ..Default::default() })
    }

    /// The model with the controls of a `meet train` output folder, if it is one.
    fn load_controlled(&self) -> anyhow::Result<Controlled> {
        Controlled::load(&self.model, &self.options()?).with_context(|| format!("loading model '{}'", self.model))
    }

    fn load(&self) -> anyhow::Result<Pretrained> {
        let packing = match self.weights.as_str() {
            "auto" => Packing::Source,
            "f32" => Packing::Dense,
            other => Packing::Quantize(PackedFormat::parse(other)?),
        };
        let opts = LoadOptions { packing, ..Default::default() };
        Pretrained::load(&self.model, &opts).with_context(|| format!("loading model '{}'", self.model))
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text. Repeat the flag for a left-padded batch: the completions are then printed
    /// as JSON lines (`prompt`, `text`, `finish_reason`, `completion_tokens`) instead of streamed.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Render the prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Token ids never to generate (comma-separated), as transformers' `suppress_tokens`.
    #[arg(long, value_delimiter = ',')]
    suppress_tokens: Vec<u32>,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable); the text is cut before it.
    #[arg(long = "stop-strings")]
    stop_strings: Vec<String>,
    /// Generate under this control (`good`, `bad`, ...) of a `meet train` output folder.
    #[arg(long)]
    control: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// The run configuration (see the README and examples/); optional when the flags say enough.
    #[arg(value_name = "CONFIG")]
    config_pos: Option<PathBuf>,
    #[arg(long, conflicts_with = "config_pos")]
    config: Option<PathBuf>,
    /// Continue every stage from its newest checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// sft | coh | control-token | meet | dpo (`method`).
    #[arg(long)]
    method: Option<String>,
    /// `model.source`.
    #[arg(long)]
    model: Option<String>,
    /// `data.train`.
    #[arg(long)]
    data: Option<String>,
    /// `output_dir`.
    #[arg(long)]
    output_dir: Option<String>,
    /// `train.lr`.
    #[arg(long)]
    lr: Option<f64>,
    /// `train.epochs`.
    #[arg(long)]
    epochs: Option<usize>,
    /// `train.max_steps`.
    #[arg(long)]
    max_steps: Option<usize>,
    /// `train.batch_size`.
    #[arg(long)]
    batch_size: Option<usize>,
    /// `train.seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// `data.skip_invalid = true`: skip and count invalid records.
    #[arg(long)]
    skip_invalid: bool,
    /// Any option as `key=value` with its dotted TOML path (`--set dpo.beta=0.2`,
    /// `--set meet.steps=step1`, `--set 'model.controls=["pos","neg"]'`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl TrainArgs {
    /// The configuration: the file (if any) with every flag applied over it.
    fn config(&self) -> anyhow::Result<(meet::run::RunConfig, String)> {
        let mut over: Vec<(String, String)> = Vec::new();
        let q = |v: &str| format!("{:?}", v); // a TOML basic string
        for (k, v) in [
            ("method", self.method.as_deref().map(q)),
            ("model.source", self.model.as_deref().map(q)),
            ("data.train", self.data.as_deref().map(q)),
            ("output_dir", self.output_dir.as_deref().map(q)),
            ("train.lr", self.lr.map(|x| format!("{x:e}"))),
            ("train.epochs", self.epochs.map(|x| x.to_string())),
            ("train.max_steps", self.max_steps.map(|x| x.to_string())),
            ("train.batch_size", self.batch_size.map(|x| x.to_string())),
            ("train.seed", self.seed.map(|x| x.to_string())),
            ("data.skip_invalid", self.skip_invalid.then(|| "true".to_string())),
        ] {
            if let Some(v) = v {
                over.push((k.into(), v));
            }
        }
        for kv in &self.set {
            let Some((k, v)) = kv.split_once('=') else { bail!("--set {kv}: expected KEY=VALUE") };
            over.push((k.trim().into(), v.trim().into()));
        }
        match self.config.as_ref().or(self.config_pos.as_ref()) {
            Some(path) => Ok((meet::run::RunConfig::from_file_with(path, &over)?, path.display().to_string())),
            None => Ok((meet::run::RunConfig::from_table(Default::default(), &over)?, "the command line".into())),
        }
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompts: JSONL with a "prompt" string per line, or a text file with one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Generate under this control of a `meet train` output folder.
    #[arg(long)]
    control: Option<String>,
    /// Reference model for the KL estimate (e.g. the base model); none: no KL.
    #[arg(long)]
    reference: Option<String>,
    /// Judge: `vader` (compound sentiment of the response), `vader-full` (of prompt + response),
    /// `reward:PATH` (a reward model trained with `method = "reward"`).
    #[arg(long, default_value = "vader")]
    judge: String,
    /// Render prompts with the chat template.
    #[arg(long)]
    chat: bool,
    /// Responses per prompt.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Where the scored responses go (JSONL), for `meet compare`.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens/s at several batch sizes; ends with one JSON line.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Batch-1 prompt (the Python reference's).
        #[arg(long, default_value = "The capital of France is")]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        batches: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Sampling temperature for batches above 1 (batch 1 is greedy, as the reference).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
    },
    /// DPO steps (sigmoid, beta 0.1, full model, AdamW lr 1e-6) on the Python reference's fixed
    /// pairs; ends with one JSON line.
    Dpo {
        /// Model: HF folder, GGUF file or Hub repo id (dense f32 weights are used).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// `[{"prompt_ids", "chosen_ids", "rejected_ids"}, ...]` (the reference's data file).
        #[arg(long, default_value = "../shared/reference/data/dpo_pairs_4x64+64.json")]
        pairs: PathBuf,
        #[arg(long, default_value_t = 6)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// Forward, backward and AdamW on the Python reference's fixed batch; ends with one JSON line.
    Train {
        /// Model: HF folder, GGUF file or Hub repo id (dense f32 weights are used).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// full, lora (r 64, alpha 128, all projections) or prompt (20 virtual tokens).
        #[arg(long, default_value = "full")]
        mode: String,
        /// Token ids `{"input_ids": [[...], ...]}` (the reference's `data/lm_batch_4x128.json`).
        #[arg(long, default_value = "../shared/reference/data/lm_batch_4x128.json")]
        batch: PathBuf,
        #[arg(long, default_value_t = 8)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
    },
}

/// Sixteen varied prompts for batched runs (different lengths exercise left padding).
const BATCH_PROMPTS: [&str; 16] = [
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

fn run() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => {
            let c = a.model.load_controlled()?;
            let p = &c.policy.pretrained;
            let ids = a
                .prompt
                .iter()
                .map(|t| prompt_ids(&p.tokenizer, t, a.chat, a.system.as_deref()))
                .collect::<meet::Result<Vec<_>>>()?;
            let params = SamplingParams {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
                max_new_tokens: a.max_new_tokens,
                min_new_tokens: a.min_new_tokens,
                stop_strings: a.stop_strings.clone(),
                suppress_tokens: a.suppress_tokens.clone(),
            };
            let mut stream = TextStream::new(&p.tokenizer);
            let mut stdout = std::io::stdout().lock();
            // One prompt without stop strings streams; otherwise text is printed once final (a
            // stop string must never show).
            let streaming = ids.len() == 1 && params.stop_strings.is_empty();
            let out = c.generate(&ids, a.control.as_deref(), &params, |_, tok| {
                if streaming {
                    if let Some(piece) = stream.push(tok)? {
                        write!(stdout, "{piece}")
                            .and_then(|_| stdout.flush())
                            .map_err(|e| meet::Error::io("<stdout>", e))?;
                    }
                }
                Ok(())
            })?;
            if ids.len() == 1 {
                if !streaming {
                    write!(stdout, "{}", out[0].text)?;
                }
                writeln!(stdout)?;
            } else {
                for (prompt, g) in a.prompt.iter().zip(&out) {
                    let line = serde_json::json!({
                        "prompt": prompt,
                        "text": g.text,
                        "finish_reason": format!("{:?}", g.finish).to_lowercase(),
                        "completion_tokens": g.tokens.len(),
                    });
                    writeln!(stdout, "{line}")?;
                }
            }
        }
        Command::Eval(a) => {
            use meet::eval::sample::{evaluate, summarize, EvalOptions};
            let judge = meet::eval::judge_by_name(&a.judge)?;
            let prompts = meet::eval::sample::read_prompts(&a.prompts)?;
            let model = a.model.load_controlled()?;
            let reference = match &a.reference {
                Some(r) => {
                    Some(Controlled::load(r, &a.model.options()?).with_context(|| format!("loading reference '{r}'"))?)
                }
                None => None,
            };
            let opts = EvalOptions {
                control: a.control.clone(),
                chat: a.chat,
                samples: a.samples,
                params: SamplingParams {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed,
                    max_new_tokens: a.max_new_tokens,
                    ..Default::default()
                },
                batch: a.batch,
            };
            let samples = evaluate(&model, reference.as_ref(), judge.as_ref(), &prompts, &opts)?;
            if let Some(out) = &a.out {
                meet::io::write_jsonl(out, &samples)?;
            }
            let s = summarize(&samples, a.seed)?;
            eprintln!(
                "{} responses: {} {:.4} [{:.4}, {:.4}], length {:.1} tokens, cut {:.1}%{}",
                samples.len(),
                a.judge,
                s.score.value,
                s.score.lo,
                s.score.hi,
                s.length.value,
                100.0 * s.cut_share,
                s.kl.map(|k| format!(", KL {:.3} [{:.3}, {:.3}]", k.value, k.lo, k.hi)).unwrap_or_default()
            );
            println!(
                "{}",
                serde_json::json!({"eval": a.model.model, "control": a.control, "judge": a.judge, "summary": s})
            );
        }
        Command::Pairs { model, prompts, judge, samples, temperature, max_new_tokens, seed, batch, out } => {
            use meet::eval::pairs::best_worst_pairs;
            use meet::eval::sample::EvalOptions;
            let judge = meet::eval::judge_by_name(&judge)?;
            let prompts = meet::eval::sample::read_prompts(&prompts)?;
            let m = model.load_controlled()?;
            let opts = EvalOptions {
                control: None,
                chat: false,
                samples,
                params: SamplingParams { temperature, seed, max_new_tokens, ..Default::default() },
                batch,
            };
            let (pairs, ties) = best_worst_pairs(&m, judge.as_ref(), &prompts, &opts)?;
            meet::io::write_jsonl(&out, &pairs)?;
            eprintln!("wrote {} pairs to {} ({ties} prompts without a score difference)", pairs.len(), out.display());
        }
        Command::PrepareSentiment { snippets, words, train, eval, pairs, min_gap, seed, out } => {
            use meet::data::sentiment::{read_snippets, sentiment_task, TaskOptions};
            let s = read_snippets(&snippets)?;
            let o = TaskOptions { words, train, eval, pairs, min_gap, seed, ..Default::default() };
            let t = sentiment_task(&s, &o)?;
            meet::data::sentiment::write_task(&t, &out)?;
            eprintln!(
                "{}: {} train prompts, {} held-out prompts, {} human-rating pairs (from {} snippets)",
                out.display(),
                t.train_prompts.len(),
                t.eval_prompts.len(),
                t.rating_pairs.len(),
                s.len()
            );
        }
        Command::Compare { a, b, seed } => {
            use meet::eval::sample::{paired_scores, Sample};
            let (sa, sb): (Vec<Sample>, Vec<Sample>) = (meet::io::read_jsonl(&a)?, meet::io::read_jsonl(&b)?);
            let (xa, xb) =
                paired_scores(&sa, &sb).with_context(|| format!("pairing {} with {}", a.display(), b.display()))?;
            let w = meet::eval::stats::win_rate(&xa, &xb, seed)?;
            let len =
                |s: &[meet::eval::sample::Sample]| s.iter().map(|x| x.tokens as f64).sum::<f64>() / s.len() as f64;
            eprintln!(
                "win rate of {} over {}: {:.3} [{:.3}, {:.3}] on {} responses (lengths {:.1} vs {:.1} tokens)",
                a.display(),
                b.display(),
                w.value,
                w.lo,
                w.hi,
                w.n,
                len(&sa),
                len(&sb)
            );
            println!(
                "{}",
                serde_json::json!({"a": a, "b": b, "win_rate": w, "length_a": len(&sa), "length_b": len(&sb)})
            );
        }
        Command::Experiment { config, quick } => {
            let mut cfg = meet::experiment::ExperimentConfig::from_file(&config)?;
            if quick {
                cfg.quick();
            }
            let report = meet::experiment::run(&cfg).with_context(|| format!("experiment {}", config.display()))?;
            eprintln!("report: {}", report.display());
        }
        Command::Convert { model, out } => {
            let n = meet::io::convert(&model, &out).with_context(|| format!("converting '{model}'"))?;
            eprintln!("wrote {} ({n} tensors)", out.display());
        }
        Command::Train(args) => {
            let (cfg, from) = args.config()?;
            let logs = meet::run::run(&cfg, args.resume).with_context(|| format!("training with {from}"))?;
            if let Some(last) = logs.last() {
                eprintln!(
                    "done: step {} loss {:.4}; outputs in {}",
                    last.step,
                    last.loss,
                    cfg.output_dir.join("final").display()
                );
            }
        }
        Command::Merge { model, adapter, out } => {
            let (cfg, tensors) = meet::peft::folder::read_lora(&adapter)?;
            let raw = meet::run::merge_lora(&model, &cfg, &tensors)
                .with_context(|| format!("merging {} into '{model}'", adapter.display()))?;
            meet::io::save_hf_folder(&raw, &out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Bench { what: BenchCommand::Train { model, mode, batch, steps, warmup } } => {
            let f = meet::bench::bench_train(&model, &mode, &batch, steps, warmup)?;
            println!(
                "train {}: {:.3} s/step (fwd {:.3}, bwd {:.3}, opt {:.3}), {:.1} tok/s, losses {:?}, peak RSS {:.0} MiB",
                f.mode, f.sec_per_step_median, f.fwd_median, f.bwd_median, f.opt_median, f.tokens_per_s_median,
                f.losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>(), f.peak_rss_mib.unwrap_or(0.0)
            );
            println!(
                "{}",
                serde_json::json!({"bench": "train", "model": model, "threads": meet::nn::team::Team::global().threads(), "result": f})
            );
        }
        Command::Bench { what: BenchCommand::Dpo { model, pairs, steps, warmup } } => {
            let f = meet::bench::bench_dpo(&model, &pairs, steps, warmup)?;
            println!(
                "dpo: {} pairs, {:.3} s/step (fwd {:.3}, bwd {:.3}, opt {:.3}) + reference pass {:.3} s once, {:.3} pairs/s with it, losses {:?}, peak RSS {:.0} MiB",
                f.pairs, f.sec_per_step_median, f.fwd_median, f.bwd_median, f.opt_median, f.reference_s,
                f.pairs_per_s_with_reference,
                f.losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>(), f.peak_rss_mib.unwrap_or(0.0)
            );
            println!(
                "{}",
                serde_json::json!({"bench": "dpo", "model": model, "threads": meet::nn::team::Team::global().threads(), "result": f})
            );
        }
        Command::Bench { what: BenchCommand::Generate { model, prompt, new_tokens, batches, reps, temperature } } => {
            if new_tokens < 2 {
                bail!("--new-tokens must be at least 2");
            }
            let p = model.load()?;
            let mut results = vec![];
            for &b in &batches {
                let prompts = if b == 1 {
                    vec![p.tokenizer.encode(&prompt, true)?]
                } else {
                    (0..b)
                        .map(|i| p.tokenizer.encode(BATCH_PROMPTS[i % BATCH_PROMPTS.len()], true))
                        .collect::<meet::Result<Vec<_>>>()?
                };
                let temp = if b == 1 { 0.0 } else { temperature };
                let f = meet::bench::bench_generate(
                    p.model.as_ref(),
                    &p.tokenizer,
                    &p.generation,
                    &prompts,
                    new_tokens,
                    temp,
                    reps,
                    &p.device,
                )?;
                println!(
                    "batch {:>2} ({}): prefill {:>8.1} tok/s, decode {:>7.1} tok/s ({} prompt tokens, {} new per row, median {:.3}s)",
                    f.batch, f.sampling, f.prefill_tokens_per_s, f.decode_tokens_per_s, f.prompt_tokens, f.new_tokens, f.seconds_total_median
                );
                results.push(f);
            }
            let json = serde_json::json!({
                "bench": "generate",
                "model": model.model,
                "weights": model.weights,
                "threads": meet::nn::team::Team::global().threads(),
                "results": results,
                "peak_rss_mib": meet::bench::peak_rss_mib(),
            });
            println!("{json}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // The kernel team (src/nn/team.rs) runs every heavy op on all cores. candle's own elementwise
    // ops would otherwise spread over rayon too, whose idle workers spin on the same cores and
    // delay the team's helpers (measured: a LoRA run 25% slower). So rayon gets one thread, the
    // team the cores; both settled before any thread starts (candle re-reads /proc/cpuinfo on
    // every matmul unless RAYON_NUM_THREADS is set).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("MEET_THREADS").is_none() {
        let n = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(cores);
        std::env::set_var("MEET_THREADS", n.max(1).to_string());
    }
    std::env::set_var("RAYON_NUM_THREADS", "1");
    // Run on a pool worker so parallel kernels use the calling thread plus the others, instead of
    // a blocked main thread beside busy-waiting workers.
    match rayon::scope(|_| run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
