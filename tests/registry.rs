//! A method is one file plus one registration line: this test-only method lives in this file
//! alone and joins `meet` through the public registry, with its own typed section, its own checks,
//! its recipe built from the shared setup and stage pieces, and its own way of applying its
//! control at inference. No other file knows it.

mod common;

use meet::controls::Controlled;
use meet::data::Example;
use meet::generate::SamplingParams;
use meet::methods::config::RunConfig;
use meet::methods::setup::{self, load_pairs};
use meet::methods::spec::{spec, ControlKind, ControlSpec};
use meet::methods::stage::{stage, Stage};
use meet::methods::{self, Recipe};
use meet::objectives::lm::LanguageModeling;
use meet::tokenizer::Tokenizer;
use meet::train::StepLog;
use meet::{Error, LoadOptions, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// "Echo": SFT on the chosen response, after a cue phrase from `[echo]` (a one-control CoH).
struct Echo;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EchoOptions {
    cue: String,
}

impl Default for EchoOptions {
    fn default() -> Self {
        Self { cue: "Echo:".into() }
    }
}

/// How often inference asked Echo to apply its control.
static APPLIED: AtomicUsize = AtomicUsize::new(0);

impl Recipe for Echo {
    const NAME: &'static str = "echo";
    const SECTION: Option<&'static str> = Some("echo");
    type Options = EchoOptions;

    fn default_controls(&self) -> Vec<String> {
        vec!["good".into()]
    }

    fn check(&self, _: &RunConfig, o: &EchoOptions) -> Result<()> {
        match o.cue.trim().is_empty() {
            true => Err(Error::Invalid("echo: cue must not be empty".into())),
            false => Ok(()),
        }
    }

    fn run(&self, cfg: &RunConfig, o: &EchoOptions, resume: bool) -> Result<Vec<StepLog>> {
        let mut built = setup::standard(cfg)?;
        let p = &built.policy.pretrained;
        let cue = p.tokenizer.encode(&format!(" {}", o.cue), false)?;
        let (pairs, held_out) = load_pairs(cfg, p)?;
        let to_examples = |pairs: Vec<meet::data::preference::Pair>| -> Vec<Example> {
            pairs
                .into_iter()
                .map(|x| Example {
                    start: x.prompt.len() + cue.len(),
                    ids: [x.prompt, cue.clone(), x.chosen].concat(),
                    ..Default::default()
                })
                .collect()
        };
        let (examples, eval) = (to_examples(pairs), to_examples(held_out));
        let objective = LanguageModeling { pad_id: p.generation.pad_id()? };
        let st = Stage { name: "echo", label: "echo: the chosen responses after the cue", dir: &cfg.output_dir };
        let s = spec(cfg, ControlKind::Text, vec![o.cue.clone()]);
        stage(cfg, &st, &mut built, &objective, &examples, &eval, resume, Some(s))
    }

    fn apply_control(
        &self,
        spec: &ControlSpec,
        selected: &[(usize, f32)],
        tok: &Tokenizer,
        ids: &mut [Vec<u32>],
    ) -> Result<()> {
        APPLIED.fetch_add(1, Ordering::SeqCst);
        let cue = tok.encode(&format!(" {}", spec.markers[selected[0].0]), false)?;
        ids.iter_mut().for_each(|x| x.extend(&cue));
        Ok(())
    }
}

fn text(model: &str, data: &Path, out: &Path, method: &str, extra: &str) -> String {
    format!(
        "method = {method:?}\noutput_dir = {out:?}\n[model]\nsource = {model:?}\ntrain_weights = true\n\
         [data]\ntrain = {data:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 1e-2\nwarmup_steps = 0\n{extra}"
    )
}

#[test]
fn a_method_registered_from_outside_trains_and_controls_generation() {
    methods::register(Arc::new(Echo)).unwrap();
    // Its name and section are now taken.
    assert!(methods::register(Arc::new(Echo)).unwrap_err().to_string().contains("clashes"));
    assert!(methods::names().contains(&"echo"));

    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(3, 64), &model).unwrap();
    let model = model.to_str().unwrap();
    let data = dir.path().join("prefs.jsonl");
    let rows: String =
        (0..16).map(|i| format!("{{\"prompt\": \"q{i}:\", \"chosen\": \" yes\", \"rejected\": \" no\"}}\n")).collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.path().join("run");

    // Its section is typed and checked like a built-in's; it is foreign to other methods.
    let e = RunConfig::from_str(&text(model, &data, &out, "echo", "[echo]\ncue = \"\"\n")).unwrap_err();
    assert!(e.to_string().contains("echo: cue must not be empty"), "{e}");
    let e = RunConfig::from_str(&text(model, &data, &out, "echo", "[echo]\ncu = \"x\"\n")).unwrap_err();
    assert!(e.to_string().contains("line 14, column 1") && e.to_string().contains("unknown field `cu`"), "{e}");
    let e = RunConfig::from_str(&text(model, &data, &out, "sft", "[echo]\ncue = \"x\"\n")).unwrap_err();
    assert!(e.to_string().contains("[echo] is the options of method echo, but this run's method is sft"), "{e}");
    let e = RunConfig::from_str(&text(model, &data, &out, "echo", "[dpo]\nbeta = 0.5\n")).unwrap_err();
    assert!(e.to_string().contains("[dpo] is the options of method dpo, but this run's method is echo"), "{e}");

    let cfg = RunConfig::from_str(&text(model, &data, &out, "echo", "[echo]\ncue = \"Say yes:\"\n")).unwrap();
    assert_eq!(cfg.options::<EchoOptions>().unwrap().cue, "Say yes:");
    let logs = methods::run(&cfg, false).unwrap();
    assert_eq!(logs.len(), 6);
    assert!(logs.last().unwrap().loss < logs[0].loss, "{} -> {}", logs[0].loss, logs.last().unwrap().loss);
    // The saved run names its method; its section is kept in config.toml.
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains("method = \"echo\"") && saved.contains("[echo]") && saved.contains("Say yes:"), "{saved}");
    assert!(out.join("finished.json").is_file() && out.join("final/config.json").is_file());

    // At inference the control is applied by the method's own code.
    let m = Controlled::load(out.join("final").to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(m.spec.as_ref().unwrap().method, "echo");
    let ids = m.tokenizer().encode("q3:", true).unwrap();
    let params = SamplingParams { max_new_tokens: 2, temperature: 0.0, ..Default::default() };
    let before = APPLIED.load(Ordering::SeqCst);
    m.generate(std::slice::from_ref(&ids), Some("good"), &params, |_, _| Ok(())).unwrap();
    assert_eq!(APPLIED.load(Ordering::SeqCst), before + 1);
    m.generate(&[ids], None, &params, |_, _| Ok(())).unwrap();
    assert_eq!(APPLIED.load(Ordering::SeqCst), before + 1, "no control, nothing applied");
}
