//! Evaluating a model on prompts: sample responses (under a control), score them with a judge,
//! and measure what alignment papers report next to the score — response length, the share cut
//! at the token budget, and a sampled estimate of the KL divergence to a reference model,
//! `KL ≈ log π(y|c, x) − log π_ref(y|x)` for `y ~ π(·|c, x)` (summed over the response tokens).

use crate::controls::Controlled;
use crate::eval::stats::{mean_ci, Estimate};
use crate::eval::Judge;
use crate::generate::{prompt_ids, FinishReason, SamplingParams};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How responses are drawn.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Control to generate under (`good`, `bad`, ...), if the model has controls.
    pub control: Option<String>,
    /// Render prompts with the chat template.
    pub chat: bool,
    /// Responses per prompt.
    pub samples: usize,
    pub params: SamplingParams,
    /// Rows per generation / scoring batch.
    pub batch: usize,
    /// Show progress under this label (responses done, rate, ETA); `None`: silent.
    pub progress: Option<String>,
}

/// One scored response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Index of the prompt in the prompt list, and of the sample for that prompt.
    pub prompt_index: usize,
    pub sample_index: usize,
    pub prompt: String,
    pub response: String,
    pub score: f64,
    /// Response tokens (without EOS).
    pub tokens: usize,
    /// Stopped by the token budget rather than EOS or a stop string.
    pub cut: bool,
    /// Sampled KL estimate to the reference, when one is given.
    pub kl: Option<f64>,
}

/// Samples, scores and (with `reference`) measures the KL of `model` on `prompts`.
pub fn evaluate(
    model: &Controlled,
    reference: Option<&Controlled>,
    judge: &dyn Judge,
    prompts: &[String],
    opts: &EvalOptions,
) -> Result<Vec<Sample>> {
    if prompts.is_empty() {
        return Err(Error::Invalid("no prompts to evaluate".into()));
    }
    let tok = model.tokenizer();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| prompt_ids(tok, p, opts.chat, None)).collect::<Result<_>>()?;
    // Every (prompt, sample) pair, sample-major, so each batch mixes prompts.
    let jobs: Vec<(usize, usize)> =
        (0..opts.samples.max(1)).flat_map(|s| (0..prompts.len()).map(move |p| (p, s))).collect();
    let mut out = Vec::with_capacity(jobs.len());
    let mut progress = opts.progress.as_deref().map(|l| crate::ui::Progress::new(l, jobs.len(), "responses", 0));
    for (chunk_no, chunk) in jobs.chunks(opts.batch.max(1)).enumerate() {
        let batch_ids: Vec<Vec<u32>> = chunk.iter().map(|&(p, _)| ids[p].clone()).collect();
        // A fresh seed per batch: batches draw different tokens, and a rerun draws the same ones.
        let params = SamplingParams { seed: opts.params.seed.wrapping_add(chunk_no as u64), ..opts.params.clone() };
        let gens = model.generate(&batch_ids, opts.control.as_deref(), &params, |_, _| Ok(()))?;
        let responses: Vec<Vec<u32>> = gens.iter().map(|g| g.tokens.clone()).collect();
        let kl = match reference {
            // The model itself without a control: the estimate is 0 by definition.
            Some(r) if std::ptr::eq(r, model) && opts.control.is_none() => vec![Some(0.0); gens.len()],
            Some(r) => {
                // log π(y|c, x) comes with the sampling; the reference needs one forward pass.
                let rref = r.response_logps(&batch_ids, &responses, None, opts.batch)?;
                gens.iter().zip(&rref).map(|(g, b)| Some(g.logps.iter().map(|&x| x as f64).sum::<f64>() - b)).collect()
            }
            None => vec![None; gens.len()],
        };
        let pairs: Vec<(&str, &str)> =
            chunk.iter().zip(&gens).map(|(&(p, _), g)| (prompts[p].as_str(), g.text.as_str())).collect();
        let scores = judge.score(&pairs)?;
        for (((&(p, s), g), score), kl) in chunk.iter().zip(&gens).zip(scores).zip(kl) {
            out.push(Sample {
                prompt_index: p,
                sample_index: s,
                prompt: prompts[p].clone(),
                response: g.text.clone(),
                score,
                tokens: g.tokens.len(),
                cut: g.finish == FinishReason::Length,
                kl,
            });
        }
        if let Some(p) = progress.as_mut() {
            let mean = out.iter().map(|s| s.score).sum::<f64>() / out.len() as f64;
            p.inc(chunk.len(), &format!("mean score {mean:.3}"));
        }
    }
    if let Some(p) = progress {
        let mean = out.iter().map(|s| s.score).sum::<f64>() / out.len().max(1) as f64;
        p.finish(&format!("mean score {mean:.3}"));
    }
    out.sort_by_key(|s| (s.prompt_index, s.sample_index));
    Ok(out)
}

/// The figures of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub score: Estimate,
    pub length: Estimate,
    /// Share of responses cut at the token budget.
    pub cut_share: Estimate,
    pub kl: Option<Estimate>,
}

/// Means with 95% bootstrap intervals (seeded) of score, length and KL.
pub fn summarize(samples: &[Sample], seed: u64) -> Result<Summary> {
    let col = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let kls: Option<Vec<f64>> = samples.iter().map(|s| s.kl).collect();
    Ok(Summary {
        score: mean_ci(&col(&|s| s.score), seed)?,
        length: mean_ci(&col(&|s| s.tokens as f64), seed)?,
        cut_share: mean_ci(&col(&|s| s.cut as u8 as f64), seed)?,
        kl: match kls {
            Some(k) if !k.is_empty() => Some(mean_ci(&k, seed)?),
            _ => None,
        },
    })
}

/// Scores of two evaluations paired by (prompt, sample) index, on the responses both have (one
/// evaluation may have drawn more samples per prompt than the other).
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    /// Responses only one of the two evaluations has (left out of the comparison).
    pub only_a: usize,
    pub only_b: usize,
}

/// Pairs two evaluations of the same prompts (see [`Paired`]). Different prompt lists, or no
/// response in common, are errors.
pub fn paired_scores(a: &[Sample], b: &[Sample]) -> Result<Paired> {
    let (pairs, only_a, only_b) = paired_samples(a, b)?;
    Ok(Paired {
        a: pairs.iter().map(|p| p.0.score).collect(),
        b: pairs.iter().map(|p| p.1.score).collect(),
        only_a,
        only_b,
    })
}

/// Responses of two evaluations to the same (prompt, sample), and how many only `a` and only `b`
/// have.
pub type SamplePairs<'a> = (Vec<(&'a Sample, &'a Sample)>, usize, usize);

/// The responses of two evaluations to the same (prompt, sample), in `a`'s order.
pub fn paired_samples<'a>(a: &'a [Sample], b: &'a [Sample]) -> Result<SamplePairs<'a>> {
    let key = |s: &Sample| (s.prompt_index, s.sample_index);
    let bmap: std::collections::HashMap<_, _> = b.iter().map(|s| (key(s), s)).collect();
    let mut pairs = vec![];
    let mut only_a = 0;
    for s in a {
        let Some(o) = bmap.get(&key(s)) else {
            only_a += 1;
            continue;
        };
        if o.prompt != s.prompt {
            return Err(Error::Invalid(format!(
                "prompt {} differs between the evaluations: they were run on different prompt files",
                s.prompt_index
            )));
        }
        pairs.push((s, *o));
    }
    if pairs.is_empty() {
        return Err(Error::Invalid("the two evaluations have no (prompt, sample) in common".into()));
    }
    let only_b = b.len() - pairs.len();
    Ok((pairs, only_a, only_b))
}

/// Prompts from a text file (one per line), or from the `"prompt"` strings of a data source: a
/// JSONL / JSON / Parquet file, a folder, or a Hub dataset id (`hf:…`, split `test` by default;
/// see [`crate::data::source`]).
pub fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    // Data files, folders and Hub ids through the record reader; anything else is text.
    if name.starts_with(crate::io::hub::DATASET_PREFIX) || path.is_dir() || crate::io::hub::is_data_file(&name) {
        let (out, _) = crate::data::read_each(
            crate::data::Records::open(path, "test")?,
            false,
            "prompts",
            |v| {
                v.get("prompt")
                    .and_then(|p| p.as_str())
                    .map(String::from)
                    .ok_or("field 'prompt' must be a string".into())
            },
            |_| String::new(),
            "",
        )?;
        return Ok(out);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let out: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(String::from).collect();
    if out.is_empty() {
        return Err(Error::parse(path, "no prompts"));
    }
    Ok(out)
}
