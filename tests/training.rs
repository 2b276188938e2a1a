//! The training engine on tiny models: gradients of every trainable kind, PEFT adapter folders in
//! both directions, per-row controls, and resuming a killed run.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{check_finite_differences, lora_config, max_diff, seeded_normal, tiny_raw};
use meet::data::Example;
use meet::objectives::lm::LanguageModeling;
use meet::objectives::Objective;
use meet::peft::folder;
use meet::peft::lora::{Adapters, Routing, TARGETABLE};
use meet::peft::prompt::{PromptConfig, SoftPrompts};
use meet::policy::{Batch, Policy};
use meet::{LoadOptions, Pretrained};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn examples() -> Vec<Example> {
    vec![
        Example { ids: vec![1, 5, 9, 33, 7, 2, 90], start: 2, controls: vec![0], ..Default::default() },
        Example { ids: vec![8, 8, 100, 3, 250], start: 1, controls: vec![1], ..Default::default() },
        Example { ids: vec![4, 44, 144, 14, 41, 240, 24, 42], start: 3, controls: vec![0], ..Default::default() },
    ]
}

fn loss(policy: &Policy, ex: &[Example]) -> Tensor {
    let refs: Vec<&Example> = ex.iter().collect();
    let obj = LanguageModeling { pad_id: 256 };
    obj.loss(policy, &refs).unwrap().sum.affine(1.0 / obj.units(&refs) as f64, 0.0).unwrap()
}

/// A tiny model wrapped by two adapters whose `B` is non-zero (fresh ones have B = 0, which would
/// hide A's gradient).
fn lora_policy() -> (Policy, std::sync::Arc<Adapters>) {
    let adapters = Adapters::new(
        vec![
            ("good".into(), lora_config(4, TARGETABLE)),
            ("bad".into(), lora_config(2, &["q_proj", "v_proj", "down_proj"])),
        ],
        7,
    )
    .unwrap();
    let p = Pretrained::from_raw(
        tiny_raw(11, 64),
        &LoadOptions { adapters: Some(adapters.source()), ..Default::default() },
    )
    .unwrap();
    for (k, v) in adapters.varmap.data().lock().unwrap().iter() {
        if k.contains("lora_B") {
            v.set(&seeded_normal(k, 0.3, v.shape())).unwrap();
        }
    }
    (Policy { pretrained: p, lora: Some(adapters.clone()), prompts: None }, adapters)
}

#[test]
fn lora_gradients_match_finite_differences_and_the_base_gets_none() {
    let (policy, adapters) = lora_policy();
    let mut vars: Vec<(String, Var)> =
        adapters.varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    // 2 layers: "good" wraps 7 modules, "bad" 3; an A and a B each.
    assert_eq!(vars.len(), 2 * (7 + 3) * 2);
    let ex = examples();
    check_finite_differences(&vars, &|| loss(&policy, &ex));
}

#[test]
fn soft_prompt_gradients_match_finite_differences() {
    let p = Pretrained::from_raw(tiny_raw(12, 64), &LoadOptions::default()).unwrap();
    let names = vec!["good".to_string(), "bad".to_string()];
    let cfg = PromptConfig { n: 3, ..Default::default() };
    let prompts = SoftPrompts::new(&names, &cfg, p.model.as_ref(), &p.tokenizer, 5, &Device::Cpu).unwrap();
    let vars: Vec<(String, Var)> = names.iter().cloned().zip(prompts.vars.iter().cloned()).collect();
    let policy = Policy { pretrained: p, lora: None, prompts: Some(prompts) };
    let ex = examples();
    check_finite_differences(&vars, &|| loss(&policy, &ex));
}

#[test]
fn an_untrained_adapter_leaves_logits_unchanged_and_rows_follow_their_control() {
    let adapters =
        Adapters::new(vec![("good".into(), lora_config(4, TARGETABLE)), ("bad".into(), lora_config(4, TARGETABLE))], 3)
            .unwrap();
    let p = Pretrained::from_raw(
        tiny_raw(13, 64),
        &LoadOptions { adapters: Some(adapters.source()), ..Default::default() },
    )
    .unwrap();
    let ids = Tensor::new(&[[3u32, 70, 12, 5, 199, 42]], &Device::Cpu).unwrap();
    adapters.route(Routing::Off);
    let base = p.model.forward(&ids).unwrap();
    adapters.route(Routing::All(0));
    assert!(max_diff(&p.model.forward(&ids).unwrap(), &base) == 0.0, "B = 0 must leave the logits as they are");
    for (k, v) in adapters.varmap.data().lock().unwrap().iter() {
        v.set(&seeded_normal(k, 0.1, v.shape())).unwrap();
    }
    let single = |i: usize| {
        adapters.route(Routing::All(i));
        p.model.forward(&ids).unwrap()
    };
    let (good, bad) = (single(0), single(1));
    assert!(max_diff(&good, &base) > 1e-3 && max_diff(&good, &bad) > 1e-3);
    // A mixed batch: row 0 bad, row 1 good, row 2 no adapter — each as if alone.
    let batch = Tensor::cat(&[&ids, &ids, &ids], 0).unwrap();
    adapters.route(Routing::PerRow(vec![Some(1), Some(0), None]));
    let mixed = p.model.forward(&batch).unwrap();
    // Different batch sizes take different gemm blockings: equal up to f32 rounding.
    assert!(max_diff(&mixed.narrow(0, 0, 1).unwrap(), &bad) < 1e-4);
    assert!(max_diff(&mixed.narrow(0, 1, 1).unwrap(), &good) < 1e-4);
    assert!(max_diff(&mixed.narrow(0, 2, 1).unwrap(), &base) < 1e-4);
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("peft_expected.json")).unwrap()).unwrap()
}

fn rows(v: &serde_json::Value) -> Tensor {
    let r: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    let (n, m) = (r.len(), r[0].len());
    Tensor::from_vec(r.concat(), (1, n, m), &Device::Cpu).unwrap()
}

#[test]
fn lora_adapters_saved_by_peft_give_peft_logits() {
    // tests/fixtures/peft-lora: "default" (r 4, all projections) at the root, "bad" (r 2, rsLoRA,
    // q/v) in bad/, saved by PEFT 0.21 from scripts/make_peft_fixtures.py.
    let exp = expected();
    let dir = fixtures().join("peft-lora");
    assert_eq!(folder::adapter_names(&dir).unwrap(), vec!["default", "bad"]);
    let mut specs = Vec::new();
    let mut weights = Vec::new();
    for name in ["default", "bad"] {
        let (cfg, t) = folder::read_lora(&folder::adapter_dir(&dir, name)).unwrap();
        specs.push((name.to_string(), cfg));
        weights.push(t);
    }
    assert!(specs[1].1.use_rslora && specs[1].1.r == 2);
    let adapters = Adapters::new(specs, 0).unwrap();
    let model = fixtures().join("tiny-llama3");
    let p = Pretrained::load(
        model.to_str().unwrap(),
        &LoadOptions { adapters: Some(adapters.source()), ..Default::default() },
    )
    .unwrap();
    folder::load_lora(&adapters, &dir).unwrap();
    let ids: Vec<u32> = serde_json::from_value(exp["ids"].clone()).unwrap();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    adapters.route(Routing::Off);
    let d = max_diff(&p.model.forward(&ids).unwrap(), &rows(&exp["base"]));
    assert!(d < 1e-4, "base {d}");
    for (i, name) in ["default", "bad"].iter().enumerate() {
        adapters.route(Routing::All(i));
        let d = max_diff(&p.model.forward(&ids).unwrap(), &rows(&exp[format!("lora_{name}")]));
        assert!(d < 1e-4, "{name}: max |logit diff| {d} vs PEFT");
    }
    // Saving them again gives PEFT's layout, keys and values.
    let out = tempfile::tempdir().unwrap();
    folder::save_lora(&adapters, out.path(), "tiny").unwrap();
    for name in ["default", "bad"] {
        let (cfg, t) = folder::read_lora(&folder::adapter_dir(out.path(), name)).unwrap();
        let (cfg0, t0) = folder::read_lora(&folder::adapter_dir(&dir, name)).unwrap();
        assert_eq!(cfg.r, cfg0.r);
        let mut k: Vec<_> = t.keys().collect();
        let mut k0: Vec<_> = t0.keys().collect();
        k.sort();
        k0.sort();
        assert_eq!(k, k0);
        assert!(t.iter().all(|(n, v)| max_diff(v, &t0[n]) == 0.0));
    }
}

#[test]
fn a_peft_adapter_saved_in_its_own_module_order_starts_a_run() {
    // PEFT saves target_modules as a set, in its own order (here down_proj, v_proj, q_proj); a
    // run listing the same modules in another order starts from it, with PEFT's logits.
    let exp = expected();
    let dir = fixtures().join("peft-lora-order");
    let saved = folder::read_lora(&dir).unwrap().0.target_modules;
    let listed = ["q_proj", "v_proj", "down_proj"];
    assert_ne!(saved, listed, "the fixture must store another order than the run lists");
    let model = fixtures().join("tiny-llama3");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"ab\"}\n").unwrap();
    let cfg = |r: usize, targets: &[&str]| {
        let mut c = meet::methods::config::RunConfig::new(
            "sft",
            model.to_str().unwrap(),
            meet::methods::config::DataSection::new(&data),
            tmp.path().join("run"),
        )
        .unwrap();
        c.lora = Some(lora_config(r, targets));
        c.model.init_adapters = Some(dir.clone());
        c
    };
    let built = meet::methods::setup::standard(&cfg(4, &listed)).unwrap();
    let p = &built.policy.pretrained;
    built.policy.lora.as_ref().unwrap().route(Routing::All(0));
    let ids: Vec<u32> = serde_json::from_value(exp["ids"].clone()).unwrap();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let d = max_diff(&p.model.forward(&ids).unwrap(), &rows(&exp["lora_order"]));
    assert!(d < 1e-4, "max |logit diff| {d} vs PEFT");
    // A real difference is named, field by field.
    let err = |c| meet::methods::setup::standard(&c).err().expect("the adapter should be refused").to_string();
    let e = err(cfg(8, &listed));
    assert!(e.contains("adapter_config.json") && e.contains("r: 4 vs 8") && !e.contains("target_modules"), "{e}");
    let e = err(cfg(4, &["q_proj", "k_proj", "down_proj"]));
    assert!(e.contains("target_modules: [down_proj, q_proj, v_proj] vs [down_proj, k_proj, q_proj]"), "{e}");
}

#[test]
fn merging_a_peft_adapter_gives_its_logits_without_the_adapter() {
    // PEFT's merge_and_unload: W + s B A. The merged HF folder alone must give PEFT's adapter logits.
    let exp = expected();
    let model = fixtures().join("tiny-llama3");
    let (cfg, tensors) = folder::read_lora(&fixtures().join("peft-lora")).unwrap();
    let merged = meet::peft::merge::merge(model.to_str().unwrap(), &cfg, &tensors).unwrap();
    let out = tempfile::tempdir().unwrap();
    meet::models::pretrained::save_hf_folder(&merged, out.path()).unwrap();
    let p = Pretrained::load(out.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(exp["ids"].clone()).unwrap();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let d = max_diff(&p.model.forward(&ids).unwrap(), &rows(&exp["lora_default"]));
    assert!(d < 1e-4, "merged model vs PEFT adapter logits: {d}");
}

#[test]
fn soft_prompts_saved_by_peft_give_peft_logits() {
    let exp = expected();
    let dir = fixtures().join("peft-prompt");
    let (cfg, t) = folder::read_prompt(&dir).unwrap();
    assert_eq!((cfg.n, t.dims()), (3, &[3usize, 32][..]));
    let model = fixtures().join("tiny-llama3");
    let p = Pretrained::load(model.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let prompts = SoftPrompts::new(&["default".into()], &cfg, p.model.as_ref(), &p.tokenizer, 0, &Device::Cpu).unwrap();
    folder::load_prompts(&prompts, &dir).unwrap();
    let policy = Policy { pretrained: p, lora: None, prompts: Some(prompts) };
    let ids: Vec<u32> = serde_json::from_value(exp["ids"].clone()).unwrap();
    let batch = Batch::from_rows(&[(ids.clone(), 0)], 0).unwrap();
    let (h, n) = policy.hidden(&batch).unwrap();
    let logits = policy.pretrained.model.lm_head(&h.narrow(1, n, ids.len()).unwrap()).unwrap();
    let d = max_diff(&logits, &rows(&exp["prompt"]));
    assert!(d < 1e-4, "max |logit diff| {d} vs PEFT");
    let out = tempfile::tempdir().unwrap();
    folder::save_prompts(policy.prompts.as_ref().unwrap(), out.path(), "tiny", 2, 4).unwrap();
    let (cfg2, t2) = folder::read_prompt(out.path()).unwrap();
    assert_eq!(cfg2.n, 3);
    assert_eq!(max_diff(&t2, &t), 0.0);
}

/// A LoRA adapter and a soft prompt trained by `meet` on the tiny Llama fixture and saved
/// (`tests/fixtures/meet-trained/`, rewritten with `MEET_WRITE_FIXTURES=1`), then read by Python
/// PEFT: `scripts/check_peft_roundtrip.py` recorded PEFT's logits for them in `peft_logits.json`.
/// Here: meet reads those folders back to PEFT's logits, and training today still writes folders
/// of exactly that form (same files, keys, shapes and config fields).
#[test]
fn adapters_trained_here_load_in_peft_with_the_same_logits() {
    roundtrip("meet-trained", "tiny-llama3", r#"["q_proj", "v_proj", "down_proj"]"#);
}

/// The same on GPT-Neo (LoRA on its attention and MLP) and GPT-2 (`Conv1D` layers, PEFT's
/// `fan_in_fan_out`), on the fixtures of tests/gpt.rs.
#[test]
fn gpt_adapters_trained_here_load_in_peft_with_the_same_logits() {
    roundtrip("meet-trained-gpt-neo", "tiny-gpt-neo", r#"["q_proj", "out_proj", "c_fc"]"#);
    roundtrip("meet-trained-gpt2", "tiny-gpt2", r#"["c_attn", "c_proj", "c_fc"]"#);
}

fn roundtrip(fixture: &str, base: &str, targets: &str) {
    let fix = fixtures().join(fixture);
    let out = tempfile::tempdir().unwrap();
    let model = fixtures().join(base);
    let data = out.path().join("data.jsonl");
    let lines: String = (0..6)
        .map(|i| {
            format!("{{\"prompt\": \"t{} t{} t{}\", \"completion\": \"t{} t{}\"}}\n", i, i + 3, 2 * i, 60 - i, i + 9)
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let write = std::env::var_os("MEET_WRITE_FIXTURES").is_some();
    let peft: Option<serde_json::Value> =
        std::fs::read_to_string(fix.join("peft_logits.json")).ok().map(|t| serde_json::from_str(&t).unwrap());
    let ids: Vec<u32> = vec![5, 17, 3, 60, 41, 9, 2, 33];
    let mut got = serde_json::Map::new();
    for kind in ["lora", "prompt"] {
        let section = if kind == "lora" {
            format!("[lora]\nr = 4\nalpha = 8.0\ntarget_modules = {targets}\n")
        } else {
            "[prompt]\nn = 4\n".to_string()
        };
        let cfg_text = format!(
            "method = \"sft\"\noutput_dir = \"{}\"\n[model]\nsource = \"{}\"\n{section}[data]\ntrain = \"{}\"\n[train]\nmax_steps = 3\nbatch_size = 2\nlr = 0.05\n",
            out.path().join(kind).display(),
            model.display(),
            data.display()
        );
        let mut cfg = meet::methods::config::RunConfig::from_str(&cfg_text).unwrap();
        meet::methods::run(&cfg, false).unwrap();
        let saved = out.path().join(kind).join("final").join(if kind == "lora" { "lora" } else { "prompts" });
        if write {
            let _ = std::fs::remove_dir_all(fix.join(kind));
            copy_dir(&saved, &fix.join(kind));
            // PEFT finds the base model beside the fixture.
            let c = fix.join(kind).join("adapter_config.json");
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&c).unwrap()).unwrap();
            v["base_model_name_or_path"] = serde_json::json!(format!("../../{base}"));
            std::fs::write(&c, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        }
        // Today's training writes the committed folder's form.
        let ta = meet::io::safetensors::load(&[saved.join("adapter_model.safetensors")], &Device::Cpu).unwrap();
        let tb =
            meet::io::safetensors::load(&[fix.join(kind).join("adapter_model.safetensors")], &Device::Cpu).unwrap();
        let shapes = |m: &std::collections::HashMap<String, Tensor>| {
            let mut v: Vec<(String, Vec<usize>)> = m.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
            v.sort();
            v
        };
        assert_eq!(shapes(&ta), shapes(&tb), "{kind}: tensors differ from the committed fixture");
        let cfg_of = |d: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap()).unwrap()
        };
        let (ca, cb) = (cfg_of(&saved), cfg_of(&fix.join(kind)));
        let keys = |c: &serde_json::Value| c.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&ca), keys(&cb));
        for k in ["peft_type", "task_type", "r", "lora_alpha", "target_modules", "num_virtual_tokens", "token_dim"] {
            assert_eq!(ca.get(k), cb.get(k), "{kind}: adapter_config.json field {k}");
        }
        // meet reads the committed (PEFT-checked) folder back.
        cfg.model.init_adapters = Some(if write { out.path().join(kind).join("final") } else { fix.join(kind) });
        let built = meet::methods::setup::standard(&cfg).unwrap();
        let batch = Batch::from_rows(&[(ids.clone(), 0)], 0).unwrap();
        let (h, n) = built.policy.hidden(&batch).unwrap();
        let logits = built.policy.pretrained.model.lm_head(&h.narrow(1, n, ids.len()).unwrap()).unwrap();
        let l: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        got.insert(kind.into(), serde_json::json!(l));
    }
    if write {
        let j = serde_json::json!({"ids": ids, "meet_logits": got});
        std::fs::write(fix.join("meet_logits.json"), serde_json::to_string(&j).unwrap()).unwrap();
        return; // now run scripts/check_peft_roundtrip.py
    }
    let peft = peft.expect("tests/fixtures/<fixture>/peft_logits.json: run scripts/check_peft_roundtrip.py");
    for kind in ["lora", "prompt"] {
        let d = max_diff(&rows(&got[kind]), &rows(&peft[kind]));
        assert!(d < 1e-4, "{fixture} {kind}: max |logit diff| {d} between meet and PEFT on meet's folder");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A tiny model folder, training data and a run configuration (full fine-tuning plus a LoRA
/// adapter with dropout, so both parameter groups and the dropout stream are exercised).
fn resumable_run(dir: &Path, name: &str, lr: f64) -> PathBuf {
    let model = dir.join("model");
    if !model.exists() {
        meet::models::pretrained::save_hf_folder(&tiny_raw(21, 64), &model).unwrap();
        let lines: String = (0..24)
            .map(|i| format!("{{\"prompt\": \"row {i}:\", \"completion\": \" {} and {}\"}}\n", i * 7, i * 13))
            .collect();
        std::fs::write(dir.join("data.jsonl"), lines).unwrap();
    }
    let cfg = format!(
        "method = \"sft\"\noutput_dir = \"{out}\"\n[model]\nsource = \"{model}\"\ntrain_weights = true\n[lora]\nr = 2\nalpha = 4.0\ndropout = 0.1\n\
         [data]\ntrain = \"{data}\"\n[train]\nmax_steps = 120\nbatch_size = 3\ngrad_accum = 2\nlr = {lr}\nschedule = \"cosine\"\n\
         warmup_steps = 5\nsave_every = 4\nkeep_checkpoints = true\nseed = 3\n",
        out = dir.join(name).display(),
        model = model.display(),
        data = dir.join("data.jsonl").display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    path
}

fn meet_train(config: &Path, resume: bool) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_meet"));
    c.arg("train").arg(config).env("RAYON_NUM_THREADS", "2");
    if resume {
        c.arg("--resume");
    }
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    c
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let a = resumable_run(tmp.path(), "a", 0.01);
    let out = meet_train(&a, false).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let b = resumable_run(tmp.path(), "b", 0.01);
    let mut child = meet_train(&b, false).spawn().unwrap();
    let run_b = tmp.path().join("b");
    let started = std::time::Instant::now();
    while meet::train::checkpoint::latest(&run_b).unwrap().is_none_or(|c| c.ends_with("checkpoint-4")) {
        assert!(started.elapsed().as_secs() < 60, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = meet::train::checkpoint::latest(&run_b).unwrap().unwrap();
    assert!(!at_kill.ends_with("checkpoint-120"), "the run finished before it could be killed");
    let out = meet_train(&b, true).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let read = |run: &str, file: &str| {
        meet::io::safetensors::load(&[tmp.path().join(run).join("checkpoint-120").join(file)], &Device::Cpu).unwrap()
    };
    for file in ["trainable.safetensors", "optimizer.safetensors"] {
        let (wa, wb) = (read("a", file), read("b", file));
        assert_eq!(wa.len(), wb.len());
        for (k, v) in &wa {
            assert_eq!(max_diff(v, &wb[k]), 0.0, "{file}: {k} differs after resuming from {}", at_kill.display());
        }
    }
    let (la, lb) = (losses(&tmp.path().join("a")), losses(&run_b));
    assert_eq!(la.len(), 120);
    assert_eq!(la, lb, "the resumed run's losses differ");
    assert!(la[119] < la[0], "the loss did not go down: {} -> {}", la[0], la[119]);
    // Outputs users load elsewhere.
    assert!(tmp.path().join("b/final/config.json").is_file());
    assert!(tmp.path().join("b/final/lora/adapter_model.safetensors").is_file());

    // A checkpoint of another configuration is refused; so is a damaged one.
    let other = resumable_run(tmp.path(), "b", 0.02);
    let out = meet_train(&other, true).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("different configuration"), "{err}");
    let b = resumable_run(tmp.path(), "b", 0.01);
    let weights = tmp.path().join("b/checkpoint-120/trainable.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = meet_train(&b, true).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("trainable.safetensors"), "{err}");
}

#[test]
fn sequence_log_probs_sum_and_average_each_rows_labels() {
    // Row sums/means of the labelled-token log-probs equal sums/means of log_softmax picked by hand.
    let p = Pretrained::from_raw(tiny_raw(31, 64), &LoadOptions::default()).unwrap();
    let policy = Policy::plain(p);
    let batch = Batch::from_rows(&[(vec![1, 5, 9, 33, 7], 2), (vec![8, 8, 100], 1)], 256).unwrap();
    let lp = meet::objectives::logps::label_logps(&policy, &batch).unwrap();
    assert_eq!(lp.counts(), vec![3, 2]);
    let ids = Tensor::new(&[[1u32, 5, 9, 33, 7]], &Device::Cpu).unwrap();
    let logits = policy.pretrained.model.forward(&ids).unwrap().squeeze(0).unwrap();
    let lsm = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
    // Labels start at position 2: tokens 9, 33, 7 predicted from positions 1, 2, 3.
    let want: f32 = lsm[1][9] + lsm[2][33] + lsm[3][7];
    let sums = lp.per_sequence_sum().unwrap().to_vec1::<f32>().unwrap();
    let means = lp.per_sequence_mean().unwrap().to_vec1::<f32>().unwrap();
    assert!((sums[0] - want).abs() < 1e-4, "{} vs {want}", sums[0]);
    assert!((means[0] - want / 3.0).abs() < 1e-4);
}

#[test]
fn soft_prompts_start_from_text_or_vocabulary_embeddings() {
    let p = Pretrained::from_raw(tiny_raw(32, 64), &LoadOptions::default()).unwrap();
    let text = PromptConfig { n: 5, init: meet::peft::prompt::PromptInit::Text, init_text: Some("ab".into()) };
    let sp = SoftPrompts::new(&["good".into()], &text, p.model.as_ref(), &p.tokenizer, 0, &Device::Cpu).unwrap();
    // "ab" is two byte tokens, repeated to fill 5: a b a b a.
    let ids = p.tokenizer.encode("ab", false).unwrap();
    let want = p.model.embed(&Tensor::new(&[ids[0], ids[1], ids[0], ids[1], ids[0]], &Device::Cpu).unwrap()).unwrap();
    assert_eq!(max_diff(sp.vars[0].as_tensor(), &want), 0.0);
    let vocab = PromptConfig { n: 4, init: meet::peft::prompt::PromptInit::SampleVocab, init_text: None };
    let sv = SoftPrompts::new(&["good".into()], &vocab, p.model.as_ref(), &p.tokenizer, 0, &Device::Cpu).unwrap();
    assert_eq!(sv.vars[0].dims(), &[4, 32]);
    let missing = PromptConfig { n: 4, init: meet::peft::prompt::PromptInit::Text, init_text: None };
    assert!(SoftPrompts::new(&["good".into()], &missing, p.model.as_ref(), &p.tokenizer, 0, &Device::Cpu).is_err());
}

#[test]
fn bad_training_data_is_refused_with_file_and_line() {
    use meet::data::{read_supervised, SupervisedOptions};
    let tok = common::tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let opts = SupervisedOptions {
        max_length: 16,
        controls: vec!["good".into()],
        dimensions: vec![],
        scores: vec![],
        default_control: None,
        eos_id: Some(258),
        skip_invalid: false,
    };
    let cases = [
        ("{\"text\": \"ok\"}\n{not json\n", "line 2: invalid JSON"),
        ("{\"prompt\": \"a\"}\n", "line 1: field 'completion' must be a string"),
        ("{\"prompt\": \"a\", \"completion\": \"b\", \"control\": \"evil\"}\n", "unknown control 'evil'"),
        ("{\"question\": \"a\"}\n", "expected 'text', 'prompt'/'completion' or 'messages'"),
        ("{\"prompt\": \"aaaaaaaaaaaaaaaaaaaaaaaa\", \"completion\": \"b\"}\n", "leaves no response token"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&path, text).unwrap();
        let err = read_supervised(&path, &tok, &opts).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains(&format!("bad{i}.jsonl")), "{err}");
    }
    // Rows longer than max_length are cut and counted; the prompt/response boundary is kept.
    let path = dir.path().join("long.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"ab\", \"completion\": \"cdefghijklmnopqrstuvwxyz\", \"control\": \"good\"}\n",
    )
    .unwrap();
    let (ex, stats) = read_supervised(&path, &tok, &opts).unwrap();
    assert_eq!((ex[0].ids.len(), ex[0].start, ex[0].controls.clone(), stats.truncated), (16, 2, vec![0], 1));
    // With skip_invalid every per-record problem is skipped and counted: a line that is not
    // JSON, bytes that are not UTF-8, messages without an assistant turn, a missing field.
    let path = dir.path().join("mixed.jsonl");
    let rows: Vec<u8> = [
        &b"{\"text\": \"ok\"}\n{not json\n"[..],
        b"{\"text\": \"\xff\"}\n",
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        b"{\"prompt\": \"a\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n",
    ]
    .concat();
    std::fs::write(&path, &rows).unwrap();
    let err = read_supervised(&path, &tok, &opts).unwrap_err().to_string();
    assert!(err.contains("mixed.jsonl") && err.contains("line 2: invalid JSON"), "{err}");
    let skip = SupervisedOptions { skip_invalid: true, ..opts.clone() };
    let (ex, stats) = read_supervised(&path, &tok, &skip).unwrap();
    assert_eq!(ex.len(), 2);
    let at: Vec<&str> = stats.skipped.iter().map(|s| s.split(':').next().unwrap()).collect();
    assert_eq!(at, ["line 2", "line 3", "line 4", "line 5"], "{:?}", stats.skipped);
    assert!(stats.skipped[2].contains("no assistant message"), "{:?}", stats.skipped);
    // Nothing usable left, or no file: still an error.
    std::fs::write(&path, "{not json\n").unwrap();
    let err = read_supervised(&path, &tok, &skip).unwrap_err().to_string();
    assert!(err.contains("no usable records (1 skipped)"), "{err}");
    assert!(read_supervised(&dir.path().join("absent.jsonl"), &tok, &skip).is_err());
}
