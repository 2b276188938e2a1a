//! Preference data on disk: every format from files (JSONL, JSON arrays, gzip), the exact
//! prompt/response boundary, the truncation policy with its counts, and bad input refused with
//! file and line (or skipped and counted).

mod common;

use common::tiny_tokenizer;
use meet::data::preference::{read_preferences, Format, PreferenceOptions};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

fn write(dir: &Path, name: &str, lines: &[serde_json::Value]) -> PathBuf {
    let p = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn opts() -> PreferenceOptions {
    PreferenceOptions { max_prompt_length: None, ..Default::default() }
}

#[test]
fn text_prompts_keep_the_boundary_and_end_responses_with_eos() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer();
    let p = write(dir.path(), "trl.jsonl", &[json!({"prompt": "Q: hi?", "chosen": " A: yes", "rejected": " A: no"})]);
    let (pairs, stats) = read_preferences(&p, &tok, &opts()).unwrap();
    let eos = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(stats.pairs, 1);
    let pair = &pairs[0];
    assert_eq!(pair.prompt, tok.encode("Q: hi?", true).unwrap());
    assert_eq!(pair.chosen, [tok.encode(" A: yes", false).unwrap(), vec![eos]].concat());
    assert_eq!(pair.rejected, [tok.encode(" A: no", false).unwrap(), vec![eos]].concat());
}

#[test]
fn chat_records_use_the_template_and_stop_at_its_end_of_turn() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer();
    let msgs = |a: &str| json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]);
    let p = write(dir.path(), "conv.jsonl", &[json!({"chosen": msgs("hello"), "rejected": msgs("go")})]);
    let (pairs, _) = read_preferences(&p, &tok, &opts()).unwrap();
    let dec = |ids: &[u32]| tok.decode(ids, false).unwrap();
    assert_eq!(dec(&pairs[0].prompt), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    // The template's "\n" after <|im_end|> is not learned: the response ends at end-of-turn.
    assert_eq!(dec(&pairs[0].chosen), "hello<|im_end|>");
    assert_eq!(dec(&pairs[0].rejected), "go<|im_end|>");
}

#[test]
fn every_format_reads_from_files_plain_json_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer();
    let dec = |ids: &[u32]| tok.decode(ids, false).unwrap();
    // Anthropic HH-RLHF: the prompt is the dialogue up to the last Assistant turn.
    let hh = json!({
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: Sure, here.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: No."
    });
    let p = dir.path().join("hh.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::fast());
    writeln!(gz, "{hh}").unwrap();
    gz.finish().unwrap();
    let (pairs, _) = read_preferences(&p, &tok, &opts()).unwrap();
    assert_eq!(
        dec(&pairs[0].prompt),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nJoke?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(dec(&pairs[0].chosen), "Sure, here.<|im_end|>");
    // OpenAI summarize-from-feedback comparisons.
    let tldr = json!({"info": {"id": "t3", "post": "My cat sleeps.", "title": "Cat", "subreddit": "cats"},
                      "summaries": [{"text": " cat naps", "policy": "a"}, {"text": "dog", "policy": "b"}],
                      "choice": 0, "worker": "w", "batch": "b", "split": "train"});
    let p = write(dir.path(), "tldr.jsonl", &[tldr]);
    let (pairs, _) = read_preferences(&p, &tok, &opts()).unwrap();
    assert_eq!(dec(&pairs[0].prompt), "SUBREDDIT: r/cats\n\nTITLE: Cat\n\nPOST: My cat sleeps.\n\nTL;DR:");
    assert_eq!(dec(&pairs[0].chosen), " cat naps<|im_end|>");
    assert_eq!(dec(&pairs[0].rejected), " dog<|im_end|>");
    // LLaMA-Factory's preference JSON (an array), ShareGPT style with a system prompt.
    let lf = json!([{"conversations": [{"from": "human", "value": "2+2?"}], "system": "Be brief.",
                     "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}]);
    let p = dir.path().join("lf.json");
    std::fs::write(&p, lf.to_string()).unwrap();
    let (pairs, _) = read_preferences(&p, &tok, &opts()).unwrap();
    assert_eq!(
        dec(&pairs[0].prompt),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(dec(&pairs[0].rejected), "5<|im_end|>");
}

#[test]
fn truncation_keeps_the_prompt_end_caps_responses_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer();
    let p = write(
        dir.path(),
        "long.jsonl",
        &[
            json!({"prompt": "0123456789", "chosen": "abcdefgh", "rejected": "xy"}),
            json!({"prompt": "p", "chosen": "a", "rejected": "b"}),
        ],
    );
    // Byte-level: one token per character, plus EOS after each response.
    let o = PreferenceOptions {
        max_length: 12,
        max_prompt_length: Some(6),
        max_completion_length: Some(7),
        ..Default::default()
    };
    let (pairs, stats) = read_preferences(&p, &tok, &o).unwrap();
    let dec = |ids: &[u32]| tok.decode(ids, false).unwrap();
    // Response capped at 7 (no EOS left); the prompt keeps its last 12 - 7 = 5 tokens.
    assert_eq!(dec(&pairs[0].chosen), "abcdefg");
    assert_eq!(dec(&pairs[0].rejected), "xy<|im_end|>");
    assert_eq!(dec(&pairs[0].prompt), "56789");
    assert_eq!((stats.prompts_cut, stats.responses_cut), (1, 1));
    assert_eq!(dec(&pairs[1].prompt), "p");
}

#[test]
fn bad_records_name_file_and_line_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tiny_tokenizer();
    let good = json!({"prompt": "p", "chosen": "a", "rejected": "b"}).to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed", format!("{good}\n{{\"prompt\": \"p\",\n").into_bytes(), "line 2: invalid JSON"),
        (
            "missing",
            format!("{good}\n{}\n", json!({"prompt": "p", "chosen": "a"})).into_bytes(),
            "line 2: missing field 'rejected'",
        ),
        (
            "empty",
            format!("{}\n", json!({"prompt": "p", "chosen": "", "rejected": "b"})).into_bytes(),
            "line 1: the chosen response is empty",
        ),
        (
            "same",
            format!("{good}\n\n{}\n", json!({"prompt": "p", "chosen": "a", "rejected": "a"})).into_bytes(),
            "line 3: chosen and rejected responses are identical",
        ),
        ("bytes", [good.as_bytes(), b"\n{\"prompt\": \"\xff\"}\n"].concat(), "line 2: not valid UTF-8"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&p, bytes).unwrap();
        let err = read_preferences(&p, &tok, &opts()).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()) && err.contains(want), "{name}: {err}");
    }
    // With skip_invalid the usable rows are kept and every skipped one is listed.
    let p = write(
        dir.path(),
        "mixed.jsonl",
        &[
            json!({"prompt": "p", "chosen": "a", "rejected": "b"}),
            json!({"prompt": "p", "chosen": "a"}),
            json!({"prompt": "q", "chosen": "c", "rejected": "c"}),
            json!({"prompt": "r", "chosen": "c", "rejected": "d"}),
        ],
    );
    let o = PreferenceOptions { skip_invalid: true, ..opts() };
    let (pairs, stats) = read_preferences(&p, &tok, &o).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(stats.skipped.len(), 2);
    assert!(stats.skipped[0].starts_with("line 2:") && stats.skipped[1].starts_with("line 3:"), "{:?}", stats.skipped);
    // Malformed lines are per-record problems too: a line that is not JSON, one that is not
    // UTF-8, a conversational record without an assistant turn, an empty response.
    let good = json!({"prompt": "p", "chosen": "a", "rejected": "b"}).to_string();
    let no_answer = json!({"prompt": [{"role": "user", "content": "hi"}],
                           "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]});
    let rows = [
        good.as_bytes(),
        b"\n{\"prompt\": \"p\", \"chosen\": \n",
        b"{\"prompt\": \"\xff\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
        format!("{no_answer}\n").as_bytes(),
        format!("{}\n", json!({"prompt": "p", "chosen": "", "rejected": "b"})).as_bytes(),
        format!("{good}\n").as_bytes(),
    ]
    .concat();
    let m = dir.path().join("malformed.jsonl");
    std::fs::write(&m, rows).unwrap();
    let err = read_preferences(&m, &tok, &opts()).unwrap_err().to_string();
    assert!(err.contains("malformed.jsonl") && err.contains("line 2: invalid JSON"), "{err}");
    let (pairs, stats) = read_preferences(&m, &tok, &o).unwrap();
    assert_eq!(pairs.len(), 2);
    let at: Vec<&str> = stats.skipped.iter().map(|s| s.split(':').next().unwrap()).collect();
    assert_eq!(at, ["line 2", "line 3", "line 4", "line 5"], "{:?}", stats.skipped);
    assert!(
        stats.skipped[1].contains("not valid UTF-8") && stats.skipped[2].contains("assistant"),
        "{:?}",
        stats.skipped
    );
    // File-level problems still stop: nothing usable, or no file.
    std::fs::write(&m, "{not json\n").unwrap();
    let err = read_preferences(&m, &tok, &o).unwrap_err().to_string();
    assert!(err.contains("no usable preference records (1 skipped)"), "{err}");
    assert!(read_preferences(&dir.path().join("absent.jsonl"), &tok, &o)
        .unwrap_err()
        .to_string()
        .contains("absent.jsonl"));
    // A forced format that does not fit says which format it tried.
    let o = PreferenceOptions { format: Format::Tldr, ..opts() };
    let err = read_preferences(&p, &tok, &o).unwrap_err().to_string();
    assert!(err.contains("line 1: missing field 'info'") && err.contains("read as tldr records"), "{err}");
}
