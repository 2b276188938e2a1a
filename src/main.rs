//! The `meet` command line: flags (`flags.rs`) and a thin dispatch over the library.

mod flags;

use anyhow::{bail, Context};
use clap::Parser;
use flags::{unescape, BenchCommand, Cli, Command};
use meet::controls::Controlled;
use meet::generate::{prompt_ids, SamplingParams, TextStream};
use std::io::Write;
use std::process::ExitCode;

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
            if a.judge.starts_with("llm:") {
                use meet::eval::llm_judge::{evaluate_against, LlmJudge, Task};
                let Some(reference) = reference.as_ref() else {
                    bail!(
                        "--judge {}: the LLM judge compares each response with --reference's; give --reference",
                        a.judge
                    )
                };
                let j = LlmJudge::from_spec(&a.judge, Task::parse(&a.judge_task)?, a.judge_concurrency)?;
                let (samples, c) = evaluate_against(&j, &model, reference, &prompts, &opts)?;
                if let Some(out) = &a.out {
                    meet::files::write_jsonl(out, &samples)?;
                }
                eprintln!(
                    "LLM judge {}: win rate over {}: {}",
                    c.judge,
                    a.reference.as_deref().unwrap_or_default(),
                    c.describe()
                );
                println!(
                    "{}",
                    serde_json::json!({"eval": a.model.model, "control": a.control, "judge": a.judge, "reference": a.reference, "llm_judge": c})
                );
                return Ok(ExitCode::SUCCESS);
            }
            let judge = meet::eval::judge_by_name(&a.judge)?;
            let samples = evaluate(&model, reference.as_ref(), judge.as_ref(), &prompts, &opts)?;
            if let Some(out) = &a.out {
                meet::files::write_jsonl(out, &samples)?;
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
            meet::files::write_jsonl(&out, &pairs)?;
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
        Command::Compare { a, b, seed, judge, judge_task, judge_concurrency, out } => {
            use meet::eval::sample::{paired_samples, Sample};
            let (sa, sb): (Vec<Sample>, Vec<Sample>) = (meet::files::read_jsonl(&a)?, meet::files::read_jsonl(&b)?);
            let (pairs, only_a, only_b) =
                paired_samples(&sa, &sb).with_context(|| format!("pairing {} with {}", a.display(), b.display()))?;
            if only_a + only_b > 0 {
                eprintln!(
                    "note: comparing the {} (prompt, sample) responses both files have; left out {only_a} of {} and \
                     {only_b} of {} (the evaluations drew different --samples)",
                    pairs.len(),
                    a.display(),
                    b.display()
                );
            }
            let len = |s: &[&Sample]| s.iter().map(|x| x.tokens as f64).sum::<f64>() / s.len() as f64;
            let (pa, pb): (Vec<&Sample>, Vec<&Sample>) = pairs.iter().copied().unzip();
            let (la, lb) = (len(&pa), len(&pb));
            if let Some(spec) = judge {
                use meet::eval::llm_judge::{summarize, LlmJudge, Task};
                let j = LlmJudge::from_spec(&spec, Task::parse(&judge_task)?, judge_concurrency)?;
                let items: Vec<(String, String, String)> =
                    pairs.iter().map(|(x, y)| (x.prompt.clone(), x.response.clone(), y.response.clone())).collect();
                let (js, cached) = j.judge_pairs(&items, seed)?;
                if let Some(out) = &out {
                    meet::files::write_jsonl(out, &js)?;
                }
                let c = summarize(j.name(), j.task, &js, cached, seed)?;
                eprintln!(
                    "LLM judge {}: win rate of {} over {}: {} (lengths {la:.1} vs {lb:.1} tokens)",
                    c.judge,
                    a.display(),
                    b.display(),
                    c.describe()
                );
                println!("{}", serde_json::json!({"a": a, "b": b, "llm_judge": c, "length_a": la, "length_b": lb}));
            } else {
                let sa: Vec<f64> = pa.iter().map(|s| s.score).collect();
                let sb: Vec<f64> = pb.iter().map(|s| s.score).collect();
                let w = meet::eval::stats::win_rate(&sa, &sb, seed)?;
                eprintln!(
                    "win rate of {} over {}: {:.3} [{:.3}, {:.3}] on {} responses (lengths {la:.1} vs {lb:.1} tokens)",
                    a.display(),
                    b.display(),
                    w.value,
                    w.lo,
                    w.hi,
                    w.n,
                );
                println!("{}", serde_json::json!({"a": a, "b": b, "win_rate": w, "length_a": la, "length_b": lb}));
            }
        }
        Command::Serve(a) => {
            if a.max_tokens == 0 {
                bail!("--max-tokens must be at least 1");
            }
            let model = a.model.load_controlled()?;
            let opts = meet::serve::ServeOptions {
                addr: a.addr.clone(),
                name: a.served_model_name.clone().unwrap_or_else(|| a.model.model.clone()),
                api_key: a.api_key.clone(),
                max_batch: a.max_batch,
                max_tokens: a.max_tokens,
                max_body: a.max_body,
            };
            meet::serve::serve(model, &opts)?;
        }
        Command::Experiment { config, quick } => {
            let mut exp = meet::experiment::Experiment::from_file(&config)?;
            if quick {
                exp.quick();
            }
            let report = exp.run().with_context(|| format!("experiment {}", config.display()))?;
            eprintln!("report: {}", report.display());
        }
        Command::Convert { model, out } => {
            let n = meet::models::pretrained::convert(&model, &out).with_context(|| format!("converting '{model}'"))?;
            eprintln!("wrote {} ({n} tensors)", out.display());
        }
        Command::Train(args) => {
            let (cfg, from) = args.config()?;
            let logs = meet::methods::run(&cfg, args.resume).with_context(|| format!("training with {from}"))?;
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
            let raw = meet::peft::merge::merge(&model, &cfg, &tensors)
                .with_context(|| format!("merging {} into '{model}'", adapter.display()))?;
            meet::models::pretrained::save_hf_folder(&raw, &out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Bench { what: BenchCommand::Train { model, mode, batch, steps, warmup, dtype } } => {
            let dtype = meet::train::Dtype::parse(&dtype)?;
            let f = meet::bench::bench_train(&model, &mode, &batch, steps, warmup, dtype)?;
            println!(
                "train {}: {:.3} s/step (fwd {:.3}, bwd {:.3}, opt {:.3}), {:.1} tok/s, losses {:?}, peak RSS {:.0} MiB",
                f.mode, f.sec_per_step_median, f.fwd_median, f.bwd_median, f.opt_median, f.tokens_per_s_median,
                f.losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>(), f.peak_rss_mib.unwrap_or(0.0)
            );
            println!(
                "{}",
                serde_json::json!({"bench": "train", "model": model, "dtype": dtype, "threads": meet::nn::team::Team::global().threads(), "result": f})
            );
        }
        Command::Bench {
            what: BenchCommand::Serve { model, prompts, clients, requests, max_tokens, control, max_batch, max_seconds },
        } => {
            let opts = meet::serve::load::LoadOptions {
                serve_args: vec![
                    "--model".into(),
                    model.model.clone(),
                    "--weights".into(),
                    model.weights.clone(),
                    "--max-batch".into(),
                    max_batch.to_string(),
                    "--max-tokens".into(),
                    max_tokens.max(1).to_string(),
                ],
                prompts: meet::eval::sample::read_prompts(&prompts)?,
                clients,
                requests,
                max_tokens,
                controls: control.into_iter().map(Some).collect(),
                max_seconds,
            };
            let r = meet::serve::load::run(&opts)?;
            for l in &r.levels {
                println!(
                    "{:>3} clients: {} requests ({} errors) in {:.1} s, {:.2} req/s, {:.1} output tok/s, TTFT p50 {:.3} s p99 {:.3} s, latency p50 {:.3} s p99 {:.3} s",
                    l.clients, l.requests, l.errors, l.seconds, l.requests_per_s, l.output_tokens_per_s,
                    l.ttft_p50_s, l.ttft_p99_s, l.latency_p50_s, l.latency_p99_s
                );
            }
            println!("server peak RSS {:.0} MiB", r.server_peak_rss_mib.unwrap_or(f64::NAN));
            println!(
                "{}",
                serde_json::json!({"bench": "serve", "model": model.model, "weights": model.weights, "threads": meet::nn::team::Team::global().threads(), "result": r})
            );
        }
        Command::Bench { what: BenchCommand::Dpo { model, pairs, steps, warmup, dtype } } => {
            let dtype = meet::train::Dtype::parse(&dtype)?;
            let f = meet::bench::bench_dpo(&model, &pairs, steps, warmup, dtype)?;
            println!(
                "dpo: {} pairs, {:.3} s/step (fwd {:.3}, bwd {:.3}, opt {:.3}) + reference pass {:.3} s once, {:.3} pairs/s with it, losses {:?}, peak RSS {:.0} MiB",
                f.pairs, f.sec_per_step_median, f.fwd_median, f.bwd_median, f.opt_median, f.reference_s,
                f.pairs_per_s_with_reference,
                f.losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>(), f.peak_rss_mib.unwrap_or(0.0)
            );
            println!(
                "{}",
                serde_json::json!({"bench": "dpo", "model": model, "dtype": dtype, "threads": meet::nn::team::Team::global().threads(), "result": f})
            );
        }
        Command::Bench { what: BenchCommand::Prefill { model, lengths, reps, ids } } => {
            let p = model.load()?;
            let v = meet::files::read_json(&ids)?;
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
            let results = meet::bench::bench_generate_batches(&p, &prompt, &batches, new_tokens, temperature, reps)?;
            for f in &results {
                println!(
                    "batch {:>2} ({}): prefill {:>8.1} tok/s, decode {:>7.1} tok/s ({} prompt tokens, {} new per row, median {:.3}s)",
                    f.batch, f.sampling, f.prefill_tokens_per_s, f.decode_tokens_per_s, f.prompt_tokens, f.new_tokens, f.seconds_total_median
                );
            }
            println!("{}", inference_bench_json("generate", &model, &results)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The one JSON line an inference benchmark ends with.
fn inference_bench_json(
    bench: &str,
    model: &flags::ModelArgs,
    results: &impl serde::Serialize,
) -> anyhow::Result<String> {
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

/// Keeps memory freed at the end of a training step for the next one. The work runs on a pool
/// thread, whose glibc arena is made of 64 MB heaps that glibc unmaps as soon as they empty: a
/// step's activations then come back as fresh pages, each a page fault and a page cleared
/// (measured on bf16 full fine-tuning: ~200k faults per step, the forward pass 0.48 s against
/// 0.28 s with them kept). A top pad of a whole heap keeps emptied heaps mapped, and fixed
/// mmap and trim thresholds keep allocations of up to 32 MB in the heaps and the heaps untrimmed.
/// The cost is that memory freed after the peak is not returned until exit.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
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
    keep_freed_memory();
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
