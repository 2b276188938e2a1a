//! Text generation: greedy and sampled decoding (temperature, top-k, top-p, seed) with a KV cache,
//! batched over left-padded prompts, stopping on EOS, stop strings or a token budget.
//! Semantics follow transformers' `generate` (warpers applied temperature -> top-k -> top-p,
//! positions of left-padded rows counted from their first real token).

use crate::io::generation::GenerationDefaults;
use crate::models::{AttentionInputs, CausalLm};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{Device, IndexOp, Tensor};
use rand::{Rng, SeedableRng};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens are out (as transformers' `min_new_tokens`).
    pub min_new_tokens: usize,
    /// Generation stops when the new text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Token ids never generated (transformers' `suppress_tokens`), e.g. control tokens, which
    /// are inputs only and unknown to the reference model.
    pub suppress_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            max_new_tokens: 128,
            min_new_tokens: 0,
            stop_strings: vec![],
            suppress_tokens: vec![],
        }
    }
}

/// Picks next tokens from logits with a seeded RNG (ChaCha8: the same seed gives the same
/// choices on every platform and crate version).
pub struct Sampler {
    params: SamplingParams,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: &SamplingParams) -> Result<Self> {
        if params.temperature < 0.0 || !params.temperature.is_finite() {
            return Err(Error::Invalid(format!("temperature must be >= 0, got {}", params.temperature)));
        }
        if let Some(p) = params.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Invalid(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        if params.top_k == Some(0) {
            return Err(Error::Invalid("top_k must be at least 1".into()));
        }
        Ok(Self { params: params.clone(), rng: rand_chacha::ChaCha8Rng::seed_from_u64(params.seed) })
    }

    /// The next token for one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let u = self.rng.gen();
        pick(&self.params, logits, u)
    }

    /// The next token of every row where `active` holds (`None` elsewhere). Uniform numbers are
    /// drawn in row order, so results do not depend on how the rows are spread over threads.
    pub fn sample_rows(&mut self, rows: &[Vec<f32>], active: &[bool]) -> Vec<Option<u32>> {
        let us: Vec<Option<f32>> = active.iter().map(|&a| a.then(|| self.rng.gen())).collect();
        let mut out = vec![None; rows.len()];
        let dst = crate::nn::team::SharedMut(out.as_mut_ptr());
        crate::nn::team::Team::global().for_ranges(rows.len(), 1, &|range| {
            let dst = &dst;
            for r in range {
                if let Some(u) = us[r] {
                    // Safety: each row index is written by one thread only.
                    unsafe { *dst.0.add(r) = Some(pick(&self.params, &rows[r], u)) };
                }
            }
        });
        out
    }
}

/// The token for one row of logits given a uniform draw `u` in [0, 1).
fn pick(params: &SamplingParams, logits: &[f32], u: f32) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if params.temperature == 0.0 {
        return argmax();
    }
    let t = params.temperature as f32;
    if params.top_k.is_none() && params.top_p.is_none() {
        // Plain temperature: no candidate list, one pass of exp and a scan of the mass.
        let mut w: Vec<f32> = logits.iter().map(|&v| v / t).collect();
        let max = crate::nn::simd::max(&w);
        let target = u * crate::nn::simd::exp_shifted_sum(&mut w, max);
        let mut acc = 0f32;
        let mut last = 0;
        for (i, &p) in w.iter().enumerate() {
            if p > 0.0 {
                acc += p;
                last = i;
                if target < acc {
                    return i as u32;
                }
            }
        }
        return last as u32;
    }
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &v)| (i as u32, v / t)).collect();
    // Only top-k/top-p need an order; select before sorting so 50k-entry rows stay cheap.
    if let Some(k) = params.top_k.filter(|&k| k < cand.len()) {
        cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(k);
    }
    if params.top_p.is_some() || params.top_k.is_some() {
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = cand.iter().map(|c| c.1).collect();
    let sum = crate::nn::simd::exp_shifted_sum(&mut probs, max);
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(top_p) = params.top_p {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0f32;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let mut acc = 0f32;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token (not included in `tokens`).
    Eos,
    /// A stop string (`text` is cut before it).
    Stop,
    /// The token budget or the context ran out.
    Length,
}

/// One generated continuation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Log-probability of each token of `tokens` under the model's own distribution (temperature
    /// 1, before suppression): what a KL estimate needs, without a second forward pass.
    pub logps: Vec<f32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
}

/// Incremental detokenizer: yields the text each new token adds, holding back incomplete UTF-8.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    /// An empty stream.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, tokens: vec![], printed: 0 }
    }

    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens, true)?;
        if text.len() > self.printed && !text.ends_with('\u{FFFD}') && text.is_char_boundary(self.printed) {
            let new = text[self.printed..].to_string();
            self.printed = text.len();
            return Ok(Some(new));
        }
        Ok(None)
    }

    /// The text not returned yet, at the end of generation: an incomplete character of the last
    /// tokens comes out as U+FFFD, as transformers' `TextStreamer` flushes it and as the whole
    /// decoded text (`Generation::text`) has it, so the streamed text equals the batch text.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.tokens, true)?;
        let rest = text.get(self.printed..).filter(|r| !r.is_empty()).map(String::from);
        self.printed = text.len();
        Ok(rest)
    }
}

/// Generates continuations of `prompts` (token ids) in one left-padded batch. `on_token(row,
/// token)` sees every new token as it is chosen (for streaming).
pub fn generate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    defaults: &GenerationDefaults,
    device: &Device,
    on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Generation>> {
    generate_with_prefix(model, tokenizer, prompts, None, params, defaults, device, on_token)
}

/// `log Σ exp` of each row of logits not yet `done` (0 for those), rows spread over the team: a
/// batch of 16 rows is 800k exponentials per decoding step.
fn row_log_sum_exp(rows: &[Vec<f32>], done: &[bool]) -> Vec<f32> {
    let mut lse = vec![0f32; rows.len()];
    let dst = crate::nn::team::SharedMut(lse.as_mut_ptr());
    crate::nn::team::Team::global().for_ranges(rows.len(), 1, &|range| {
        let dst = &dst;
        for r in range.filter(|&r| !done[r]) {
            // Safety: each row index is written by one thread only.
            unsafe { *dst.0.add(r) = crate::nn::simd::log_sum_exp(&rows[r]) };
        }
    });
    lse
}

/// [`generate`] with `prefix` `(n, hidden)` embeddings (a soft prompt) before every prompt. The
/// prefix goes first in each row, then the left padding (masked), then the prompt: positions
/// count real entries only, so each row sees the prefix at 0..n and its prompt after it, as in
/// training.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_prefix(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    prefix: Option<&Tensor>,
    params: &SamplingParams,
    defaults: &GenerationDefaults,
    device: &Device,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::Invalid(format!("prompt {i} is empty")));
    }
    let ctx = model.max_positions();
    let n_prefix = match prefix {
        Some(p) => p.dims2()?.0,
        None => 0,
    };
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0) + n_prefix;
    if longest >= ctx {
        return Err(Error::Invalid(format!(
            "prompt of {longest} tokens does not fit the model's context of {ctx} tokens (at least one new token is needed)"
        )));
    }
    let budget = params.max_new_tokens.min(ctx - longest);
    let mut sampler = Sampler::new(params)?;
    let pad = defaults.pad_id()?;
    let mut mask: Vec<Vec<u8>> = Vec::with_capacity(b);
    let mut ids = Vec::with_capacity(b * longest);
    for p in prompts {
        let n_pad = longest - n_prefix - p.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        mask.push(
            std::iter::repeat_n(1u8, n_prefix)
                .chain(std::iter::repeat_n(0u8, n_pad))
                .chain(std::iter::repeat_n(1u8, p.len()))
                .collect(),
        );
    }
    let mut cache = model.new_cache(b, longest + budget, device)?;
    let mut input = Tensor::from_vec(ids, (b, longest - n_prefix), device)?;
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            tokens: vec![],
            logps: vec![],
            text: String::new(),
            finish: FinishReason::Length,
            prompt_tokens: p.len(),
        })
        .collect();
    let mut done = vec![false; b];
    for _ in 0..budget {
        let mut embeds = model.embed(&input)?;
        if let (Some(p), 0) = (prefix, cache.len) {
            let (n, hidden) = p.dims2()?;
            embeds = Tensor::cat(&[p.unsqueeze(0)?.broadcast_as((b, n, hidden))?.contiguous()?, embeds], 1)?;
        }
        let t = embeds.dims()[1];
        let inp = AttentionInputs::new(b, t, cache.len, Some(&mask))?;
        let h = model.forward_embeds(&embeds, &inp, Some(&mut cache))?;
        let logits = model.lm_head(&h.i((.., t - 1..t, ..))?)?.squeeze(1)?; // (b, vocab)
        let mut logits = logits.to_vec2::<f32>()?;
        // log Σ exp of each live row, before any masking: log π(token) = logit − lse.
        let lse = row_log_sum_exp(&logits, &done);
        for (r, row) in logits.iter_mut().enumerate() {
            let eos = (!done[r] && out[r].tokens.len() < params.min_new_tokens).then_some(&defaults.eos_token_ids);
            for &e in params.suppress_tokens.iter().chain(eos.into_iter().flatten()) {
                if let Some(v) = row.get_mut(e as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        let active: Vec<bool> = done.iter().map(|d| !d).collect();
        let picks = sampler.sample_rows(&logits, &active);
        let next: Vec<u32> = picks.iter().map(|p| p.unwrap_or(pad)).collect();
        for (r, pick) in picks.into_iter().enumerate() {
            let Some(tok) = pick else { continue };
            if defaults.eos_token_ids.contains(&tok) {
                done[r] = true;
                out[r].finish = FinishReason::Eos;
                continue;
            }
            out[r].tokens.push(tok);
            out[r].logps.push(logits[r][tok as usize] - lse[r]);
            on_token(r, tok)?;
            if !params.stop_strings.is_empty() {
                let text = tokenizer.decode(&out[r].tokens, true)?;
                if params.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    done[r] = true;
                    out[r].finish = FinishReason::Stop;
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for m in mask.iter_mut() {
            m.push(1);
        }
        input = Tensor::from_vec(next, (b, 1), device)?;
    }
    for g in out.iter_mut() {
        let mut text = tokenizer.decode(&g.tokens, true)?;
        if g.finish == FinishReason::Stop {
            if let Some(cut) = params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
        }
        g.text = text;
    }
    Ok(out)
}

/// Prompt token ids for `text`: rendered with the chat template (as one user turn, with
/// `system` first if given) when `chat`, else encoded as is with the tokenizer's special tokens.
pub fn prompt_ids(tokenizer: &Tokenizer, text: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
    if chat {
        let mut msgs = vec![];
        if let Some(s) = system {
            msgs.push(crate::tokenizer::Message::new("system", s));
        }
        msgs.push(crate::tokenizer::Message::new("user", text));
        let rendered = tokenizer.apply_chat_template(&msgs, true)?;
        // The template already holds every special token (as transformers' apply_chat_template).
        tokenizer.encode(&rendered, false)
    } else {
        tokenizer.encode(text, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(&SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        let logits = [0.0, 2.0, 1.0, 5.0, 4.9];
        let mut s =
            Sampler::new(&SamplingParams { temperature: 1.0, top_k: Some(1), seed: 3, ..Default::default() }).unwrap();
        assert!((0..50).all(|_| s.sample(&logits) == 3));
        // p(3) ~ 0.5, p(4) ~ 0.45: top_p 0.9 keeps exactly {3, 4}.
        let mut s = Sampler::new(&SamplingParams { temperature: 1.0, top_p: Some(0.9), seed: 4, ..Default::default() })
            .unwrap();
        let picks: Vec<u32> = (0..400).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|&t| t == 3 || t == 4));
        let threes = picks.iter().filter(|&&t| t == 3).count() as f64 / 400.0;
        // Renormalised over {3, 4}: e^5 / (e^5 + e^4.9) = 0.525.
        assert!((threes - 0.525).abs() < 0.07, "{threes}");
    }

    #[test]
    fn sampling_matches_the_softmax_and_is_seeded() {
        let logits = [1.0f32, 0.0, 2.0];
        let params = SamplingParams { temperature: 0.5, seed: 7, ..Default::default() };
        let mut s = Sampler::new(&params).unwrap();
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        // softmax([2, 0, 4]) = [0.1173, 0.0159, 0.8668]
        for (c, p) in counts.iter().zip([0.1173, 0.0159, 0.8668]) {
            assert!((*c as f64 / n as f64 - p).abs() < 0.01, "{counts:?}");
        }
        let a: Vec<u32> = {
            let mut s = Sampler::new(&params).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&params).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Sampler::new(&SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(&SamplingParams { top_p: Some(0.0), ..Default::default() }).is_err());
        assert!(Sampler::new(&SamplingParams { top_k: Some(0), ..Default::default() }).is_err());
    }
}
