//! The experiment end to end on a tiny model and made-up rated snippets: every step runs, the
//! report holds its tables, and a second invocation reuses everything (resumable).

mod common;

use meet::experiment::{run, ExperimentConfig};

#[test]
fn the_experiment_runs_every_step_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(3, 96), &model).unwrap();
    let words = ["great", "awful", "fine", "boring", "lovely", "bad", "good", "dull"];
    let snippets: String = (0..80)
        .map(|i| {
            format!("{i}\t{}\tthis film is {} and {} overall\n", (i % 9) as f64 - 4.0, words[i % 8], words[(i / 8) % 8])
        })
        .collect();
    let sn = dir.path().join("snippets.txt");
    std::fs::write(&sn, snippets).unwrap();
    let out = dir.path().join("exp");
    // The LLM judge is a tiny random model behind `meet serve` (with room for the judging prompt):
    // it never answers with a verdict.
    let judge_model = dir.path().join("judge");
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(4, 2048), &judge_model).unwrap();
    let server = common::serve_child(judge_model.to_str().unwrap(), &["--served-model-name", "judge"]);
    let url = server.url.clone();
    let cache = dir.path().join("judge-cache");
    let text = format!(
        r#"
output_dir = {out:?}
model = {model:?}
snippets = {sn:?}
seeds = [0]
temperatures = [0.5, 1.0]
methods = ["sft", "dpo", "meet-prompt", "control-token"]
[task]
train = 16
eval = 6
human_pairs = 10
[pairs]
samples = 3
max_new_tokens = 6
[eval]
samples = 2
max_new_tokens = 6
[train]
max_steps = 2
save_every = 1
batch_size = 4
lr = 1e-3
[method.meet-prompt]
prompt = {{ n = 2 }}
[sweep]
prompt_n = [1, 2]
lora_r = [2]
[reward_model]
train = {{ lr = 1e-3 }}
reward = {{ eval_share = 0.3 }}
[llm_judge]
judge = "llm:{url}/v1#judge"
task = "dialogue"
concurrency = 2
cache_dir = {cache:?}
"#,
        out = out.to_string_lossy(),
        model = model.to_string_lossy(),
        sn = sn.to_string_lossy(),
        cache = cache.to_string_lossy(),
    );
    let cfg_path = dir.path().join("exp.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let cfg = ExperimentConfig::from_file(&cfg_path).unwrap();
    let report = run(&cfg).unwrap();
    let md = std::fs::read_to_string(&report).unwrap();
    for want in [
        "## Mean vader score",
        "| sft |",
        "| dpo |",
        "| meet-prompt (good) |",
        "## Controllability",
        "| control-token |",
        "## Mean reward model score",
        "held-out pairwise accuracy",
        "win rate of MEET over each method",
        "## Control size",
        "| meet-prompt | 1 |",
        "| meet-prompt | 2 |",
        "| meet-lora | 2 |",
        "| meet-prompt-n1-seed0 step 1 |",
        "| reward-model |",
        "## LLM judge at T = 1: win rate over the base model",
        // 6 prompts x 2 samples, both orders: 24 answers, none with a verdict.
        "| sft | – | – | – | – | 24 of 24 | 12 |",
    ] {
        assert!(md.contains(want), "report lacks {want:?}:\n{md}");
    }
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    // base + 4 methods at 2 temperatures, `bad` at the last one for the 2 controllable ones, and
    // the two new sweep sizes (n = 1, r = 2; n = 2 is the main run) under good and bad.
    // (after the provenance line)
    assert!(results.lines().next().unwrap().starts_with("{\"provenance\":{\"meet\":"), "{results}");
    assert!(md.contains("Made by meet ") && md.contains(" threads"), "{md}");
    assert_eq!(results.lines().count(), 1 + 5 * 2 + 2 + 4);
    assert!(results.lines().skip(1).all(|l| l.contains("\"reward_model\"")), "{results}");
    assert!(out.join("runs/meet-prompt-n1-seed0/final").is_dir() && out.join("runs/meet-lora-r2-seed0/final").is_dir());
    assert!(!out.join("runs/meet-prompt-n2-seed0").exists(), "the main size is reused");
    // Finished runs keep their outputs and metrics, not their checkpoints.
    for run in ["sft-seed0", "meet-prompt-seed0", "meet-prompt-seed0/step1", "reward-model"] {
        let names: Vec<String> = std::fs::read_dir(out.join("runs").join(run))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.contains(&"final".to_string()) && names.contains(&"metrics.jsonl".to_string()),
            "{run}: {names:?}"
        );
        assert!(!names.iter().any(|n| n.starts_with("checkpoint-")), "{run}: {names:?}");
    }
    let lora =
        std::fs::read_to_string(out.join("runs/meet-lora-r2-seed0/final/lora/good/adapter_config.json")).unwrap();
    assert!(lora.contains("\"r\": 2") || lora.contains("\"r\":2"), "{lora}");
    for png in
        ["score_vs_temperature", "rm_score_vs_temperature", "win_rates", "score_vs_kl", "control_size", "loss_curves"]
    {
        let b = std::fs::read(out.join(format!("{png}.png"))).unwrap();
        assert!(b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 10_000, "{png}.png");
        assert!(md.contains(&format!("![]({png}.png)")), "report lacks {png}.png");
    }
    assert!(out.join("runs/dpo-seed0/reference_logps.json").is_file());
    // Every computed step has its wall time, and the report sums them.
    let times: Vec<serde_json::Value> = std::fs::read_to_string(out.join("timings.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names = |kind: &str| -> Vec<String> {
        times.iter().filter(|t| t["kind"] == kind).map(|t| t["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(names("data"), ["task", "pairs"]);
    for run in ["sft-seed0", "dpo-seed0", "meet-prompt-n1-seed0", "meet-lora-r2-seed0", "reward-model"] {
        assert!(names("train").contains(&run.to_string()), "{run}: {times:?}");
    }
    assert_eq!(names("eval").len(), 1 + 4 + 2, "{times:?}");
    assert!(times.iter().all(|t| t["seconds"].as_f64().unwrap() > 0.0));
    assert!(md.contains("## Wall time") && md.contains("| **total** |"), "{md}");
    // Resumed: nothing is redone, the report is the same (a stray run folder in `runs/` is not
    // one of the experiment's runs and stays out of it).
    let stray = out.join("runs/other-seed0");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::copy(out.join("runs/sft-seed0/metrics.jsonl"), stray.join("metrics.jsonl")).unwrap();
    let stamp = std::fs::metadata(out.join("data/pairs.jsonl")).unwrap().modified().unwrap();
    let eval_stamp = std::fs::metadata(out.join("eval/sft-seed0-plain-t1.jsonl")).unwrap().modified().unwrap();
    assert!(out.join("llm_judge/sft.jsonl").is_file());
    // The judge is gone: its cached answers are all a rerun needs.
    drop(server);
    run(&cfg).unwrap();
    assert_eq!(std::fs::metadata(out.join("data/pairs.jsonl")).unwrap().modified().unwrap(), stamp);
    assert_eq!(std::fs::metadata(out.join("eval/sft-seed0-plain-t1.jsonl")).unwrap().modified().unwrap(), eval_stamp);
    assert_eq!(std::fs::read_to_string(&report).unwrap(), md);
    // An unknown method is refused with the file named.
    std::fs::write(&cfg_path, std::fs::read_to_string(&cfg_path).unwrap().replace("\"dpo\"", "\"ppo\"")).unwrap();
    let e = ExperimentConfig::from_file(&cfg_path).unwrap_err().to_string();
    assert!(e.contains("exp.toml") && e.contains("unknown experiment method 'ppo'"), "{e}");
    // An unknown experiment kind is refused with the kinds named.
    std::fs::write(
        &cfg_path,
        format!("experiment = \"three-dimensions\"\n{}", std::fs::read_to_string(&cfg_path).unwrap()),
    )
    .unwrap();
    let e = meet::experiment::Experiment::from_file(&cfg_path).err().expect("refused").to_string();
    assert!(e.contains("exp.toml") && e.contains("\"two-dimensions\""), "{e}");
}

/// The paper's architecture through the whole experiment: GPT-Neo (a local window shorter than
/// the sequences) trained by SFT, DPO and MEET with soft prompts and LoRA (`all-linear`: its own
/// projections), judged by VADER and by a reward model with a GPT-Neo backbone.
#[test]
fn the_experiment_runs_on_gpt_neo() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let mut raw = common::tiny_raw(3, 96);
    raw.config = serde_json::json!({
        "model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"], "vocab_size": 300, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "max_position_embeddings": 96, "attention_layers": ["global", "local"],
        "window_size": 8, "initializer_range": 0.2, "bos_token_id": 257, "eos_token_id": 258,
    });
    raw.tensors = meet::models::random_weights(&raw.config, 3, &candle_core::Device::Cpu).unwrap();
    meet::models::pretrained::save_hf_folder(&raw, &model).unwrap();
    let snippets: String =
        (0..60).map(|i| format!("{i}\t{}\tthis film is good and {} overall\n", (i % 9) as f64 - 4.0, i % 7)).collect();
    let sn = dir.path().join("snippets.txt");
    std::fs::write(&sn, snippets).unwrap();
    let out = dir.path().join("exp");
    let text = format!(
        "output_dir = {:?}\nmodel = {:?}\nsnippets = {:?}\nseeds = [0]\ntemperatures = [1.0]\n\
         methods = [\"sft\", \"dpo\", \"meet-prompt\", \"meet-lora\"]\n[task]\ntrain = 12\neval = 4\nhuman_pairs = 8\n\
         [pairs]\nsamples = 2\nmax_new_tokens = 6\n[eval]\nsamples = 1\nmax_new_tokens = 6\n\
         [train]\nmax_steps = 2\nbatch_size = 4\nlr = 1e-3\n[method.meet-prompt]\nprompt = {{ n = 2 }}\n\
         [method.meet-lora]\nlora = {{ r = 2, alpha = 4.0 }}\n[reward_model]\nreward = {{ eval_share = 0.25 }}\n",
        out.to_string_lossy(),
        model.to_string_lossy(),
        sn.to_string_lossy()
    );
    let cfg_path = dir.path().join("exp.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let report = run(&ExperimentConfig::from_file(&cfg_path).unwrap()).unwrap();
    let md = std::fs::read_to_string(report).unwrap();
    for want in ["| sft |", "| dpo |", "| meet-prompt (good) |", "| meet-lora (good) |", "## Mean reward model score"] {
        assert!(md.contains(want), "report lacks {want:?}:\n{md}");
    }
    // meet-lora's "all-linear" became GPT-Neo's own projections.
    let lora = std::fs::read_to_string(out.join("runs/meet-lora-seed0/final/lora/good/adapter_config.json")).unwrap();
    for t in ["out_proj", "c_fc", "c_proj", "q_proj"] {
        assert!(lora.contains(&format!("\"{t}\"")), "{t} not targeted: {lora}");
    }
    assert!(!lora.contains("gate_proj"), "{lora}");
    let rm = std::fs::read_to_string(out.join("runs/reward-model/final/config.json")).unwrap();
    assert!(rm.contains("GPTNeoForSequenceClassification"), "{rm}");
}
