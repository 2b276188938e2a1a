//! A fresh quick-profile run of the README's experiment reproduces a committed quick-profile
//! `results.jsonl` bit for bit, where this machine runs the same kernels as those recorded in that
//! file's first line: `docs/results/sentiment-quick/` (made on AVX-512) and each folder below it
//! (`avx2/`: made on an AVX2-only CPU). Where none matches, the test says so and checks nothing.
//! A change that alters the numerics must regenerate the committed results in the same change.
//!
//! To regenerate on a machine with the kernels of one of them: `meet experiment
//! examples/sentiment.toml --quick`, then copy `runs/sentiment/quick/{results.jsonl,report.md}` to
//! its folder. A folder whose kernels no machine at hand has (the `gemm` crate's AVX-512 products
//! cannot be capped, so an AVX-512 machine cannot remake `avx2/`) is deleted by a change that may
//! alter its numerics, and remade by the next session on such a machine.

use meet::experiment::{run, ExperimentConfig};
use meet::provenance::{Numerics, Provenance};
use std::path::{Path, PathBuf};

/// The committed quick-results folders: the top one and its subfolders holding a `results.jsonl`.
fn committed_folders(top: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![top.to_path_buf()];
    let mut subs: Vec<PathBuf> = std::fs::read_dir(top)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("results.jsonl").is_file())
        .collect();
    subs.sort();
    dirs.extend(subs);
    dirs
}

#[test]
fn a_quick_run_reproduces_the_committed_quick_results() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let here = Provenance::current();
    let mut cfg = ExperimentConfig::from_file(&root.join("examples/sentiment.toml")).unwrap();
    // Where bf16 products run matters only to an experiment that trains in bf16.
    let bf16 = cfg.train.get("dtype").and_then(|v| v.as_str()) == Some("bf16");
    let mut seen = Vec::new();
    let mut matching = None;
    for dir in committed_folders(&root.join("docs/results/sentiment-quick")) {
        let committed = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(committed.lines().next().unwrap()).unwrap();
        let as_made: Numerics = serde_json::from_value(first["provenance"]["numerics"].clone()).unwrap();
        let mut recorded = as_made.clone();
        if !bf16 {
            recorded.bf16_products = here.numerics.bf16_products.clone();
        }
        if recorded == here.numerics {
            matching = Some((dir, committed, first));
            break;
        }
        seen.push(format!("{} ({as_made:?})", dir.strip_prefix(root).unwrap().display()));
    }
    let Some((dir, committed, first)) = matching else {
        eprintln!(
            "SKIPPED: the committed quick results were computed with other kernels than this machine's {:?}, \
             which sum in another order, so no bit-for-bit comparison is possible here: {}",
            here.numerics,
            seen.join("; ")
        );
        return;
    };
    eprintln!("comparing with {}", dir.display());
    let out = tempfile::tempdir().unwrap();
    cfg.output_dir = out.path().to_path_buf();
    cfg.quick();
    run(&cfg).unwrap();
    let fresh = std::fs::read_to_string(cfg.output_dir.join("results.jsonl")).unwrap();
    let (a, b): (Vec<&str>, Vec<&str>) = (committed.lines().skip(1).collect(), fresh.lines().skip(1).collect());
    assert_eq!(a.len(), b.len(), "the fresh run has {} results, {} has {}", b.len(), dir.display(), a.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x,
            y,
            "result {} differs from the committed quick results in {} (made by {}); if the numerics \
             changed on purpose, regenerate them (see tests/reproduce.rs)",
            i + 1,
            dir.display(),
            first["provenance"]["commit"]
        );
    }
}
