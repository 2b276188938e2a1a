//! The LLM judge: pairwise comparison of two responses by a model behind any OpenAI-compatible
//! endpoint (`--judge llm:URL[#MODEL]`, `URL` the API base such as `http://127.0.0.1:8080/v1`),
//! with the DPO paper's GPT-4 prompts (Rafailov et al. 2023, appendix C.2: the summarisation and
//! the dialogue variant).
//!
//! Each pair is asked in both orders: first in a seeded random order (recorded), then swapped,
//! which measures the judge's position bias and its agreement with itself. A verdict is read
//! strictly from the answer's last `Preferred:` / `More helpful:` line; an answer without one is
//! counted as unparseable, never guessed. Requests retry with backoff on 429 and 5xx, run at most
//! `concurrency` at a time, and every answer is cached on disk by a hash of the request, so a
//! rerun sends nothing. The API key comes from `OPENAI_API_KEY`.

use crate::eval::stats::{bootstrap, mean, Estimate, RESAMPLES};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Which of the DPO paper's prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// "For the following query to a chatbot, which response is more helpful?"
    Dialogue,
    /// "Which of the following summaries does a better job ...?"
    Summary,
}

impl Task {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "dialogue" => Ok(Task::Dialogue),
            "summary" => Ok(Task::Summary),
            other => Err(Error::Invalid(format!("unknown judge task '{other}' (dialogue, summary)"))),
        }
    }

    /// The judging prompt for `query` with `first` shown as A and `second` as B.
    pub fn prompt(self, query: &str, first: &str, second: &str) -> String {
        match self {
            Task::Dialogue => format!(
                "For the following query to a chatbot, which response is more helpful?\n\n\
                 Query: {query}\n\n\
                 Response A:\n{first}\n\n\
                 Response B:\n{second}\n\n\
                 FIRST provide a one-sentence comparison of the two responses and explain which you feel is more \
                 helpful. SECOND, on a new line, state only \"A\" or \"B\" to indicate which response is more \
                 helpful. Your response should use the format:\n\
                 Comparison: <one-sentence comparison and explanation>\n\
                 More helpful: <\"A\" or \"B\">"
            ),
            Task::Summary => format!(
                "Which of the following summaries does a better job of summarizing the most important points in the \
                 given forum post, without including unimportant or irrelevant details? A good summary is both \
                 precise and concise.\n\n\
                 Post:\n{query}\n\n\
                 Summary A:\n{first}\n\n\
                 Summary B:\n{second}\n\n\
                 FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. \
                 SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. Your response should use \
                 the format:\n\
                 Comparison: <one-sentence comparison and explanation>\n\
                 Preferred: <\"A\" or \"B\">"
            ),
        }
    }

    fn key(self) -> &'static str {
        match self {
            Task::Dialogue => "More helpful:",
            Task::Summary => "Preferred:",
        }
    }

    /// The position an answer prefers: from its last line starting with the task's key, whose
    /// rest is `A` or `B` (quotes, asterisks, a final full stop allowed); `None` otherwise.
    pub fn verdict(self, answer: &str) -> Option<Position> {
        let line = answer
            .lines()
            .rev()
            .map(|l| l.trim().trim_matches('*').trim())
            .find(|l| l.get(..self.key().len()).is_some_and(|k| k.eq_ignore_ascii_case(self.key())))?;
        let rest = line[self.key().len()..].trim().trim_matches(|c| matches!(c, '"' | '\'' | '*' | '.' | ' '));
        match rest {
            "A" => Some(Position::A),
            "B" => Some(Position::B),
            _ => None,
        }
    }
}

/// A position in the judging prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Position {
    A,
    B,
}

/// One pair judged in both orders.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Judgement {
    pub index: usize,
    pub prompt: String,
    /// The first order showed response 1 (of method a) as A; the second order swaps.
    pub a_shown_first: bool,
    /// Raw answers: first order, then swapped.
    pub answers: [String; 2],
    /// Whether method a won in each order (`None`: unparseable).
    pub a_wins: [Option<bool>; 2],
    /// The positions chosen in each order.
    pub positions: [Option<Position>; 2],
}

/// What a comparison found.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub judge: String,
    pub task: Task,
    pub pairs: usize,
    /// Win rate of a over b: each pair scores the mean of its parsed verdicts (1, ½ when the
    /// orders disagree, 0), pairs without a parsed verdict left out; 95% bootstrap CI.
    pub win_rate: Option<Estimate>,
    /// The same from the randomised first order alone (as the DPO paper judged).
    pub first_order_win_rate: Option<Estimate>,
    /// Share of pairs, both orders parsed, whose two verdicts name the same response.
    pub agreement: Option<f64>,
    /// Share of parsed verdicts choosing position A (0.5: no position bias).
    pub position_a_share: Option<f64>,
    /// Answers without a verdict, of `2 * pairs`.
    pub unparseable: usize,
    /// Requests answered from the cache, of `2 * pairs`.
    pub cached: usize,
}

impl Comparison {
    /// The figures in words: `0.750 [0.5, 1.0] on 12 pairs, both orders; first order alone …`.
    pub fn describe(&self) -> String {
        let est = |e: &Option<Estimate>| {
            e.map_or("n/a (no verdict parsed)".into(), |e| format!("{:.3} [{:.3}, {:.3}]", e.value, e.lo, e.hi))
        };
        let share = |x: Option<f64>| x.map_or("n/a".into(), |v| format!("{v:.3}"));
        format!(
            "{} on {} pairs, both orders; first order alone {}; agreement under swapped order {}; position A \
             chosen {}; {} of {} answers unparseable; {} from the cache",
            est(&self.win_rate),
            self.pairs,
            est(&self.first_order_win_rate),
            share(self.agreement),
            share(self.position_a_share),
            self.unparseable,
            2 * self.pairs,
            self.cached
        )
    }
}

/// A judge behind an OpenAI-compatible endpoint.
pub struct LlmJudge {
    pub base_url: String,
    pub model: String,
    pub task: Task,
    api_key: Option<String>,
    pub cache_dir: PathBuf,
    pub concurrency: usize,
    /// Attempts per request (429 / 5xx / connection errors are retried).
    pub attempts: usize,
    /// First backoff; doubled per retry (a `Retry-After` header wins).
    pub backoff: Duration,
    client: reqwest::blocking::Client,
}

/// The default cache folder: `$MEET_JUDGE_CACHE`, else `$XDG_CACHE_HOME/meet/llm-judge`, else
/// `~/.cache/meet/llm-judge`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MEET_JUDGE_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("meet").join("llm-judge")
}

impl LlmJudge {
    /// A judge from `llm:URL[#MODEL]`. Without `#MODEL` the endpoint must list exactly one model.
    pub fn from_spec(spec: &str, task: Task, concurrency: usize) -> Result<Self> {
        let rest = spec
            .strip_prefix("llm:")
            .ok_or_else(|| Error::Invalid(format!("judge '{spec}': an LLM judge is written llm:URL[#MODEL]")))?;
        let (url, model) = match rest.split_once('#') {
            Some((u, m)) => (u, Some(m.to_string())),
            None => (rest, None),
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Invalid(format!("judge '{spec}': URL must start with http:// or https://")));
        }
        if concurrency == 0 {
            return Err(Error::Invalid("judge concurrency must be at least 1".into()));
        }
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| Error::Invalid(format!("HTTP client: {e}")))?;
        let mut judge = Self {
            base_url: url.trim_end_matches('/').to_string(),
            model: model.unwrap_or_default(),
            task,
            api_key: std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty()),
            cache_dir: default_cache_dir(),
            concurrency,
            attempts: 6,
            backoff: Duration::from_millis(500),
            client,
        };
        if judge.model.is_empty() {
            judge.model = judge.only_model()?;
        }
        Ok(judge)
    }

    /// `llm:URL#MODEL`, for reports.
    pub fn name(&self) -> String {
        format!("llm:{}#{}", self.base_url, self.model)
    }

    fn with_auth(&self, r: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn only_model(&self) -> Result<String> {
        let url = format!("{}/models", self.base_url);
        let v: Value = self
            .with_auth(self.client.get(&url))
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .map_err(|e| Error::Invalid(format!("judge: listing the models at {url}: {e}")))?;
        let ids: Vec<String> = v["data"]
            .as_array()
            .map(|d| d.iter().filter_map(|m| m["id"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::Invalid(format!("judge: {url} lists no model; name one as llm:URL#MODEL"))),
            many => Err(Error::Invalid(format!(
                "judge: {url} serves several models ({}); name one as llm:URL#MODEL",
                many.join(", ")
            ))),
        }
    }

    /// The body of a judging request.
    fn request(&self, prompt: &str) -> Value {
        json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 256,
        })
    }

    fn cache_path(&self, body: &Value) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.base_url.as_bytes());
        h.update([0]);
        h.update(body.to_string().as_bytes());
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        self.cache_dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The answer to `prompt`, from the cache or the endpoint; `true` when cached.
    pub fn ask(&self, prompt: &str) -> Result<(String, bool)> {
        let body = self.request(prompt);
        let path = self.cache_path(&body);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some(a) =
                serde_json::from_str::<Value>(&text).ok().and_then(|v| v["answer"].as_str().map(String::from))
            {
                return Ok((a, true));
            }
        }
        let url = format!("{}/chat/completions", self.base_url);
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                std::thread::sleep(self.backoff * (1 << (attempt - 1).min(6)));
            }
            let r = match self.with_auth(self.client.post(&url)).json(&body).send() {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{e}");
                    continue;
                }
            };
            let status = r.status();
            if status.as_u16() == 429 || status.is_server_error() {
                let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
                last = format!("HTTP {status}: {}", r.text().unwrap_or_default());
                if let Some(w) = wait {
                    std::thread::sleep(Duration::from_secs_f64(w.clamp(0.0, 60.0)));
                }
                continue;
            }
            let text = r.text().map_err(|e| Error::Invalid(format!("judge: reading the answer from {url}: {e}")))?;
            if !status.is_success() {
                return Err(Error::Invalid(format!("judge: {url} answered HTTP {status}: {text}")));
            }
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::Invalid(format!("judge: {url} answered something not JSON ({e}): {text:.200}")))?;
            let answer = v["choices"][0]["message"]["content"].as_str().ok_or_else(|| {
                Error::Invalid(format!("judge: {url} answered without choices[0].message.content: {text:.200}"))
            })?;
            let record = json!({"url": url, "request": body, "answer": answer, "response": v});
            crate::files::atomic_write(&path, record.to_string().as_bytes())?;
            return Ok((answer.to_string(), false));
        }
        Err(Error::Invalid(format!("judge: {url} failed {} times; last: {last}", self.attempts)))
    }

    /// Judges response 1 (of method a) against response 2 (of method b) for each
    /// `(query, response_a, response_b)`, both orders, the first order drawn with `seed`.
    /// Returns the judgements and how many answers came from the cache.
    pub fn judge_pairs(&self, items: &[(String, String, String)], seed: u64) -> Result<(Vec<Judgement>, usize)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a_first: Vec<bool> = items.iter().map(|_| rng.gen()).collect();
        // Request k: pair k / 2, order k % 2 (0 = the drawn order, 1 = swapped).
        let prompts: Vec<String> = (0..items.len() * 2)
            .map(|k| {
                let (q, ra, rb) = &items[k / 2];
                let shows_a_first = a_first[k / 2] == (k % 2 == 0);
                if shows_a_first {
                    self.task.prompt(q, ra, rb)
                } else {
                    self.task.prompt(q, rb, ra)
                }
            })
            .collect();
        // Each request's answer (and whether it was cached), once asked.
        type Answer = Option<Result<(String, bool)>>;
        let answers: Mutex<Vec<Answer>> = Mutex::new((0..prompts.len()).map(|_| None).collect());
        let next = AtomicUsize::new(0);
        let progress = Mutex::new(crate::ui::Progress::new("judge", prompts.len(), "answers", 0));
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.min(prompts.len()).max(1) {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= prompts.len() {
                        break;
                    }
                    let r = self.ask(&prompts[k]);
                    let failed = r.is_err();
                    answers.lock().unwrap_or_else(|p| p.into_inner())[k] = Some(r);
                    progress.lock().unwrap_or_else(|p| p.into_inner()).inc(1, "");
                    if failed {
                        // Stop handing out work: the first error is reported.
                        next.store(prompts.len(), Ordering::Relaxed);
                    }
                });
            }
        });
        progress.into_inner().unwrap_or_else(|p| p.into_inner()).finish("");
        let answers = answers.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![];
        let mut got: Vec<(String, bool)> = vec![];
        for a in answers {
            match a {
                Some(Ok(x)) => got.push(x),
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Invalid("judge: a request was never sent".into())),
            }
        }
        for (i, (q, _, _)) in items.iter().enumerate() {
            let (first, second) = (&got[2 * i], &got[2 * i + 1]);
            let positions = [self.task.verdict(&first.0), self.task.verdict(&second.0)];
            // In order 0, a is at A when a_first; in order 1 the other way round.
            let a_at_a = [a_first[i], !a_first[i]];
            let a_wins = [0, 1].map(|o| positions[o].map(|p| (p == Position::A) == a_at_a[o]));
            out.push(Judgement {
                index: i,
                prompt: q.clone(),
                a_shown_first: a_first[i],
                answers: [first.0.clone(), second.0.clone()],
                a_wins,
                positions,
            });
        }
        let cached = got.iter().filter(|g| g.1).count();
        Ok((out, cached))
    }
}

/// A placeholder for the scores of responses that the LLM judge compares afterwards.
struct Pending;

impl crate::eval::Judge for Pending {
    fn name(&self) -> &str {
        "pending"
    }

    fn score(&self, items: &[(&str, &str)]) -> Result<Vec<f64>> {
        Ok(vec![0.0; items.len()])
    }
}

/// `meet eval --judge llm:...`: samples `model` (under its control) and `reference` (plain) on the
/// same prompts with the same options, and has the LLM judge compare each (prompt, sample) pair.
/// Each of the model's responses then scores its pair's win (1, ½, 0: the mean of its parsed
/// verdicts); responses whose pair got no verdict are left out of the returned samples.
pub fn evaluate_against(
    judge: &LlmJudge,
    model: &crate::controls::Controlled,
    reference: &crate::controls::Controlled,
    prompts: &[String],
    opts: &crate::eval::sample::EvalOptions,
) -> Result<(Vec<crate::eval::sample::Sample>, Comparison)> {
    use crate::eval::sample::{evaluate, EvalOptions};
    let mine = evaluate(model, Some(reference), &Pending, prompts, opts)?;
    let ref_opts = EvalOptions { control: None, progress: Some("reference".into()), ..opts.clone() };
    let theirs = evaluate(reference, None, &Pending, prompts, &ref_opts)?;
    // Both are sorted by (prompt, sample) over the same prompts and sample counts.
    let items: Vec<(String, String, String)> =
        mine.iter().zip(&theirs).map(|(a, b)| (a.prompt.clone(), a.response.clone(), b.response.clone())).collect();
    let seed = opts.params.seed;
    let (js, cached) = judge.judge_pairs(&items, seed)?;
    let c = summarize(judge.name(), judge.task, &js, cached, seed)?;
    let scored = mine
        .into_iter()
        .zip(&js)
        .filter_map(|(mut s, j)| {
            let parsed: Vec<f64> = j.a_wins.iter().flatten().map(|&w| if w { 1.0 } else { 0.0 }).collect();
            (!parsed.is_empty()).then(|| {
                s.score = mean(&parsed);
                s
            })
        })
        .collect();
    Ok((scored, c))
}

/// The statistics of judgements (see [`Comparison`]).
pub fn summarize(judge: String, task: Task, js: &[Judgement], cached: usize, seed: u64) -> Result<Comparison> {
    let win = |b: bool| if b { 1.0 } else { 0.0 };
    let both: Vec<f64> = js
        .iter()
        .filter_map(|j| {
            let parsed: Vec<f64> = j.a_wins.iter().flatten().map(|&b| win(b)).collect();
            (!parsed.is_empty()).then(|| mean(&parsed))
        })
        .collect();
    let first: Vec<f64> = js.iter().filter_map(|j| j.a_wins[0].map(win)).collect();
    let ci = |xs: &[f64]| -> Result<Option<Estimate>> {
        if xs.is_empty() {
            Ok(None)
        } else {
            Ok(Some(bootstrap(xs, mean, RESAMPLES, seed)?))
        }
    };
    let pairs_both: Vec<bool> = js.iter().filter_map(|j| Some(j.a_wins[0]? == j.a_wins[1]?)).collect();
    let positions: Vec<f64> =
        js.iter().flat_map(|j| j.positions.iter().flatten().map(|&p| win(p == Position::A))).collect();
    let share = |xs: &[f64]| (!xs.is_empty()).then(|| mean(xs));
    Ok(Comparison {
        judge,
        task,
        pairs: js.len(),
        win_rate: ci(&both)?,
        first_order_win_rate: ci(&first)?,
        agreement: share(&pairs_both.iter().map(|&b| win(b)).collect::<Vec<_>>()),
        position_a_share: share(&positions),
        unparseable: js.iter().map(|j| j.positions.iter().filter(|p| p.is_none()).count()).sum(),
        cached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_strictly() {
        let d = Task::Dialogue;
        assert_eq!(d.verdict("Comparison: B is kinder.\nMore helpful: B"), Some(Position::B));
        assert_eq!(d.verdict("Comparison: x\nMore helpful: \"A\""), Some(Position::A));
        assert_eq!(d.verdict("Comparison: x\n**More helpful:** A."), Some(Position::A));
        assert_eq!(d.verdict("more helpful: a"), None, "lower-case a is not a verdict");
        assert_eq!(d.verdict("Comparison: x\nMore helpful: A or B"), None);
        assert_eq!(d.verdict("I think A is better."), None);
        assert_eq!(d.verdict("Preferred: A"), None, "the summary key is not the dialogue key");
        assert_eq!(Task::Summary.verdict("Comparison: x\nPreferred: B"), Some(Position::B));
        // The last verdict line counts (a model restating the format first).
        assert_eq!(d.verdict("More helpful: <\"A\" or \"B\">\nComparison: y\nMore helpful: B"), Some(Position::B));
    }

    #[test]
    fn prompts_are_the_dpo_papers() {
        let p = Task::Dialogue.prompt("Q?", "one", "two");
        assert!(p.starts_with("For the following query to a chatbot, which response is more helpful?\n\nQuery: Q?"));
        assert!(p.contains("Response A:\none\n\nResponse B:\ntwo\n\n"));
        assert!(p.ends_with("More helpful: <\"A\" or \"B\">"));
        let s = Task::Summary.prompt("post", "s1", "s2");
        assert!(s.contains("Post:\npost\n\nSummary A:\ns1\n\nSummary B:\ns2"));
        assert!(s.ends_with("Preferred: <\"A\" or \"B\">"));
    }

    #[test]
    fn statistics_count_orders_agreement_and_position_bias() {
        let j = |a_first: bool, positions: [Option<Position>; 2]| {
            let a_at_a = [a_first, !a_first];
            Judgement {
                index: 0,
                prompt: String::new(),
                a_shown_first: a_first,
                answers: Default::default(),
                a_wins: [0, 1].map(|o| positions[o].map(|p| (p == Position::A) == a_at_a[o])),
                positions,
            }
        };
        use Position::*;
        let js = vec![
            j(true, [Some(A), Some(B)]),  // a wins twice: agrees
            j(false, [Some(A), Some(A)]), // always A: b then a, disagrees
            j(true, [None, Some(A)]),     // one unparseable; order 1 shows b at A: b wins
            j(true, [None, None]),        // left out
        ];
        let c = summarize("t".into(), Task::Dialogue, &js, 0, 1).unwrap();
        assert_eq!(c.pairs, 4);
        assert_eq!(c.unparseable, 3);
        // Pair scores 1, 0.5, 0: mean 0.5.
        assert!((c.win_rate.unwrap().value - 0.5).abs() < 1e-12);
        // First order: a wins in pair 0, loses in pair 1.
        assert!((c.first_order_win_rate.unwrap().value - 0.5).abs() < 1e-12);
        assert_eq!(c.agreement, Some(0.5));
        // Positions chosen: A, B, A, A, A → 0.8.
        assert!((c.position_a_share.unwrap() - 0.8).abs() < 1e-12);
    }
}
