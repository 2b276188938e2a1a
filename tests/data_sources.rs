//! Data as users have it: Parquet files written by Python `datasets` / `pyarrow` give exactly the
//! examples of the same records in JSONL (every format); a folder of shards reads in order and
//! keeps to its split; Hub dataset ids resolve offline from an HF cache laid out as `hf-hub`
//! expects (tests/fixtures/data/hub, made by scripts/make_data_fixtures.py); bad input is refused
//! naming the file, column or id; mixing and held-out data reach training, whose metrics.jsonl
//! logs the held-out loss.

mod common;

use common::{metrics, tiny_raw, tiny_tokenizer};
use meet::data::preference::{preferences_from_records, read_preferences, PreferenceOptions};
use meet::data::{read_supervised, Records, SupervisedOptions};
use meet::methods::config::RunConfig;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

/// Every test of this binary reads Hub ids from the fixture cache, offline (the same values in
/// every test, so parallel tests agree).
fn offline_cache() {
    std::env::set_var("HF_HUB_CACHE", fixtures().join("hub"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
}

fn opts() -> PreferenceOptions {
    PreferenceOptions { max_prompt_length: Some(64), max_length: 96, ..Default::default() }
}

fn records(source: &str, split: &str, limit: Option<usize>) -> Records {
    offline_cache();
    Records::open(Path::new(source), split).unwrap().limit(limit)
}

fn pairs_of(r: Records) -> Vec<meet::data::preference::Pair> {
    preferences_from_records(r, &tiny_tokenizer(), &opts()).unwrap().0
}

fn jsonl(name: &str) -> String {
    fixtures().join(format!("{name}.jsonl")).to_string_lossy().into_owned()
}

#[test]
fn parquet_gives_the_examples_of_the_same_records_in_jsonl_for_every_format() {
    let tok = tiny_tokenizer();
    for (name, n) in [("trl", 200), ("chat", 150), ("hh", 200), ("tldr", 150), ("llama_factory", 120)] {
        let (a, sa) = read_preferences(&fixtures().join(format!("{name}.jsonl")), &tok, &opts()).unwrap();
        let (b, sb) = read_preferences(&fixtures().join(format!("{name}.parquet")), &tok, &opts()).unwrap();
        assert_eq!(a.len(), n, "{name}");
        assert_eq!(a, b, "{name}: Parquet and JSONL differ");
        assert_eq!((sa.prompts_cut, sa.responses_cut), (sb.prompts_cut, sb.responses_cut), "{name}");
        assert!(a.iter().all(|p| !p.prompt.is_empty() && p.chosen != p.rejected));
    }
    let so = SupervisedOptions {
        max_length: 512,
        controls: vec![],
        dimensions: vec![],
        scores: vec![],
        default_control: None,
        eos_id: Some(258),
        skip_invalid: false,
    };
    let (a, sa) = read_supervised(&fixtures().join("sft.jsonl"), &tok, &so).unwrap();
    let (b, sb) = read_supervised(&fixtures().join("sft.parquet"), &tok, &so).unwrap();
    assert_eq!((a.len(), &a), (150, &b));
    assert_eq!(sa, sb);
    // TL;DR's nested struct with nulls: the subreddit is empty where it is null.
    let tldr: Vec<serde_json::Value> =
        std::fs::read_to_string(jsonl("tldr")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let null_at = tldr.iter().position(|v| v["info"]["subreddit"].is_null()).unwrap();
    let whole = PreferenceOptions { max_prompt_length: None, max_length: 4096, ..Default::default() };
    let r = records(&fixtures().join("tldr.parquet").to_string_lossy(), "train", None);
    let p = &preferences_from_records(r, &tok, &whole).unwrap().0[null_at];
    let text = tok.decode(&p.prompt, false).unwrap();
    assert!(text.starts_with("SUBREDDIT: r/\n\nTITLE:"), "{text}");
}

#[test]
fn a_folder_of_shards_reads_in_order_and_keeps_to_its_split() {
    let folder = pairs_of(records(&fixtures().join("shards").to_string_lossy(), "train", None));
    assert_eq!(folder, pairs_of(records(&jsonl("hh"), "train", None)), "three train shards = hh.jsonl");
    let test = pairs_of(records(&fixtures().join("shards").to_string_lossy(), "test", None));
    assert_eq!(test.len(), 20, "the test shard alone");
    // Locations name the shard.
    let mut r = records(&fixtures().join("shards").to_string_lossy(), "train", None);
    let last = r.by_ref().last().unwrap().unwrap();
    assert_eq!(last.loc, "train-00002-of-00003.parquet row 60");
}

#[test]
fn hub_dataset_ids_resolve_offline_from_the_cache_with_configs_splits_and_the_parquet_branch() {
    // data/{split}-NNNNN-of-NNNNN.parquet shards (the test shard is zstd-compressed).
    let train = pairs_of(records("hf:meet-fixtures/prefs", "train", None));
    assert_eq!(train, pairs_of(records(&jsonl("trl"), "train", Some(160))));
    let test = pairs_of(records("hf:meet-fixtures/prefs:test", "train", None));
    assert_eq!(test, pairs_of(records(&jsonl("trl"), "train", None))[160..]);
    // The role's split: held-out data reads `test` by default.
    assert_eq!(pairs_of(records("hf:meet-fixtures/prefs", "test", None)), test);
    // HH-RLHF's layout: every subset's train file (folders in name order), or one subset.
    let hh = pairs_of(records(&jsonl("hh"), "train", None));
    assert_eq!(pairs_of(records("hf:meet-fixtures/hh", "train", None)), hh[..150]);
    assert_eq!(pairs_of(records("hf:meet-fixtures/hh/helpful-base:test", "train", None)), hh[150..]);
    assert_eq!(pairs_of(records("hf:meet-fixtures/hh/helpful-base", "train", None)), hh[60..150]);
    // A script dataset: main has no data, so the Parquet conversion serves it; or named directly.
    let tldr = pairs_of(records(&jsonl("tldr"), "train", None));
    assert_eq!(pairs_of(records("hf:meet-fixtures/tldr/comparisons", "train", None)), tldr[..120]);
    assert_eq!(
        pairs_of(records("hf:meet-fixtures/tldr/comparisons@refs/convert/parquet:validation", "train", None)),
        tldr[120..]
    );
    // A commit as the revision.
    assert_eq!(
        pairs_of(records("hf:meet-fixtures/prefs@1111111111111111111111111111111111111111", "train", None)),
        train
    );
}

fn open_err(source: &str, split: &str) -> String {
    offline_cache();
    match Records::open(Path::new(source), split) {
        Ok(r) => match preferences_from_records(r, &tiny_tokenizer(), &opts()) {
            Ok(_) => panic!("{source} was read"),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_sources_are_refused_naming_the_file_column_or_id() {
    let f = |n: &str| fixtures().join(n).to_string_lossy().into_owned();
    let e = open_err(&f("missing_column.parquet"), "train");
    assert!(e.contains("missing_column.parquet: row 1: missing field 'rejected'"), "{e}");
    assert!(e.contains("Parquet columns: prompt: Utf8, chosen: Utf8"), "{e}");
    let e = open_err(&f("bad_type.parquet"), "train");
    assert!(e.contains("bad_type.parquet: row 1: field 'chosen' must be a string"), "{e}");
    assert!(e.contains("chosen: Int64"), "{e}");
    // Corrupt files: cut in half, and not Parquet at all.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(f("trl.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = open_err(&cut.to_string_lossy(), "train");
    assert!(e.contains("cut.parquet") && e.contains("not a readable Parquet file"), "{e}");
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"PAR1 this is not parquet PAR1").unwrap();
    let e = open_err(&junk.to_string_lossy(), "train");
    assert!(e.contains("junk.parquet") && e.contains("not a readable Parquet file"), "{e}");
    // A page corrupted inside an intact file (footer kept): reading stops with the file.
    let mut bad = bytes.clone();
    for b in &mut bad[8..bytes.len() / 3] {
        *b = 0xAB;
    }
    let paged = dir.path().join("paged.parquet");
    std::fs::write(&paged, &bad).unwrap();
    let e = open_err(&paged.to_string_lossy(), "train");
    assert!(e.contains("paged.parquet"), "{e}");
    // Ids: unknown offline, a missing split, a missing config, a malformed id, a local typo.
    let e = open_err("hf:meet-fixtures/nope", "train");
    assert!(e.contains("hf:meet-fixtures/nope") && e.contains("HF_HUB_OFFLINE"), "{e}");
    let e = open_err("hf:meet-fixtures/prefs:validation", "train");
    assert!(e.contains("no split 'validation'") && e.contains("splits: test, train"), "{e}");
    let e = open_err("hf:meet-fixtures/tldr/axis", "train");
    assert!(e.contains("no config (folder) 'axis'") && e.contains("comparisons"), "{e}");
    let e = open_err("hf:hh-rlhf", "train");
    assert!(e.contains("hf:OWNER/NAME[/CONFIG][@REVISION][:SPLIT]"), "{e}");
    let e = open_err("Anthropic/hh-rlhf", "train");
    assert!(e.contains("no such file or folder; for a Hub dataset write hf:Anthropic/hh-rlhf"), "{e}");
    // A folder with splits but not the one asked for.
    let e = open_err(&f("shards"), "validation");
    assert!(e.contains("split into test, train"), "{e}");
}

// --- Training: mixing and held-out loss on the tiny rule task --------------------------------

const WORDS: [&str; 3] = ["cat", "dog", "sun"];

fn rule_rows(seed: u64, n: usize, word: Option<&str>) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::new();
    for _ in 0..n {
        let s: String = (0..rng.gen_range(2..5)).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
        let w = word.unwrap_or(WORDS[rng.gen_range(0..3)]);
        out.push_str(&format!(
            "{}\n",
            json!({"prompt": format!("{s}:"), "chosen": format!(" {w} yes"), "rejected": format!(" {w}")})
        ));
    }
    out
}

fn tiny_model(dir: &Path) -> String {
    let model = dir.join("model");
    meet::models::pretrained::save_hf_folder(&tiny_raw(11, 256), &model).unwrap();
    model.to_string_lossy().into_owned()
}

fn config(text: &str) -> RunConfig {
    RunConfig::from_table(toml::from_str(text).unwrap(), &[]).unwrap()
}

#[test]
fn sources_mix_by_weight_and_a_share_is_held_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(&a, rule_rows(1, 300, Some("cat"))).unwrap();
    std::fs::write(&b, rule_rows(2, 100, Some("dog"))).unwrap();
    let cfg = config(&format!(
        "method = \"sft\"\noutput_dir = {:?}\n[model]\nsource = {model:?}\ntrain_weights = true\n[data]\neval_share = 0.1\n\
         [[data.sources]]\npath = {a:?}\nweight = 1.0\n[[data.sources]]\npath = {b:?}\nweight = 3.0\nmax_records = 80\n",
        dir.path().join("out")
    ));
    cfg.check().unwrap();
    let p = meet::Pretrained::load(&model, &meet::LoadOptions::default()).unwrap();
    let loaded = meet::methods::setup::load_data(&cfg, &p).unwrap();
    let tok = &p.tokenizer;
    let word_of = |ids: &[u32]| tok.decode(ids, false).unwrap().contains("dog");
    let (train, eval) = match (loaded.train, loaded.eval) {
        (meet::methods::setup::TrainingData::Pairs(t), Some(meet::methods::setup::TrainingData::Pairs(e))) => (t, e),
        _ => panic!("pairs expected"),
    };
    // 270 + 72 kept after holding out 10% of each; a mixture pass draws as many.
    assert_eq!((train.len(), eval.len()), (270 + 72, 30 + 8));
    let dog = train.iter().filter(|p| word_of(&p.chosen)).count() as f64 / train.len() as f64;
    assert!((dog - 0.75).abs() < 0.06, "share of source b {dog}, weight 3/4");
    // Held-out pairs never reach training (prompts are random letters: unique enough).
    let in_train = eval.iter().filter(|e| train.iter().any(|t| t.prompt == e.prompt && t.chosen == e.chosen)).count();
    assert!(in_train <= 1, "{in_train} held-out pairs in the training set");
    // The mixture is seeded: the same data twice.
    let again = meet::methods::setup::load_data(&cfg, &p).unwrap();
    match again.train {
        meet::methods::setup::TrainingData::Pairs(t) => assert_eq!(t, train),
        _ => unreachable!(),
    }
}

#[test]
fn training_logs_the_held_out_loss_and_dpo_its_reward_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("prefs.jsonl");
    std::fs::write(&data, rule_rows(5, 96, None)).unwrap();
    let held = dir.path().join("held.jsonl");
    std::fs::write(&held, rule_rows(9, 32, None)).unwrap();
    let sft_out = dir.path().join("sft");
    let cfg = config(&format!(
        "method = \"sft\"\noutput_dir = {sft_out:?}\n[model]\nsource = {model:?}\ntrain_weights = true\n[data]\ntrain = {data:?}\n\
         eval_share = 0.25\nmax_length = 32\n[train]\nbatch_size = 16\nepochs = 10\nlr = 3e-3\nseed = 1\neval_every = 5\n"
    ));
    meet::methods::run(&cfg, false).unwrap();
    let logs = metrics(&sft_out);
    let evals: Vec<(usize, f64)> = logs.iter().filter_map(|l| l.extra.get("eval_loss").map(|&v| (l.step, v))).collect();
    eprintln!("sft held-out loss by step: {evals:?}");
    let steps: Vec<usize> = evals.iter().map(|e| e.0).collect();
    assert_eq!(steps, (1..=logs.len()).filter(|s| s % 5 == 0 || *s == logs.len()).collect::<Vec<_>>());
    assert_eq!(logs.len(), 10 * 72usize.div_ceil(16), "72 of 96 records train");
    let (first, last) = (evals[0].1, evals.last().unwrap().1);
    assert!(last < first * 0.7 && evals.windows(2).filter(|w| w[1].1 > w[0].1).count() <= 1, "{evals:?}");

    // DPO from the SFT model on a held-out file: eval_loss and eval_rewards/accuracies.
    let dpo_out = dir.path().join("dpo");
    let cfg = config(&format!(
        "method = \"dpo\"\noutput_dir = {dpo_out:?}\n[model]\nsource = {:?}\ntrain_weights = true\n[data]\ntrain = {data:?}\n\
         eval = {held:?}\nmax_length = 32\n[train]\nbatch_size = 16\nepochs = 20\nlr = 3e-4\nseed = 1\neval_every = 30\n[dpo]\nbeta = 0.1\n",
        sft_out.join("final")
    ));
    meet::methods::run(&cfg, false).unwrap();
    let logs = metrics(&dpo_out);
    let evals: Vec<(usize, f64, f64)> = logs
        .iter()
        .filter_map(|l| Some((l.step, *l.extra.get("eval_loss")?, *l.extra.get("eval_rewards/accuracies")?)))
        .collect();
    eprintln!("dpo held-out (step, loss, accuracy): {evals:?}");
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [30, 60, 90, 120]);
    let last = evals.last().unwrap();
    assert!(last.1 < std::f64::consts::LN_2 - 0.1 && last.2 >= 0.8, "{evals:?}");
    assert!(dpo_out.join("reference_logps_eval.json").is_file());
}

#[test]
fn the_cli_trains_from_a_hub_dataset_id_with_its_test_split_held_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("out");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_meet"))
        .args(["train", "--method", "sft", "--model", &model, "--data", "hf:meet-fixtures/prefs"])
        .args(["--output-dir", &out.to_string_lossy(), "--set", "data.eval=\"hf:meet-fixtures/prefs:test\""])
        .args(["--set", "model.train_weights=true", "--set", "train.max_steps=4", "--set", "train.eval_every=2"])
        .args(["--set", "data.max_length=128"])
        .env("HF_HUB_CACHE", fixtures().join("hub"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("160 training and 40 held-out preference pairs"), "{err}");
    let logs = metrics(&out);
    assert_eq!(logs.iter().filter(|l| l.extra.contains_key("eval_loss")).count(), 2);
    // Offline and not cached: refused before anything is written.
    let out2 = dir.path().join("out2");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_meet"))
        .args(["train", "--method", "sft", "--model", &model, "--data", "hf:someone/absent"])
        .args(["--output-dir", &out2.to_string_lossy(), "--set", "model.train_weights=true"])
        .env("HF_HUB_CACHE", fixtures().join("hub"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("data.train: hf:someone/absent"), "{err}");
    assert!(!out2.exists());
}

#[test]
fn eval_prompts_come_from_parquet_folders_and_hub_ids_as_from_jsonl() {
    offline_cache();
    let read = |s: &str| meet::eval::sample::read_prompts(Path::new(s)).unwrap();
    let from_jsonl = read(&jsonl("trl"));
    assert_eq!(from_jsonl.len(), 200);
    assert_eq!(read(&fixtures().join("trl.parquet").to_string_lossy()), from_jsonl);
    // A Hub id's prompts are its test split by default (held-out prompts).
    assert_eq!(read("hf:meet-fixtures/prefs"), from_jsonl[160..]);
    assert_eq!(read("hf:meet-fixtures/prefs:train"), from_jsonl[..160]);
    let e = meet::eval::sample::read_prompts(&fixtures().join("hh.parquet")).unwrap_err().to_string();
    assert!(e.contains("hh.parquet: row 1: field 'prompt' must be a string"), "{e}");
}

/// A stand-in for the Hub's HTTP API, serving the repos of the fixture cache as `hf-hub` asks for
/// them: `GET /api/datasets/{repo}/revision/{rev}` (the listing) and
/// `GET /datasets/{repo}/resolve/{rev}/{file}` with byte ranges, `etag`, `x-repo-commit` and
/// `content-range`. Returns its address and the paths asked for.
fn mock_hub() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::http::{header, HeaderMap, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = asked.clone();
    let root = fixtures().join("hub");
    let handle = move |uri: Uri, headers: HeaderMap| {
        let (root, log) = (root.clone(), log.clone());
        async move {
            let path = uri.path().to_string();
            log.lock().unwrap().push(path.clone());
            let not_found = || (StatusCode::NOT_FOUND, "not found").into_response();
            // {owner}/{name}/{kind}/{revision, '/' escaped as %2F}[/file]
            let snapshot = |rest: &str, kind: &str| -> Option<(String, PathBuf, String)> {
                let mut parts = rest.splitn(5, '/');
                let (owner, name, k, rev) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
                if k != kind {
                    return None;
                }
                let rev = rev.replace("%2F", "/");
                let base = root.join(format!("datasets--{owner}--{name}"));
                let commit = std::fs::read_to_string(base.join("refs").join(&rev)).ok()?;
                Some((commit.clone(), base.join("snapshots").join(commit), parts.next().unwrap_or("").to_string()))
            };
            let response: Response = if let Some(rest) = path.strip_prefix("/api/datasets/") {
                match snapshot(rest, "revision") {
                    Some((sha, dir, _)) => {
                        let files = meet::io::hub::data_files_under(&dir).unwrap();
                        let siblings: Vec<_> = files.iter().map(|f| json!({"rfilename": f})).collect();
                        axum::Json(json!({"sha": sha, "siblings": siblings})).into_response()
                    }
                    None => not_found(),
                }
            } else if let Some(rest) = path.strip_prefix("/datasets/") {
                match snapshot(rest, "resolve")
                    .and_then(|(sha, dir, f)| Some((sha, std::fs::read(dir.join(&f)).ok()?, f)))
                {
                    Some((sha, bytes, file)) => {
                        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or("bytes=0-");
                        let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap();
                        let a: usize = a.parse().unwrap();
                        let b: usize = b.parse().unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                        let etag = format!("\"{sha}-{}\"", file.replace('/', "-"));
                        (
                            StatusCode::PARTIAL_CONTENT,
                            [
                                ("etag", etag),
                                ("x-repo-commit", sha),
                                ("content-range", format!("bytes {a}-{b}/{}", bytes.len())),
                            ],
                            bytes[a..=b].to_vec(),
                        )
                            .into_response()
                    }
                    None => not_found(),
                }
            } else {
                not_found()
            };
            response
        }
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, axum::Router::new().fallback(handle)).await.unwrap();
        });
    });
    (format!("http://{addr}"), asked)
}

#[test]
fn hub_ids_download_into_the_cache_when_online_and_then_read_offline() {
    let (endpoint, asked) = mock_hub();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let cache = dir.path().join("hf-cache");
    let train = |out: &str, online: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meet"));
        cmd.args(["train", "--method", "sft", "--model", &model, "--data", "hf:meet-fixtures/tldr/comparisons"])
            .args(["--output-dir", &dir.path().join(out).to_string_lossy()])
            .args(["--set", "data.eval=\"hf:meet-fixtures/prefs\"", "--set", "data.max_length=128"])
            .args(["--set", "model.train_weights=true", "--set", "train.max_steps=2"])
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_HOME");
        if online {
            cmd.env("HF_ENDPOINT", &endpoint).env_remove("HF_HUB_OFFLINE");
        } else {
            cmd.env("HF_HUB_OFFLINE", "1").env("HF_ENDPOINT", "http://127.0.0.1:9");
        }
        let run = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(run.status.success(), "{err}");
        err
    };
    let err = train("online", true);
    assert!(err.contains("120 training and 40 held-out preference pairs"), "{err}");
    let asked = asked.lock().unwrap().clone();
    // main holds a loading script only, so the Parquet conversion was listed and fetched.
    for path in [
        "/api/datasets/meet-fixtures/tldr/revision/main",
        "/api/datasets/meet-fixtures/tldr/revision/refs%2Fconvert%2Fparquet",
        "/datasets/meet-fixtures/tldr/resolve/refs%2Fconvert%2Fparquet/comparisons/train/0000.parquet",
        "/api/datasets/meet-fixtures/prefs/revision/main",
        "/datasets/meet-fixtures/prefs/resolve/main/data/test-00000-of-00001.parquet",
    ] {
        assert!(asked.iter().any(|a| a == path), "{path} not asked for: {asked:?}");
    }
    assert!(
        !asked.iter().any(|a| a.contains("validation") || a.contains("train-0000")),
        "other splits fetched: {asked:?}"
    );
    assert!(cache.join("datasets--meet-fixtures--tldr/refs/refs/convert/parquet").is_file());
    // The cache hf-hub wrote is read offline, with no server.
    let err = train("offline", false);
    assert!(err.contains("120 training and 40 held-out preference pairs"), "{err}");
}
