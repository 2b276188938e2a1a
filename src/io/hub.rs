//! Hugging Face Hub repo ids (`org/name[@revision]`) through the `hf-hub` crate. Files are taken
//! from the standard HF cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`); missing ones are downloaded unless `HF_HUB_OFFLINE=1`.

use crate::{Error, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

/// Whether `s` has the shape of a repo id (`org/name`, optionally `@revision`).
pub fn looks_like_repo_id(s: &str) -> bool {
    let id = s.split('@').next().unwrap_or("");
    let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    matches!(id.split('/').collect::<Vec<_>>()[..], [a, b] if ok(a) && ok(b))
}

fn cache() -> Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// Fetches (or finds in the cache) the files of a model repo and returns its snapshot folder.
pub fn snapshot(model: &str) -> Result<PathBuf> {
    snapshot_in(cache(), model, offline())
}

/// [`snapshot`] with an explicit cache and offline flag.
pub fn snapshot_in(cache: Cache, model: &str, offline: bool) -> Result<PathBuf> {
    let (id, revision) = match model.split_once('@') {
        Some((id, rev)) => (id, rev.to_string()),
        None => (model, "main".to_string()),
    };
    let err = |msg: String| Error::ModelSource { model: model.into(), msg };
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision);
    let cached = cache.repo(repo.clone());
    let api = if offline {
        None
    } else {
        Some(hf_hub::api::sync::ApiBuilder::from_cache(cache.clone()).build().map_err(|e| err(e.to_string()))?)
    };
    let fetch = |file: &str, required: bool| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(file) {
            return Ok(Some(p));
        }
        match &api {
            None if required => Err(err(format!(
                "'{file}' is not in the HF cache at {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            ))),
            None => Ok(None),
            Some(api) => match api.repo(repo.clone()).get(file) {
                Ok(p) => Ok(Some(p)),
                Err(e) if required => Err(err(format!(
                    "'{file}' is not in the HF cache at {} and downloading it failed: {e}",
                    cache.path().display()
                ))),
                Err(_) => Ok(None),
            },
        }
    };
    let config = fetch("config.json", true)?.ok_or_else(|| err("config.json missing".into()))?;
    fetch("tokenizer.json", true)?;
    for optional in ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"] {
        fetch(optional, false)?;
    }
    match fetch("model.safetensors.index.json", false)? {
        Some(index) => {
            let v = crate::files::read_json(&index)?;
            let mut shards: Vec<&str> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                fetch(s, true)?;
            }
        }
        None => {
            fetch("model.safetensors", true)?;
        }
    }
    config.parent().map(PathBuf::from).ok_or_else(|| err("cache path has no parent".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_recognised() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_repo_id("org/name@v1.0"));
        assert!(!looks_like_repo_id("models/x/y.gguf"));
        assert!(!looks_like_repo_id("plainname"));
        assert!(!looks_like_repo_id("./a/b"));
    }
}
