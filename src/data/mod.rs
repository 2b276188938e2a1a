//! Training examples and the readers that make them. An [`Example`] is token ids with the
//! position where the loss starts (before it: the prompt) and an optional control.
//!
//! Supervised JSONL (TRL's dataset formats), one object per line:
//! `{"text": ...}` (loss on every token), `{"prompt": ..., "completion": ...}` (loss on the
//! completion), `{"messages": [{"role", "content"}, ...]}` (chat template; loss on the last
//! assistant message). An optional `"control"` names the soft prompt / LoRA adapter of the row.
//! Preference data (chosen/rejected) is in [`preference`].

pub mod mix;
pub mod preference;
pub mod sentiment;
pub mod source;

use crate::tokenizer::{Message, Tokenizer};
use crate::{Error, Result};
use serde_json::Value;
pub use source::Records;
use std::path::Path;

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Index of the first labelled token.
    pub start: usize,
    /// Control indices (soft prompts / LoRA adapters), at most one per preference dimension, in
    /// dimension order; empty for none.
    pub controls: Vec<usize>,
    /// Ranges `[a, b)` after `start` that take no loss (Chain-of-Hindsight's feedback phrases).
    pub unlabelled: Vec<(usize, usize)>,
    /// The response's score on each objective of [`SupervisedOptions::scores`], in that order
    /// (Rewards-in-Context's rows, `"scores": {"sentiment": 0.7, ...}`).
    pub scores: Vec<f64>,
}

/// One record of a data file: where it is (`line N` / `record N` / `row N`, after the file's name
/// when a source has several) and its JSON, or why that line is not usable JSON (a per-record
/// problem, which `skip_invalid` skips).
#[derive(Debug, Clone)]
pub struct Record {
    pub loc: String,
    pub value: std::result::Result<Value, String>,
}

/// Reads and tokenises records with a progress bar when the source is large, counting what
/// was read, skipped and cut: `each` turns one record into an item or says why it cannot be one.
/// An invalid record stops with its location (and the Parquet columns), or with `skip_invalid`
/// is skipped and counted. Returns the items and the skipped records (`"{loc}: {reason}"`).
pub fn read_each<T>(
    records: Records,
    skip_invalid: bool,
    what: &str,
    mut each: impl FnMut(&Value) -> std::result::Result<T, String>,
    mut status: impl FnMut(&[String]) -> String,
    error_suffix: &str,
) -> Result<(Vec<T>, Vec<String>)> {
    let mut records = records;
    let source = records.source.clone();
    let mut progress = records.large.then(|| {
        crate::ui::Progress::new(&format!("reading {}", source.display()), records.total.unwrap_or(0), "records", 0)
    });
    let (mut out, mut skipped, mut seen) = (Vec::new(), Vec::new(), 0usize);
    while let Some(r) = records.next() {
        let r = r?;
        seen += 1;
        match r.value.as_ref().map_err(String::clone).and_then(&mut each) {
            Ok(item) => out.push(item),
            Err(e) if skip_invalid => skipped.push(format!("{}: {e}", r.loc)),
            Err(e) => {
                return Err(Error::parse(&source, format!("{}: {e}{}{error_suffix}", r.loc, records.schema_hint())))
            }
        }
        if let Some(p) = &mut progress {
            if seen % 256 == 0 {
                p.update(seen, &format!("{} {what}, {}", out.len(), status(&skipped)));
            }
        }
    }
    if let Some(p) = progress {
        p.finish(&format!("{} {what}, {}", out.len(), status(&skipped)));
    }
    report_skipped(&source, &skipped, seen);
    if out.is_empty() {
        return Err(Error::parse(&source, format!("no usable {what} ({} skipped)", skipped.len())));
    }
    Ok((out, skipped))
}

/// Records skipped with `skip_invalid`: `"{loc}: {reason}"` each. Logs how many and the first few.
pub fn report_skipped(path: &Path, skipped: &[String], total: usize) {
    if !skipped.is_empty() {
        tracing::warn!(
            "{}: skipped {} of {} records: {}{}",
            path.display(),
            skipped.len(),
            total,
            skipped.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
            if skipped.len() > 5 { "; ..." } else { "" }
        );
    }
}

/// Reading options for supervised data.
#[derive(Debug, Clone)]
pub struct SupervisedOptions {
    /// Longest sequence kept; longer ones are cut at the end (and counted).
    pub max_length: usize,
    /// Control names rows may give in `"control"`, by index.
    pub controls: Vec<String>,
    /// The preference dimensions (names and their controls), when the run has several: rows
    /// then give `"controls": {"dimension": "control", ...}`.
    pub dimensions: Vec<(String, Vec<String>)>,
    /// Objectives every row must score in `"scores"` (empty: the field is not read).
    pub scores: Vec<String>,
    /// Control of rows without a `"control"` field.
    pub default_control: Option<usize>,
    /// Token appended after each response (EOS).
    pub eos_id: Option<u32>,
    /// Skip (and count) invalid records instead of failing on the first.
    pub skip_invalid: bool,
}

/// What reading cut.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadStats {
    pub examples: usize,
    pub truncated: usize,
    /// Records skipped with `skip_invalid`, each as `"{loc}: {reason}"`.
    pub skipped: Vec<String>,
}

fn field<'a>(v: &'a Value, k: &str) -> std::result::Result<&'a str, String> {
    v.get(k).and_then(Value::as_str).ok_or_else(|| format!("field '{k}' must be a string"))
}

/// Reads a supervised data source (a file, a folder or an `hf:` id, see [`source`]) into
/// examples.
pub fn read_supervised(path: &Path, tok: &Tokenizer, opts: &SupervisedOptions) -> Result<(Vec<Example>, ReadStats)> {
    supervised_from_records(Records::open(path, "train")?, tok, opts)
}

/// One supervised row as an example, or why it cannot be one.
fn supervised_example(
    v: &Value,
    tok: &Tokenizer,
    opts: &SupervisedOptions,
    stats: &mut ReadStats,
) -> std::result::Result<Example, String> {
    let enc = |t: &str, special: bool| tok.encode(t, special).map_err(|e| e.to_string());
    let (prompt, response): (Vec<u32>, Vec<u32>) = if v.get("text").is_some() {
        (vec![], enc(field(v, "text")?, false)?)
    } else if v.get("prompt").is_some() {
        (enc(field(v, "prompt")?, false)?, enc(field(v, "completion")?, false)?)
    } else if let Some(msgs) = v.get("messages") {
        let msgs = msgs.as_array().ok_or("field 'messages' must be a list of messages")?;
        let msgs: Vec<Message> = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| match (m.get("role").and_then(Value::as_str), m.get("content").and_then(Value::as_str)) {
                (Some(r), Some(c)) => Ok(Message::new(r, c)),
                _ => Err(format!("messages[{i}] needs string 'role' and 'content'")),
            })
            .collect::<std::result::Result<_, String>>()?;
        let last =
            msgs.iter().rposition(|m| m.role == "assistant").ok_or("'messages' has no assistant message to learn")?;
        let head = tok.apply_chat_template(&msgs[..last], true).map_err(|e| e.to_string())?;
        let full = tok.apply_chat_template(&msgs[..=last], false).map_err(|e| e.to_string())?;
        let tail = full.strip_prefix(&head).ok_or("the chat template does not extend the prompt")?;
        (enc(&head, false)?, enc(tail, false)?)
    } else {
        return Err("expected 'text', 'prompt'/'completion' or 'messages'".into());
    };
    if response.is_empty() {
        return Err("the response is empty".into());
    }
    let index = |c: &str| {
        opts.controls
            .iter()
            .position(|n| n == c)
            .ok_or_else(|| format!("unknown control '{c}' (have: {})", opts.controls.join(", ")))
    };
    let mut controls = match (v.get("control"), v.get("controls")) {
        (Some(_), Some(_)) => return Err("give 'control' or 'controls', not both".into()),
        (Some(Value::String(c)), None) => vec![index(c)?],
        (Some(_), None) => return Err("field 'control' must be a string".into()),
        (None, Some(Value::Object(m))) => {
            if opts.dimensions.is_empty() {
                return Err("'controls' names controls per dimension, but the run has none (model.dimensions)".into());
            }
            let mut out = Vec::with_capacity(m.len());
            for (dim, c) in m {
                let c = c.as_str().ok_or_else(|| format!("controls.{dim} must be a string"))?;
                let (_, cs) = opts.dimensions.iter().find(|(d, _)| d == dim).ok_or_else(|| {
                    let known: Vec<&str> = opts.dimensions.iter().map(|(d, _)| d.as_str()).collect();
                    format!("unknown dimension '{dim}' (have: {})", known.join(", "))
                })?;
                if !cs.iter().any(|n| n == c) {
                    return Err(format!("controls.{dim}: '{c}' is not a control of '{dim}' (have: {})", cs.join(", ")));
                }
                out.push(index(c)?);
            }
            out
        }
        (None, Some(_)) => return Err("field 'controls' must be an object {\"dimension\": \"control\", ...}".into()),
        (None, None) => opts.default_control.into_iter().collect(),
    };
    // The control list holds the dimensions in order: index order is dimension order.
    controls.sort_unstable();
    let scores = if opts.scores.is_empty() {
        vec![]
    } else {
        let m = v
            .get("scores")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("needs 'scores', an object with a number for each of {}", opts.scores.join(", ")))?;
        if let Some(k) = m.keys().find(|k| !opts.scores.contains(k)) {
            return Err(format!("scores.{k}: not an objective of this run (have: {})", opts.scores.join(", ")));
        }
        opts.scores
            .iter()
            .map(|o| match m.get(o).and_then(Value::as_f64) {
                Some(x) if x.is_finite() => Ok(x),
                Some(_) | None => Err(format!("scores.{o} must be a finite number")),
            })
            .collect::<std::result::Result<Vec<f64>, String>>()?
    };
    let mut ids = prompt.clone();
    ids.extend(&response);
    if v.get("messages").is_none() {
        ids.extend(opts.eos_id);
    }
    let start = prompt.len();
    if start > 0 && start + 1 >= ids.len().min(opts.max_length) {
        return Err(format!("the prompt fills max_length ({}) and leaves no response token", opts.max_length));
    }
    if ids.len() > opts.max_length {
        ids.truncate(opts.max_length);
        stats.truncated += 1;
    }
    Ok(Example { ids, start, controls, scores, ..Default::default() })
}

/// Supervised examples from `records`. An invalid record stops with its location, or with
/// `skip_invalid` is skipped and counted.
pub fn supervised_from_records(
    records: Records,
    tok: &Tokenizer,
    opts: &SupervisedOptions,
) -> Result<(Vec<Example>, ReadStats)> {
    let source = records.source.clone();
    let stats = std::cell::RefCell::new(ReadStats::default());
    let (out, skipped) = read_each(
        records,
        opts.skip_invalid,
        "records",
        |v| supervised_example(v, tok, opts, &mut stats.borrow_mut()),
        |skipped| format!("{} skipped, {} cut", skipped.len(), stats.borrow().truncated),
        " (skip_invalid skips such records)",
    )?;
    let mut stats = stats.into_inner();
    stats.skipped = skipped;
    stats.examples = out.len();
    if stats.truncated > 0 {
        tracing::warn!(
            "{}: {} of {} examples cut to max_length {}",
            source.display(),
            stats.truncated,
            out.len(),
            opts.max_length
        );
    }
    Ok((out, stats))
}
