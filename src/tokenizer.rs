//! Tokenizer and chat template: HF `tokenizer.json` + `tokenizer_config.json`, or the
//! `tokenizer.ggml.*` metadata of a GGUF file rebuilt into the same `tokenizers::Tokenizer`.

use crate::io::gguf::{meta_str, meta_u};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// One chat message (`{"role": "user", "content": "..."}`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// The rest of `tokenizer_config.json`, written back unchanged on save.
    pub extra_config: serde_json::Map<String, serde_json::Value>,
}

fn token_str(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

// GPT-2-style splitting patterns of the GGUF pre-tokenizer names (llama.cpp `llama-vocab.cpp`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer of a GGUF `tokenizer.ggml.pre` name, as the model family's own
/// `tokenizer.json` has it (checked split for split against the Python `tokenizers` library:
/// `tests/fixtures/pretokenizers.json`).
pub fn gguf_pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let split = |pattern: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let s = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| format!("pre-tokenizer regex: {e}"))?;
        Ok(s.into())
    };
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => ByteLevel::new(false, true, true).into(),
        // SmolLM/StarCoder: every numeric character is its own pre-token.
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
        }
        "llama-bpe" | "llama3" => {
            Sequence::new(vec![split(LLAMA3_PATTERN)?, ByteLevel::new(false, true, false).into()]).into()
        }
        "qwen2" => Sequence::new(vec![split(QWEN2_PATTERN)?, ByteLevel::new(false, true, false).into()]).into(),
        other => {
            return Err(format!("GGUF pre-tokenizer '{other}' is not supported (smollm, gpt-2, llama-bpe, qwen2)"))
        }
    })
}

/// GPT-2's special token, its BOS/EOS/unknown token by default.
const GPT2_SPECIAL: &str = "<|endoftext|>";

/// A GPT-2 style byte-level BPE tokenizer from `vocab.json` + `merges.txt`, as transformers'
/// `GPT2TokenizerFast` builds it: byte-level pre-tokenizer without a prefix space, byte-level
/// decoder and post-processor, no BOS added.
fn byte_level_bpe(vocab: &Path, merges: &Path) -> Result<tokenizers::Tokenizer> {
    let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
    let bpe =
        BPE::from_file(&v, &m).build().map_err(|e| Error::parse(merges, format!("vocab.json + merges.txt: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    inner.with_post_processor(Some(ByteLevel::new(true, false, true)));
    Ok(inner)
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and `chat_template.jinja`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let from_bpe_files = !tj.is_file() && vocab.is_file() && merges.is_file();
        let mut inner = if tj.is_file() {
            tokenizers::Tokenizer::from_file(&tj).map_err(|e| Error::parse(&tj, e.to_string()))?
        } else if from_bpe_files {
            byte_level_bpe(&vocab, &merges)?
        } else {
            return Err(Error::format(dir, "no tokenizer.json (nor vocab.json + merges.txt) in this folder"));
        };
        let tc = dir.join("tokenizer_config.json");
        let mut cfg = serde_json::Map::new();
        if tc.is_file() {
            let text = std::fs::read_to_string(&tc).map_err(|e| Error::io(&tc, e))?;
            cfg = match serde_json::from_str(&text) {
                Ok(serde_json::Value::Object(m)) => m,
                Ok(_) => return Err(Error::parse(&tc, "expected a JSON object")),
                Err(e) => return Err(Error::parse(&tc, e.to_string())),
            };
        }
        let mut chat_template = match cfg.remove("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s),
            // A list of named templates: the "default" one.
            Some(serde_json::Value::Array(list)) => list.iter().find_map(|t| {
                (t.get("name")?.as_str()? == "default").then(|| t.get("template")?.as_str().map(String::from))?
            }),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.is_file() {
            chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        let special = |key: &str| token_str(cfg.get(key));
        let (mut bos, mut eos, pad, mut unk) =
            (special("bos_token"), special("eos_token"), special("pad_token"), special("unk_token"));
        if from_bpe_files {
            // GPT-2's tokenizer: `<|endoftext|>` is its BOS, EOS and unknown token unless the
            // folder's config says otherwise (special_tokens_map.json of older checkpoints).
            let map_path = dir.join("special_tokens_map.json");
            let map = if map_path.is_file() { Some(crate::files::read_json(&map_path)?) } else { None };
            let from_map = |key: &str| map.as_ref().and_then(|m| token_str(m.get(key)));
            let default = (inner.token_to_id(GPT2_SPECIAL).is_some()).then(|| GPT2_SPECIAL.to_string());
            bos = bos.or_else(|| from_map("bos_token")).or(default.clone());
            eos = eos.or_else(|| from_map("eos_token")).or(default.clone());
            unk = unk.or_else(|| from_map("unk_token")).or(default);
            let specials: Vec<AddedToken> = [&bos, &eos, &unk]
                .into_iter()
                .flatten()
                .map(|t| AddedToken::from(t.clone(), true).normalized(false))
                .collect();
            inner.add_special_tokens(specials).map_err(|e| Error::format(dir, format!("special tokens: {e}")))?;
        }
        Ok(Self {
            inner,
            chat_template,
            bos_token: bos,
            eos_token: eos,
            pad_token: pad,
            unk_token: unk,
            extra_config: cfg,
        })
    }

    /// Rebuilds the HF tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`, byte-level BPE).
    pub fn from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let err = |m: String| Error::format(path, m);
        let model = meta_str(md, "tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2'); use an HF folder with tokenizer.json"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match md.get(key) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        _ => Err(err(format!("'{key}' holds a non-string"))),
                    })
                    .collect(),
                _ => Err(err(format!("missing metadata '{key}'"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => *x as i64,
                    Value::U32(x) => *x as i64,
                    _ => 1,
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("malformed merge '{m}'")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe =
            BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| err(format!("building BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = meta_str(md, "tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer = gguf_pre_tokenizer(pre).map_err(err)?;
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched before BPE, as llama.cpp does.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == 3).normalized(false))
            .collect();
        let (specials, plain): (Vec<AddedToken>, Vec<AddedToken>) = added.into_iter().partition(|t| t.special);
        inner.add_special_tokens(specials).map_err(|e| err(format!("special tokens: {e}")))?;
        inner.add_tokens(plain).map_err(|e| err(format!("added tokens: {e}")))?;
        let tok_at = |key: &str| meta_u(md, key).and_then(|id| tokens.get(id as usize).cloned());
        let bos = tok_at("tokenizer.ggml.bos_token_id");
        let add_bos = matches!(md.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
        if add_bos {
            let b = bos.clone().ok_or_else(|| err("add_bos_token is set but there is no bos_token_id".into()))?;
            let id = inner.token_to_id(&b).unwrap_or(0);
            let tp = TemplateProcessing::builder()
                .try_single(format!("{b} $A"))
                .and_then(|t| t.try_pair(format!("{b} $A {b} $B")))
                .map_err(|e| err(format!("post-processor: {e}")))?
                .special_tokens(vec![(b.clone(), id)])
                .build()
                .map_err(|e| err(format!("post-processor: {e}")))?;
            inner.with_post_processor(Some(tp));
        } else {
            inner.with_post_processor(Some(ByteLevel::new(true, false, true)));
        }
        let mut extra = serde_json::Map::new();
        extra.insert("add_bos_token".into(), json!(add_bos));
        extra.insert("clean_up_tokenization_spaces".into(), json!(false));
        let arch = meta_str(md, "general.architecture").unwrap_or("llama");
        extra.insert("model_max_length".into(), json!(meta_u(md, &format!("{arch}.context_length")).unwrap_or(2048)));
        Ok(Self {
            inner,
            chat_template: meta_str(md, "tokenizer.chat_template").map(String::from),
            bos_token: bos,
            eos_token: tok_at("tokenizer.ggml.eos_token_id"),
            pad_token: tok_at("tokenizer.ggml.padding_token_id"),
            unk_token: tok_at("tokenizer.ggml.unknown_token_id"),
            extra_config: extra,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. BOS) as HF does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.inner.encode_fast(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        Ok(self.inner.decode(ids, skip_special_tokens)?)
    }

    /// Id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Id of the EOS token, if the tokenizer names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` with the chat template, like transformers' `apply_chat_template(...,
    /// tokenize=False)`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template =
            self.chat_template.as_deref().ok_or_else(|| Error::Tokenizer("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        // transformers renders with jinja2 trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let tmpl = env.get_template("chat").map_err(|e| Error::Tokenizer(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = self.inner.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        crate::files::atomic_write(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut cfg = self.extra_config.clone();
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            cfg.insert(k.into(), v.clone().map_or(serde_json::Value::Null, serde_json::Value::String));
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        cfg.entry("tokenizer_class").or_insert(json!("PreTrainedTokenizerFast"));
        let text =
            serde_json::to_string_pretty(&serde_json::Value::Object(cfg)).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::files::atomic_write(&dir.join("tokenizer_config.json"), text.as_bytes())
    }
}
