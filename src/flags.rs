//! The command line's flags: one struct per subcommand (clap derive), and what turns flags into
//! library options — model loading options, a run configuration with each error blamed on the
//! flag or file that caused it, stop-string escapes. `main.rs` only dispatches.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use meet::controls::Controlled;
use meet::nn::packed::PackedFormat;
use meet::{LoadOptions, Packing, Pretrained};
use std::path::PathBuf;

/// The model `scripts/fetch-model.sh` puts in place.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "meet",
    version,
    about = "Align causal language models with human preferences (MEET and baselines) on candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Train as a TOML run configuration (and flags) say: sft, coh, control-token, meet, dpo, reward or ric.
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
    /// Serve the model over OpenAI's API (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/models`, `/health`), each request under its own control (`"control": "good"` in the
    /// body, or `model: "NAME:good"`), requests in flight decoded together.
    Serve(ServeArgs),
    /// Win rate of one evaluation over another on the same prompts (ties half), with its 95% CI.
    Compare {
        /// `meet eval --out` file of method A.
        a: PathBuf,
        /// `meet eval --out` file of method B.
        b: PathBuf,
        /// Seed of the bootstrap resampling (and of the LLM judge's orders).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Judge the pairs of responses with an LLM behind an OpenAI-compatible endpoint,
        /// `llm:URL[#MODEL]` (URL the API base, e.g. http://127.0.0.1:8080/v1; key from
        /// OPENAI_API_KEY), instead of comparing the files' scores.
        #[arg(long)]
        judge: Option<String>,
        /// The LLM judge's prompt (the DPO paper's): `dialogue` or `summary`.
        #[arg(long, default_value = "dialogue")]
        judge_task: String,
        /// LLM judge requests in flight at once.
        #[arg(long, default_value_t = 4)]
        judge_concurrency: usize,
        /// Write the LLM judge's judgements (answers, orders, verdicts) here as JSONL.
        #[arg(long)]
        out: Option<PathBuf>,
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
pub struct ModelArgs {
    /// Model: HF folder, GGUF file, or Hub repo id (org/name[@revision]) from the HF cache.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Weight storage for inference: `auto` keeps a GGUF file's formats (exact) and f32 as f32;
    /// `f32` expands everything; `q8_0`, `q4_1`, `q4_0`, `f16`, `bf16` round matrices (lossy).
    #[arg(long, default_value = "auto")]
    pub weights: String,
}

impl ModelArgs {
    pub fn options(&self) -> anyhow::Result<LoadOptions> {
        let packing = match self.weights.as_str() {
            "auto" => Packing::Source,
            "f32" => Packing::Dense,
            other => Packing::Quantize(PackedFormat::parse(other).map_err(|e| anyhow::anyhow!("--weights: {e}"))?),
        };
        Ok(LoadOptions { packing, ..Default::default() })
    }

    /// The model with the controls of a `meet train` output folder, if it is one.
    pub fn load_controlled(&self) -> anyhow::Result<Controlled> {
        Controlled::load(&self.model, &self.options()?).with_context(|| format!("loading model '{}'", self.model))
    }

    pub fn load(&self) -> anyhow::Result<Pretrained> {
        Pretrained::load(&self.model, &self.options()?).with_context(|| format!("loading model '{}'", self.model))
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; port 0 picks a free port (the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// The model name clients give (`model`); default: `--model` as given.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Required as `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "MEET_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Rows (requests × n) decoded together; more requests wait for a free row.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most new tokens one request may ask for (and its default when it gives none).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text. Repeat the flag for a left-padded batch: the completions are then printed
    /// as JSON lines (`prompt`, `text`, `finish_reason`, `completion_tokens`) instead of streamed.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Render the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (a system turn of the chat template: needs --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Fewest tokens to generate (EOS is suppressed until then).
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Token ids never to generate (comma-separated), as transformers' `suppress_tokens`.
    #[arg(long, value_delimiter = ',')]
    pub suppress_tokens: Vec<u32>,
    /// Sampling temperature; 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to p (nucleus sampling).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the output contains this text (repeatable); the text is cut before it. `\n`,
    /// `\t`, `\r` and `\\` stand for a newline, a tab, a carriage return and a backslash.
    #[arg(long = "stop-strings")]
    pub stop_strings: Vec<String>,
    /// Generate under this control (`good`, `bad`, ...) of a `meet train` output folder; with
    /// several preference dimensions one per dimension, `positive,concise` or
    /// `sentiment=positive,length=concise:0.5` (a weight scales a LoRA control's delta).
    #[arg(long)]
    pub control: Option<String>,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The run configuration (see the README and examples/); optional when the flags say enough.
    #[arg(value_name = "CONFIG")]
    pub config_pos: Option<PathBuf>,
    /// The run configuration, as a flag (the same as the positional CONFIG).
    #[arg(long, conflicts_with = "config_pos")]
    pub config: Option<PathBuf>,
    /// Continue every stage from its newest checkpoint in the output folder (a finished run is
    /// left as it is).
    #[arg(long)]
    pub resume: bool,
    /// sft | coh | control-token | meet | dpo | reward | ric (`method`).
    #[arg(long)]
    pub method: Option<String>,
    /// `model.source`.
    #[arg(long)]
    pub model: Option<String>,
    /// `data.train`.
    #[arg(long)]
    pub data: Option<String>,
    /// `output_dir`.
    #[arg(long)]
    pub output_dir: Option<String>,
    /// `train.lr`.
    #[arg(long)]
    pub lr: Option<f64>,
    /// `train.epochs`.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// `train.max_steps`.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// `train.batch_size`.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// `train.seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// `data.skip_invalid = true`: skip and count invalid records.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Any option as `key=value` with its dotted TOML path (`--set dpo.beta=0.2`,
    /// `--set meet.steps=step1`, `--set 'model.controls=["pos","neg"]'`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
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
const REQUIRED: [(&str, &str); 4] =
    [("method", "--method"), ("model.source", "--model"), ("data.train", "--data"), ("output_dir", "--output-dir")];

impl TrainArgs {
    /// The configuration: the file (if any) with every flag applied over it. Errors name the flag
    /// or the file that caused them.
    pub fn config(&self) -> anyhow::Result<(meet::methods::config::RunConfig, String)> {
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
            Some(path) => meet::methods::config::RunConfig::read_table(path)?,
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
        match meet::methods::config::RunConfig::from_table(table.clone(), &kv(&over)) {
            Ok(c) => Ok((c, from)),
            Err(e) => {
                let msg = e.to_string();
                // The flag without which the configuration is valid is the culprit.
                let culprit = (0..over.len()).rev().find(|&i| {
                    let rest: Vec<Override> =
                        over.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, o)| o.clone()).collect();
                    meet::methods::config::RunConfig::from_table(table.clone(), &kv(&rest)).is_ok()
                });
                // The file is at fault: read alone, its text gives the line and column.
                if let (None, Some(path)) = (culprit, file) {
                    if let Err(e) = meet::methods::config::RunConfig::from_file(path) {
                        if !e.to_string().contains("missing field") {
                            return Err(e.into());
                        }
                    }
                }
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
        let mut hint = flag.map(|(_, f)| format!(" (or give {f})")).unwrap_or_default();
        if missing == "method" {
            hint = format!(" (or give --method): no method is assumed; one of {}", meet::methods::names().join(", "));
        }
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
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts: JSONL with a "prompt" string per line, or a text file with one prompt per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Generate under this control of a `meet train` output folder (several dimensions:
    /// `positive,concise`, `sentiment=positive,length=concise:0.5`).
    #[arg(long)]
    pub control: Option<String>,
    /// Reference model for the KL estimate (e.g. the base model); none: no KL.
    #[arg(long)]
    pub reference: Option<String>,
    /// Judge: `vader` (compound sentiment of the response), `vader-full` (of prompt + response),
    /// `reward:PATH` (a reward model trained with `method = "reward"`), or `llm:URL[#MODEL]` (an
    /// LLM behind an OpenAI-compatible endpoint comparing each response with `--reference`'s
    /// response to the same prompt: the score is the win rate over the reference).
    #[arg(long, default_value = "vader")]
    pub judge: String,
    /// The LLM judge's prompt (the DPO paper's): `dialogue` or `summary`.
    #[arg(long, default_value = "dialogue")]
    pub judge_task: String,
    /// LLM judge requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub judge_concurrency: usize,
    /// Render prompts with the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Responses per prompt.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling: the most likely tokens whose probabilities sum to p.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Longest response, in tokens.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Seed of the sampling and of the bootstrap intervals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences generated together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Where the scored responses go (JSONL), for `meet compare`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum BenchCommand {
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
        /// f32, or bf16 (products with bf16 operands and f32 sums, as PyTorch's CPU autocast).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Load test of `meet serve` over loopback HTTP: the server started as a child process, then
    /// a fixed number of streamed chat requests at each client count (fixed output length,
    /// controls cycled); requests/s, output tokens/s, p50/p99 time to first token and latency,
    /// errors, the server's peak memory; ends with one JSON line.
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompts: JSONL with a "prompt" string per line, or one prompt per line (cycled).
        #[arg(long)]
        prompts: PathBuf,
        /// Concurrent clients per level (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
        /// Requests per level.
        #[arg(long, default_value_t = 32)]
        requests: usize,
        /// New tokens per request (EOS ignored).
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// A control, cycled over the requests with the others given (repeat the flag); none:
        /// the plain model.
        #[arg(long)]
        control: Vec<String>,
        /// The server's --max-batch.
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        /// A level issues no new request after this many seconds.
        #[arg(long, default_value_t = 300.0)]
        max_seconds: f64,
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
        /// f32, or bf16 (products with bf16 operands and f32 sums, as PyTorch's CPU autocast).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

/// A command-line string with the escapes HF users write (`"\n"` for a newline): `\n`, `\t`,
/// `\r`, `\\`; any other backslash sequence is an error rather than a silent literal.
pub fn unescape(s: &str) -> anyhow::Result<String> {
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
