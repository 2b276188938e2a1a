//! `meet bench generate`: prefill and decode throughput, measured the way the Python reference's
//! `bench_generate.py` does (a run of N new tokens and a run of 1; decode rate from the difference).

use crate::generate::{generate, GenerationDefaults, SamplingParams};
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

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
