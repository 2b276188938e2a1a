//! Reading and writing `.safetensors` weights: single files and HF sharded folders
//! (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`).

use crate::files::atomic_write;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The weight files of an HF folder, in load order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::parse(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::parse(&index, "missing object 'weight_map'"))?;
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f =
                f.as_str().ok_or_else(|| Error::parse(&index, format!("weight_map['{name}'] is not a file name")))?;
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json in this folder"))
}

/// Loads every tensor of `files` as f32 on `device`. F32, F16 and BF16 are accepted.
pub fn load(files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // Safety: the file is opened read-only and not modified while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
        for (name, view) in st.tensors() {
            let t = to_tensor(&view, device).map_err(|msg| Error::format(path, format!("tensor '{name}': {msg}")))?;
            out.insert(name, t);
        }
    }
    Ok(out)
}

fn to_tensor(v: &TensorView, device: &Device) -> std::result::Result<Tensor, String> {
    let shape = v.shape().to_vec();
    let data = v.data();
    let t = match v.dtype() {
        Dtype::F32 => {
            let vals: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Tensor::from_vec(vals, shape, device)
        }
        Dtype::F16 => {
            let vals: Vec<f32> =
                data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            Tensor::from_vec(vals, shape, device)
        }
        Dtype::BF16 => {
            let vals: Vec<f32> =
                data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            Tensor::from_vec(vals, shape, device)
        }
        other => return Err(format!("unsupported tensor type {other:?} (meet reads F32, F16 and BF16)")),
    };
    t.map_err(|e| e.to_string())
}

/// Writes `tensors` (converted to f32) to `path` atomically, with `{"format": "pt"}` metadata so
/// transformers accepts the file.
pub fn save(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32)?.flatten_all()?;
        let bytes: Vec<u8> = t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect();
        bufs.push((name.clone(), tensors[name].dims().to_vec(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor '{n}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::Invalid(e.to_string()))?;
    atomic_write(path, &bytes)
}
