//! The LLM judge (`meet compare --judge llm:URL[#MODEL]`): against a scripted OpenAI-compatible
//! endpoint (a judge that prefers the response saying GOOD, garbles some answers, fails with 429
//! and 500 before answering some), for the protocol, strict parsing, retries, the API key, the
//! on-disk cache and the statistics; then end to end against `meet serve` itself.

mod common;

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn meet(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meet"));
    c.args(args).env("RAYON_NUM_THREADS", "2").env_remove("OPENAI_API_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[derive(Default)]
struct Mock {
    requests: AtomicUsize,
    /// Prompts seen, to fail each FLAKY prompt twice (429, then 500) before answering.
    flaky: Mutex<std::collections::HashMap<String, usize>>,
    unauthorised: AtomicUsize,
}

/// The scripted judge on a loopback port; returns its base URL.
fn start_mock(mock: Arc<Mock>) -> String {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let m = mock.clone();
            let app = axum::Router::new()
                .route("/v1/models", axum::routing::get(|| async { axum::Json(json!({"data": [{"id": "scripted"}]})) }))
                .route(
                    "/v1/chat/completions",
                    axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                        let m = m.clone();
                        async move {
                            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer sk-test") {
                                m.unauthorised.fetch_add(1, Ordering::SeqCst);
                                return (StatusCode::UNAUTHORIZED, "no").into_response();
                            }
                            m.requests.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(body["model"], "scripted");
                            assert_eq!(body["temperature"], 0);
                            let prompt = body["messages"][0]["content"].as_str().unwrap().to_string();
                            if prompt.contains("FLAKY") {
                                let mut f = m.flaky.lock().unwrap();
                                let n = f.entry(prompt.clone()).or_insert(0);
                                *n += 1;
                                match *n {
                                    1 => return (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response(),
                                    2 => return (StatusCode::BAD_GATEWAY, "oops").into_response(),
                                    _ => {}
                                }
                            }
                            let answer = if prompt.contains("GARBLE") {
                                "Both are fine, I suppose.".to_string()
                            } else {
                                let a = prompt.split("Response A:\n").nth(1).unwrap();
                                let (a, _) = a.split_once("\n\nResponse B:").unwrap();
                                let pick = if a.contains("GOOD") { "A" } else { "B" };
                                format!("Comparison: one says GOOD.\nMore helpful: {pick}")
                            };
                            axum::Json(
                                json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}),
                            )
                            .into_response()
                        }
                    }),
                );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{}/v1", rx.recv().unwrap())
}

fn sample(i: usize, prompt: &str, response: &str) -> Value {
    json!({"prompt_index": i, "sample_index": 0, "prompt": prompt, "response": response, "score": 0.0,
           "tokens": 3, "cut": false, "kl": null})
}

fn write(path: &Path, rows: &[Value]) {
    std::fs::write(path, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
}

fn result(o: &Output) -> Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
}

#[test]
fn the_llm_judge_asks_both_orders_parses_strictly_retries_and_caches() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(Mock::default());
    let url = start_mock(mock.clone());
    let prompts = ["q0", "q1 FLAKY", "q2", "q3 GARBLE", "q4", "q5"];
    let a: Vec<Value> = prompts.iter().enumerate().map(|(i, p)| sample(i, p, "a GOOD answer")).collect();
    let b: Vec<Value> = prompts.iter().enumerate().map(|(i, p)| sample(i, p, "a plain answer")).collect();
    let (fa, fb) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    write(&fa, &a);
    write(&fb, &b);
    let cache = dir.path().join("cache");
    let out = dir.path().join("judgements.jsonl");
    let env = [("OPENAI_API_KEY", "sk-test"), ("MEET_JUDGE_CACHE", cache.to_str().unwrap())];
    let judge = format!("llm:{url}");
    let args =
        ["compare", fa.to_str().unwrap(), fb.to_str().unwrap(), "--judge", &judge, "--out", out.to_str().unwrap()];
    let r = result(&meet(&args, &env))["llm_judge"].clone();
    // The model came from /v1/models (it lists one).
    assert_eq!(r["judge"], format!("llm:{url}#scripted"));
    assert_eq!(r["pairs"], 6);
    // GARBLE's two answers have no verdict: counted, not guessed.
    assert_eq!(r["unparseable"], 2);
    // The judge always picks GOOD: a wins every parsed verdict, in both orders.
    assert_eq!(r["win_rate"]["value"], 1.0);
    assert_eq!(r["win_rate"]["n"], 5);
    assert_eq!(r["first_order_win_rate"]["value"], 1.0);
    assert_eq!(r["agreement"], 1.0);
    // Each pair was asked with GOOD at A once and at B once: no position bias to see.
    assert_eq!(r["position_a_share"], 0.5);
    assert_eq!(r["cached"], 0);
    // 12 answers, 2 of them after a 429 and a 502 each.
    assert_eq!(mock.requests.load(Ordering::SeqCst), 12 + 4);
    assert_eq!(mock.flaky.lock().unwrap().values().copied().collect::<Vec<_>>(), [3, 3]);
    // The judgements record the orders and raw answers.
    let js: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(js.len(), 6);
    let firsts: Vec<bool> = js.iter().map(|j| j["a_shown_first"].as_bool().unwrap()).collect();
    assert!(firsts.contains(&true) && firsts.contains(&false), "orders are drawn, not fixed: {firsts:?}");
    for j in &js {
        let want = if j["a_shown_first"].as_bool().unwrap() { ["A", "B"] } else { ["B", "A"] };
        if j["prompt"] != "q3 GARBLE" {
            assert_eq!(j["positions"], json!(want), "{j}");
            assert!(j["answers"][0].as_str().unwrap().contains("More helpful:"));
        } else {
            assert_eq!(j["positions"], json!([null, null]));
        }
    }
    // A rerun sends nothing: every answer comes from the cache.
    let again = result(&meet(&args, &env))["llm_judge"].clone();
    assert_eq!(again["cached"], 12);
    assert_eq!(again["win_rate"], r["win_rate"]);
    assert_eq!(mock.requests.load(Ordering::SeqCst), 16);
    // A wrong key: a clear error, nothing guessed.
    let bad_cache = dir.path().join("cache2");
    let o = meet(&args, &[("OPENAI_API_KEY", "nope"), ("MEET_JUDGE_CACHE", bad_cache.to_str().unwrap())]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("401"), "{err}");
    assert!(mock.unauthorised.load(Ordering::SeqCst) > 0);
    // A judge spec that is not one.
    let o = meet(&["compare", fa.to_str().unwrap(), fb.to_str().unwrap(), "--judge", "llm:ftp://x"], &env);
    assert!(String::from_utf8_lossy(&o.stderr).contains("must start with http://"));
}

#[test]
fn meet_eval_judges_each_response_against_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(Mock::default());
    let url = start_mock(mock.clone());
    let (m1, m2) = (dir.path().join("m1"), dir.path().join("m2"));
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(3, 256), &m1).unwrap();
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(4, 256), &m2).unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "first\nsecond\nthird\n").unwrap();
    let out = dir.path().join("scored.jsonl");
    let judge = format!("llm:{url}#scripted");
    let cache = dir.path().join("cache");
    let env = [("OPENAI_API_KEY", "sk-test"), ("MEET_JUDGE_CACHE", cache.to_str().unwrap())];
    let args = [
        "eval",
        "--model",
        m1.to_str().unwrap(),
        "--reference",
        m2.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--judge",
        &judge,
        "--samples",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ];
    let r = result(&meet(&args, &env))["llm_judge"].clone();
    // Neither says GOOD: the scripted judge always answers B, so each response wins in one order
    // and loses in the other: win rate ½, no agreement, every verdict for position B.
    assert_eq!(r["pairs"], 6);
    assert_eq!(r["unparseable"], 0);
    assert_eq!(r["win_rate"]["value"], 0.5);
    assert_eq!(r["agreement"], 0.0);
    assert_eq!(r["position_a_share"], 0.0);
    assert_eq!(mock.requests.load(Ordering::SeqCst), 12);
    let scored: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(scored.len(), 6);
    assert!(scored.iter().all(|s| s["score"] == 0.5 && s["kl"].is_f64()), "{scored:?}");
    // Without a reference there is nothing to compare with.
    let o = meet(&args[..3].iter().chain(&args[5..]).copied().collect::<Vec<_>>(), &env);
    assert!(String::from_utf8_lossy(&o.stderr).contains("give --reference"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_llm_judge_runs_against_meet_serve() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    meet::models::pretrained::save_hf_folder(&common::tiny_raw(3, 2048), &model).unwrap();
    let server = common::serve_child(model.to_str().unwrap(), &["--served-model-name", "judge"]);
    let url = &server.url;
    let a: Vec<Value> = (0..3).map(|i| sample(i, &format!("question {i}"), "yes")).collect();
    let b: Vec<Value> = (0..3).map(|i| sample(i, &format!("question {i}"), "no")).collect();
    let (fa, fb) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    write(&fa, &a);
    write(&fb, &b);
    let cache = dir.path().join("cache");
    let judge = format!("llm:{url}/v1#judge");
    let o = meet(
        &["compare", fa.to_str().unwrap(), fb.to_str().unwrap(), "--judge", &judge],
        &[("MEET_JUDGE_CACHE", cache.to_str().unwrap())],
    );
    let r = result(&o)["llm_judge"].clone();
    drop(server);
    // A random tiny model never writes the verdict line: every answer is unparseable, and the
    // win rate is absent rather than invented.
    assert_eq!(r["pairs"], 3);
    assert_eq!(r["unparseable"], 6);
    assert!(r["win_rate"].is_null(), "{r}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("6 of 6 answers unparseable"), "{stderr}");
    // Six answers cached, one file each.
    let files = walk(&cache);
    assert_eq!(files, 6);
}

fn walk(p: &Path) -> usize {
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path())
            } else {
                1
            }
        })
        .sum()
}
