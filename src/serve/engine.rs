//! Continuous batching: one thread owns the model and decodes every request in flight together,
//! one token per row per step. A new request is prefilled on its own (under its own controls)
//! and joins the running batch at the next step; a finished or abandoned one leaves it.
//!
//! The batch's KV cache is one `(rows, capacity, kv_heads, head_dim)` tensor per layer, each row
//! right-aligned: a row's keys end at the cache's last column and the columns before its first
//! token are masked, so every row's positions count its own tokens only (as left padding in
//! [`crate::generate`]). Rows route to their own LoRA adapters ([`Controlled::route_rows`]);
//! soft prompts go before the prompt at prefill, which is all they take.

use crate::controls::Controlled;
use crate::generate::{FinishReason, Sampler, SamplingParams};
use crate::models::{AttentionInputs, KvCache};
use crate::policy::RowControls;
use crate::{Error, Result};
use candle_core::{IndexOp, Tensor};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// One request: a prompt under one control, `n` continuations of it.
pub struct Job {
    /// Prompt ids, with the control's tokens or phrases already in place.
    pub ids: Vec<u32>,
    /// Soft-prompt embeddings `(n, hidden)` before the prompt.
    pub prefix: Option<Tensor>,
    /// The LoRA adapters of every row of this job (see [`Controlled::row_routing`]).
    pub adapters: RowControls,
    /// Sampling, budget, stop strings and suppressed tokens; choice `i` samples with seed
    /// `seed + i`, so choice 0 draws exactly what `meet generate` draws for the same seed.
    pub params: SamplingParams,
    pub n: usize,
    /// Report each token's log-probability, with this many most likely alternatives.
    pub top_logprobs: Option<usize>,
    /// Where the job's events go; a closed receiver (the client left) ends the job.
    pub events: UnboundedSender<Event>,
}

/// A token's log-probability under the model (temperature 1), with the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the engine tells a job's handler.
#[derive(Debug)]
pub enum Event {
    /// New text of a choice (never part of a stop string or an unfinished character), and the
    /// tokens chosen since the last event (when log-probabilities were asked for).
    Delta { choice: usize, text: String, logprobs: Vec<TokenLogprob> },
    /// A choice finished: its whole text (cut before a stop string) and token count.
    Done { choice: usize, text: String, finish: FinishReason, tokens: usize },
    /// The job failed; no more events follow.
    Failed(String),
}

/// The handle requests are sent to; the engine thread stops once every handle is dropped and
/// the requests in flight are finished.
#[derive(Clone)]
pub struct Engine {
    jobs: Sender<Job>,
    pub load: Arc<Load>,
}

/// What the engine holds now (for `/health`).
#[derive(Debug, Default)]
pub struct Load {
    /// Rows being decoded.
    pub running: AtomicUsize,
    /// Jobs waiting for free rows.
    pub waiting: AtomicUsize,
    /// The most rows one step has decoded since the start.
    pub peak: AtomicUsize,
}

impl Engine {
    /// Starts the engine thread over `model`, decoding at most `max_batch` rows at once.
    pub fn start(model: Arc<Controlled>, max_batch: usize) -> Result<(Self, std::thread::JoinHandle<()>)> {
        if max_batch == 0 {
            return Err(Error::Invalid("--max-batch must be at least 1".into()));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let load = Arc::new(Load::default());
        let l = load.clone();
        let handle = std::thread::Builder::new()
            .name("meet-engine".into())
            .spawn(move || run(&model, rx, max_batch, &l))
            .map_err(|e| Error::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok((Self { jobs: tx, load }, handle))
    }

    /// Queues a job; its events arrive on `job.events`.
    pub fn submit(&self, job: Job) -> Result<()> {
        self.jobs.send(job).map_err(|_| Error::Invalid("the engine has stopped".into()))
    }
}

/// A job's shared part, referenced by each of its rows.
struct JobInfo {
    params: SamplingParams,
    top_logprobs: Option<usize>,
    adapters: RowControls,
    events: UnboundedSender<Event>,
}

/// One continuation being decoded.
struct Row {
    job: Arc<JobInfo>,
    choice: usize,
    sampler: Sampler,
    tokens: Vec<u32>,
    /// Bytes of the text already sent.
    sent: usize,
    /// Cache columns holding this row's entries (prefix, prompt, fed tokens); the last ones.
    content: usize,
    /// The token to feed at the next step.
    next: u32,
    /// Finished or abandoned: fed padding until the batch is compacted.
    dead: bool,
}

/// The running batch.
#[derive(Default)]
struct Batch {
    rows: Vec<Row>,
    cache: Option<KvCache>,
}

/// A prefilled job: its rows' shared cache (one row) and the logits after its prompt.
struct Prefilled {
    job: Job,
    cache: KvCache,
    logits: Vec<f32>,
}

fn run(model: &Controlled, jobs: Receiver<Job>, max_batch: usize, load: &Load) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut batch = Batch::default();
    loop {
        let live = batch.rows.iter().filter(|r| !r.dead).count();
        load.running.store(live, Ordering::Relaxed);
        load.peak.fetch_max(live, Ordering::Relaxed);
        load.waiting.store(pending.len(), Ordering::Relaxed);
        if live == 0 && pending.is_empty() {
            batch = Batch::default();
            match jobs.recv() {
                Ok(j) => pending.push_back(j),
                Err(_) => return,
            }
        }
        pending.extend(jobs.try_iter());
        // Admit what fits, in arrival order (a job of n rows waits for n free rows).
        let mut joining = vec![];
        let mut rows = live;
        while pending.front().is_some_and(|j| rows + j.n <= max_batch) {
            let job = pending.pop_front().expect("checked above");
            if job.events.is_closed() {
                continue;
            }
            rows += job.n;
            let events = job.events.clone();
            match std::panic::catch_unwind(AssertUnwindSafe(|| prefill(model, job))) {
                Ok(Ok(p)) => joining.push(p),
                Ok(Err(e)) => drop(events.send(Event::Failed(e.to_string()))),
                Err(panic) => {
                    tracing::error!("a request panicked during prefill: {}", panic_message(&panic));
                    drop(events.send(Event::Failed(format!("internal error: {}", panic_message(&panic)))));
                }
            }
        }
        if pending.front().is_some_and(|j| j.n > max_batch) {
            let j = pending.pop_front().expect("checked above");
            drop(
                j.events.send(Event::Failed(format!("n = {} is more than the server's --max-batch {max_batch}", j.n))),
            );
        }
        let step = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<()> {
            join(model, &mut batch, joining)?;
            if batch.rows.iter().any(|r| !r.dead) {
                decode_step(model, &mut batch)?;
            }
            compact(&mut batch, false)
        }));
        let failure = match step {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("internal error: {}", panic_message(&panic)),
        };
        // The batch's state is unknown after a failed step: its requests fail, the server goes on.
        tracing::error!("a decoding step failed: {failure}");
        for r in batch.rows.iter().filter(|r| !r.dead) {
            drop(r.job.events.send(Event::Failed(failure.clone())));
        }
        batch = Batch::default();
    }
}

/// The text of a caught panic.
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Runs a job's prompt (after its soft prompt) through the model under its controls.
fn prefill(model: &Controlled, job: Job) -> Result<Prefilled> {
    if std::env::var("MEET_SERVE_FAIL_POINT").is_ok_and(|p| !p.is_empty() && contains(&job.ids, model, &p)) {
        // A test hook: a request whose prompt holds this text panics here (tests/serve.rs).
        panic!("fail point reached");
    }
    let p = &model.policy.pretrained;
    let m = p.model.as_ref();
    if job.ids.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    let ids = Tensor::from_vec(job.ids.clone(), (1, job.ids.len()), &p.device)?;
    let mut embeds = m.embed(&ids)?;
    if let Some(prefix) = &job.prefix {
        embeds = Tensor::cat(&[prefix.unsqueeze(0)?, embeds], 1)?;
    }
    let t = embeds.dim(1)?;
    let mut cache = m.new_cache(1, t, &p.device)?;
    model.route(&job.adapters);
    let inp = AttentionInputs::new(1, t, 0, None)?;
    let h = m.forward_embeds(&embeds, &inp, Some(&mut cache))?;
    let logits = m.lm_head(&h.i((.., t - 1..t, ..))?)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Prefilled { job, cache, logits })
}

fn contains(ids: &[u32], model: &Controlled, needle: &str) -> bool {
    model.tokenizer().decode(ids, false).is_ok_and(|t| t.contains(needle))
}

/// Adds prefilled jobs to the batch: each choice picks its first token; the cache is laid out
/// again with the new rows (and without the dead ones).
fn join(model: &Controlled, batch: &mut Batch, joining: Vec<Prefilled>) -> Result<()> {
    if joining.is_empty() {
        return Ok(());
    }
    let eos = &model.policy.pretrained.generation.eos_token_ids;
    let mut sources: Vec<(Option<usize>, usize)> = vec![]; // (old row, or None: new) → index
    let mut new_caches = vec![];
    let mut new_rows = vec![];
    for p in joining {
        let info = Arc::new(JobInfo {
            params: p.job.params.clone(),
            top_logprobs: p.job.top_logprobs,
            adapters: model.row_routing(&p.job.adapters),
            events: p.job.events.clone(),
        });
        let content = p.cache.len;
        let cache_index = new_caches.len();
        new_caches.push(p.cache);
        for choice in 0..p.job.n {
            let params = SamplingParams { seed: info.params.seed.wrapping_add(choice as u64), ..info.params.clone() };
            let mut row = Row {
                job: info.clone(),
                choice,
                sampler: Sampler::new(&params)?,
                tokens: vec![],
                sent: 0,
                content,
                next: 0,
                dead: false,
            };
            let mut logits = p.logits.clone();
            advance(model, &mut row, &mut logits, eos)?;
            if !row.dead {
                new_rows.push((row, cache_index));
            }
        }
    }
    let old = batch.cache.take();
    let mut rows = vec![];
    for (i, r) in std::mem::take(&mut batch.rows).into_iter().enumerate() {
        if !r.dead {
            sources.push((Some(i), r.content));
            rows.push(r);
        }
    }
    for (r, c) in new_rows {
        sources.push((None, c));
        rows.push(r);
    }
    if rows.is_empty() {
        return Ok(());
    }
    // Every row right-aligned at the longest one; room for the longest remaining budget.
    let width = rows.iter().map(|r| r.content).max().unwrap_or(0);
    let room = rows.iter().map(|r| r.job.params.max_new_tokens.saturating_sub(r.tokens.len())).max().unwrap_or(0);
    let capacity = width + room + 1;
    let m = model.policy.pretrained.model.as_ref();
    let device = &model.policy.pretrained.device;
    let mut cache = m.new_cache(rows.len(), capacity, device)?;
    for (l, (k, v)) in cache.layers.iter_mut().enumerate() {
        let mut ks = vec![];
        let mut vs = vec![];
        for ((src, c), row) in sources.iter().zip(&rows) {
            let (kc, vc, start) = match src {
                Some(i) => {
                    let o = old.as_ref().ok_or_else(|| Error::Invalid("batch without a cache".into()))?;
                    let (kc, vc) = &o.layers[l];
                    (kc.narrow(0, *i, 1)?, vc.narrow(0, *i, 1)?, o.len - row.content)
                }
                None => {
                    let (kc, vc) = &new_caches[*c].layers[l];
                    (kc.clone(), vc.clone(), 0)
                }
            };
            let pad = |x: &Tensor| -> Result<Tensor> {
                let x = x.narrow(1, start, row.content)?;
                let (_, _, h, d) = x.dims4()?;
                let before = Tensor::zeros((1, width - row.content, h, d), x.dtype(), x.device())?;
                let after = Tensor::zeros((1, capacity - width, h, d), x.dtype(), x.device())?;
                Ok(Tensor::cat(&[&before, &x, &after], 1)?)
            };
            ks.push(pad(&kc)?);
            vs.push(pad(&vc)?);
        }
        *k = Tensor::cat(&ks, 0)?;
        *v = Tensor::cat(&vs, 0)?;
    }
    cache.len = width;
    batch.rows = rows;
    batch.cache = Some(cache);
    Ok(())
}

/// Drops dead rows from the batch once they are a quarter of it (or `now`): each costs a row of
/// every step, while dropping copies the cache.
fn compact(batch: &mut Batch, now: bool) -> Result<()> {
    let dead = batch.rows.iter().filter(|r| r.dead).count();
    if dead == 0 || !(now || dead * 4 >= batch.rows.len()) {
        return Ok(());
    }
    let keep: Vec<u32> = (0..batch.rows.len() as u32).filter(|&i| !batch.rows[i as usize].dead).collect();
    batch.rows.retain(|r| !r.dead);
    if keep.is_empty() {
        batch.cache = None;
        return Ok(());
    }
    if let Some(cache) = &mut batch.cache {
        let idx = Tensor::new(keep.as_slice(), cache.layers[0].0.device())?;
        for (k, v) in cache.layers.iter_mut() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
    }
    Ok(())
}

/// One decoding step of every row of the batch.
fn decode_step(model: &Controlled, batch: &mut Batch) -> Result<()> {
    let p = &model.policy.pretrained;
    let m = p.model.as_ref();
    let cache = batch.cache.as_mut().ok_or_else(|| Error::Invalid("batch without a cache".into()))?;
    let b = batch.rows.len();
    let past = cache.len;
    let pad = p.generation.pad_id()?;
    // Dead rows take padding as their next token and see only it.
    let masks: Vec<Vec<u8>> = batch
        .rows
        .iter()
        .map(|r| {
            let seen = if r.dead { 0 } else { r.content };
            let mut v = vec![0u8; past - seen];
            v.extend(std::iter::repeat_n(1u8, seen + 1));
            v
        })
        .collect();
    let ids: Vec<u32> = batch.rows.iter().map(|r| if r.dead { pad } else { r.next }).collect();
    let adapters: Vec<RowControls> =
        batch.rows.iter().map(|r| if r.dead { vec![] } else { r.job.adapters.clone() }).collect();
    model.route_rows(&adapters);
    let input = Tensor::from_vec(ids, (b, 1), &p.device)?;
    let inp = AttentionInputs::new(b, 1, past, Some(&masks))?;
    let h = m.forward_embeds(&m.embed(&input)?, &inp, Some(cache))?;
    let mut logits = m.lm_head(&h)?.squeeze(1)?.to_vec2::<f32>()?;
    let eos = &p.generation.eos_token_ids;
    for (row, logits) in batch.rows.iter_mut().zip(logits.iter_mut()) {
        if row.dead {
            continue;
        }
        row.content += 1;
        if row.job.events.is_closed() {
            row.dead = true;
            continue;
        }
        advance(model, row, logits, eos)?;
    }
    Ok(())
}

/// The `k` most likely tokens of `logits` with their log-probabilities (`lse`: log Σ exp).
fn top_tokens(logits: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, by_logit);
    idx.truncate(k);
    idx.sort_unstable_by(by_logit);
    idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect()
}

/// Picks a row's next token from its logits, records it, and sends what the client may see now.
fn advance(model: &Controlled, row: &mut Row, logits: &mut [f32], eos: &[u32]) -> Result<()> {
    let params = &row.job.params;
    let lse = crate::nn::simd::log_sum_exp(logits);
    let top = row.job.top_logprobs.map(|k| top_tokens(logits, k, lse));
    let min_eos = (row.tokens.len() < params.min_new_tokens).then_some(eos);
    for &t in params.suppress_tokens.iter().chain(min_eos.into_iter().flatten()) {
        if let Some(v) = logits.get_mut(t as usize) {
            *v = f32::NEG_INFINITY;
        }
    }
    let token = row.sampler.sample(logits);
    let tokenizer = model.tokenizer();
    let finish = if eos.contains(&token) {
        Some(FinishReason::Eos)
    } else {
        row.tokens.push(token);
        None
    };
    let mut text = tokenizer.decode(&row.tokens, true)?;
    let stop_at = params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min();
    let finish = finish.or(stop_at.map(|_| FinishReason::Stop)).or_else(|| {
        (row.tokens.len() >= params.max_new_tokens || row.content + 1 > model_context(model))
            .then_some(FinishReason::Length)
    });
    if let Some(cut) = stop_at {
        text.truncate(cut);
    }
    let logprobs = match (top, finish) {
        (_, Some(FinishReason::Eos)) | (None, _) => vec![],
        (Some(top), _) => vec![TokenLogprob { token, logprob: logits[token as usize] - lse, top }],
    };
    // Hold back an unfinished character and whatever could still become a stop string.
    let end = if finish.is_some() { text.len() } else { safe_end(&text, &params.stop_strings) };
    let piece = if end > row.sent && text.is_char_boundary(row.sent) && text.is_char_boundary(end) {
        let p = text[row.sent..end].to_string();
        row.sent = end;
        p
    } else {
        String::new()
    };
    let events = &row.job.events;
    let has_news = !piece.is_empty() || !logprobs.is_empty();
    if has_news && events.send(Event::Delta { choice: row.choice, text: piece, logprobs }).is_err() {
        row.dead = true;
        return Ok(());
    }
    if let Some(finish) = finish {
        drop(events.send(Event::Done { choice: row.choice, text, finish, tokens: row.tokens.len() }));
        row.dead = true;
    }
    row.next = token;
    Ok(())
}

fn model_context(model: &Controlled) -> usize {
    model.policy.pretrained.model.max_positions()
}

/// How much of `text` may be shown before generation ends: not a trailing unfinished character
/// (U+FFFD), nor a tail that begins a stop string.
fn safe_end(text: &str, stops: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for s in stops {
        for (k, _) in s.char_indices().skip(1) {
            if text[..end].ends_with(&s[..k]) {
                end -= k;
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_text_is_a_stop_string_prefix_or_an_unfinished_character() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(safe_end("Hello", &stops), 5);
        assert_eq!(safe_end("Hello\nUs", &stops), 5);
        assert_eq!(safe_end("Hello\n", &stops), 5);
        assert_eq!(safe_end("Hello\u{FFFD}", &stops), 5);
        assert_eq!(safe_end("Hello\nX", &stops), 7);
        assert_eq!(safe_end("Hello", &[]), 5);
    }

    #[test]
    fn top_tokens_are_the_largest_with_log_probabilities() {
        let logits = [0.0f32, 3.0, 1.0, 3.0];
        let lse = crate::nn::simd::log_sum_exp(&logits);
        let top = top_tokens(&logits, 3, lse);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        assert!((top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert!(top_tokens(&logits, 0, lse).is_empty());
        assert_eq!(top_tokens(&logits, 9, lse).len(), 4);
    }
}
