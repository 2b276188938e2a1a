//! Preference data: a prompt with a chosen and a rejected response, read from the formats users
//! have, and tokenised with an exact prompt/response boundary.
//!
//! Formats (`data.format`, detected from the first record when `auto`):
//! - `trl`: `{"prompt", "chosen", "rejected"}` as strings, or as lists of chat messages
//!   (conversational; without `prompt`, the messages the two share are the prompt, as TRL's
//!   `maybe_extract_prompt`);
//! - `hh`: Anthropic HH-RLHF, `{"chosen", "rejected"}` transcripts with `"\n\nHuman:"` /
//!   `"\n\nAssistant:"` turns; the prompt is the shared prefix up to the last `"\n\nAssistant:"`,
//!   read as chat messages (so the model's chat template applies, as TRL's HH script does);
//! - `tldr`: OpenAI summarize-from-feedback comparisons, `{"info": {post, title, subreddit},
//!   "summaries": [{text}, {text}], "choice"}`, prompt
//!   `"SUBREDDIT: r/{s}\n\nTITLE: {t}\n\nPOST: {post}\n\nTL;DR:"`, responses `" {text}"`;
//! - `llama-factory`: `{"conversations": [{"from", "value"}], "chosen": {..}, "rejected": {..}}`
//!   (ShareGPT style, optional `"system"`) or `{"instruction", "input", "chosen", "rejected"}`
//!   (Alpaca style).
//!
//! Sources are JSON Lines, JSON arrays or Parquet files, folders of shards, or Hub dataset ids
//! (see [`crate::data::source`]).

use crate::data::{read_each, Records};
use crate::tokenizer::{Message, Tokenizer};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Preference data layouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    #[default]
    Auto,
    Trl,
    Hh,
    Tldr,
    LlamaFactory,
}

impl Format {
    /// The name `data.format` takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Trl => "trl",
            Format::Hh => "hh",
            Format::Tldr => "tldr",
            Format::LlamaFactory => "llama-factory",
        }
    }
}

/// A prompt: plain text, or chat messages rendered with the model's template.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

/// One preference record before tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceText {
    pub prompt: Prompt,
    pub chosen: String,
    pub rejected: String,
}

/// One tokenised preference: the responses end with EOS (unless cut).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// The preference dimension the record names (`"dimension"`), for runs with several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimension: Option<String>,
}

/// How preference records are read and cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceOptions {
    pub format: Format,
    /// Longest prompt + response, in tokens.
    pub max_length: usize,
    /// Longest prompt; longer ones keep their end (TRL's `keep_end`).
    pub max_prompt_length: Option<usize>,
    /// Longest response; longer ones are cut at the end.
    pub max_completion_length: Option<usize>,
    /// Skip (and count) invalid records instead of failing on the first.
    pub skip_invalid: bool,
    /// The run's preference dimensions: when given, every record names one of them in
    /// `"dimension"`; when empty, a record must not name one. Set by the run, not by `[data]`.
    #[serde(skip)]
    pub dimensions: Vec<String>,
}

impl Default for PreferenceOptions {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            max_length: 1024,
            max_prompt_length: Some(512),
            max_completion_length: None,
            skip_invalid: false,
            dimensions: vec![],
        }
    }
}

/// What reading did besides returning pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreferenceStats {
    pub pairs: usize,
    /// Records skipped with `skip_invalid`, each with its location and reason.
    pub skipped: Vec<String>,
    pub prompts_cut: usize,
    pub responses_cut: usize,
}

fn detect(v: &Value) -> Format {
    let has = |k: &str| v.get(k).is_some();
    if has("conversations") || has("instruction") {
        Format::LlamaFactory
    } else if has("info") && has("summaries") {
        Format::Tldr
    } else if !has("prompt") && v.get("chosen").and_then(Value::as_str).is_some_and(|s| s.contains("\n\nHuman:")) {
        Format::Hh
    } else {
        Format::Trl
    }
}

fn string<'a>(v: &'a Value, k: &str) -> std::result::Result<&'a str, String> {
    match v.get(k) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field '{k}' must be a string")),
        None => Err(format!("missing field '{k}'")),
    }
}

fn messages(v: &Value, k: &str) -> std::result::Result<Vec<Message>, String> {
    let list = v.get(k).and_then(Value::as_array).ok_or_else(|| format!("field '{k}' must be a list of messages"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| match (m.get("role").and_then(Value::as_str), m.get("content").and_then(Value::as_str)) {
            (Some(r), Some(c)) => Ok(Message::new(r, c)),
            _ => Err(format!("{k}[{i}] needs string 'role' and 'content'")),
        })
        .collect()
}

/// The assistant text of a conversational response (one assistant message, as TRL writes them).
fn response_of(msgs: &[Message], k: &str) -> std::result::Result<String, String> {
    match msgs {
        [m] if m.role == "assistant" => Ok(m.content.clone()),
        _ => Err(format!("'{k}' must hold exactly one assistant message after the prompt")),
    }
}

fn parse_trl(v: &Value) -> std::result::Result<PreferenceText, String> {
    match v.get("chosen") {
        Some(Value::Array(_)) => {
            let (chosen, rejected) = (messages(v, "chosen")?, messages(v, "rejected")?);
            let (prompt, c, r) = if v.get("prompt").is_some() {
                (messages(v, "prompt")?, chosen, rejected)
            } else {
                // Implicit prompt: the shared leading messages.
                let k = chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count();
                (chosen[..k].to_vec(), chosen[k..].to_vec(), rejected[k..].to_vec())
            };
            if prompt.is_empty() {
                return Err("no prompt: 'prompt' is missing and 'chosen'/'rejected' share no messages".into());
            }
            Ok(PreferenceText {
                prompt: Prompt::Chat(prompt),
                chosen: response_of(&c, "chosen")?,
                rejected: response_of(&r, "rejected")?,
            })
        }
        _ => Ok(PreferenceText {
            prompt: Prompt::Text(string(v, "prompt")?.into()),
            chosen: string(v, "chosen")?.into(),
            rejected: string(v, "rejected")?.into(),
        }),
    }
}

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// An HH transcript (up to, not including, the final assistant reply) as chat messages.
fn hh_messages(prompt: &str) -> std::result::Result<Vec<Message>, String> {
    let mut out = Vec::new();
    let mut rest = prompt;
    while !rest.is_empty() {
        let (role, tag) = if rest.starts_with(HUMAN) {
            ("user", HUMAN)
        } else if rest.starts_with(ASSISTANT) {
            ("assistant", ASSISTANT)
        } else {
            return Err("transcript turns must start with \"\\n\\nHuman:\" or \"\\n\\nAssistant:\"".into());
        };
        rest = &rest[tag.len()..];
        let end = [rest.find(HUMAN), rest.find(ASSISTANT)].into_iter().flatten().min().unwrap_or(rest.len());
        out.push(Message::new(role, rest[..end].trim()));
        rest = &rest[end..];
    }
    match out.last() {
        Some(m) if m.role == "user" => Ok(out),
        _ => Err("the transcript does not end with a Human turn before the answer".into()),
    }
}

fn parse_hh(v: &Value) -> std::result::Result<PreferenceText, String> {
    let (chosen, rejected) = (string(v, "chosen")?, string(v, "rejected")?);
    let cut = chosen.rfind(ASSISTANT).ok_or("'chosen' has no \"\\n\\nAssistant:\" turn")? + ASSISTANT.len();
    let prompt = &chosen[..cut];
    let Some(r) = rejected.strip_prefix(prompt) else {
        return Err("'chosen' and 'rejected' do not share the transcript up to the last Assistant turn".into());
    };
    let dialogue = &prompt[..prompt.len() - ASSISTANT.len()];
    Ok(PreferenceText {
        prompt: Prompt::Chat(hh_messages(dialogue)?),
        chosen: chosen[cut..].trim().to_string(),
        rejected: r.trim().to_string(),
    })
}

fn parse_tldr(v: &Value) -> std::result::Result<PreferenceText, String> {
    let info = v.get("info").ok_or("missing field 'info'")?;
    let text = |k: &str| info.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    if info.get("post").and_then(Value::as_str).is_none() {
        return Err("field 'info.post' must be a string".into());
    }
    let summaries = v.get("summaries").and_then(Value::as_array).ok_or("field 'summaries' must be a list")?;
    if summaries.len() != 2 {
        return Err(format!("'summaries' must hold 2 summaries, has {}", summaries.len()));
    }
    let choice = v.get("choice").and_then(Value::as_u64).filter(|&c| c < 2).ok_or("field 'choice' must be 0 or 1")?;
    let summary = |i: usize| {
        summaries[i]
            .get("text")
            .and_then(Value::as_str)
            .map(|s| format!(" {}", s.trim()))
            .ok_or_else(|| format!("summaries[{i}].text must be a string"))
    };
    Ok(PreferenceText {
        prompt: Prompt::Text(format!(
            "SUBREDDIT: r/{}\n\nTITLE: {}\n\nPOST: {}\n\nTL;DR:",
            text("subreddit"),
            text("title"),
            text("post")
        )),
        chosen: summary(choice as usize)?,
        rejected: summary(1 - choice as usize)?,
    })
}

fn parse_llama_factory(v: &Value) -> std::result::Result<PreferenceText, String> {
    let value = |x: &Value, k: &str| match x {
        Value::String(s) => Ok(s.clone()),
        Value::Object(_) => {
            x.get("value").and_then(Value::as_str).map(String::from).ok_or(format!("'{k}.value' must be a string"))
        }
        _ => Err(format!("field '{k}' must be a string or a {{\"from\", \"value\"}} message")),
    };
    let get = |k: &str| v.get(k).ok_or(format!("missing field '{k}'"));
    let mut prompt = Vec::new();
    if let Some(s) = v.get("system").and_then(Value::as_str).filter(|s| !s.is_empty()) {
        prompt.push(Message::new("system", s));
    }
    if let Some(conv) = v.get("conversations") {
        let conv = conv.as_array().ok_or("field 'conversations' must be a list")?;
        for (i, m) in conv.iter().enumerate() {
            let from =
                m.get("from").and_then(Value::as_str).ok_or(format!("conversations[{i}].from must be a string"))?;
            let role = match from {
                "human" | "user" => "user",
                "gpt" | "assistant" => "assistant",
                "system" => "system",
                other => return Err(format!("conversations[{i}]: role '{other}' is not supported")),
            };
            prompt.push(Message::new(role, &value(m, &format!("conversations[{i}]"))?));
        }
    } else {
        let mut text = string(v, "instruction")?.to_string();
        if let Some(input) = v.get("input").and_then(Value::as_str).filter(|s| !s.is_empty()) {
            text = format!("{text}\n{input}");
        }
        prompt.push(Message::new("user", &text));
    }
    if prompt.last().is_none_or(|m| m.role != "user") {
        return Err("the conversation must end with a human turn".into());
    }
    Ok(PreferenceText {
        prompt: Prompt::Chat(prompt),
        chosen: value(get("chosen")?, "chosen")?,
        rejected: value(get("rejected")?, "rejected")?,
    })
}

/// Parses one record of `format` and checks it is usable.
pub fn parse_record(v: &Value, format: Format) -> std::result::Result<PreferenceText, String> {
    let format = if format == Format::Auto { detect(v) } else { format };
    let p = match format {
        Format::Trl | Format::Auto => parse_trl(v),
        Format::Hh => parse_hh(v),
        Format::Tldr => parse_tldr(v),
        Format::LlamaFactory => parse_llama_factory(v),
    }?;
    if p.chosen.trim().is_empty() {
        return Err("the chosen response is empty".into());
    }
    if p.rejected.trim().is_empty() {
        return Err("the rejected response is empty".into());
    }
    if p.chosen == p.rejected {
        return Err("chosen and rejected responses are identical".into());
    }
    Ok(p)
}

/// The prompt's tokens and a function giving a response's tokens after it. Chat prompts go
/// through the model's template (the response is what the template adds for one assistant
/// turn); without a template they are laid out as HH transcripts.
type Responder<'a> = Box<dyn Fn(&str) -> Result<Vec<u32>> + 'a>;

fn render<'a>(p: &Prompt, tok: &'a Tokenizer) -> Result<(Vec<u32>, Responder<'a>)> {
    let eos = tok.eos_token.as_deref().and_then(|e| tok.token_id(e));
    let with_eos = move |mut ids: Vec<u32>| {
        match eos.and_then(|e| ids.iter().rposition(|&t| t == e)) {
            // The template closes the turn itself: stop at its end-of-turn token.
            Some(i) => ids.truncate(i + 1),
            None => ids.extend(eos),
        }
        ids
    };
    match p {
        Prompt::Text(s) => Ok((tok.encode(s, true)?, Box::new(move |r| Ok(with_eos(tok.encode(r, false)?))))),
        Prompt::Chat(msgs) if tok.chat_template.is_some() => {
            let head = tok.apply_chat_template(msgs, true)?;
            let msgs = msgs.clone();
            let ids = tok.encode(&head, false)?;
            Ok((
                ids,
                Box::new(move |r| {
                    let mut all = msgs.clone();
                    all.push(Message::new("assistant", r));
                    let full = tok.apply_chat_template(&all, false)?;
                    let tail = full.strip_prefix(&head).ok_or_else(|| {
                        Error::Tokenizer("the chat template does not extend the prompt with the answer".into())
                    })?;
                    Ok(with_eos(tok.encode(tail, false)?))
                }),
            ))
        }
        Prompt::Chat(msgs) => {
            let mut text = String::new();
            for m in msgs {
                let tag = match m.role.as_str() {
                    "assistant" => ASSISTANT,
                    "system" => "\n\nSystem:",
                    _ => HUMAN,
                };
                text.push_str(&format!("{tag} {}", m.content));
            }
            text.push_str(ASSISTANT);
            Ok((tok.encode(&text, true)?, Box::new(move |r| Ok(with_eos(tok.encode(&format!(" {r}"), false)?)))))
        }
    }
}

/// Prompt and response ids of a plain-text prompt and one response, tokenised as preference
/// records are (the response ends with EOS): what reward models score.
pub fn text_pair_ids(tok: &Tokenizer, prompt: &str, response: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let (p, resp) = render(&Prompt::Text(prompt.to_string()), tok)?;
    Ok((p, resp(response)?))
}

/// Tokenises a record and applies the truncation policy: responses capped at
/// `max_completion_length`, the prompt keeps its last `max_prompt_length` tokens, then the prompt
/// gives way (from its start) until prompt + longer response fit `max_length`, then the responses.
pub fn tokenize(
    p: &PreferenceText,
    tok: &Tokenizer,
    opts: &PreferenceOptions,
    stats: &mut PreferenceStats,
) -> Result<Pair> {
    let (mut prompt, response) = render(&p.prompt, tok)?;
    let (mut chosen, mut rejected) = (response(&p.chosen)?, response(&p.rejected)?);
    let mut response_cut = false;
    if let Some(m) = opts.max_completion_length {
        for r in [&mut chosen, &mut rejected] {
            if r.len() > m {
                r.truncate(m);
                response_cut = true;
            }
        }
    }
    let mut keep = opts.max_prompt_length.unwrap_or(usize::MAX).min(prompt.len());
    let longest = chosen.len().max(rejected.len());
    if keep + longest > opts.max_length {
        keep = opts.max_length.saturating_sub(longest).max(1).min(prompt.len());
    }
    if keep < prompt.len() {
        prompt.drain(..prompt.len() - keep);
        stats.prompts_cut += 1;
    }
    let room = opts.max_length.saturating_sub(prompt.len());
    if room == 0 {
        return Err(Error::Invalid(format!("max_length {} leaves no room for a response", opts.max_length)));
    }
    for r in [&mut chosen, &mut rejected] {
        if r.len() > room {
            r.truncate(room);
            response_cut = true;
        }
    }
    stats.responses_cut += response_cut as usize;
    Ok(Pair { prompt, chosen, rejected, dimension: None })
}

/// The record's `"dimension"`, checked against the run's dimensions (see
/// [`PreferenceOptions::dimensions`]).
fn record_dimension(v: &Value, dimensions: &[String]) -> std::result::Result<Option<String>, String> {
    match (v.get("dimension"), dimensions.is_empty()) {
        (None, true) => Ok(None),
        (None, false) => Err(format!("no 'dimension' (the run has several: {})", dimensions.join(", "))),
        (Some(Value::String(d)), false) if dimensions.contains(d) => Ok(Some(d.clone())),
        (Some(Value::String(d)), false) => {
            Err(format!("unknown dimension '{d}' (the run has: {})", dimensions.join(", ")))
        }
        (Some(Value::String(d)), true) => Err(format!(
            "the record names dimension '{d}', but the run has none: give model.dimensions, or drop the field"
        )),
        (Some(_), _) => Err("field 'dimension' must be a string".into()),
    }
}

/// Reads and tokenises a preference source (a file, a folder or an `hf:` id, see
/// [`crate::data::source`]). Invalid records fail with their location, or with `skip_invalid`
/// are skipped and listed in the stats.
pub fn read_preferences(
    path: &Path,
    tok: &Tokenizer,
    opts: &PreferenceOptions,
) -> Result<(Vec<Pair>, PreferenceStats)> {
    preferences_from_records(Records::open(path, "train")?, tok, opts)
}

/// [`read_preferences`] on a stream of records; the format is detected from the first.
pub fn preferences_from_records(
    mut records: Records,
    tok: &Tokenizer,
    opts: &PreferenceOptions,
) -> Result<(Vec<Pair>, PreferenceStats)> {
    let format = match (opts.format, records.first_value()?) {
        (Format::Auto, Some(v)) => detect(&v),
        (f, _) => f,
    };
    let source = records.source.clone();
    let stats = std::cell::RefCell::new(PreferenceStats::default());
    let suffix = format!(" (read as {} records; skip_invalid skips such records)", format.name());
    let (pairs, skipped) = read_each(
        records,
        opts.skip_invalid,
        "preference records",
        |v| {
            let dimension = record_dimension(v, &opts.dimensions)?;
            let p = parse_record(v, format)?;
            let mut pair = tokenize(&p, tok, opts, &mut stats.borrow_mut()).map_err(|e| e.to_string())?;
            pair.dimension = dimension;
            Ok(pair)
        },
        |skipped| {
            let s = stats.borrow();
            format!("{} skipped, {} prompts and {} responses cut", skipped.len(), s.prompts_cut, s.responses_cut)
        },
        &suffix,
    )?;
    let mut stats = stats.into_inner();
    stats.skipped = skipped;
    stats.pairs = pairs.len();
    if stats.prompts_cut + stats.responses_cut > 0 {
        let limit = |v: Option<usize>| v.map_or("none".to_string(), |n| n.to_string());
        tracing::warn!(
            "{}: {} prompts and {} response pairs cut to fit (max_length {}, max_prompt_length {}, max_completion_length {})",
            source.display(),
            stats.prompts_cut,
            stats.responses_cut,
            opts.max_length,
            limit(opts.max_prompt_length),
            limit(opts.max_completion_length)
        );
    }
    Ok((pairs, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_are_detected_and_read() {
        let trl = json!({"prompt": "Q", "chosen": " a", "rejected": " b"});
        assert_eq!(parse_record(&trl, Format::Auto).unwrap().prompt, Prompt::Text("Q".into()));
        let conv = json!({
            "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]
        });
        let p = parse_record(&conv, Format::Auto).unwrap();
        assert_eq!(p.prompt, Prompt::Chat(vec![Message::new("user", "hi")]));
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("hello", "go away"));
        let hh = json!({
            "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4?\n\nHuman: Sure?\n\nAssistant: Yes, 4.",
            "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4?\n\nHuman: Sure?\n\nAssistant: No idea."
        });
        let p = parse_record(&hh, Format::Auto).unwrap();
        assert_eq!(
            p.prompt,
            Prompt::Chat(vec![
                Message::new("user", "What is 2+2?"),
                Message::new("assistant", "4?"),
                Message::new("user", "Sure?")
            ])
        );
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("Yes, 4.", "No idea."));
        let tldr = json!({"info": {"post": "P", "title": "T", "subreddit": "s"},
                          "summaries": [{"text": "one "}, {"text": "two"}], "choice": 1});
        let p = parse_record(&tldr, Format::Auto).unwrap();
        assert_eq!(p.prompt, Prompt::Text("SUBREDDIT: r/s\n\nTITLE: T\n\nPOST: P\n\nTL;DR:".into()));
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), (" two", " one"));
        let lf = json!({"conversations": [{"from": "human", "value": "q"}],
                        "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}});
        let p = parse_record(&lf, Format::Auto).unwrap();
        assert_eq!(p.prompt, Prompt::Chat(vec![Message::new("user", "q")]));
        let alpaca = json!({"instruction": "do", "input": "this", "chosen": "ok", "rejected": "no"});
        assert_eq!(
            parse_record(&alpaca, Format::Auto).unwrap().prompt,
            Prompt::Chat(vec![Message::new("user", "do\nthis")])
        );
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let cases = [
            (json!({"prompt": "Q", "chosen": "a"}), "missing field 'rejected'"),
            (json!({"prompt": "Q", "chosen": " ", "rejected": "b"}), "chosen response is empty"),
            (json!({"prompt": "Q", "chosen": "a", "rejected": "a"}), "identical"),
            (json!({"prompt": 3, "chosen": "a", "rejected": "b"}), "'prompt' must be a string"),
            (
                json!({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: y"}),
                "do not share",
            ),
            (json!({"info": {"post": "p"}, "summaries": [{"text": "a"}], "choice": 0}), "2 summaries"),
        ];
        for (v, want) in cases {
            let e = parse_record(&v, Format::Auto).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
