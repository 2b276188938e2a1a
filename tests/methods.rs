//! Every alignment method learns a known rule on a tiny model. The synthetic preference task:
//! a prompt is a few random letters and a colon; both responses name one of three words, and the
//! chosen one ends with the marker " yes" that the rejected one lacks. After training, generating
//! under `good` must end with the marker far more often than under `bad` (and than before
//! training). Rates are measured by sampling the saved output folders through the same path as
//! `meet generate --control`.

mod common;

use common::{metrics, tiny_raw};
use meet::controls::Controlled;
use meet::generate::SamplingParams;
use meet::methods::config::RunConfig;
use meet::LoadOptions;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};

const WORDS: [&str; 3] = ["cat", "dog", "sun"];

fn prompt(rng: &mut impl Rng) -> String {
    let n = rng.gen_range(2..5);
    let s: String = (0..n).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
    format!("{s}:")
}

/// The tiny model folder, the preference file, and held-out prompts.
fn task(dir: &Path) -> (String, PathBuf, Vec<String>) {
    task_on(dir, "llama")
}

/// [`task`] with a tiny model of architecture `arch` (`llama`, `gpt_neo` with a local window of
/// 8 keys, shorter than the sequences, or `gpt2`), the same tokenizer and width.
fn task_on(dir: &Path, arch: &str) -> (String, PathBuf, Vec<String>) {
    let model = dir.join("model");
    let mut raw = tiny_raw(11, 64);
    raw.config = match arch {
        "llama" => {
            let mut c = raw.config.clone();
            c["hidden_size"] = json!(64);
            c["intermediate_size"] = json!(128);
            c
        }
        "gpt_neo" => json!({
            "model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"], "vocab_size": 300,
            "hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64,
            "attention_layers": ["global", "local"], "window_size": 8, "initializer_range": 0.2,
            "bos_token_id": 257, "eos_token_id": 258,
        }),
        "gpt2" => json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 300, "n_embd": 64,
            "n_layer": 2, "n_head": 4, "n_positions": 64, "initializer_range": 0.2,
            "bos_token_id": 257, "eos_token_id": 258,
        }),
        other => panic!("no tiny {other}"),
    };
    raw.tensors = meet::models::random_weights(&raw.config, 11, &candle_core::Device::Cpu).unwrap();
    meet::models::pretrained::save_hf_folder(&raw, &model).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut lines = String::new();
    for _ in 0..96 {
        let w = WORDS[rng.gen_range(0..3)];
        let row = json!({"prompt": prompt(&mut rng), "chosen": format!(" {w} yes"), "rejected": format!(" {w}")});
        lines.push_str(&format!("{row}\n"));
    }
    let data = dir.join("prefs.jsonl");
    std::fs::write(&data, lines).unwrap();
    let held_out = (0..48).map(|_| prompt(&mut rng)).collect();
    (model.to_string_lossy().into_owned(), data, held_out)
}

fn config(method: &str, model: &str, data: &Path, out: &Path, set: &[(&str, &str)]) -> RunConfig {
    let text = format!(
        r#"
method = "{}"
output_dir = {:?}
[model]
source = {:?}
[data]
train = {:?}
max_length = 32
[train]
batch_size = 16
epochs = 40
lr = 3e-3
seed = 1
"#,
        method,
        out.to_string_lossy(),
        model,
        data.to_string_lossy()
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut set: Vec<(String, String)> = set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    // MEET_TEST_DTYPE=bf16 (scripts/test.sh sets it for a second pass): every method learns the
    // rule under bf16 mixed precision too.
    if let Ok(dtype) = std::env::var("MEET_TEST_DTYPE") {
        set.push(("train.dtype".into(), format!("{dtype:?}")));
    }
    // MEET_TEST_SEED=N: the same tests on another training seed, for seed sweeps by hand.
    if let Ok(seed) = std::env::var("MEET_TEST_SEED") {
        set.push(("train.seed".into(), seed));
    }
    RunConfig::from_table(table, &set).unwrap()
}

/// A training run gives the same bits whether or not another runs beside it in the process (as
/// tests do): a call that finds the kernel team busy splits its work as the team would. Whole-data
/// batches (96 rows of ~16 steps, width 64) are large enough for the row kernels (the norms'
/// weight gradients sum per-part partials) to go to the team.
#[test]
fn training_keeps_its_bits_beside_another_training() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, _) = task(dir.path());
    let set = [("model.train_weights", "true"), ("train.batch_size", "96"), ("train.epochs", "12")];
    let train = |name: &str| {
        let out = dir.path().join(name);
        meet::methods::run(&config("sft", &model, &data, &out, &set), false).unwrap();
        let losses: Vec<u64> = metrics(&out).iter().map(|s| s.loss.to_bits()).collect();
        (losses, std::fs::read(out.join("final/model.safetensors")).unwrap())
    };
    let alone = train("alone");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| train("a"));
        let b = s.spawn(|| train("b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(alone.0.len() >= 12, "{} steps", alone.0.len());
    for (name, run) in [("a", &a), ("b", &b)] {
        assert_eq!(run.0, alone.0, "run {name}'s losses");
        assert!(run.1 == alone.1, "run {name}'s weights differ from the run alone");
    }
}

/// Share of sampled completions (temperature 1, two per prompt) that end with the marker.
fn rate(model: &str, control: Option<&str>, prompts: &[String]) -> f64 {
    let c = Controlled::load(model, &LoadOptions::default()).unwrap();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| c.tokenizer().encode(p, true).unwrap()).collect();
    let mut hits = 0;
    for seed in [1, 2] {
        let params = SamplingParams { temperature: 1.0, seed, max_new_tokens: 10, ..Default::default() };
        let out = c.generate(&ids, control, &params, |_, _| Ok(())).unwrap();
        hits += out.iter().filter(|g| g.text.trim_end().ends_with("yes")).count();
    }
    hits as f64 / (2 * prompts.len()) as f64
}

fn final_dir(out: &Path) -> String {
    out.join("final").to_string_lossy().into_owned()
}

/// The starting model of every method: the tiny model fine-tuned on both responses of every
/// pair, so that it knows the words and ends about half its answers with the marker (a
/// "pretrained" model without a preference). Returns its folder and its marker rate.
fn pretrained(dir: &Path, model: &str, data: &Path, prompts: &[String]) -> (String, f64) {
    let mixed = dir.join("mixed.jsonl");
    let rows: String = std::fs::read_to_string(data)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ["chosen", "rejected"].map(|k| format!("{}\n", json!({"prompt": v["prompt"], "completion": v[k]})))
        })
        .collect();
    std::fs::write(&mixed, rows).unwrap();
    let out = dir.join("sft-mixed");
    meet::methods::run(&config("sft", model, &mixed, &out, &[("model.train_weights", "true")]), false).unwrap();
    let base = final_dir(&out);
    let r = rate(&base, None, prompts);
    (base, r)
}

/// Marker rates of a method trained from the pretrained tiny model: before training, after MEET's
/// step 1 (good, bad) when there is one, and at the end under `good` and `bad`.
struct Rates {
    base: f64,
    step1: Option<(f64, f64)>,
    good: f64,
    bad: f64,
}

fn train_and_rate(method: &str, set: &[(&str, &str)]) -> Rates {
    train_and_rate_on("llama", method, set)
}

fn train_and_rate_on(arch: &str, method: &str, set: &[(&str, &str)]) -> Rates {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, prompts) = task_on(dir.path(), arch);
    let (model, base) = pretrained(dir.path(), &model, &data, &prompts);
    let out = dir.path().join("run");
    meet::methods::run(&config(method, &model, &data, &out, set), false).unwrap();
    let both = |d: &str| (rate(d, Some("good"), &prompts), rate(d, Some("bad"), &prompts));
    let step1 = out.join("step1").is_dir().then(|| both(&final_dir(&out.join("step1"))));
    let (good, bad) = both(&final_dir(&out));
    // The largest gradient norm before clipping: how close the run came to a damaging spike.
    let max_grad = metrics(&out).iter().map(|s| s.grad_norm).fold(0.0, f64::max);
    eprintln!(
        "{arch} {method}: base {base:.2}, step 1 {step1:?}, good {good:.2}, bad {bad:.2}, max grad norm {max_grad:.1}"
    );
    Rates { base, step1, good, bad }
}

/// MEET with soft prompts (n 8) and with LoRA adapters (r 4) on the tiny task.
const MEET_PROMPT: [(&str, &str); 5] = [
    ("train.control_lr", "1e-1"),
    ("prompt.n", "8"),
    ("prompt.init", "\"sample_vocab\""),
    ("meet.step1.epochs", "80"),
    ("meet.step2.epochs", "40"),
];
const MEET_LORA: [(&str, &str); 4] = [
    ("train.control_lr", "1e-2"),
    ("lora.r", "4"),
    ("lora.alpha", "8"),
    ("lora.target_modules", r#"["q_proj", "v_proj", "down_proj"]"#),
];

/// `good` follows the rule, `bad` avoids it, and `good` far more than the model before training.
fn assert_controllable(r: &Rates) {
    assert!(r.good >= 0.8 && r.bad <= 0.2 && r.good > r.base + 0.3, "good {}, bad {}, base {}", r.good, r.bad, r.base);
}

#[test]
fn meet_with_soft_prompts_learns_the_rule() {
    let r = train_and_rate(
        "meet",
        &[
            ("train.control_lr", "1e-1"),
            ("prompt.n", "8"),
            ("prompt.init", "\"sample_vocab\""),
            ("meet.step1.epochs", "80"),
            ("meet.step2.epochs", "20"),
        ],
    );
    // Step 1 alone (the model frozen) already separates the two behaviours.
    let (g1, b1) = r.step1.unwrap();
    assert!(g1 >= 0.6 && g1 - b1 >= 0.4, "step 1: good {g1}, bad {b1}");
    assert_controllable(&r);
}

#[test]
fn meet_with_lora_controls_learns_the_rule() {
    let r = train_and_rate("meet", &MEET_LORA);
    let (g1, b1) = r.step1.unwrap();
    assert!(g1 >= 0.6 && g1 - b1 >= 0.4, "step 1: good {g1}, bad {b1}");
    assert_controllable(&r);
}

/// MEET (step 1 + step 2, soft prompts) on the paper's architecture and on GPT-2.
#[test]
fn meet_learns_the_rule_on_gpt_neo_and_gpt2() {
    // Step 2 at the other methods' lr (3e-3) is unstable on GPT-Neo: gradient norms spike to
    // 22-220 before clipping, and on some seeds the last spike leaves a damaged model (an AVX2-only
    // Zen 3, bf16, seed 1: good 0.36; an Intel Xeon, seeds 1-4 x f32 / bf16 / bf16 on the f32
    // kernels: 3 of 12 runs below 0.8, f32 seed 4 at 0.50). At 1e-3 the spikes stay under 70 and
    // every one of those 12 runs, and of the same 12 on GPT-2, ends with good 0.96-1.00, bad 0.00.
    let recipe = [MEET_PROMPT.as_slice(), &[("meet.step2.lr", "1e-3")]].concat();
    for arch in ["gpt_neo", "gpt2"] {
        let r = train_and_rate_on(arch, "meet", &recipe);
        let (g1, b1) = r.step1.unwrap();
        assert!(g1 - b1 >= 0.3, "{arch} step 1: good {g1}, bad {b1}");
        assert_controllable(&r);
    }
}

#[test]
fn control_tokens_learn_the_rule() {
    assert_controllable(&train_and_rate("control-token", &[("model.train_weights", "true")]));
}

#[test]
fn chain_of_hindsight_learns_the_rule() {
    assert_controllable(&train_and_rate("coh", &[("model.train_weights", "true")]));
}

#[test]
fn dpo_raises_the_margin_and_follows_the_rule() {
    dpo_on("llama");
}

#[test]
fn dpo_follows_the_rule_on_gpt_neo_and_gpt2() {
    dpo_on("gpt_neo");
    dpo_on("gpt2");
}

fn dpo_on(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, prompts) = task_on(dir.path(), arch);
    // The reference is the SFT model.
    let (sft, before) = pretrained(dir.path(), &model, &data, &prompts);

    let out = dir.path().join("dpo");
    let set = [("model.train_weights", "true"), ("train.epochs", "30"), ("train.lr", "3e-4"), ("dpo.beta", "0.1")];
    let cfg = config("dpo", &sft, &data, &out, &set);
    meet::methods::run(&cfg, false).unwrap();
    let after = rate(&final_dir(&out), None, &prompts);
    let logs = metrics(&out);
    let (first, last) = (&logs[0], logs.last().unwrap());
    eprintln!(
        "{arch} dpo: rule {before:.2} -> {after:.2}; margin {:.3} -> {:.3}, accuracy {:.2} -> {:.2}, loss {:.3} -> {:.3}",
        first.extra["rewards/margins"],
        last.extra["rewards/margins"],
        first.extra["rewards/accuracies"],
        last.extra["rewards/accuracies"],
        first.loss,
        last.loss
    );
    // The reference pass batches the pairs differently from the policy's first step; in f32 that
    // moves the loss by < 1e-4, under bf16 autocast the operands' rounding can amplify it (gpt2 on
    // an AVX2-only processor: 0.69305, 9.7e-5 off ln 2, with 0.81 of the pairs "won").
    let bf16 = std::env::var("MEET_TEST_DTYPE").is_ok_and(|d| d == "bf16");
    let tol = if bf16 { 2e-3 } else { 1e-4 };
    assert!((first.loss - std::f64::consts::LN_2).abs() < tol, "first DPO loss {}", first.loss);
    assert!(last.extra["rewards/margins"] > 1.0 && last.extra["rewards/accuracies"] >= 0.9);
    // The sampled rule rate of the trained model: under bf16 autocast SFT and DPO reach the
    // same DPO loss, margin and accuracy as in f32 (gpt_neo: 0.130, 1.97, 1.00 against 0.133,
    // 1.95, 1.00) but a different model, whose 96 samples follow the rule at 0.74 (f32: 0.85).
    let floor = if bf16 { 0.7 } else { 0.75 };
    assert!(after >= floor && after > before + 0.25, "{arch}: rule rate {before} -> {after}");
    assert!(out.join("reference_logps.json").is_file());
}

fn meet_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_meet")).args(args).output().unwrap()
}

#[test]
fn the_cli_trains_from_a_config_with_flag_overrides_and_generates_under_a_control() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, prompts) = task(dir.path());
    let (model, _) = pretrained(dir.path(), &model, &data, &prompts);
    let out = dir.path().join("cli");
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "method = \"control-token\"\noutput_dir = {:?}\n[model]\nsource = {model:?}\ntrain_weights = true\n[data]\ntrain = {:?}\n[train]\nbatch_size = 16\nlr = 1e-4\n",
            out.to_string_lossy(),
            data.to_string_lossy()
        ),
    )
    .unwrap();
    // Flags override the file: the learning rate, the epochs, a nested key.
    let o = meet_cli(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--lr",
        "3e-3",
        "--epochs",
        "40",
        "--set",
        "train.seed=1",
        "--set",
        "control_token.template=<{name}>",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains("lr = 0.003") && saved.contains("epochs = 40") && saved.contains("template = \"<{name}>\""));
    let fin = out.join("final");
    let spec = std::fs::read_to_string(fin.join("meet_controls.json")).unwrap();
    assert!(spec.contains("\"<good>\""), "{spec}");
    let generate = |control: &str| {
        let mut args =
            vec!["generate", "--model", fin.to_str().unwrap(), "--control", control, "--max-new-tokens", "10"];
        for p in &prompts[..8] {
            args.extend(["--prompt", p.as_str()]);
        }
        let o = meet_cli(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .trim_end()
                    .ends_with("yes")
            })
            .count()
    };
    let (good, bad) = (generate("good"), generate("bad"));
    assert!(good >= 6 && bad <= 2, "greedy: {good}/8 good and {bad}/8 bad end with the marker");
    // An unknown control is an error that lists the known ones.
    let o = meet_cli(&["generate", "--model", fin.to_str().unwrap(), "--control", "neutral", "--prompt", "ab:"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unknown control 'neutral'") && err.contains("good, bad"), "{err}");
    // Resuming a finished run trains nothing more.
    let o = meet_cli(&[
        "train",
        cfg.to_str().unwrap(),
        "--resume",
        "--lr",
        "3e-3",
        "--epochs",
        "40",
        "--set",
        "train.seed=1",
        "--set",
        "control_token.template=<{name}>",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_cli_runs_without_a_config_and_reports_bad_data_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, _) = task(dir.path());
    let out = dir.path().join("flags");
    let args = |data: &str| {
        vec![
            "train".to_string(),
            "--method".into(),
            "sft".into(),
            "--model".into(),
            model.clone(),
            "--data".into(),
            data.to_string(),
            "--output-dir".into(),
            out.to_string_lossy().into_owned(),
            "--max-steps".into(),
            "2".into(),
            "--set".into(),
            "model.train_weights=true".into(),
        ]
    };
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_meet")).args(args(data.to_str().unwrap())).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics(&out).len(), 2);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n",
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_meet")).args(args(bad.to_str().unwrap())).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.jsonl") && err.contains("line 2: missing field 'rejected'"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // --skip-invalid trains on what is usable.
    let mut a = args(bad.to_str().unwrap());
    a.push("--skip-invalid".into());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_meet")).args(a).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("skipped 1 of 2 records"), "{err}");
}

#[test]
fn control_tokens_grow_a_full_vocabulary_and_survive_saving() {
    let mut raw = tiny_raw(4, 64);
    // A vocabulary with no spare rows: the new tokens need new rows.
    raw.config["vocab_size"] = json!(raw.tokenizer.vocab_size());
    raw.tensors = meet::models::random_weights(&raw.config, 4, &candle_core::Device::Cpu).unwrap();
    let rows = raw.tokenizer.vocab_size();
    let old = raw.tensors["model.embed_tokens.weight"].clone();
    meet::methods::control_token::add_tokens(&mut raw, &["<|good|>".into(), "<|bad|>".into()], 0).unwrap();
    let emb = raw.tensors["model.embed_tokens.weight"].clone();
    assert_eq!(emb.dims2().unwrap().0, rows + 2);
    assert_eq!(raw.config["vocab_size"], json!(rows + 2));
    assert_eq!(raw.tokenizer.token_id("<|good|>"), Some(rows as u32));
    // Old rows untouched; new rows near the mean of the old ones, and not equal to each other.
    assert_eq!(common::max_diff(&emb.narrow(0, 0, rows).unwrap(), &old), 0.0);
    let mean = old.mean_keepdim(0).unwrap();
    let new = emb.narrow(0, rows, 2).unwrap();
    assert!(common::max_diff(&new, &mean.broadcast_as((2, old.dims()[1])).unwrap().contiguous().unwrap()) < 0.05);
    assert!(common::max_diff(&new.narrow(0, 0, 1).unwrap(), &new.narrow(0, 1, 1).unwrap()) > 0.0);
    // The saved folder reads back with the tokens special (never split) and the grown matrix.
    let dir = tempfile::tempdir().unwrap();
    meet::models::pretrained::save_hf_folder(&raw, dir.path()).unwrap();
    let p = meet::Pretrained::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let ids = p.tokenizer.encode("<|bad|>hi", false).unwrap();
    assert_eq!(ids[0], rows as u32 + 1);
    assert_eq!(p.tokenizer.decode(&ids, true).unwrap(), "hi");
    assert_eq!(p.model.vocab_size(), rows + 2);
}

#[test]
fn every_example_config_is_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let table: toml::Table = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            if table.contains_key("methods") {
                // An experiment file: every method's run configuration must build.
                meet::experiment::Experiment::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
                continue;
            }
            let cfg = RunConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(
                dir.parent().unwrap().join(&cfg.data.train).is_file(),
                "{}: no {}",
                p.display(),
                cfg.data.train.display()
            );
            n += 1;
        }
    }
    assert!(n >= 6, "{n} example configs");
}

#[test]
fn meet_ablations_and_frozen_controls() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, _) = task(dir.path());
    let common = [("prompt.n", "2"), ("train.max_steps", "3"), ("train.control_lr", "1e-2")];
    let with =
        |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> { common.iter().chain(extra).copied().collect() };
    let prompt = |dir: &Path, name: &str| {
        let (_, t) = meet::peft::folder::read_prompt(&dir.join("prompts").join(name)).unwrap();
        t
    };
    // Step 1 only: the controls train, the model does not (no model folder is written).
    let out = dir.path().join("s1");
    meet::methods::run(&config("meet", &model, &data, &out, &with(&[("meet.steps", "step1")])), false).unwrap();
    assert!(out.join("final/prompts/good").is_dir() && !out.join("final/config.json").exists());
    // Step 2 only: fresh controls trained jointly with the model.
    let out = dir.path().join("s2");
    meet::methods::run(&config("meet", &model, &data, &out, &with(&[("meet.steps", "step2")])), false).unwrap();
    assert!(out.join("final/config.json").is_file() && !out.join("step1").exists());
    // Both steps with frozen controls: step 2 keeps step 1's prompts; without freezing they move.
    for (freeze, out) in [("true", "frozen"), ("false", "moving")] {
        let out = dir.path().join(out);
        meet::methods::run(&config("meet", &model, &data, &out, &with(&[("meet.freeze_controls", freeze)])), false)
            .unwrap();
        let d = common::max_diff(&prompt(&out.join("step1/final"), "good"), &prompt(&out.join("final"), "good"));
        assert_eq!(d == 0.0, freeze == "true", "freeze {freeze}: prompt moved by {d}");
    }
}

#[test]
fn dpo_with_a_lora_adapter_uses_the_base_as_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, prompts) = task(dir.path());
    let (sft, before) = pretrained(dir.path(), &model, &data, &prompts);
    let out = dir.path().join("dpo-lora");
    let set = [
        ("train.epochs", "20"),
        ("train.lr", "3e-3"),
        ("lora.r", "8"),
        ("lora.alpha", "16"),
        ("lora.target_modules", r#"["q_proj", "v_proj", "up_proj", "down_proj"]"#),
    ];
    meet::methods::run(&config("dpo", &sft, &data, &out, &set), false).unwrap();
    let logs = metrics(&out);
    // B = 0 at the start: the policy is the base, so the first loss is exactly log 2.
    assert!((logs[0].loss - std::f64::consts::LN_2).abs() < 1e-5, "{}", logs[0].loss);
    assert!(out.join("final/lora/adapter_model.safetensors").is_file() && !out.join("final/config.json").exists());
    let after = rate(&final_dir(&out), None, &prompts);
    let last = logs.last().unwrap();
    eprintln!("dpo lora: rule {before:.2} -> {after:.2}, margin {:.3}", last.extra["rewards/margins"]);
    assert!(last.extra["rewards/margins"] > 0.5 && after > before + 0.2, "rule {before} -> {after}");
}

#[test]
fn a_reward_model_learns_the_rule_and_judges_with_it() {
    use meet::eval::Judge;
    let dir = tempfile::tempdir().unwrap();
    let (model, data, _) = task(dir.path());
    let out = dir.path().join("rm");
    let set =
        [("model.train_weights", "true"), ("train.epochs", "10"), ("train.lr", "1e-3"), ("reward.eval_share", "0.25")];
    meet::methods::run(&config("reward", &model, &data, &out, &set), false).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/reward_eval.json")).unwrap()).unwrap();
    eprintln!("reward model: {report}");
    assert_eq!(report["held_out_pairs"], 24);
    assert!(report["accuracy"].as_f64().unwrap() >= 0.95, "{report}");
    assert!(report["accuracy_before"].as_f64().unwrap() <= 0.75, "{report}");
    let logs = metrics(&out);
    assert!(logs.last().unwrap().extra["accuracy"] > logs[0].extra["accuracy"]);
    // The saved folder is a sequence classifier and scores marker answers above plain ones.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    let judge = meet::eval::reward_model::RewardModel::load(out.join("final").to_str().unwrap()).unwrap();
    let s = judge.score(&[("xyz:", " cat yes"), ("xyz:", " cat"), ("qq:", " sun yes"), ("qq:", " sun")]).unwrap();
    assert!(s[0] > s[1] && s[2] > s[3], "{s:?}");
    // As the judge of `meet pairs`: a wrong folder is a clear error.
    assert!(meet::eval::reward_model::RewardModel::load(&model).is_err());
}

// Several preference dimensions: two independent markers, each taught only by its own
// dimension's pairs — `tone` ends the chosen answer with " yes" (controls `affirm` / `neutral`),
// `lead` starts it with " so" (controls `so` / `direct`). In every pair the other marker is drawn
// at random and is the same in both responses, so a pair says nothing about the other dimension.
// Under each of the four combinations, both markers must follow their own control.

const DIMENSIONS: &str = r#"{ tone = ["affirm", "neutral"], lead = ["so", "direct"] }"#;
const COMBINATIONS: [(&str, bool, bool); 4] = [
    ("affirm,so", true, true),
    ("affirm,direct", true, false),
    ("neutral,so", false, true),
    ("neutral,direct", false, false),
];

/// The tiny model, the two dimensions' pairs (96 each) and held-out prompts.
fn two_marker_task(dir: &Path) -> (String, PathBuf, Vec<String>) {
    let (model, _, _) = task(dir);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut lines = String::new();
    let answer =
        |so: bool, w: &str, yes: bool| format!("{}{w}{}", if so { " so " } else { " " }, if yes { " yes" } else { "" });
    for _ in 0..96 {
        let w = WORDS[rng.gen_range(0..3)];
        let so = rng.gen_bool(0.5);
        let p = prompt(&mut rng);
        let row =
            json!({"prompt": p, "chosen": answer(so, w, true), "rejected": answer(so, w, false), "dimension": "tone"});
        lines.push_str(&format!("{row}\n"));
        let w = WORDS[rng.gen_range(0..3)];
        let yes = rng.gen_bool(0.5);
        let p = prompt(&mut rng);
        let row = json!({"prompt": p, "chosen": answer(true, w, yes), "rejected": answer(false, w, yes), "dimension": "lead"});
        lines.push_str(&format!("{row}\n"));
    }
    let data = dir.join("two-dimensions.jsonl");
    std::fs::write(&data, lines).unwrap();
    let held_out = (0..48).map(|_| prompt(&mut rng)).collect();
    (model, data, held_out)
}

/// Shares of sampled answers (temperature 1, two per prompt) ending with " yes" and starting with
/// " so", under `control`.
fn marker_rates(model: &str, control: Option<&str>, prompts: &[String]) -> (f64, f64) {
    let c = Controlled::load(model, &LoadOptions::default()).unwrap();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| c.tokenizer().encode(p, true).unwrap()).collect();
    let (mut yes, mut so) = (0, 0);
    for seed in [1, 2] {
        let params = SamplingParams { temperature: 1.0, seed, max_new_tokens: 12, ..Default::default() };
        for g in c.generate(&ids, control, &params, |_, _| Ok(())).unwrap() {
            yes += g.text.trim_end().ends_with("yes") as usize;
            so += g.text.trim_start().starts_with("so ") as usize;
        }
    }
    let n = (2 * prompts.len()) as f64;
    (yes as f64 / n, so as f64 / n)
}

/// Marker rates `(yes, so)` of a model trained on both dimensions at once: under each
/// combination of [`COMBINATIONS`], and under each control alone.
struct TwoDimensionRates {
    combos: Vec<(f64, f64)>,
    alone: Vec<(&'static str, f64, f64)>,
}

/// Trains `method` on both dimensions at once from the pretrained tiny model and measures it
/// (printed: the README's two-dimension rates come from these lines).
fn train_two_dimensions(method: &str, set: &[(&str, &str)]) -> TwoDimensionRates {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, prompts) = two_marker_task(dir.path());
    let (model, _) = pretrained(dir.path(), &model, &data, &prompts);
    let base = marker_rates(&model, None, &prompts);
    let out = dir.path().join("run");
    let mut set = set.to_vec();
    set.push(("model.dimensions", DIMENSIONS));
    meet::methods::run(&config(method, &model, &data, &out, &set), false).unwrap();
    let mut report = format!("{method} {:?}: base yes {:.2} so {:.2}", &set[..set.len() - 1], base.0, base.1);
    let mut combos = Vec::new();
    for (combo, _, _) in COMBINATIONS {
        let (ry, rs) = marker_rates(&final_dir(&out), Some(combo), &prompts);
        report.push_str(&format!("; {combo}: yes {ry:.2} so {rs:.2}"));
        combos.push((ry, rs));
    }
    let mut alone = Vec::new();
    for single in ["affirm", "neutral", "so", "direct"] {
        let (ry, rs) = marker_rates(&final_dir(&out), Some(single), &prompts);
        report.push_str(&format!("; alone {single}: yes {ry:.2} so {rs:.2}"));
        alone.push((single, ry, rs));
    }
    if out.join("step1").is_dir() {
        for (combo, _, _) in COMBINATIONS {
            let (ry, rs) = marker_rates(&final_dir(&out.join("step1")), Some(combo), &prompts);
            report.push_str(&format!("; step 1 {combo}: yes {ry:.2} so {rs:.2}"));
        }
    }
    eprintln!("{report}");
    TwoDimensionRates { combos, alone }
}

/// A marker is on (rate ≥ 0.7) where its control asks for it and off (≤ 0.3) where the other
/// control of its dimension is given.
fn follows(rate: f64, on: bool) -> bool {
    if on {
        rate >= 0.7
    } else {
        rate <= 0.3
    }
}

/// Each control alone steers its own marker.
fn assert_each_alone(r: &TwoDimensionRates) {
    for (control, ry, rs) in &r.alone {
        let ok = match *control {
            "affirm" => follows(*ry, true),
            "neutral" => follows(*ry, false),
            "so" => follows(*rs, true),
            _ => follows(*rs, false),
        };
        assert!(ok, "{control} alone: yes {ry:.2}, so {rs:.2}");
    }
}

/// Under each of the four combinations both markers follow their own control.
fn assert_composes(r: &TwoDimensionRates) {
    for ((combo, yes, so), (ry, rs)) in COMBINATIONS.iter().zip(&r.combos) {
        assert!(follows(*ry, *yes) && follows(*rs, *so), "{combo}: yes {ry:.2}, so {rs:.2}");
    }
}

/// MEET's step 2 on whole combinations (labelled by step 1's controls) is what makes the prompts
/// compose: with `meet.combinations = "single"` each prompt alone works (asserted) but
/// combinations do not (printed; the README gives both sets of rates).
#[test]
fn meet_with_soft_prompts_composes_two_dimensions() {
    assert_composes(&train_two_dimensions("meet", &MEET_PROMPT));
    let single = [MEET_PROMPT.as_slice(), &[("meet.combinations", "\"single\"")]].concat();
    assert_each_alone(&train_two_dimensions("meet", &single));
}

#[test]
fn meet_with_lora_controls_composes_two_dimensions() {
    assert_composes(&train_two_dimensions("meet", &MEET_LORA));
    // LoRA deltas compose without step 2 seeing combinations too.
    let single = [MEET_LORA.as_slice(), &[("meet.combinations", "\"single\"")]].concat();
    assert_composes(&train_two_dimensions("meet", &single));
}

/// Control tokens are trained one token per sequence (a pair names one dimension), so two tokens
/// together are never seen in training. They compose on the AVX-512 kernels, but on an AVX2-only
/// processor (different sums, so different bits) `neutral,so` gives yes 0.46: the composition is
/// not robust (README). Asserted: each token alone; the combinations are printed.
#[test]
fn control_tokens_steer_two_dimensions_one_at_a_time() {
    assert_each_alone(&train_two_dimensions("control-token", &[("model.train_weights", "true")]));
}

/// Chain-of-Hindsight as published composes by writing several phrases after the prompt, which
/// its training never shows (each response follows one phrase): each phrase alone steers its own
/// marker, but under two phrases the markers do not follow (a finding, in the README). Asserted:
/// each phrase alone.
#[test]
fn chain_of_hindsight_learns_each_dimension_alone() {
    assert_each_alone(&train_two_dimensions("coh", &[("model.train_weights", "true")]));
}

/// RiC on the same task: every response of both dimensions' pairs as a supervised row scored on
/// both objectives (marker present: 1, absent: 0); the combinations ask for z-scores of ±1.
#[test]
fn rewards_in_context_composes_two_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, prompts) = two_marker_task(dir.path());
    let (model, _) = pretrained(dir.path(), &model, &data, &prompts);
    let scored = dir.path().join("scored.jsonl");
    let rows: String = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ["chosen", "rejected"].map(|k| {
                let r = v[k].as_str().unwrap();
                let scores = json!({"tone": r.ends_with("yes") as u8, "lead": r.starts_with(" so ") as u8});
                format!("{}\n", json!({"prompt": v["prompt"], "completion": r, "scores": scores}))
            })
        })
        .collect();
    std::fs::write(&scored, rows).unwrap();
    let out = dir.path().join("ric");
    let set = [("model.train_weights", "true"), ("ric.objectives", r#"["tone", "lead"]"#)];
    meet::methods::run(&config("ric", &model, &scored, &out, &set), false).unwrap();
    let spec = std::fs::read_to_string(out.join("final/meet_controls.json")).unwrap();
    assert!(spec.contains("\"scores\"") && spec.contains("<tone>") && spec.contains("score_stats"), "{spec}");
    // The requested scores are those of a response with (1) or without (0) the marker, in the
    // normalised units the training text used (a tiny model does not interpolate between numbers).
    let stats: Vec<[f64; 2]> = serde_json::from_str::<serde_json::Value>(&spec).unwrap()["score_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| [s[0].as_f64().unwrap(), s[1].as_f64().unwrap()])
        .collect();
    let z = |j: usize, on: bool| (on as u8 as f64 - stats[j][0]) / stats[j][1];
    let mut report = String::from("ric:");
    for (combo, yes, so) in COMBINATIONS {
        let control = format!("tone={:.2},lead={:.2}", z(0, yes), z(1, so));
        let (ry, rs) = marker_rates(&final_dir(&out), Some(&control), &prompts);
        report.push_str(&format!(" {combo} ({control}): yes {ry:.2} so {rs:.2};"));
        assert!(follows(ry, yes) && follows(rs, so), "{report}");
    }
    eprintln!("{report}");
}
