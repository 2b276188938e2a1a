//! What a new user meets on the command line (issue 13's defects, each asserted on its text): the
//! messages of bad flags and files, what a run leaves on disk, a finished run resumed, stage
//! labels and plain warnings when piped, stale temporary checkpoints, the final flush of
//! streamed text. Tiny random models; the README's own commands are in tests/readme.rs.

mod common;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Output;

fn meet(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_meet")).args(args).env("RAYON_NUM_THREADS", "2").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn failed_with(o: &Output, wants: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "should fail: {err}");
    for w in wants {
        assert!(err.contains(w), "missing {w:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A tiny model folder, a preference file and a supervised file in `dir`.
fn setup(dir: &Path) -> (String, PathBuf, PathBuf) {
    let model = dir.join("model");
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(3, 64), &model).unwrap();
    let prefs: String = (0..12)
        .map(|i| format!("{}\n", json!({"prompt": format!("q{i}:"), "chosen": " yes", "rejected": " no"})))
        .collect();
    std::fs::write(dir.join("prefs.jsonl"), prefs).unwrap();
    let sft: String =
        (0..12).map(|i| format!("{}\n", json!({"prompt": format!("q{i}:"), "completion": format!(" a{i}")}))).collect();
    std::fs::write(dir.join("sft.jsonl"), sft).unwrap();
    (model.to_string_lossy().into_owned(), dir.join("prefs.jsonl"), dir.join("sft.jsonl"))
}

/// `meet train` by flags alone, plus `extra` flags.
fn train_flags(method: &str, model: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let s = |x: &str| x.to_string();
    let mut args = vec![
        s("train"),
        s("--method"),
        s(method),
        s("--model"),
        s(model),
        s("--data"),
        data.to_string_lossy().into_owned(),
        s("--output-dir"),
        out.to_string_lossy().into_owned(),
        s("--batch-size"),
        s("4"),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    args
}

fn run(args: &[String]) -> Output {
    meet(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn configuration_errors_name_the_flag_or_the_file_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (model, prefs, _) = setup(dir.path());
    let out = dir.path().join("run");
    let base = train_flags("sft", &model, &prefs, &out, &["--set", "model.train_weights=true"]);
    let with = |extra: &[&str]| {
        let mut a = base.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        run(&a)
    };
    // --lr nan: the same clear message as --set train.lr=nan, blamed on the flag.
    failed_with(&with(&["--lr", "nan"]), &["--lr NaN", "lr NaN must be a non-negative number"]);
    failed_with(&with(&["--set", "train.lr=nan"]), &["--set train.lr=nan", "lr NaN must be a non-negative number"]);
    failed_with(&with(&["--set", "train.lrr=1"]), &["--set train.lrr=1: unknown field `lrr`"]);
    failed_with(
        &run(&train_flags("ppo", &model, &prefs, &out, &[])),
        &["--method ppo: unknown variant `ppo`", "reward"],
    );
    failed_with(
        &with(&["--set", "lora.target_modules=[\"zz\"]"]),
        &["--set lora.target_modules", "unknown target module 'zz'"],
    );
    // A run refused at validation writes nothing, not even its output folder.
    assert!(!out.exists(), "{} was created by a refused run", out.display());
    // Errors in the run file are the file's.
    let cfg = dir.path().join("run.toml");
    let text =
        "method = \"sft\"\noutput_dir = \"x\"\n[model]\nsource = \"m\"\n[data]\ntrain = \"d\"\n[train]\nlrr = 1\n";
    std::fs::write(&cfg, text).unwrap();
    // A typo names the file, its line and column.
    failed_with(&meet(&["train", cfg.to_str().unwrap()]), &["run.toml", "line 8, column 1", "unknown field `lrr`"]);
    // A section of another method is an error naming that method, at its line.
    std::fs::write(&cfg, text.replace("[train]\nlrr = 1", "[dpo]\nbeta = 0.2")).unwrap();
    failed_with(
        &meet(&["train", cfg.to_str().unwrap()]),
        &["run.toml", "line 7", "[dpo] is the options of method dpo, but this run's method is sft"],
    );
    // No method is assumed.
    std::fs::write(&cfg, text.replace("method = \"sft\"\n", "").replace("[train]\nlrr = 1\n", "")).unwrap();
    failed_with(&meet(&["train", cfg.to_str().unwrap()]), &["run.toml: missing `method`", "no method is assumed"]);
    // A bad value given with --set is the flag's, not the file's.
    std::fs::write(&cfg, text.replace("[train]\nlrr = 1\n", "").replace("\"m\"\n", "\"m\"\ntrain_weights = true\n"))
        .unwrap();
    failed_with(
        &meet(&["train", cfg.to_str().unwrap(), "--set", "train.lr=abc"]),
        &["--set train.lr=abc: invalid type: string \"abc\", expected f64"],
    );
    // No run file and not enough flags: say which flags.
    failed_with(&meet(&["train"]), &["give a run file", "--method, --model, --data and --output-dir"]);
    failed_with(&meet(&["train", "--data", "x.jsonl"]), &["missing: --method, --model, --output-dir"]);
    // Missing files: the OS reason once, the file named.
    let err = failed_with(&meet(&["train", "nope.toml"]), &["nope.toml"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let a = train_flags("sft", &model, Path::new("missing.jsonl"), &out, &["--set", "model.train_weights=true"]);
    failed_with(&run(&a), &["data.train: missing.jsonl: no such file or folder"]);
    assert!(!out.exists());
    // An output folder that cannot be made: the path and the OS reason, once.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let a = train_flags(
        "sft",
        &model,
        &prefs,
        &file.join("run"),
        &["--set", "model.train_weights=true", "--max-steps", "1"],
    );
    let err = failed_with(&run(&a), &["a-file/run"]);
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
}

#[test]
fn a_full_run_leaves_its_outputs_and_no_checkpoint_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _, sft) = setup(dir.path());
    let out = dir.path().join("full");
    let a = train_flags("sft", &model, &sft, &out, &["--set", "model.train_weights=true", "--max-steps", "3"]);
    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(names(&out), ["config.toml", "final", "finished.json", "metrics.jsonl"]);
    // Periodic checkpoints exist to resume an unfinished run; once final/ is written they go.
    let out2 = dir.path().join("periodic");
    let b = train_flags(
        "sft",
        &model,
        &sft,
        &out2,
        &["--set", "model.train_weights=true", "--max-steps", "3", "--set", "train.save_every=1"],
    );
    assert!(run(&b).status.success());
    assert!(!names(&out2).iter().any(|n| n.starts_with("checkpoint-")), "{:?}", names(&out2));
    // Kept when asked, the last step's included.
    let out3 = dir.path().join("kept");
    let c = train_flags(
        "sft",
        &model,
        &sft,
        &out3,
        &[
            "--set",
            "model.train_weights=true",
            "--max-steps",
            "3",
            "--set",
            "train.save_every=2",
            "--set",
            "train.keep_checkpoints=true",
        ],
    );
    assert!(run(&c).status.success());
    let kept: Vec<String> = names(&out3).into_iter().filter(|n| n.starts_with("checkpoint-")).collect();
    assert_eq!(kept, ["checkpoint-2", "checkpoint-3"]);
}

#[test]
fn resuming_a_finished_run_says_so_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (model, prefs, _) = setup(dir.path());
    let out = dir.path().join("meet");
    let mut a = train_flags("meet", &model, &prefs, &out, &["--set", "prompt.n=2", "--max-steps", "2"]);
    let o = run(&a);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // Each stage is named, with its progress lines under it (stderr is a pipe here: no colours,
    // no bars, no debug text).
    assert!(err.contains("==> MEET step 1/2: the controls, model frozen"), "{err}");
    assert!(err.contains("==> MEET step 2/2: the full model conditioned on the controls"), "{err}");
    assert!(err.contains("meet-step2: 2/2 steps") && err.contains("final loss"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains("Some("), "{err}");
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let files = [
        out.join("config.toml"),
        out.join("final/meet_controls.json"),
        out.join("final/prompts/good/adapter_config.json"),
    ];
    let before: Vec<_> = files.iter().map(|f| stamp(f)).collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    a.push("--resume".into());
    let o = run(&a);
    let err = stderr(&o);
    assert!(o.status.success() && err.contains("finished earlier; nothing to do"), "{err}");
    assert!(!err.contains("steps  loss"), "a finished run trained again: {err}");
    let after: Vec<_> = files.iter().map(|f| stamp(f)).collect();
    assert_eq!(before, after, "resuming a finished run rewrote its files");
    // Stopped after step 1 finished: resuming keeps step 1's outputs and trains step 2 only.
    std::fs::remove_file(out.join("finished.json")).unwrap();
    std::fs::remove_dir_all(out.join("final")).unwrap();
    let o = run(&a);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("==> MEET step 1/2") && err.contains("finished earlier (2 steps)"), "{err}");
    assert!(!err.contains("meet-step1: 1/2 steps") && err.contains("meet-step2: 2/2 steps"), "{err}");
    assert!(out.join("final/meet_controls.json").is_file());
    // Another configuration in the same folder is a new run, not "finished".
    a.extend(["--seed".into(), "5".into()]);
    let o = run(&a);
    assert!(o.status.success() && !stderr(&o).contains("finished earlier; nothing to do"), "{}", stderr(&o));
}

#[test]
fn dpo_shows_its_reference_pass_and_warnings_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let (model, prefs, _) = setup(dir.path());
    let out = dir.path().join("dpo");
    // A tiny max_prompt_length cuts prompts: the warning says so in user words.
    let extra = ["--set", "model.train_weights=true", "--max-steps", "1", "--set", "data.max_prompt_length=2"];
    let a = train_flags("dpo", &model, &prefs, &out, &extra);
    let o = run(&a);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("==> DPO reference pass") && err.contains("reference: 12 pairs in"), "{err}");
    assert!(err.contains("max_prompt_length 2, max_completion_length none"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains("Some(") && !err.contains("None"), "{err}");
}

#[test]
fn stale_temporary_checkpoints_are_removed_when_a_run_starts_or_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _, sft) = setup(dir.path());
    let out = dir.path().join("run");
    // What a run killed while writing checkpoint 3 leaves behind.
    let stale = out.join(".checkpoint-3.tmp-4242");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("trainable.safetensors"), vec![0u8; 1000]).unwrap();
    let a =
        train_flags("sft", &model, &sft, &out, &["--set", "model.train_weights=true", "--max-steps", "2", "--resume"]);
    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists(), "the stale temporary checkpoint is still there: {:?}", names(&out));
    assert!(stderr(&o).contains("removed 1 unfinished checkpoint folder"), "{}", stderr(&o));
}

#[test]
fn messages_point_to_what_the_user_meant() {
    let dir = tempfile::tempdir().unwrap();
    let (model, prefs, sft) = setup(dir.path());
    // --control on an SFT output: it has no controls (it is a meet output folder all the same).
    let out = dir.path().join("sft");
    let a = train_flags("sft", &model, &sft, &out, &["--set", "model.train_weights=true", "--max-steps", "1"]);
    assert!(run(&a).status.success());
    let fin = out.join("final");
    failed_with(
        &meet(&["generate", "--model", fin.to_str().unwrap(), "--control", "good", "--prompt", "x"]),
        &["has no controls", "sft, dpo or reward", "leave out --control"],
    );
    // A LoRA output: `meet merge` of its final/ lists the adapters under it; `meet convert` of it
    // points to `meet merge`.
    let lora = dir.path().join("lora");
    let a = train_flags(
        "meet",
        &model,
        &prefs,
        &lora,
        &["--set", "lora.r=2", "--max-steps", "1", "--set", "meet.steps=\"step1\""],
    );
    let o = run(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let fin = lora.join("final");
    let merged = dir.path().join("merged");
    let err = failed_with(
        &meet(&["merge", "--model", &model, "--adapter", fin.to_str().unwrap(), "--out", merged.to_str().unwrap()]),
        &["no adapter_config.json in this folder", "pass one of those"],
    );
    assert!(err.contains("final/lora/good") && err.contains("final/lora/bad"), "{err}");
    failed_with(
        &meet(&["convert", fin.to_str().unwrap(), "--out", merged.to_str().unwrap()]),
        &["no config.json", "meet merge"],
    );
    let o = meet(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        fin.join("lora/good").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A hand-edited or older meet_controls.json: a clear error naming the file, never a panic.
    let spec_path = fin.join("meet_controls.json");
    let spec = std::fs::read_to_string(&spec_path).unwrap();
    let edited = spec.replacen("\"lora\"", "\"token\"", 1);
    assert_ne!(edited, spec);
    std::fs::write(&spec_path, edited).unwrap();
    let gen = |c: &str| meet(&["generate", "--model", fin.to_str().unwrap(), "--control", c, "--prompt", "x"]);
    failed_with(&gen("good"), &["meet_controls.json", "2 controls in 'names' but 0 in 'markers'"]);
    let twice = spec.replacen("\"bad\"", "\"good\"", 1);
    std::fs::write(&spec_path, twice).unwrap();
    failed_with(&gen("good"), &["meet_controls.json", "control 'good' is listed twice"]);
    std::fs::write(&spec_path, &spec).unwrap();
    // Flags: --weights lists every format; --system needs --chat.
    failed_with(
        &meet(&["generate", "--model", &model, "--weights", "q8", "--prompt", "x"]),
        &["--weights", "auto, f32, q8_0"],
    );
    failed_with(&meet(&["generate", "--model", &model, "--system", "be brief", "--prompt", "x"]), &["--chat"]);
    failed_with(&meet(&["generate", "--model", &model, "--stop-strings", "\\q", "--prompt", "x"]), &["unknown escape"]);
    // Help: every method named, no empty flag help.
    let help = String::from_utf8(meet(&["--help"]).stdout).unwrap();
    assert!(help.contains("reward"), "{help}");
    let help = String::from_utf8(meet(&["train", "--help"]).stdout).unwrap();
    assert!(help.contains("sft | coh | control-token | meet | dpo | reward"), "{help}");
    for cmd in [
        &["generate"][..],
        &["eval"],
        &["train"],
        &["pairs"],
        &["compare"],
        &["prepare-sentiment"],
        &["bench", "prefill"],
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = String::from_utf8(meet(&args).stdout).unwrap();
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            // An option line with nothing after it and no description on the next line.
            if t.starts_with("--") && t.split_whitespace().count() <= 2 && !l.contains("  ") {
                let next = lines.get(i + 1).map(|n| n.trim()).unwrap_or("");
                assert!(!next.is_empty() && !next.starts_with('-'), "{cmd:?}: '{t}' has no help:\n{help}");
            }
        }
    }
}

#[test]
fn eval_gives_every_figure_an_interval_and_compare_uses_shared_samples() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _, _) = setup(dir.path());
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"good day\"}\n{\"prompt\": \"what a film\"}\n").unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let eval = |out: &Path, samples: &str| {
        meet(&[
            "eval",
            "--model",
            &model,
            "--prompts",
            prompts.to_str().unwrap(),
            "--samples",
            samples,
            "--max-new-tokens",
            "4",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let o = eval(&a, "2");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cut = &line["summary"]["cut_share"];
    assert!(cut["lo"].is_f64() && cut["hi"].is_f64(), "{line}");
    assert!(err.contains("% [") && err.contains("95% bootstrap intervals"), "{err}");
    assert!(eval(&b, "1").status.success());
    // One file has 2 samples per prompt, the other 1: the shared ones are compared, with a note.
    let o = meet(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(o.status.success() && err.contains("comparing the 2 (prompt, sample) responses both files have"), "{err}");
    assert!(err.contains("left out 2 of"), "{err}");
}

#[test]
fn streamed_text_ends_as_the_batch_text_does() {
    // Byte-level tokens: a generation that stops inside a character flushes U+FFFD at the end,
    // as transformers' streamer and the batch JSON do.
    let tok = common::tiny_tokenizer();
    let mut stream = meet::generate::TextStream::new(&tok);
    let all = tok.encode("aé", false).unwrap();
    let cut = &all[..all.len() - 1];
    let mut streamed = String::new();
    for &t in cut {
        streamed.push_str(&stream.push(t).unwrap().unwrap_or_default());
    }
    assert_eq!(streamed, "a", "incomplete UTF-8 is held back while streaming");
    streamed.push_str(&stream.finish().unwrap().unwrap_or_default());
    let batch = tok.decode(cut, true).unwrap();
    assert_eq!(streamed, batch);
    assert!(batch.ends_with('\u{FFFD}'), "{batch:?}");
    // Through the CLI: one prompt streams, two print JSON; the texts agree for every length.
    let dir = tempfile::tempdir().unwrap();
    let (model, _, _) = setup(dir.path());
    let mut partial = 0;
    for n in 1..=12 {
        let n = n.to_string();
        let one = meet(&["generate", "--model", &model, "--prompt", "hello", "--max-new-tokens", &n]);
        assert!(one.status.success(), "{}", stderr(&one));
        let streamed = String::from_utf8(one.stdout).unwrap();
        let streamed = streamed.strip_suffix('\n').unwrap();
        let two =
            meet(&["generate", "--model", &model, "--prompt", "hello", "--prompt", "hello", "--max-new-tokens", &n]);
        let first: serde_json::Value =
            serde_json::from_str(String::from_utf8(two.stdout).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(streamed, first["text"].as_str().unwrap(), "{n} new tokens");
        partial += streamed.ends_with('\u{FFFD}') as usize;
    }
    assert!(partial > 0, "no generation ended inside a character: the case is not exercised");
}

#[test]
fn the_licence_and_third_party_notices_ship_with_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let licence = std::fs::read_to_string(root.join("LICENSE")).unwrap();
    assert!(licence.contains("Apache License") && licence.contains("Version 2.0"));
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(cargo.contains("license = \"Apache-2.0\""));
    let notices = std::fs::read_to_string(root.join("THIRD-PARTY-NOTICES.md")).unwrap();
    for (what, file) in [("VADER", "src/eval/vader_lexicon.txt"), ("DejaVu", "assets/fonts")] {
        assert!(notices.contains(what) && notices.contains(file), "{what} is not in THIRD-PARTY-NOTICES.md");
        assert!(root.join(file).exists());
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("cargo install --path ."), "the README does not say how to get `meet` on the PATH");
}
