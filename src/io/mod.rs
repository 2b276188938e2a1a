//! Model sources behind one `--model` argument: an HF folder, a GGUF file, or a Hub repo id served
//! from the local HF cache; and writing HF folders back.

pub mod generation;
pub mod gguf;
pub mod hub;
pub mod safetensors;

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The kind of thing `--model` names.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Folder(PathBuf),
    Gguf(PathBuf),
}

/// Resolves `--model`: an existing folder, an existing `.gguf` file, or `org/name[@revision]`
/// found in (or, when online, fetched into) the HF cache.
pub fn resolve(model: &str) -> Result<Source> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(Source::Folder(p.to_path_buf()));
    }
    if p.is_file() {
        let mut magic = [0u8; 4];
        let ok = std::fs::File::open(p).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok();
        if ok && &magic == b"GGUF" {
            return Ok(Source::Gguf(p.to_path_buf()));
        }
        return Err(Error::format(
            p,
            "not a GGUF file (no GGUF magic); pass a GGUF file, an HF model folder or a Hub repo id",
        ));
    }
    if hub::looks_like_repo_id(model) {
        return Ok(Source::Folder(hub::snapshot(model)?));
    }
    Err(Error::ModelSource {
        model: model.into(),
        msg: "no such file or folder, and not a Hugging Face repo id (org/name)".into(),
    })
}
