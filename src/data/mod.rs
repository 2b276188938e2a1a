//! Training examples and the readers that make them. An [`Example`] is token ids with the
//! position where the loss starts (before it: the prompt) and an optional control.
//!
//! Supervised JSONL (TRL's dataset formats), one object per line:
//! `{"text": ...}` (loss on every token), `{"prompt": ..., "completion": ...}` (loss on the
//! completion), `{"messages": [{"role", "content"}, ...]}` (chat template; loss on the last
//! assistant message). An optional `"control"` names the soft prompt / LoRA adapter of the row.
//! Preference data (chosen/rejected) is in [`preference`].

pub mod preference;
pub mod sentiment;

use crate::tokenizer::{Message, Tokenizer};
use crate::{Error, Result};
use serde_json::Value;
use std::io::Read;
use std::path::Path;

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Index of the first labelled token.
    pub start: usize,
    /// Control index (soft prompt / LoRA adapter), if the row has one.
    pub control: Option<usize>,
    /// Ranges `[a, b)` after `start` that take no loss (Chain-of-Hindsight's feedback phrases).
    pub unlabelled: Vec<(usize, usize)>,
}

/// Records of a JSON Lines file or a JSON array (plain or gzip-compressed, `.gz`), with where each came from (`line N` /
/// `record N`). Bytes that are not UTF-8 are an error naming the line.
pub fn read_records(path: &Path) -> Result<Vec<(String, Value)>> {
    let mut bytes = Vec::new();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    reader.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            Error::parse(path, format!("line {line}: not valid UTF-8"))
        })?;
        let v: Vec<Value> = serde_json::from_str(text).map_err(|e| Error::parse(path, format!("invalid JSON: {e}")))?;
        return Ok(v.into_iter().enumerate().map(|(i, v)| (format!("record {}", i + 1), v)).collect());
    }
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(line)
            .map_err(|e| Error::parse(path, format!("line {}: not valid UTF-8 (byte {})", i + 1, e.valid_up_to())))?;
        if line.trim().is_empty() {
            continue;
        }
        let v =
            serde_json::from_str(line).map_err(|e| Error::parse(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        out.push((format!("line {}", i + 1), v));
    }
    Ok(out)
}

/// Reading options for supervised data.
#[derive(Debug, Clone)]
pub struct SupervisedOptions {
    /// Longest sequence kept; longer ones are cut at the end (and counted).
    pub max_length: usize,
    /// Control names rows may give in `"control"`, by index.
    pub controls: Vec<String>,
    /// Control of rows without a `"control"` field.
    pub default_control: Option<usize>,
    /// Token appended after each response (EOS).
    pub eos_id: Option<u32>,
}

/// What reading cut.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadStats {
    pub examples: usize,
    pub truncated: usize,
}

fn field<'a>(v: &'a Value, k: &str, path: &Path, loc: &str) -> Result<&'a str> {
    v.get(k).and_then(Value::as_str).ok_or_else(|| Error::parse(path, format!("{loc}: field '{k}' must be a string")))
}

/// Reads a supervised JSONL file into examples.
pub fn read_supervised(path: &Path, tok: &Tokenizer, opts: &SupervisedOptions) -> Result<(Vec<Example>, ReadStats)> {
    supervised_from_records(path, read_records(path)?, tok, opts)
}

/// Supervised examples from the records of `path` (see [`read_records`]).
pub fn supervised_from_records(
    path: &Path,
    records: Vec<(String, Value)>,
    tok: &Tokenizer,
    opts: &SupervisedOptions,
) -> Result<(Vec<Example>, ReadStats)> {
    let mut stats = ReadStats::default();
    let mut out = Vec::new();
    for (loc, v) in records {
        let line = loc.as_str();
        let (prompt, response): (Vec<u32>, Vec<u32>) = if v.get("text").is_some() {
            (vec![], tok.encode(field(&v, "text", path, line)?, false)?)
        } else if v.get("prompt").is_some() {
            (
                tok.encode(field(&v, "prompt", path, line)?, false)?,
                tok.encode(field(&v, "completion", path, line)?, false)?,
            )
        } else if let Some(Value::Array(msgs)) = v.get("messages") {
            let msgs: Vec<Message> = msgs
                .iter()
                .map(|m| Ok(Message::new(field(m, "role", path, line)?, field(m, "content", path, line)?)))
                .collect::<Result<_>>()?;
            let last = msgs
                .iter()
                .rposition(|m| m.role == "assistant")
                .ok_or_else(|| Error::parse(path, format!("{line}: 'messages' has no assistant message to learn")))?;
            let head = tok.apply_chat_template(&msgs[..last], true)?;
            let full = tok.apply_chat_template(&msgs[..=last], false)?;
            let Some(tail) = full.strip_prefix(&head) else {
                return Err(Error::parse(path, format!("{line}: the chat template does not extend the prompt")));
            };
            (tok.encode(&head, false)?, tok.encode(tail, false)?)
        } else {
            return Err(Error::parse(path, format!("{line}: expected 'text', 'prompt'/'completion' or 'messages'")));
        };
        let control = match v.get("control") {
            Some(Value::String(c)) => Some(opts.controls.iter().position(|n| n == c).ok_or_else(|| {
                Error::parse(path, format!("{line}: unknown control '{c}' (have: {})", opts.controls.join(", ")))
            })?),
            Some(_) => return Err(Error::parse(path, format!("{line}: field 'control' must be a string"))),
            None => opts.default_control,
        };
        let mut ids = prompt.clone();
        ids.extend(&response);
        if v.get("messages").is_none() {
            ids.extend(opts.eos_id);
        }
        if ids.len() > opts.max_length {
            ids.truncate(opts.max_length);
            stats.truncated += 1;
        }
        let start = prompt.len();
        if start + 1 >= ids.len() && start > 0 {
            return Err(Error::parse(
                path,
                format!("{line}: the prompt fills max_length ({}) and leaves no response token", opts.max_length),
            ));
        }
        out.push(Example { ids, start, control, ..Default::default() });
    }
    if out.is_empty() {
        return Err(Error::parse(path, "no examples"));
    }
    stats.examples = out.len();
    if stats.truncated > 0 {
        tracing::warn!(
            "{}: {} of {} examples cut to max_length {}",
            path.display(),
            stats.truncated,
            out.len(),
            opts.max_length
        );
    }
    Ok((out, stats))
}
