//! Merging a LoRA adapter into its base model's weights, as PEFT's `merge_and_unload`.

use crate::models::pretrained::{self, LoadOptions, RawModel};
use crate::peft::lora::LoraConfig;
use crate::{Error, Pretrained, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// The base model of `source` with a LoRA adapter (`config` and its tensors under model-relative
/// names, as [`crate::peft::folder::read_lora`] gives them) merged into its weights (`W + s B A`), as PEFT's
/// `merge_and_unload`; save it with [`pretrained::save_hf_folder`]. The merged model is built once, so an
/// unusable result fails here.
pub fn merge(source: &str, config: &LoraConfig, tensors: &HashMap<String, Tensor>) -> Result<RawModel> {
    let mut raw = pretrained::read(source, &LoadOptions::default())?;
    let scale = config.scale();
    for (name, t) in tensors {
        let Some(path) = name.strip_suffix(".lora_A.weight") else {
            if name.ends_with(".lora_B.weight") {
                let a = name.replace(".lora_B.weight", ".lora_A.weight");
                if !tensors.contains_key(&a) {
                    return Err(Error::Invalid(format!("adapter has {name} without its {a}")));
                }
                continue;
            }
            return Err(Error::Invalid(format!("adapter tensor '{name}' is neither a lora_A nor a lora_B weight")));
        };
        let b = tensors
            .get(&format!("{path}.lora_B.weight"))
            .ok_or_else(|| Error::Invalid(format!("adapter has {name} without its lora_B")))?;
        let key = format!("{path}.weight");
        let w =
            raw.tensors.get(&key).ok_or_else(|| Error::Invalid(format!("base model has no '{key}' to merge into")))?;
        // GPT-2's Conv1D stores the weight [in, out] (PEFT's fan_in_fan_out): merge Δᵀ.
        let fan_in_fan_out = crate::models::architecture(&raw.config, &raw.origin)?.fan_in_fan_out;
        let (out_dim, in_dim) = if fan_in_fan_out { w.dims2().map(|(i, o)| (o, i))? } else { w.dims2()? };
        if t.dims() != [config.r, in_dim] || b.dims() != [out_dim, config.r] {
            return Err(Error::Invalid(format!(
                "adapter '{path}': lora_A {:?} and lora_B {:?} do not fit r = {} and the weight [{out_dim}, {in_dim}]",
                t.dims(),
                b.dims(),
                config.r
            )));
        }
        let delta = b.matmul(t)?.affine(scale, 0.0)?;
        let merged = if fan_in_fan_out { (w + delta.t()?)? } else { (w + delta)? };
        raw.tensors.insert(key, merged);
    }
    Pretrained::from_raw(raw.clone(), &LoadOptions::default())?;
    Ok(raw)
}
