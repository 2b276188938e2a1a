//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` with PEFT's exact
//! keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `prompt_embeddings`).
//! As PEFT's `save_pretrained`, an adapter named `default` sits at the folder's root and every
//! other adapter in a subfolder of its name, so `PeftModel.from_pretrained(model, dir/name)` loads
//! it.

use crate::files::{atomic_write, read_json};
use crate::io::safetensors;
use crate::peft::lora::{Adapters, LoraConfig};
use crate::peft::prompt::{PromptConfig, PromptInit, SoftPrompts};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const PREFIX: &str = "base_model.model.";
const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";

/// Where adapter `name` lives inside `dir`.
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == "default" {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The adapters saved in `dir`: `default` when the root holds one, then every subfolder that does.
pub fn adapter_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if dir.join(CONFIG).is_file() {
        names.push("default".to_string());
    }
    let mut subs: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(CONFIG).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    subs.sort();
    names.extend(subs);
    if names.is_empty() {
        return Err(Error::format(dir, format!("no {CONFIG} in this folder or its subfolders")));
    }
    Ok(names)
}

fn write_config(dir: &Path, config: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(e.to_string()))?;
    atomic_write(&dir.join(CONFIG), text.as_bytes())
}

/// PEFT's `LoraConfig` as `save_pretrained` writes it (every field, defaults where `meet` has none).
fn lora_config_json(c: &LoraConfig, base_model: &str) -> Value {
    json!({
        "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
        "base_model_name_or_path": base_model, "bias": "none", "corda_config": null,
        "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null, "fan_in_fan_out": c.fan_in_fan_out,
        "inference_mode": true, "init_lora_weights": true, "kasa_config": null, "layer_replication": null,
        "layers_pattern": null, "layers_to_transform": null, "loftq_config": {}, "lora_alpha": c.alpha,
        "lora_bias": false, "lora_dropout": c.dropout, "lora_ga_config": null, "megatron_config": null,
        "megatron_core": "megatron.core", "modules_to_save": null, "monteclora_config": null, "peft_type": "LORA",
        "peft_version": "0.21.2", "qalora_group_size": 16, "r": c.r, "rank_pattern": {}, "revision": null,
        "target_modules": c.target_modules, "target_parameters": null, "task_type": "CAUSAL_LM",
        "trainable_token_indices": null, "use_bdlora": null, "use_dora": false, "use_qalora": false,
        "use_rslora": c.use_rslora, "velora_config": null
    })
}

/// Saves every adapter of `adapters` under `dir` (PEFT layout), `base_model` recorded as
/// `base_model_name_or_path`.
pub fn save_lora(adapters: &Adapters, dir: &Path, base_model: &str) -> Result<()> {
    for (i, name) in adapters.names.iter().enumerate() {
        let d = adapter_dir(dir, name);
        let tensors: BTreeMap<String, Tensor> =
            adapters.tensors(i)?.into_iter().map(|(k, t)| (format!("{PREFIX}{k}"), t)).collect();
        safetensors::save(&tensors, &d.join(WEIGHTS))?;
        write_config(&d, &lora_config_json(&adapters.configs[i], base_model))?;
    }
    Ok(())
}

/// Folders under `dir` (two levels down) that hold an adapter, for "did you mean" hints.
fn adapters_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut walk = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = walk.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()) {
            if e.path().join(CONFIG).is_file() {
                out.push(e.path());
            }
            if depth < 1 {
                walk.push((e.path(), depth + 1));
            }
        }
    }
    out.sort();
    out
}

fn config_of(dir: &Path, want: &str) -> Result<(PathBuf, Value)> {
    let path = dir.join(CONFIG);
    if !dir.is_dir() {
        return Err(Error::format(dir, "no such folder (expected a PEFT adapter folder with adapter_config.json)"));
    }
    if !path.is_file() {
        let found = adapters_below(dir);
        let hint = if found.is_empty() {
            "no PEFT adapter here or in its subfolders".to_string()
        } else {
            let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
            format!("the adapters below it are: {} — pass one of those", list.join(", "))
        };
        return Err(Error::format(dir, format!("no {CONFIG} in this folder; {hint}")));
    }
    let cfg = read_json(&path)?;
    let peft_type = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != want {
        return Err(Error::format(&path, format!("peft_type is '{peft_type}', expected '{want}'")));
    }
    if let Some(t) = cfg.get("task_type").and_then(Value::as_str) {
        if t != "CAUSAL_LM" {
            return Err(Error::format(&path, format!("task_type is '{t}'; meet loads CAUSAL_LM adapters")));
        }
    }
    Ok((path, cfg))
}

fn weights_of(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let file = dir.join(WEIGHTS);
    if !file.is_file() {
        return Err(Error::format(dir, format!("missing {WEIGHTS} (adapter_model.bin is not read)")));
    }
    safetensors::load(&[file], &Device::Cpu)
}

/// Reads a LoRA adapter folder written by PEFT or `meet`: its config and its tensors under
/// model-relative names (`model.layers.0.self_attn.q_proj.lora_A.weight`). PEFT features `meet`
/// does not implement (DoRA, bias training, per-layer ranks) are refused.
pub fn read_lora(dir: &Path) -> Result<(LoraConfig, HashMap<String, Tensor>)> {
    let (path, cfg) = config_of(dir, "LORA")?;
    let field = |k: &str| cfg.get(k).filter(|v| !v.is_null());
    let num = |k: &str| -> Result<f64> {
        field(k).and_then(Value::as_f64).ok_or_else(|| Error::format(&path, format!("missing or non-numeric '{k}'")))
    };
    for (k, ok) in [
        ("use_dora", field("use_dora").is_none_or(|v| v == &json!(false))),
        ("bias", field("bias").is_none_or(|v| v == "none")),
        ("rank_pattern", field("rank_pattern").is_none_or(|v| v.as_object().is_some_and(|o| o.is_empty()))),
        ("alpha_pattern", field("alpha_pattern").is_none_or(|v| v.as_object().is_some_and(|o| o.is_empty()))),
        ("layers_to_transform", field("layers_to_transform").is_none()),
        ("modules_to_save", field("modules_to_save").is_none()),
    ] {
        if !ok {
            return Err(Error::format(&path, format!("'{k}' = {} is not supported by meet", cfg[k])));
        }
    }
    let target_modules = match field("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
        Some(Value::String(s)) => {
            return Err(Error::format(&path, format!("target_modules as a regex ('{s}') is not supported; list names")))
        }
        _ => return Err(Error::format(&path, "missing 'target_modules'")),
    };
    let config = LoraConfig {
        r: num("r")? as usize,
        alpha: num("lora_alpha")?,
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        use_rslora: field("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        fan_in_fan_out: field("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false),
    };
    config.validate().map_err(|e| Error::format(&path, e.to_string()))?;
    let mut tensors = HashMap::new();
    for (k, t) in weights_of(dir)? {
        let Some(rel) = k.strip_prefix(PREFIX) else {
            return Err(Error::format(dir.join(WEIGHTS), format!("tensor '{k}' does not start with '{PREFIX}'")));
        };
        tensors.insert(rel.to_string(), t);
    }
    Ok((config, tensors))
}

/// Loads the LoRA adapters of `dir` (all of them, by name) into `adapters`, which must have been
/// built with the same names and configs (see [`read_lora`]).
pub fn load_lora(adapters: &Adapters, dir: &Path) -> Result<()> {
    for (i, name) in adapters.names.iter().enumerate() {
        let d = adapter_dir(dir, name);
        let (cfg, tensors) = read_lora(&d)?;
        let diff = cfg.differences(&adapters.configs[i]);
        if !diff.is_empty() {
            return Err(Error::format(
                d.join(CONFIG),
                format!("adapter '{name}' differs from the run's [lora] settings (saved vs run): {}", diff.join("; ")),
            ));
        }
        adapters.load_weights(i, &tensors).map_err(|e| Error::format(d.join(WEIGHTS), e.to_string()))?;
    }
    Ok(())
}

/// Saves every prompt of `prompts` under `dir` (PEFT layout) for a model of `layers` layers and
/// `heads` attention heads (PEFT records both).
pub fn save_prompts(prompts: &SoftPrompts, dir: &Path, base_model: &str, layers: usize, heads: usize) -> Result<()> {
    let c = &prompts.config;
    for (name, var) in prompts.names.iter().zip(&prompts.vars) {
        let d = adapter_dir(dir, name);
        let tensors = BTreeMap::from([("prompt_embeddings".to_string(), var.as_tensor().clone())]);
        safetensors::save(&tensors, &d.join(WEIGHTS))?;
        let init = match c.init {
            PromptInit::Random => "RANDOM",
            PromptInit::Text => "TEXT",
            PromptInit::SampleVocab => "SAMPLE_VOCAB",
        };
        write_config(
            &d,
            &json!({
                "auto_mapping": null, "base_model_name_or_path": base_model, "inference_mode": true,
                "modules_to_save": null, "num_attention_heads": heads, "num_layers": layers,
                "num_transformer_submodules": 1, "num_virtual_tokens": c.n, "peft_type": "PROMPT_TUNING",
                "peft_version": "0.21.2", "prompt_tuning_init": init, "prompt_tuning_init_text": c.init_text,
                "revision": null, "task_type": "CAUSAL_LM", "token_dim": var.dims()[1], "tokenizer_kwargs": null,
                "tokenizer_name_or_path": if c.init == PromptInit::Text { json!(base_model) } else { Value::Null }
            }),
        )?;
    }
    Ok(())
}

/// Reads a prompt-tuning folder: its config and `prompt_embeddings: [n, hidden]`.
pub fn read_prompt(dir: &Path) -> Result<(PromptConfig, Tensor)> {
    let (path, cfg) = config_of(dir, "PROMPT_TUNING")?;
    let n = cfg
        .get("num_virtual_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::format(&path, "missing 'num_virtual_tokens'"))?;
    if cfg.get("num_transformer_submodules").and_then(Value::as_u64).unwrap_or(1) != 1 {
        return Err(Error::format(&path, "num_transformer_submodules != 1 (encoder-decoder prompts) is not supported"));
    }
    let init = match cfg.get("prompt_tuning_init").and_then(Value::as_str).unwrap_or("RANDOM") {
        "TEXT" => PromptInit::Text,
        "SAMPLE_VOCAB" => PromptInit::SampleVocab,
        _ => PromptInit::Random,
    };
    let init_text = cfg.get("prompt_tuning_init_text").and_then(Value::as_str).map(String::from);
    let mut w = weights_of(dir)?;
    let t = w
        .remove("prompt_embeddings")
        .ok_or_else(|| Error::format(dir.join(WEIGHTS), "missing tensor 'prompt_embeddings'"))?;
    if t.dims().first() != Some(&(n as usize)) {
        return Err(Error::format(
            dir.join(WEIGHTS),
            format!("prompt_embeddings has shape {:?}, config says {n} tokens", t.dims()),
        ));
    }
    Ok((PromptConfig { n: n as usize, init, init_text }, t))
}

/// Loads every prompt of `prompts` from `dir`.
pub fn load_prompts(prompts: &SoftPrompts, dir: &Path) -> Result<()> {
    for (i, name) in prompts.names.iter().enumerate() {
        let d = adapter_dir(dir, name);
        let (cfg, t) = read_prompt(&d)?;
        if cfg.n != prompts.n() {
            return Err(Error::format(
                d.join(CONFIG),
                format!("{} virtual tokens, the run uses {}", cfg.n, prompts.n()),
            ));
        }
        prompts.load(i, &t).map_err(|e| Error::format(d.join(WEIGHTS), e.to_string()))?;
    }
    Ok(())
}
