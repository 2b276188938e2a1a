//! A model ready to run: reading a `--model` source into its parts ([`RawModel`]), building the
//! architecture from them ([`Pretrained`]), and writing HF folders back.

use crate::files::{atomic_write, read_json};
use crate::io::generation::GenerationDefaults;
use crate::io::{gguf, resolve, safetensors, Source};
use crate::models::{self, CausalLm};
use crate::nn::packed::{PackedFormat, PackedWeight};
use crate::nn::{AdapterSource, Builder};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where model weights are kept for the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Packing {
    /// Every weight dense f32 (required for training; exact).
    #[default]
    Dense,
    /// Keep a GGUF file's compact formats (exact values, several times less memory traffic);
    /// f32 sources stay f32.
    Source,
    /// Round the weight of every linear layer (projections, embeddings, LM head) to this format
    /// (lossy, for fast generation from f32 models).
    Quantize(PackedFormat),
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Make every dense weight a `Var` in a `VarMap` (for training).
    pub trainable: bool,
    pub packing: Packing,
    /// Adapters (LoRA) to wrap the layers they target with.
    pub adapters: Option<Arc<dyn AdapterSource>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, trainable: false, packing: Packing::Dense, adapters: None }
    }
}

/// Everything read from a model source, before the model is built.
#[derive(Clone)]
pub struct RawModel {
    /// The HF `config.json`.
    pub config: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
    pub packed: HashMap<String, Arc<PackedWeight>>,
    pub tokenizer: Tokenizer,
    pub generation: GenerationDefaults,
    /// The file or folder the weights came from (for error messages).
    pub origin: PathBuf,
}

/// Reads config, weights, tokenizer and generation defaults from `model`.
pub fn read(model: &str, opts: &LoadOptions) -> Result<RawModel> {
    let pack_source = opts.packing != Packing::Dense && opts.device.is_cpu();
    let raw = match resolve(model)? {
        Source::Folder(dir) => read_folder(&dir, &opts.device)?,
        Source::Gguf(path) => {
            let g = gguf::read(&path, pack_source, &opts.device)?;
            let tokenizer = Tokenizer::from_gguf(&g.metadata, &path)?;
            let generation = GenerationDefaults::from_config(&g.config, tokenizer.eos_id());
            RawModel { config: g.config, tensors: g.tensors, packed: g.packed, tokenizer, generation, origin: path }
        }
    };
    Ok(raw)
}

fn read_folder(dir: &Path, device: &Device) -> Result<RawModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        let has = |f: &str| dir.join(f).exists();
        let hint = if has("adapter_config.json") || has("lora") {
            " — it holds LoRA adapters, not a model: add one to its base model with `meet merge --model BASE \
             --adapter FOLDER --out OUT`, or generate with the run's output folder (`--model RUN/final --control NAME`)"
        } else if has("prompts") {
            " — it holds soft prompts, not a model: generate with the run's output folder (`--model RUN/final --control NAME`)"
        } else if has("final") {
            " — it looks like a run's folder: its outputs are in final/"
        } else {
            ""
        };
        return Err(Error::format(dir, format!("no config.json in this folder{hint}")));
    }
    let config = read_json(&cfg_path)?;
    if !config.is_object() {
        return Err(Error::parse(&cfg_path, "expected a JSON object"));
    }
    let files = safetensors::weight_files(dir)?;
    let tensors = safetensors::load(&files, device)?;
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        if let Some(map) = read_json(&index)?.get("weight_map").and_then(|m| m.as_object()) {
            if let Some(missing) = map.keys().find(|k| !tensors.contains_key(*k)) {
                return Err(Error::format(
                    &index,
                    format!("tensor '{missing}' is listed but not found in {}", map[missing]),
                ));
            }
        }
    }
    let tokenizer = Tokenizer::from_folder(dir)?;
    let gen_path = dir.join("generation_config.json");
    let gen_cfg = if gen_path.is_file() { Some(read_json(&gen_path)?) } else { None };
    let mut generation = GenerationDefaults::from_config(&config, tokenizer.eos_id());
    if let Some(g) = &gen_cfg {
        generation.update_from(g);
    }
    Ok(RawModel { config, tensors, packed: HashMap::new(), tokenizer, generation, origin: dir.to_path_buf() })
}

/// A model ready to run, with its tokenizer.
pub struct Pretrained {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    pub config: serde_json::Value,
    pub generation: GenerationDefaults,
    /// The trainable parameters (when loaded with `trainable`), by HF name.
    pub varmap: Option<VarMap>,
    pub device: Device,
}

impl Pretrained {
    /// Loads `model` (folder, GGUF file or Hub id).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        if opts.trainable && opts.packing != Packing::Dense {
            return Err(Error::Invalid(
                "trainable weights must be dense; do not combine training with packed weights".into(),
            ));
        }
        let raw = read(model, opts)?;
        Self::from_raw(raw, opts)
    }

    /// Builds the model from already-read parts.
    pub fn from_raw(raw: RawModel, opts: &LoadOptions) -> Result<Self> {
        let RawModel { config, tensors, packed, tokenizer, generation, origin } = raw;
        let cfg_path = if origin.is_dir() { origin.join("config.json") } else { origin.clone() };
        let mut names: Vec<String> = tensors.keys().chain(packed.keys()).cloned().collect();
        let (vb, varmap) = if opts.trainable {
            let varmap = VarMap::new();
            {
                let mut data = varmap.data().lock().map_err(|_| Error::Invalid("poisoned VarMap lock".into()))?;
                for (name, t) in tensors {
                    data.insert(name, Var::from_tensor(&t)?);
                }
            }
            (VarBuilder::from_varmap(&varmap, DType::F32, &opts.device), Some(varmap))
        } else {
            (VarBuilder::from_tensors(tensors, DType::F32, &opts.device), None)
        };
        let mut builder = Builder::loaded(vb, packed, origin.clone()).with_adapters(opts.adapters.clone());
        if let (Packing::Quantize(fmt), true) = (opts.packing, opts.device.is_cpu()) {
            // Rounded as each linear layer is built, in its `[out, in]` layout (GPT-2's Conv1D
            // weights are stored `[in, out]`); other tensors (position tables, norms) stay as stored.
            builder = builder.quantizing(fmt);
        }
        let model = models::build(&config, &builder, &cfg_path)?;
        // As transformers does, report weights the architecture does not use rather than fail.
        let used = builder.used();
        names.retain(|n| !used.contains(n));
        if !names.is_empty() {
            names.sort();
            tracing::warn!(
                "{}: {} tensors are not used by the model: {}",
                origin.display(),
                names.len(),
                names.join(", ")
            );
        }
        Ok(Self { model, tokenizer, config, generation, varmap, device: opts.device.clone() })
    }
}

/// Writes a standard HF folder (`config.json`, `model.safetensors`, `tokenizer.json`,
/// `tokenizer_config.json`, `generation_config.json`) that transformers and PEFT load unchanged.
/// Tied LM heads are not stored, as transformers does.
pub fn save_hf_folder(raw: &RawModel, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut tensors: BTreeMap<String, Tensor> = raw.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (name, p) in &raw.packed {
        tensors.insert(name.clone(), Tensor::from_vec(p.dequantize(), p.dims(), &Device::Cpu)?);
    }
    let tied = raw.config.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(false);
    if tied {
        tensors.remove("lm_head.weight");
    }
    safetensors::save(&tensors, &out.join("model.safetensors"))?;
    let mut config = raw.config.clone();
    // transformers 5 reads `dtype`, earlier versions `torch_dtype`.
    config["torch_dtype"] = serde_json::json!("float32");
    config["dtype"] = serde_json::json!("float32");
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
    atomic_write(&out.join("config.json"), text.as_bytes())?;
    raw.tokenizer.save(out)?;
    let text = serde_json::to_string_pretty(&raw.generation.to_json()).map_err(|e| Error::Invalid(e.to_string()))?;
    atomic_write(&out.join("generation_config.json"), text.as_bytes())
}

/// `meet convert`: reads `model`, checks that it builds, and writes it as an HF folder at `out`.
/// Returns the number of tensors written.
pub fn convert(model: &str, out: &Path) -> Result<usize> {
    let raw = read(model, &LoadOptions::default())?;
    // Build once so an unusable model fails here rather than in transformers.
    Pretrained::from_raw(raw.clone(), &LoadOptions::default())?;
    save_hf_folder(&raw, out)?;
    Ok(raw.tensors.len() + raw.packed.len())
}
