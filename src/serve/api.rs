//! OpenAI's request and error shapes, as `meet serve` reads and checks them: what a request asks
//! for becomes [`Plan`]s (prompt ids under a control, sampling, choices) or an [`ApiError`] naming
//! the field.

use crate::controls::Controlled;
use crate::generate::SamplingParams;
use crate::tokenizer::Message;
use serde::Deserialize;
use serde_json::{json, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
    }

    pub fn with(mut self, status: u16, code: &'static str) -> Self {
        self.status = status;
        self.code = Some(code);
        self
    }

    /// A 500: the server failed, not the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: 500, message: message.into(), kind: "server_error", param: None, code: None }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// Parses a JSON body into the fields every endpoint reads and the endpoint's own `T`; a syntax
/// error, or a field missing or of the wrong type, is a 400 naming the field (`param`).
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(Common, T), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")).with(400, "invalid_json"))?;
    if !v.is_object() {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    }
    Ok((from_value(&v)?, from_value(&v)?))
}

fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // A missing field is reported at its parent; name the field itself.
        let missing = msg.strip_prefix("missing field `").and_then(|m| m.split('`').next()).map(|f| {
            if path == "." {
                f.to_string()
            } else {
                format!("{path}.{f}")
            }
        });
        let param = missing.unwrap_or(path);
        ApiError::invalid(Some(&param), format!("'{param}': {msg}"))
    })
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or a list of parts of which only text parts are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// `meet`'s extra field: the preference control (`good`, `sentiment=positive,length=concise`).
    #[serde(default)]
    pub control: Option<String>,
    // Accepted only at values that change nothing: refused otherwise, never silently ignored.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub user: Option<String>,
    /// vLLM's extension: never stop at EOS (generate exactly the budget).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub response_format: Option<Value>,
}

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(default)]
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<u64>,
}

/// What the server allows.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The served model's name (`model`, or `NAME:CONTROL`).
    pub name: String,
    /// Most new tokens a request may ask for.
    pub max_tokens: usize,
    /// Most choices a request may ask for (`n`): the batch's rows.
    pub max_n: usize,
}

/// A checked request: one entry per prompt, each decoded `n` times.
#[derive(Debug)]
pub struct Plan {
    pub prompts: Vec<Vec<u32>>,
    pub control: Option<String>,
    pub params: SamplingParams,
    pub n: usize,
    pub top_logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

/// The control a request names (body field or model-name suffix), checked against the model.
fn control_of(common: &Common, model: &Controlled, limits: &Limits) -> Result<Option<String>, ApiError> {
    let suffix = if common.model == limits.name {
        None
    } else {
        match common.model.strip_prefix(&limits.name).and_then(|r| r.strip_prefix(':')) {
            Some(c) if !c.is_empty() => Some(c.to_string()),
            _ => {
                return Err(ApiError::invalid(
                    Some("model"),
                    format!(
                        "The model '{}' does not exist: this server serves '{}' (and '{}:CONTROL' per control; see /v1/models)",
                        common.model, limits.name, limits.name
                    ),
                )
                .with(404, "model_not_found"))
            }
        }
    };
    let control = match (&common.control, suffix) {
        (Some(a), Some(b)) if *a != b => {
            return Err(ApiError::invalid(
                Some("control"),
                format!("'control' is '{a}' but the model name asks for '{b}': give one"),
            ))
        }
        (Some(a), _) => Some(a.clone()),
        (None, b) => b,
    };
    if let Some(c) = &control {
        let known = || model.spec.as_ref().map(|s| s.names.join(", ")).unwrap_or_default();
        match &model.spec {
            None => {
                return Err(ApiError::invalid(
                    Some("control"),
                    format!("unknown control '{c}': this model has no controls (serve a meet train output folder)"),
                )
                .with(400, "unknown_control"))
            }
            Some(spec) => {
                if let Err(e) = spec.select(c) {
                    return Err(ApiError::invalid(
                        Some("control"),
                        format!("unknown control '{c}' ({e}); this model's controls: {}", known()),
                    )
                    .with(400, "unknown_control"));
                }
            }
        }
    }
    Ok(control)
}

/// Sampling as asked: OpenAI's defaults (temperature 1, top_p 1), a random seed when none.
fn sampling(common: &Common) -> Result<SamplingParams, ApiError> {
    if common.frequency_penalty.is_some_and(|v| v != 0.0) {
        return Err(ApiError::invalid(Some("frequency_penalty"), "frequency_penalty is not supported (only 0)"));
    }
    if common.presence_penalty.is_some_and(|v| v != 0.0) {
        return Err(ApiError::invalid(Some("presence_penalty"), "presence_penalty is not supported (only 0)"));
    }
    if common.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::invalid(Some("logit_bias"), "logit_bias is not supported"));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), format!("top_p must be in (0, 1], got {top_p}")));
    }
    let stop_strings = match &common.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop_strings.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(Some("stop"), "stop strings must not be empty"));
    }
    Ok(SamplingParams {
        temperature,
        top_p: (top_p < 1.0).then_some(top_p),
        seed: common.seed.map(|s| s as u64).unwrap_or_else(rand::random),
        stop_strings,
        ..Default::default()
    })
}

/// The budget of new tokens, checked against the cap and the context (`input`: the field holding
/// the prompt, `messages` or `prompt`).
fn budget(
    input: &str,
    asked: Option<u64>,
    param: &str,
    default: Option<usize>,
    longest: usize,
    model: &Controlled,
    limits: &Limits,
) -> Result<usize, ApiError> {
    let ctx = model.policy.pretrained.model.max_positions();
    if longest >= ctx {
        return Err(ApiError::invalid(
            Some(input),
            format!("This model's maximum context length is {ctx} tokens; the prompt has {longest}"),
        )
        .with(400, "context_length_exceeded"));
    }
    let n = match asked {
        Some(0) => return Err(ApiError::invalid(Some(param), format!("{param} must be at least 1"))),
        Some(n) if n as usize > limits.max_tokens => {
            return Err(ApiError::invalid(
                Some(param),
                format!("{param} = {n} is more than this server allows ({}; see --max-tokens)", limits.max_tokens),
            ))
        }
        Some(n) => n as usize,
        None => default.unwrap_or(limits.max_tokens).min(limits.max_tokens).min(ctx - longest),
    };
    if longest + n > ctx {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({longest} in the prompt, {n} in the completion). Please reduce the prompt or {param}.",
                longest + n
            ),
        )
        .with(400, "context_length_exceeded"));
    }
    Ok(n)
}

fn choices(common: &Common, limits: &Limits) -> Result<usize, ApiError> {
    match common.n.unwrap_or(1) {
        0 => Err(ApiError::invalid(Some("n"), "n must be at least 1")),
        n if n as usize > limits.max_n => Err(ApiError::invalid(
            Some("n"),
            format!("n = {n} is more than this server decodes at once ({}; see --max-batch)", limits.max_n),
        )),
        n => Ok(n as usize),
    }
}

/// The tokens a control adds in front (soft prompts take context too).
fn prefix_len(model: &Controlled, control: Option<&str>, ids: &[u32]) -> Result<(usize, usize), ApiError> {
    let p = model.prepare(&[ids.to_vec()], control).map_err(|e| ApiError::invalid(Some("control"), e.to_string()))?;
    let prefix = p.prefix.as_ref().and_then(|t| t.dims2().ok()).map_or(0, |d| d.0);
    Ok((p.ids[0].len(), prefix))
}

/// Checks a chat request and renders its messages with the chat template.
pub fn chat_plan(c: &Common, r: &ChatRequest, model: &Controlled, limits: &Limits) -> Result<Plan, ApiError> {
    if r.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid(Some("tools"), "tools are not supported"));
    }
    if let Some(f) = &r.response_format {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid(
                Some("response_format"),
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    if r.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages must not be empty"));
    }
    let mut msgs = vec![];
    for (i, m) in r.messages.iter().enumerate() {
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                Some(&format!("messages[{i}].content[{j}]")),
                                format!("only text parts are supported, got type '{}'", p.kind),
                            ))
                        }
                    }
                }
                s
            }
        };
        msgs.push(Message::new(&m.role, &text));
    }
    let tok = model.tokenizer();
    let rendered =
        tok.apply_chat_template(&msgs, true).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let ids = tok.encode(&rendered, false).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let control = control_of(c, model, limits)?;
    let mut params = sampling(c)?;
    let (len, prefix) = prefix_len(model, control.as_deref(), &ids)?;
    let (asked, param) = match (r.max_completion_tokens, c.max_tokens) {
        (Some(a), _) => (Some(a), "max_completion_tokens"),
        (None, b) => (b, "max_tokens"),
    };
    params.max_new_tokens = budget("messages", asked, param, None, len + prefix, model, limits)?;
    if c.ignore_eos == Some(true) {
        params.min_new_tokens = params.max_new_tokens;
    }
    let top_logprobs = match (r.logprobs.unwrap_or(false), r.top_logprobs) {
        (false, Some(_)) => return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs: true")),
        (true, Some(k)) if k > 20 => return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs must be 0..20")),
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    Ok(Plan {
        prompts: vec![ids],
        control,
        params,
        n: choices(c, limits)?,
        top_logprobs,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
    })
}

/// Checks a text-completion request and encodes its prompts (with the tokenizer's special tokens,
/// as `meet generate` without `--chat`).
pub fn completion_plan(
    c: &Common,
    r: &CompletionRequest,
    model: &Controlled,
    limits: &Limits,
) -> Result<Plan, ApiError> {
    if r.echo == Some(true) {
        return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
    }
    if r.best_of.is_some_and(|b| b as usize > choices(c, limits).unwrap_or(1)) {
        return Err(ApiError::invalid(Some("best_of"), "best_of is not supported"));
    }
    let tok = model.tokenizer();
    let encode = |t: &str| tok.encode(t, true).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()));
    let prompts: Vec<Vec<u32>> = match &r.prompt {
        PromptInput::Text(t) => vec![encode(t)?],
        PromptInput::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        PromptInput::Ids(ids) => vec![ids.clone()],
        PromptInput::IdLists(l) => l.clone(),
    };
    let vocab = model.policy.pretrained.model.vocab_size() as u32;
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(ApiError::invalid(Some("prompt"), "the prompt must not be empty"));
    }
    if let Some(&bad) = prompts.iter().flatten().find(|&&t| t >= vocab) {
        return Err(ApiError::invalid(Some("prompt"), format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let control = control_of(c, model, limits)?;
    let mut params = sampling(c)?;
    let mut longest = 0;
    for p in &prompts {
        let (len, prefix) = prefix_len(model, control.as_deref(), p)?;
        longest = longest.max(len + prefix);
    }
    // OpenAI's default for text completions is 16 new tokens.
    params.max_new_tokens = budget("prompt", c.max_tokens, "max_tokens", Some(16), longest, model, limits)?;
    if c.ignore_eos == Some(true) {
        params.min_new_tokens = params.max_new_tokens;
    }
    let top_logprobs = match r.logprobs {
        Some(k) if k > 20 => return Err(ApiError::invalid(Some("logprobs"), "logprobs must be 0..20")),
        k => k.map(|k| k as usize),
    };
    let n = choices(c, limits)?;
    if n * prompts.len() > limits.max_n {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!("{} prompts × n = {n} is more than this server decodes at once ({})", prompts.len(), limits.max_n),
        ));
    }
    Ok(Plan {
        prompts,
        control,
        params,
        n,
        top_logprobs,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse::<ChatRequest>(b"{\"model\": \"m\"").unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
        let e = parse::<ChatRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{e:?}");
        let e = parse::<ChatRequest>(br#"{"model": "m", "messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = parse::<ChatRequest>(br#"{"model": "m", "messages": [{"content": "x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"), "{e:?}");
    }
}
