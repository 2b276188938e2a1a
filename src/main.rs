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
    /// Train as a TOML run configuration (and flags) say: sft, coh, control-token, meet, dpo or reward.
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
        /// Sampling temperature.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Longest response, in tokens.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Sequences generated together.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Where the pairs go (TRL preference JSONL).
        #[arg(long)]
        out: PathBuf,
    },
    /// Build the sentiment task from the rated snippets (`scripts/fetch-data.sh`): train and
    /// held-out prompts (the first words of snippets) and human-rating preference pairs.
    PrepareSentiment {
        /// The snippets file.
        #[arg(long, default_value = "data/sentiment/movieReviewSnippets_GroundTruth.txt")]
        snippets: PathBuf,
        /// Words of a snippet that make a prompt.
        #[arg(long, default_value_t = 4)]
        words: usize,
        /// Training prompts.
        #[arg(long, default_value_t = 2000)]
        train: usize,
        /// Held-out prompts.
        #[arg(long, default_value_t = 200)]
        eval: usize,
        /// Human-rating preference pairs.
        #[arg(long, default_value_t = 2000)]
        pairs: usize,
        /// Smallest rating gap (on -4..4) between the snippets of a pair.
        #[arg(long, default_value_t = 2.0)]
        min_gap: f64,
        /// Seed of the draw.
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
        /// Seed of the bootstrap resampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Merge a LoRA adapter into its base model and write an HF folder.
    Merge {
        /// Base model: HF folder, GGUF file or Hub repo id.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// PEFT LoRA adapter folder (with adapter_config.json: a run's `final/lora`, or
        /// `final/lora/NAME` for a named adapter).
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
            other => Packing::Quantize(PackedFormat::parse(other).map_err(|e| anyhow::anyhow!("--weights: {e}"))?),
        };
        Ok(LoadOptions { packing, ..Default::default() })
    }

    /// The model with the controls of a `meet train` output folder, if it is one.
    fn load_controlled(&self) -> anyhow::Result<Controlled> {
        Controlled::load(&self.model, &self.options()?).with_context(|| format!("loading model '{}'", self.model))
    }

    fn load(&self) -> anyhow::Result<Pretrained> {
        Pretrained::load(&self.model, &self.options()?).with_context(|| format!("loading model '{}'", self.model))
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
    /// System message (a system turn of the chat template: needs --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Fewest tokens to generate (EOS is suppressed until then).
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Token ids never to generate (comma-separated), as transformers' `suppress_tokens`.
    #[arg(long, value_delimiter = ',')]
    suppress_tokens: Vec<u32>,
    /// Sampling temperature; 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to p (nucleus sampling).
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable); the text is cut before it. `\n`,
    /// `\t`, `\r` and `\\` stand for a newline, a tab, a carriage return and a backslash.
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
    /// The run configuration, as a flag (the same as the positional CONFIG).
    #[arg(long, conflicts_with = "config_pos")]
    config: Option<PathBuf>,
    /// Continue every stage from its newest checkpoint in the output folder (a finished run is
    /// left as it is).
    #[arg(long)]
    resume: bool,
    /// sft | coh | control-token | meet | dpo | reward (`method`).
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

/// A configuration value given on the command line: its dotted key, its TOML value, and the
/// flag as the user wrote it (for error messages).
#[derive(Clone)]
struct Override {
    key: String,
    value: String,
    flag: String,
}

/// The keys a run cannot do without, and the flags that give them.
const REQUIRED: [(&str, &str); 3] =
    [("model.source", "--model"), ("data.train", "--data"), ("output_dir", "--output-dir")];

impl TrainArgs {
    /// The configuration: the file (if any) with every flag applied over it. Errors name the flag
    /// or the file that caused them.
    fn config(&self) -> anyhow::Result<(meet::run::RunConfig, String)> {
        let s = |v: &str| toml::Value::String(v.to_string()).to_string();
        let f = |x: f64| toml::Value::Float(x).to_string();
        let mut over: Vec<Override> = Vec::new();
        let show = |v: &dyn std::fmt::Display| format!(" {v}");
        for (key, flag, value) in [
            ("method", "--method", self.method.as_deref().map(|v| (s(v), show(&v)))),
            ("model.source", "--model", self.model.as_deref().map(|v| (s(v), show(&v)))),
            ("data.train", "--data", self.data.as_deref().map(|v| (s(v), show(&v)))),
            ("output_dir", "--output-dir", self.output_dir.as_deref().map(|v| (s(v), show(&v)))),
            ("train.lr", "--lr", self.lr.map(|v| (f(v), show(&v)))),
            ("train.epochs", "--epochs", self.epochs.map(|v| (v.to_string(), show(&v)))),
            ("train.max_steps", "--max-steps", self.max_steps.map(|v| (v.to_string(), show(&v)))),
            ("train.batch_size", "--batch-size", self.batch_size.map(|v| (v.to_string(), show(&v)))),
            ("train.seed", "--seed", self.seed.map(|v| (v.to_string(), show(&v)))),
            ("data.skip_invalid", "--skip-invalid", self.skip_invalid.then(|| ("true".to_string(), String::new()))),
        ] {
            if let Some((value, shown)) = value {
                over.push(Override { key: key.into(), flag: format!("{flag}{shown}"), value });
            }
        }
        for kv in &self.set {
            let Some((k, v)) = kv.split_once('=') else { bail!("--set {kv}: expected KEY=VALUE") };
            over.push(Override { key: k.trim().into(), value: v.trim().into(), flag: format!("--set {kv}") });
        }
        let file = self.config.as_ref().or(self.config_pos.as_ref());
        let table = match file {
            Some(path) => meet::run::RunConfig::read_table(path)?,
            None => {
                let missing: Vec<&str> =
                    REQUIRED.iter().filter(|(k, _)| !over.iter().any(|o| o.key == *k)).map(|(_, flag)| *flag).collect();
                if !missing.is_empty() {
                    bail!(
                        "give a run file (`meet train examples/sft-lora.toml`; see examples/) or the flags --method, \
                         --model, --data and --output-dir (missing: {})",
                        missing.join(", ")
                    );
                }
                Default::default()
            }
        };
        let kv = |o: &[Override]| o.iter().map(|o| (o.key.clone(), o.value.clone())).collect::<Vec<_>>();
        let from = file.map_or("the command line".to_string(), |p| p.display().to_string());
        match meet::run::RunConfig::from_table(table.clone(), &kv(&over)) {
            Ok(c) => Ok((c, from)),
            Err(e) => {
                let msg = e.to_string();
                // The flag without which the configuration is valid is the culprit.
                let culprit = (0..over.len()).rev().find(|&i| {
                    let rest: Vec<Override> =
                        over.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, o)| o.clone()).collect();
                    meet::run::RunConfig::from_table(table.clone(), &kv(&rest)).is_ok()
                });
                Err(explain_config_error(&msg, file, culprit.map(|i| &over[i]), &over))
            }
        }
    }
}

/// Blames a configuration error on the flag that caused it, else on the run file; a missing key
/// names the flag that gives it.
fn explain_config_error(
    msg: &str,
    file: Option<&PathBuf>,
    culprit: Option<&Override>,
    over: &[Override],
) -> anyhow::Error {
    // toml's deserialisation errors end with "in `train.lr`" (the table or key at fault).
    let (text, at) = match msg.rsplit_once("\nin `") {
        Some((t, k)) => (t.trim_end(), Some(k.trim_end().trim_end_matches('`'))),
        None => (msg.trim_end(), None),
    };
    let named =
        |prefix: &str| text.split_once(prefix).and_then(|(_, r)| r.split_once('`')).map(|(name, _)| name.to_string());
    let join = |field: String| at.map_or(field.clone(), |a| format!("{a}.{field}"));
    if let Some(missing) = named("missing field `").map(join) {
        let flag = REQUIRED.iter().find(|(k, _)| *k == missing || k.split('.').next() == Some(missing.as_str()));
        let hint = flag.map(|(_, f)| format!(" (or give {f})")).unwrap_or_default();
        let place = file.map_or("the command line".to_string(), |p| p.display().to_string());
        return anyhow::anyhow!("{place}: missing `{missing}`{hint}");
    }
    let key = named("unknown field `").map(join).or(at.map(String::from));
    if let Some(o) = key.as_deref().and_then(|k| over.iter().rev().find(|o| o.key == k)).or(culprit) {
        return anyhow::anyhow!("{}: {text}", o.flag);
    }
    let place = file.map_or(String::new(), |p| format!("{}: ", p.display()));
    let at = key.map(|k| format!(" (at `{k}`)")).unwrap_or_default();
    anyhow::anyhow!("{place}{text}{at}")
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
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling: the most likely tokens whose probabilities sum to p.
    #[arg(long)]
    top_p: Option<f64>,
    /// Longest response, in tokens.
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Seed of the sampling and of the bootstrap intervals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences generated together.
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
        /// Tokens generated per row.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Batch sizes to measure (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        batches: Vec<usize>,
        /// Repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Sampling temperature for batches above 1 (batch 1 is greedy, as the reference).
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
    },
    /// Long-prompt prefill (plus one greedy token) at several prompt lengths; ends with one JSON
    /// line. `scripts/bench-prefill-vs-reference.sh` races it against transformers.
    Prefill {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt lengths in tokens (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1024,4096,8000")]
        lengths: Vec<usize>,
        /// Timed runs per length (the median is reported).
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Token ids `{"input_ids": [[...], ...]}` whose rows, joined and repeated, make the prompts
        /// (the Python reference reads the same file).
        #[arg(long, default_value = "tests/fixtures/lm_batch_4x128.json")]
        ids: PathBuf,
    },
    /// DPO steps (sigmoid, beta 0.1, full model, AdamW lr 1e-6) on the Python reference's fixed
    /// pairs; ends with one JSON line.
    Dpo {
        /// Model: HF folder, GGUF file or Hub repo id (dense f32 weights are used).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// `[{"prompt_ids", "chosen_ids", "rejected_ids"}, ...]` (the Python reference's
        /// `data/dpo_pairs_4x64+64.json`, copied into the repository).
        #[arg(long, default_value = "tests/fixtures/dpo_pairs_4x64+64.json")]
        pairs: PathBuf,
        /// Timed steps (after the warm-up).
        #[arg(long, default_value_t = 6)]
        steps: usize,
        /// Untimed steps first.
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
        /// Token ids `{"input_ids": [[...], ...]}` (the Python reference's
        /// `data/lm_batch_4x128.json`, copied into the repository).
        #[arg(long, default_value = "tests/fixtures/lm_batch_4x128.json")]
        batch: PathBuf,
        /// Timed steps (after the warm-up).
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Untimed steps first.
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
    // Warnings as plain `WARN text` lines: no colour codes when stderr is not a terminal, no
    // timestamps or module paths (RUST_LOG=info,meet=debug still shows more).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(meet::ui::is_terminal())
        .without_time()
        .with_target(false)
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
                stop_strings: a.stop_strings.iter().map(|s| unescape(s)).collect::<anyhow::Result<_>>()?,
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
                if streaming {
                    // What the last tokens left unfinished, as the whole text has it.
                    if let Some(rest) = stream.finish()? {
                        write!(stdout, "{rest}")?;
                    }
                } else {
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
                progress: Some("eval".into()),
            };
            let samples = evaluate(&model, reference.as_ref(), judge.as_ref(), &prompts, &opts)?;
            if let Some(out) = &a.out {
                meet::io::write_jsonl(out, &samples)?;
            }
            let s = summarize(&samples, a.seed)?;
            eprintln!(
                "{} responses: {} {:.4} [{:.4}, {:.4}], length {:.1} [{:.1}, {:.1}] tokens, cut {:.1}% [{:.1}, {:.1}]{} (95% bootstrap intervals)",
                samples.len(),
                a.judge,
                s.score.value,
                s.score.lo,
                s.score.hi,
                s.length.value,
                s.length.lo,
                s.length.hi,
                100.0 * s.cut_share.value,
                100.0 * s.cut_share.lo,
                100.0 * s.cut_share.hi,
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
                progress: Some("pairs".into()),
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
            let p = paired_scores(&sa, &sb).with_context(|| format!("pairing {} with {}", a.display(), b.display()))?;
            if p.only_a + p.only_b > 0 {
                eprintln!(
                    "note: comparing the {} (prompt, sample) responses both files have; left out {} of {} and {} of {} \
                     (the evaluations drew different --samples)",
                    p.a.len(),
                    p.only_a,
                    a.display(),
                    p.only_b,
                    b.display()
                );
            }
            let w = meet::eval::stats::win_rate(&p.a, &p.b, seed)?;
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
        Command::Bench { what: BenchCommand::Prefill { model, lengths, reps, ids } } => {
            let p = model.load()?;
            let v = meet::io::read_json(&ids)?;
            let rows: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone())
                .with_context(|| format!("{}: 'input_ids' must be rows of token ids", ids.display()))?;
            let pool = rows.concat();
            let figures = meet::bench::bench_prefill(
                p.model.as_ref(),
                &p.tokenizer,
                &p.generation,
                &pool,
                &lengths,
                reps,
                &p.device,
            )?;
            for f in &figures {
                println!(
                    "prefill {:>5} tokens: {:.2} s (median of {}), {:.0} tok/s",
                    f.prompt_tokens,
                    f.seconds_median,
                    f.seconds_all.len(),
                    f.tokens_per_s
                );
            }
            println!("{}", inference_bench_json("prefill", &model, &figures)?);
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
            println!("{}", inference_bench_json("generate", &model, &results)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The one JSON line an inference benchmark ends with.
fn inference_bench_json(bench: &str, model: &ModelArgs, results: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_json::json!({
        "bench": bench,
        "model": model.model,
        "weights": model.weights,
        "threads": meet::nn::team::Team::global().threads(),
        "results": serde_json::to_value(results)?,
        "peak_rss_mib": meet::bench::peak_rss_mib(),
    })
    .to_string())
}

/// A command-line string with the escapes HF users write (`"\n"` for a newline): `\n`, `\t`,
/// `\r`, `\\`; any other backslash sequence is an error rather than a silent literal.
fn unescape(s: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            other => bail!(
                "--stop-strings {s:?}: unknown escape '\\{}' (use \\n, \\t, \\r or \\\\)",
                other.map(String::from).unwrap_or_default()
            ),
        }
    }
    if out.is_empty() {
        bail!("--stop-strings: an empty stop string would stop at once");
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn stop_strings_unescape_as_hf_users_write_them() {
        assert_eq!(unescape("\\n").unwrap(), "\n");
        assert_eq!(unescape("a\\tb\\r\\n").unwrap(), "a\tb\r\n");
        assert_eq!(unescape("C:\\\\x").unwrap(), "C:\\x");
        assert_eq!(unescape("plain").unwrap(), "plain");
        assert!(unescape("\\d").unwrap_err().to_string().contains("unknown escape '\\d'"));
        assert!(unescape("end\\").is_err());
        assert!(unescape("").is_err());
    }
}
