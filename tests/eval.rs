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
