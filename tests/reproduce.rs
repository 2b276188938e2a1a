//! A fresh quick-profile run of the README's experiment reproduces the committed
//! `docs/results/sentiment-quick/results.jsonl` bit for bit, where this machine runs the same
//! kernels as those recorded in its first line (else the test says so and checks nothing): a
//! change that alters the numerics must regenerate the committed results in the same change.
//!
//! To regenerate: `meet experiment examples/sentiment.toml --quick`, then copy
//! `runs/sentiment/quick/{results.jsonl,report.md}` to `docs/results/sentiment-quick/`.

use meet::experiment::{run, ExperimentConfig};
use meet::provenance::{Numerics, Provenance};
use std::path::Path;

#[test]
fn a_quick_run_reproduces_the_committed_quick_results() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let committed = std::fs::read_to_string(root.join("docs/results/sentiment-quick/results.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(committed.lines().next().unwrap()).unwrap();
    let as_made: Numerics = serde_json::from_value(first["provenance"]["numerics"].clone()).unwrap();
    let mut recorded = as_made.clone();
    let here = Provenance::current();
    let mut cfg = ExperimentConfig::from_file(&root.join("examples/sentiment.toml")).unwrap();
    // Where bf16 products run matters only to an experiment that trains in bf16.
    if cfg.train.get("dtype").and_then(|v| v.as_str()) != Some("bf16") {
        recorded.bf16_products = here.numerics.bf16_products.clone();
    }
    if recorded != here.numerics {
        eprintln!(
            "SKIPPED: the committed quick results were computed with {as_made:?}; this machine runs {:?}, \
             which sums in another order, so no bit-for-bit comparison is possible here",
            here.numerics
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    cfg.output_dir = dir.path().to_path_buf();
    cfg.quick();
    run(&cfg).unwrap();
    let fresh = std::fs::read_to_string(cfg.output_dir.join("results.jsonl")).unwrap();
    let (a, b): (Vec<&str>, Vec<&str>) = (committed.lines().skip(1).collect(), fresh.lines().skip(1).collect());
    assert_eq!(a.len(), b.len(), "the fresh run has {} results, the committed file {}", b.len(), a.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x,
            y,
            "result {} differs from the committed quick results (made by {}); if the numerics changed \
             on purpose, regenerate them (see tests/reproduce.rs)",
            i + 1,
            first["provenance"]["commit"]
        );
    }
}
