//! Hugging Face Hub repos through the `hf-hub` crate: model ids (`org/name[@revision]`) and
//! dataset ids (`hf:org/name[/config][@revision][:split]`, see [`DatasetId`]). Files are taken
//! from the standard HF cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`); missing ones are downloaded (from `$HF_ENDPOINT` when set) unless
//! `HF_HUB_OFFLINE=1`.

use crate::{Error, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

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

/// The Hub client over `cache`, at `$HF_ENDPOINT` when set (a mirror), else huggingface.co.
fn api(cache: &Cache) -> std::result::Result<hf_hub::api::sync::Api, String> {
    let mut b = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone());
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()) {
        if !endpoint.is_empty() {
            b = b.with_endpoint(endpoint);
        }
    }
    b.build().map_err(|e| e.to_string())
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
    let api = if offline { None } else { Some(api(&cache).map_err(err)?) };
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

/// The prefix of a Hub dataset id in a data path.
pub const DATASET_PREFIX: &str = "hf:";

/// The syntax of a Hub dataset id, as error messages show it.
pub const DATASET_SYNTAX: &str = "hf:OWNER/NAME[/CONFIG][@REVISION][:SPLIT]";

/// A Hub dataset id: `hf:OWNER/NAME[/CONFIG][@REVISION][:SPLIT]`, e.g. `hf:Anthropic/hh-rlhf`,
/// `hf:Anthropic/hh-rlhf/helpful-base:test`, `hf:openai/summarize_from_feedback/comparisons:validation`,
/// `hf:trl-lib/ultrafeedback_binarized@main:train`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetId {
    /// `OWNER/NAME`.
    pub repo: String,
    /// A configuration: a top-level folder of the repo (as `data_dir` in `datasets`), or of its
    /// Parquet conversion (`refs/convert/parquet`).
    pub config: Option<String>,
    /// A branch, tag or commit; by default `main`, then the Hub's Parquet conversion.
    pub revision: Option<String>,
    /// By default the role's split (`train` for training data, `test` for held-out data).
    pub split: Option<String>,
}

impl DatasetId {
    /// `Some` when `s` names a Hub dataset (starts with [`DATASET_PREFIX`]); an error when it
    /// does but is not of the form [`DATASET_SYNTAX`].
    pub fn parse(s: &str) -> Option<Result<DatasetId>> {
        let rest = s.strip_prefix(DATASET_PREFIX)?;
        let bad = |why: &str| Error::Invalid(format!("'{s}': {why} (a Hub dataset is {DATASET_SYNTAX})"));
        let name_ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        Some((|| {
            let (head, split) = match rest.rsplit_once(':') {
                Some((h, sp)) if name_ok(sp) => (h, Some(sp.to_string())),
                Some(_) => return Err(bad("the split after ':' must be a name")),
                None => (rest, None),
            };
            let (path, revision) = match head.split_once('@') {
                Some((p, r)) if !r.is_empty() && !r.contains('@') => (p, Some(r.to_string())),
                Some(_) => return Err(bad("the revision after '@' must not be empty")),
                None => (head, None),
            };
            let parts: Vec<&str> = path.split('/').collect();
            if !(parts.len() == 2 || parts.len() == 3) || !parts.iter().all(|p| name_ok(p)) {
                return Err(bad("expected OWNER/NAME or OWNER/NAME/CONFIG"));
            }
            Ok(DatasetId {
                repo: format!("{}/{}", parts[0], parts[1]),
                config: parts.get(2).map(|c| c.to_string()),
                revision,
                split,
            })
        })())
    }
}

impl std::fmt::Display for DatasetId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{DATASET_PREFIX}{}", self.repo)?;
        if let Some(c) = &self.config {
            write!(f, "/{c}")?;
        }
        if let Some(r) = &self.revision {
            write!(f, "@{r}")?;
        }
        if let Some(s) = &self.split {
            write!(f, ":{s}")?;
        }
        Ok(())
    }
}

/// The Hub's automatic Parquet conversion of every public dataset: `{config}/{split}/NNNN.parquet`.
pub const PARQUET_BRANCH: &str = "refs/convert/parquet";

/// Whether a file is data `meet` reads (Parquet, JSON Lines, JSON, gzip-compressed or not).
pub fn is_data_file(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    let json = n.strip_suffix(".gz").unwrap_or(&n);
    n.ends_with(".parquet") || json.ends_with(".jsonl") || json.ends_with(".json")
}

/// The files of one split among `files` (paths relative to the dataset or its config, `/`
/// separated, sorted), by the rules of Hugging Face `datasets`: the Parquet conversion's
/// `{split}/NNNN.parquet` folders (`parquet_layout`); else shards named
/// `{split}-NNNNN-of-NNNNN.*`; else the split's keyword (`train`/`training`,
/// `validation`/`valid`/`val`/`dev`, `test`/`testing`/`eval`/`evaluation`, or the split's own
/// name) as a word of a file or folder name; else the files have no splits and are all taken.
/// `Ok((split, files))`, or `Err(the splits there are)` when `split` is not among them.
pub fn split_files(
    files: &[String],
    split: &str,
    explicit: bool,
    parquet_layout: bool,
) -> std::result::Result<(String, Vec<String>), Vec<String>> {
    let mut by_split: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    if parquet_layout {
        for f in files {
            if let Some((dir, _)) = f.split_once('/') {
                let s = dir.strip_prefix("partial-").unwrap_or(dir);
                by_split.entry(s.to_string()).or_default().push(f.clone());
            }
        }
    } else {
        for f in files {
            if let Some(s) = sharded_split(f) {
                by_split.entry(s).or_default().push(f.clone());
            }
        }
        if by_split.is_empty() {
            const KEYWORDS: [(&str, &[&str]); 3] = [
                ("train", &["train", "training"]),
                ("validation", &["validation", "valid", "dev", "val"]),
                ("test", &["test", "testing", "eval", "evaluation"]),
            ];
            for f in files {
                let words: Vec<&str> =
                    f.split(|c: char| "-._ /".contains(c) || c.is_ascii_digit()).filter(|w| !w.is_empty()).collect();
                let custom = (!KEYWORDS.iter().any(|(s, _)| *s == split)).then_some(split);
                // A requested split of another name is matched by its name as a word, or as the
                // start of a file or folder name (`train_prefs-…`).
                if let Some(c) = custom.filter(|c| {
                    words.contains(c)
                        || f.split('/').any(|part| {
                            part.strip_prefix(c).is_some_and(|r| r.is_empty() || r.starts_with(['-', '.', '_']))
                        })
                }) {
                    by_split.entry(c.to_string()).or_default().push(f.clone());
                } else if let Some((s, _)) = KEYWORDS.iter().find(|(_, kw)| kw.iter().any(|k| words.contains(k))) {
                    by_split.entry(s.to_string()).or_default().push(f.clone());
                }
            }
            if by_split.is_empty() {
                // No split names: every file, whatever the role's split (but not a named split
                // other than train, which the files cannot be).
                return if explicit && split != "train" { Err(vec![]) } else { Ok((split.into(), files.to_vec())) };
            }
        }
    }
    let names: Vec<String> = by_split.keys().cloned().collect();
    match by_split.remove(split) {
        Some(f) => Ok((split.into(), f)),
        None if !explicit && names.len() == 1 && split == "train" => {
            let (s, f) = by_split.into_iter().next().expect("one split");
            Ok((s, f))
        }
        None => Err(names),
    }
}

/// `{split}` of a shard named `{split}-NNNNN-of-NNNNN.{ext}` (in any folder).
fn sharded_split(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let stem = name.split_once('.')?.0;
    let (split, rest) = stem.split_once('-')?;
    let (a, b) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|c| c.is_ascii_digit());
    (digits(a) && digits(b) && !split.is_empty()).then(|| split.to_string())
}

/// Relative paths (`/` separated, sorted) of the data files under `dir`.
pub fn data_files_under(dir: &Path) -> Result<Vec<String>> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = e.path();
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            if path.is_dir() {
                walk(&path, &rel, out)?;
            } else if is_data_file(&name) {
                out.push(rel);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// The listing of a dataset at one revision: data files (relative, sorted) and where they come
/// from.
struct Listing {
    repo: Repo,
    files: Vec<String>,
    /// The cached snapshot folder, when the revision is cached.
    snapshot: Option<PathBuf>,
}

/// The local files of a split of a Hub dataset, in order (shards by name), from the HF cache or
/// downloaded into it (unless `HF_HUB_OFFLINE=1`). `default_split` is the role's split
/// (`train`, `test`) when the id names none.
pub fn dataset_files(id: &DatasetId, default_split: &str) -> Result<Vec<PathBuf>> {
    dataset_files_in(cache(), id, default_split, offline())
}

/// [`dataset_files`] with an explicit cache and offline flag.
pub fn dataset_files_in(cache: Cache, id: &DatasetId, default_split: &str, offline: bool) -> Result<Vec<PathBuf>> {
    let err = |msg: String| Error::Invalid(format!("{id}: {msg}"));
    let revisions: Vec<String> = match &id.revision {
        Some(r) => vec![r.clone()],
        None => vec!["main".into(), PARQUET_BRANCH.into()],
    };
    let api = if offline { None } else { Some(api(&cache).map_err(err)?) };
    let mut tried = Vec::new();
    for rev in &revisions {
        let repo = Repo::with_revision(id.repo.clone(), RepoType::Dataset, rev.clone());
        let cached_listing = list_cached(&cache, &repo)?;
        let snapshot = cached_listing.as_ref().map(|(dir, _)| dir.clone());
        let listing = match cached_listing.map(|(_, files)| files) {
            Some(files) if api.is_none() => Some(Listing { repo: repo.clone(), files, snapshot }),
            cached => match &api {
                None => None,
                Some(api) => match api.repo(repo.clone()).info() {
                    Ok(info) => Some(Listing {
                        repo: repo.clone(),
                        files: {
                            let mut f: Vec<String> =
                                info.siblings.into_iter().map(|s| s.rfilename).filter(|f| is_data_file(f)).collect();
                            f.sort();
                            f
                        },
                        snapshot,
                    }),
                    Err(e) => match cached {
                        Some(files) => {
                            tracing::warn!(
                                "{id}: listing revision {rev} on the Hub failed ({e}); using the cached files"
                            );
                            Some(Listing { repo: repo.clone(), files, snapshot })
                        }
                        None => {
                            tried.push(format!("{rev}: {e}"));
                            None
                        }
                    },
                },
            },
        };
        let Some(listing) = listing else {
            if api.is_none() {
                tried.push(format!("{rev}: not in the HF cache"));
            }
            continue;
        };
        let parquet_layout = rev == PARQUET_BRANCH;
        let config = id.config.clone().or_else(|| parquet_layout.then(|| "default".to_string()));
        let files: Vec<String> = match &config {
            None => listing.files.clone(),
            Some(c) => {
                listing.files.iter().filter_map(|f| f.strip_prefix(&format!("{c}/"))).map(String::from).collect()
            }
        };
        if files.is_empty() {
            let folders: std::collections::BTreeSet<&str> =
                listing.files.iter().filter_map(|f| f.split_once('/').map(|(d, _)| d)).collect();
            tried.push(match &config {
                Some(c) if !listing.files.is_empty() => format!(
                    "{rev}: no config (folder) '{c}' (folders: {})",
                    folders.into_iter().collect::<Vec<_>>().join(", ")
                ),
                _ => format!("{rev}: no Parquet, JSON Lines or JSON files"),
            });
            continue;
        }
        let split = id.split.as_deref().unwrap_or(default_split);
        let (_, chosen) = split_files(&files, split, id.split.is_some(), parquet_layout).map_err(|splits| {
            if splits.is_empty() {
                err(format!("its files at revision {rev} carry no split names, so there is no split '{split}'"))
            } else {
                err(format!("no split '{split}' at revision {rev} (splits: {})", splits.join(", ")))
            }
        })?;
        let prefix = config.as_ref().map(|c| format!("{c}/")).unwrap_or_default();
        let cached = cache.repo(listing.repo.clone());
        return chosen
            .iter()
            .map(|f| {
                let file = format!("{prefix}{f}");
                if let Some(p) = listing.snapshot.as_ref().map(|d| d.join(&file)).filter(|p| p.is_file()) {
                    return Ok(p);
                }
                if let Some(p) = cached.get(&file) {
                    return Ok(p);
                }
                match &api {
                    None => Err(err(format!("'{file}' is not in the HF cache and HF_HUB_OFFLINE is set"))),
                    Some(api) => api
                        .repo(listing.repo.clone())
                        .get(&file)
                        .map_err(|e| err(format!("downloading '{file}' failed: {e}"))),
                }
            })
            .collect();
    }
    let hint = if offline { " (HF_HUB_OFFLINE is set: only the cache is searched)" } else { "" };
    Err(err(format!(
        "dataset '{}' has no usable files in the HF cache at {}{hint}: {}",
        id.repo,
        cache.path().display(),
        tried.join("; ")
    )))
}

/// The snapshot folder and data files of a dataset revision in the cache (`refs/{revision}` →
/// `snapshots/{commit}`; a commit names its snapshot directly), or `None` when it is not cached.
fn list_cached(cache: &Cache, repo: &Repo) -> Result<Option<(PathBuf, Vec<String>)>> {
    let base = cache.path().join(repo.folder_name());
    let rev = repo.revision();
    let commit = match std::fs::read_to_string(base.join("refs").join(rev)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) => rev.to_string(),
        Err(_) => return Ok(None),
    };
    let snapshot = base.join("snapshots").join(commit);
    if !snapshot.is_dir() {
        return Ok(None);
    }
    Ok(Some((snapshot.clone(), data_files_under(&snapshot)?)))
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

    #[test]
    fn dataset_ids_parse_and_print_back() {
        let id = DatasetId::parse("hf:openai/summarize_from_feedback/comparisons@v1:validation").unwrap().unwrap();
        assert_eq!(id.repo, "openai/summarize_from_feedback");
        assert_eq!(id.config.as_deref(), Some("comparisons"));
        assert_eq!(id.revision.as_deref(), Some("v1"));
        assert_eq!(id.split.as_deref(), Some("validation"));
        assert_eq!(id.to_string(), "hf:openai/summarize_from_feedback/comparisons@v1:validation");
        let id = DatasetId::parse("hf:Anthropic/hh-rlhf").unwrap().unwrap();
        assert_eq!((id.config, id.revision, id.split), (None, None, None));
        assert!(DatasetId::parse("data/train.jsonl").is_none());
        for bad in ["hf:hh-rlhf", "hf:a/b/c/d", "hf:a/b@:train", "hf:a/b:", "hf:a b/c"] {
            let e = DatasetId::parse(bad).unwrap().unwrap_err().to_string();
            assert!(e.contains(DATASET_SYNTAX), "{bad}: {e}");
        }
    }

    #[test]
    fn splits_follow_the_rules_of_datasets() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let sharded = v(&[
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/train_prefs-00000-of-00001.parquet",
        ]);
        let (_, f) = split_files(&sharded, "train", false, false).unwrap();
        assert_eq!(f, v(&["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]));
        assert_eq!(split_files(&sharded, "train_prefs", true, false).unwrap().1.len(), 1);
        assert_eq!(split_files(&sharded, "validation", true, false).unwrap_err(), v(&["test", "train", "train_prefs"]));
        // HH-RLHF's layout: a split keyword in each file name, subsets in folders.
        let hh = v(&["harmless-base/test.jsonl.gz", "harmless-base/train.jsonl.gz", "helpful-base/train.jsonl.gz"]);
        assert_eq!(split_files(&hh, "train", false, false).unwrap().1.len(), 2);
        assert_eq!(split_files(&hh, "test", false, false).unwrap().1, v(&["harmless-base/test.jsonl.gz"]));
        // Keywords: dev is validation, eval is test.
        let kw = v(&["dev.jsonl", "eval.jsonl", "training.jsonl"]);
        assert_eq!(split_files(&kw, "validation", false, false).unwrap().1, v(&["dev.jsonl"]));
        assert_eq!(split_files(&kw, "test", false, false).unwrap().1, v(&["eval.jsonl"]));
        // No split names: every file, for any role; a named split other than train does not exist.
        let plain = v(&["a.parquet", "b.parquet"]);
        assert_eq!(split_files(&plain, "test", false, false).unwrap().1, plain);
        assert!(split_files(&plain, "test", true, false).is_err());
        // The Hub's Parquet conversion.
        let conv = v(&["train/0000.parquet", "train/0001.parquet", "partial-validation/0000.parquet"]);
        assert_eq!(split_files(&conv, "validation", true, true).unwrap().1, v(&["partial-validation/0000.parquet"]));
        assert_eq!(split_files(&conv, "train", false, true).unwrap().1.len(), 2);
    }
}
