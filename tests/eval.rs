//! Judges and the sentiment data: VADER against the Python reference implementation, the rated
//! snippets read with their errors named.

use meet::data::sentiment::read_snippets;
use meet::eval::vader::{Scope, Vader};
use meet::eval::Judge;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn vader_matches_the_python_implementation() {
    // scripts/make_vader_fixture.py: vaderSentiment 3.3.2 on 200 movie snippets + edge cases.
    // MEET_VADER_FIXTURE points at a larger file of the same form (e.g. every snippet).
    let path = std::env::var("MEET_VADER_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("tests/fixtures/vader_expected.json"));
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = Vader::new(Scope::Response);
    let mut worst = (0.0f64, String::new());
    let mut n_bad = 0;
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let d = (v.compound(text) - c["compound"].as_f64().unwrap()).abs();
        n_bad += (d > 1e-4) as usize;
        if d > worst.0 {
            worst = (d, text.to_string());
        }
    }
    eprintln!("{n_bad} of {} differ by more than 1e-4", cases.len());
    assert!(worst.0 <= 1e-4 + 1e-12, "largest difference {} on {:?}", worst.0, worst.1);
    let scores = v.score(&[("", "I loved it"), ("", "I hated it")]).unwrap();
    assert!(scores[0] > 0.5 && scores[1] < -0.5);
    let full = Vader::new(Scope::Full);
    assert_eq!(full.score(&[("Awful. ", "")]).unwrap()[0], v.compound("Awful. "));
}

#[test]
fn snippets_read_with_bad_lines_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.txt");
    std::fs::write(&p, "1\t2.5\tA fine film.\r\n2\t-1.2\tDull.\n").unwrap();
    let s = read_snippets(&p).unwrap();
    assert_eq!((s.len(), s[0].rating, s[1].text.as_str()), (2, 2.5, "Dull."));
    for (body, want) in [
        ("1\t2.5\n", "line 1: expected id"),
        ("1\t2.5\tok\n2\tx\tno\n", "line 2: rating 'x'"),
        ("1\t9\tno\n", "line 1: rating '9'"),
    ] {
        std::fs::write(&p, body).unwrap();
        let e = read_snippets(&p).unwrap_err().to_string();
        assert!(e.contains("g.txt") && e.contains(want), "{e}");
    }
    // The real file, when fetched: 10,605 snippets whose ratings span the scale.
    let real = root().join("data/sentiment/movieReviewSnippets_GroundTruth.txt");
    if real.is_file() {
        let s = read_snippets(&real).unwrap();
        assert_eq!(s.len(), 10605);
        assert!(s.iter().any(|x| x.rating < -3.0) && s.iter().any(|x| x.rating > 3.0));
    }
}

mod common;

use meet::controls::Controlled;
use meet::eval::sample::{evaluate, paired_scores, summarize, EvalOptions};
use meet::generate::SamplingParams;
use meet::LoadOptions;

fn tiny_folder(dir: &std::path::Path, seed: u64) -> String {
    let p = dir.join(format!("m{seed}"));
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(seed, 64), &p).unwrap();
    p.to_string_lossy().into_owned()
}

fn opts() -> EvalOptions {
    EvalOptions {
        control: None,
        chat: false,
        samples: 2,
        params: SamplingParams { temperature: 1.0, seed: 3, max_new_tokens: 6, ..Default::default() },
        batch: 3,
        progress: None,
    }
}

#[test]
fn evaluation_samples_scores_and_measures_kl() {
    let dir = tempfile::tempdir().unwrap();
    let model = Controlled::load(&tiny_folder(dir.path(), 1), &LoadOptions::default()).unwrap();
    let other = Controlled::load(&tiny_folder(dir.path(), 2), &LoadOptions::default()).unwrap();
    let prompts: Vec<String> = ["good day", "bad", "what a film"].iter().map(|s| s.to_string()).collect();
    let judge = Vader::new(Scope::Full);
    let s = evaluate(&model, Some(&model), &judge, &prompts, &opts()).unwrap();
    assert_eq!(s.len(), 6);
    assert!(s.iter().enumerate().all(|(i, x)| (x.prompt_index, x.sample_index) == (i / 2, i % 2)));
    // Against itself the KL estimate is exactly zero; the judge saw prompt + response.
    assert!(s.iter().all(|x| x.kl == Some(0.0)), "{:?}", s.iter().map(|x| x.kl).collect::<Vec<_>>());
    // Against a second copy of the same weights it is computed: the log-probs kept while sampling
    // must equal a full forward pass's, so it is zero up to rounding.
    let twin = Controlled::load(&tiny_folder(dir.path(), 1), &LoadOptions::default()).unwrap();
    let t = evaluate(&model, Some(&twin), &judge, &prompts, &opts()).unwrap();
    assert!(t.iter().all(|x| x.kl.is_some_and(|k| k.abs() < 1e-3)), "{:?}", t.iter().map(|x| x.kl).collect::<Vec<_>>());
    assert!(t.iter().any(|x| x.kl != Some(0.0)), "not the shortcut");
    assert_eq!(s[2].score, judge.compound(&format!("{}{}", s[2].prompt, s[2].response)));
    // Seeded: a rerun draws the same responses.
    assert_eq!(evaluate(&model, None, &judge, &prompts, &opts()).unwrap()[5].response, s[5].response);
    // Response log-probs (what the KL estimate subtracts) against the full logits of the unpadded
    // sequence, for a response of known tokens next to a longer one (so the batch is padded).
    let tok = model.tokenizer();
    let p = tok.encode("good day", true).unwrap();
    let r: Vec<u32> = vec![70, 80, 90, 100];
    let logp = |c: &Controlled| -> f64 {
        let ids: Vec<u32> = [p.as_slice(), &r].concat();
        let t = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = c.policy.pretrained.model.forward(&t).unwrap().squeeze(0).unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
        (p.len()..ids.len()).map(|j| lsm[j - 1][ids[j] as usize] as f64).sum()
    };
    let long = tok.encode("what a film it was", true).unwrap();
    for c in [&model, &other] {
        let got = c.response_logps(&[p.clone(), long.clone()], &[r.clone(), vec![5, 6, 7, 8, 9, 10]], None, 2).unwrap();
        assert!((got[0] - logp(c)).abs() < 1e-3, "{} vs {}", got[0], logp(c));
    }
    let s = evaluate(&model, Some(&other), &judge, &prompts, &opts()).unwrap();
    assert!(s.iter().all(|x| x.kl.is_some_and(|k| k != 0.0)));
    let sum = summarize(&s, 0).unwrap();
    assert_eq!(sum.score.n, 6);
    assert!(sum.kl.is_some() && sum.length.value > 0.0);
    // Pairing: an evaluation against itself; a mismatch is refused.
    let p = paired_scores(&s, &s).unwrap();
    assert_eq!((p.only_a, p.only_b), (0, 0));
    assert_eq!(meet::eval::stats::win_rate(&p.a, &p.b, 0).unwrap().value, 0.5);
    // Fewer samples on one side: the shared ones are compared and the rest counted.
    let p = paired_scores(&s, &s[..3]).unwrap();
    assert_eq!((p.a.len(), p.only_a, p.only_b), (3, 3, 0));
    // Another prompt list is refused.
    let mut other_prompts = s.clone();
    other_prompts[0].prompt.push_str(" (changed)");
    let e = paired_scores(&s, &other_prompts).unwrap_err().to_string();
    assert!(e.contains("different prompt files"), "{e}");
}

#[test]
fn the_cli_evaluates_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_folder(dir.path(), 1);
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"nice\"}\n{\"prompt\": \"awful\"}\n").unwrap();
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_meet")).args(args).output().unwrap();
    let out = dir.path().join("e.jsonl");
    let o = run(&[
        "eval",
        "--model",
        &model,
        "--prompts",
        prompts.to_str().unwrap(),
        "--reference",
        &model,
        "--samples",
        "3",
        "--max-new-tokens",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(summary["summary"]["score"]["n"], 6);
    assert!(summary["summary"]["kl"]["value"].as_f64().unwrap().abs() < 1e-4, "{summary}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 6);
    let o = run(&["compare", out.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(v["win_rate"]["value"], 0.5);
    // Bad prompts file: the line is named.
    std::fs::write(&prompts, "{\"prompt\": \"ok\"}\n{\"text\": \"no\"}\n").unwrap();
    let o = run(&["eval", "--model", &model, "--prompts", prompts.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("line 2: field 'prompt'"), "{err}");
}

#[test]
fn judged_pairs_keep_the_best_and_worst_and_read_back_as_preferences() {
    let dir = tempfile::tempdir().unwrap();
    let model = Controlled::load(&tiny_folder(dir.path(), 1), &LoadOptions::default()).unwrap();
    let prompts: Vec<String> = (0..6).map(|i| format!("review {i}:")).collect();
    // A judge that prefers longer responses (byte-level garbage has no sentiment).
    struct Length;
    impl Judge for Length {
        fn name(&self) -> &str {
            "length"
        }
        fn score(&self, items: &[(&str, &str)]) -> meet::Result<Vec<f64>> {
            Ok(items.iter().map(|(_, r)| r.chars().count() as f64).collect())
        }
    }
    let o = EvalOptions { samples: 4, ..opts() };
    let (pairs, ties) = meet::eval::pairs::best_worst_pairs(&model, &Length, &prompts, &o).unwrap();
    assert_eq!(pairs.len() + ties, 6);
    assert!(!pairs.is_empty());
    for p in &pairs {
        assert!(p.chosen_score > p.rejected_score && p.chosen.chars().count() > p.rejected.chars().count());
    }
    let all = evaluate(&model, None, &Length, &prompts, &o).unwrap();
    for p in &pairs {
        let best = all
            .iter()
            .filter(|s| s.prompt == p.prompt && !s.response.trim().is_empty())
            .map(|s| s.score)
            .fold(f64::MIN, f64::max);
        assert_eq!(p.chosen_score, best);
    }
    // The file meet pairs writes is TRL preference data.
    let path = dir.path().join("pairs.jsonl");
    let text: String = pairs.iter().map(|p| format!("{}\n", serde_json::json!(p))).collect();
    std::fs::write(&path, text).unwrap();
    let opts = meet::data::preference::PreferenceOptions::default();
    let (read, _) = meet::data::preference::read_preferences(&path, model.tokenizer(), &opts).unwrap();
    assert_eq!(read.len(), pairs.len());
}
