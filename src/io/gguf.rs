//! GGUF model files (llama.cpp): metadata to an HF `config.json`, tensors to HF names, and the
//! tokenizer from `tokenizer.ggml.*`.
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of the
//! Llama q/k projections so that rotary pairs are adjacent (GPT-J layout). We undo that on the raw
//! rows, before any dequantization, so a single model implementation with HF's "rotate_half"
//! layout serves GGUF and safetensors alike.

use crate::nn::packed::{PackedFormat, PackedWeight};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// What a GGUF file holds, in HF terms.
pub struct GgufModel {
    /// An HF-style `config.json`.
    pub config: serde_json::Value,
    /// Dense f32 tensors by HF name.
    pub tensors: HashMap<String, Tensor>,
    /// Packed matrices by HF name (only when asked to keep the file's compact formats).
    pub packed: HashMap<String, Arc<PackedWeight>>,
    /// Metadata, for the tokenizer.
    pub metadata: HashMap<String, Value>,
}

/// GGML type ids candle cannot read, for error messages.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        _ => "unknown",
    }
}

/// Reads the header of a GGUF file, with errors that name the file.
pub fn read_content(path: &Path) -> Result<(Content, std::fs::File)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut f).map_err(|e| {
        let msg = e.to_string();
        let id = msg.strip_prefix("unknown dtype for tensor ").map(|s| s.chars().take_while(char::is_ascii_digit).collect::<String>());
        match id.and_then(|s| s.parse::<u32>().ok()) {
            Some(id) => Error::format(
                path,
                format!(
                    "unsupported GGUF tensor type {id} ({}); meet reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K..Q8_K",
                    ggml_type_name(id)
                ),
            ),
            None => Error::format(path, format!("not a readable GGUF file: {}", msg.lines().next().unwrap_or(""))),
        }
    })?;
    Ok((content, f))
}

/// Unsigned integer metadata (any integer width).
pub fn meta_u(md: &HashMap<String, Value>, key: &str) -> Option<u64> {
    match md.get(key)? {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I32(v) if *v >= 0 => Some(*v as u64),
        Value::I64(v) if *v >= 0 => Some(*v as u64),
        _ => None,
    }
}

fn meta_f(md: &HashMap<String, Value>, key: &str) -> Option<f64> {
    match md.get(key)? {
        Value::F32(v) => Some(*v as f64),
        Value::F64(v) => Some(*v),
        _ => meta_u(md, key).map(|v| v as f64),
    }
}

/// String metadata.
pub fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    match md.get(key)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// HF name of a GGUF tensor name, or `None` for tensors the model does not use.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Reorders the rows of a llama.cpp-permuted q/k projection back to HF order. Rows stay whole,
/// so this works on quantized blocks as well. For `heads` heads of `d` rows, GGUF row
/// `h*d + 2i + p` holds HF row `h*d + p*d/2 + i`.
fn unpermute_rows(data: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = data.len() / rows;
    let d = rows / heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for p in 0..2 {
                let src = h * d + 2 * i + p;
                let dst = h * d + p * d / 2 + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Loads a GGUF model. With `pack`, matrices stored in a format that has a fused kernel stay in
/// that format (exact, and several times smaller than f32); everything else becomes f32.
pub fn read(path: &Path, pack: bool, device: &Device) -> Result<GgufModel> {
    let (content, mut file) = read_content(path)?;
    let md = &content.metadata;
    let arch = meta_str(md, "general.architecture")
        .ok_or_else(|| Error::format(path, "missing metadata 'general.architecture'"))?;
    let model_type = match arch {
        "llama" => "llama",
        "qwen2" => "qwen2",
        other => {
            return Err(Error::format(
                path,
                format!("unsupported GGUF architecture '{other}' (meet supports: llama, qwen2)"),
            ))
        }
    };
    let need = |k: &str| {
        meta_u(md, &format!("{arch}.{k}")).ok_or_else(|| Error::format(path, format!("missing metadata '{arch}.{k}'")))
    };
    let hidden = need("embedding_length")? as usize;
    let heads = need("attention.head_count")? as usize;
    let kv_heads = meta_u(md, &format!("{arch}.attention.head_count_kv")).unwrap_or(heads as u64) as usize;
    let vocab = match meta_u(md, &format!("{arch}.vocab_size")) {
        Some(v) => v as usize,
        None => match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => return Err(Error::format(path, format!("missing metadata '{arch}.vocab_size'"))),
        },
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::format(
            path,
            "per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) are not supported yet",
        ));
    }
    let head_dim = meta_u(md, &format!("{arch}.attention.key_length")).map(|v| v as usize).unwrap_or(hidden / heads);
    let tied = !content.tensor_infos.contains_key("output.weight");
    let theta = meta_f(md, &format!("{arch}.rope.freq_base")).unwrap_or(10000.0);
    let mut config = json!({
        "architectures": [if model_type == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": need("context_length")?,
        "rms_norm_eps": meta_f(md, &format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": theta,
        "rope_scaling": null,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        "mlp_bias": false,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "dtype": "float32",
    });
    if let Some(kind) = meta_str(md, &format!("{arch}.rope.scaling.type")) {
        if kind != "none" {
            // transformers 4 reads rope_scaling, transformers 5 rope_parameters.
            let rope = json!({
                "rope_type": kind,
                "rope_theta": theta,
                "factor": meta_f(md, &format!("{arch}.rope.scaling.factor")),
                "original_max_position_embeddings": meta_u(md, &format!("{arch}.rope.scaling.original_context_length")),
            });
            config["rope_scaling"] = rope.clone();
            config["rope_parameters"] = rope;
        }
    }
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = meta_u(md, key) {
            config[field] = json!(id);
        }
    }

    let mut tensors = HashMap::new();
    let mut packed = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gname in names {
        let Some(name) = hf_name(gname) else {
            tracing::warn!("{}: skipping GGUF tensor '{gname}', which meet does not use", path.display());
            continue;
        };
        let qt = content
            .tensor(&mut file, gname, &Device::Cpu)
            .map_err(|e| Error::format(path, format!("tensor '{gname}': {e}")))?;
        let dtype = qt.dtype();
        let dims = qt.shape().dims().to_vec();
        let mut raw = qt.data().map_err(|e| Error::format(path, format!("tensor '{gname}': {e}")))?.into_owned();
        let perm_heads = match (model_type, gname.rsplit('.').nth(1)) {
            ("llama", Some("attn_q")) => Some(heads),
            ("llama", Some("attn_k")) => Some(kv_heads),
            _ => None,
        };
        if let Some(h) = perm_heads {
            raw = unpermute_rows(&raw, dims[0], h);
        }
        let format = PackedFormat::from_ggml(dtype).filter(|_| pack && dims.len() == 2 && device.is_cpu());
        match format {
            Some(f) => {
                let p = PackedWeight::from_raw(f, dims[0], dims[1], raw)
                    .map_err(|e| Error::format(path, format!("tensor '{gname}': {e}")))?;
                packed.insert(name, Arc::new(p));
            }
            None => {
                let t = dequantize(dtype, &raw, &dims, device)
                    .map_err(|e| Error::format(path, format!("tensor '{gname}': {e}")))?;
                tensors.insert(name, t);
            }
        }
    }
    let metadata = content.metadata;
    Ok(GgufModel { config, tensors, packed, metadata })
}

fn dequantize(dtype: GgmlDType, raw: &[u8], dims: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    qtensor_from_ggml(dtype, raw, dims.to_vec(), &Device::Cpu)?.dequantize(&Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, ...).swapaxes(1, 2); HF row r of head h sits at
        // GGUF row h*d + 2*(r % (d/2)) + r / (d/2).
        let (heads, d) = (2, 8);
        let hf: Vec<u8> = (0..(heads * d) as u8).collect();
        let mut gguf = vec![0u8; hf.len()];
        for h in 0..heads {
            for r in 0..d {
                gguf[h * d + 2 * (r % (d / 2)) + r / (d / 2)] = hf[h * d + r];
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads * d, heads), hf);
    }

    #[test]
    fn tensor_names_map_to_hf() {
        assert_eq!(hf_name("blk.3.attn_q.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(hf_name("blk.0.attn_q.bias").as_deref(), Some("model.layers.0.self_attn.q_proj.bias"));
        assert_eq!(hf_name("blk.12.ffn_down.weight").as_deref(), Some("model.layers.12.mlp.down_proj.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
