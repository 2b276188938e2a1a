//! `meet serve` over real HTTP: the binary started on a loopback port, talked to with reqwest.
//! Chat and text completions, streaming, `n > 1`, log-probabilities, concurrent requests under
//! different controls (each equal to `meet generate --control`), every bad input as an OpenAI
//! error, auth, a client leaving mid-stream, a panicking request, graceful shutdown. Tiny random
//! models, with controls trained by `meet train` for a few steps.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn meet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meet"));
    c.env("RAYON_NUM_THREADS", "2").env_remove("MEET_API_KEY");
    c
}

/// A running `meet serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    fn start(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = meet();
        cmd.args(["serve", "--model", model, "--addr", "127.0.0.1:0", "--served-model-name", "m"]).args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        let url = loop {
            let line = lines.next().unwrap_or_else(|| panic!("server ended: {seen}")).unwrap();
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.split("on http://").nth(1) {
                break format!("http://{}", rest.split_whitespace().next().unwrap().trim_end_matches("/v1"));
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let log = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Server { child, url, log }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client().post(format!("{}{path}", self.url)).json(body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let r = client().get(format!("{}{path}", self.url)).send().unwrap();
        (r.status().as_u16(), r.json().unwrap())
    }

    fn health(&self) -> Value {
        self.get("/health").1
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

/// The data of each `data:` line of a server-sent event stream, up to `[DONE]` (included).
fn sse_events(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}

/// A streamed request's text per choice, its finish reasons and its usage chunk.
fn stream(server: &Server, path: &str, body: &Value) -> (Vec<String>, Vec<String>, Option<Value>) {
    let r = client().post(format!("{}{path}", server.url)).json(body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_events(&r.text().unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let mut texts = vec![];
    let mut finishes = vec![];
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if texts.len() <= i {
                texts.resize(i + 1, String::new());
                finishes.resize(i + 1, String::new());
            }
            let piece = c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or("");
            texts[i].push_str(piece);
            if let Some(f) = c["finish_reason"].as_str() {
                finishes[i] = f.to_string();
            }
        }
    }
    (texts, finishes, usage)
}

/// Trained control folders over one tiny model: (kind, folder, controls).
struct Models {
    _dir: tempfile::TempDir,
    plain: String,
    trained: Vec<(&'static str, PathBuf, Vec<&'static str>)>,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        meet::models::pretrained::save_hf_folder(&common::tiny_raw(3, 4096), &model).unwrap();
        let prefs: String = (0..12)
            .map(|i| format!("{}\n", json!({"prompt": format!("q{i}:"), "chosen": " yes", "rejected": " no"})))
            .collect();
        let data = dir.path().join("prefs.jsonl");
        std::fs::write(&data, prefs).unwrap();
        let train = |name: &str, method: &str, extra: &[&str]| -> PathBuf {
            let out = dir.path().join(name);
            let o = meet()
                .args(["train", "--method", method, "--model", model.to_str().unwrap(), "--data"])
                .arg(&data)
                .arg("--output-dir")
                .arg(&out)
                .args(["--batch-size", "4", "--max-steps", "2"])
                .args(extra)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            out.join("final")
        };
        // Larger learning rates than a real run, so that two steps move the controls apart.
        let trained = vec![
            (
                "meet-lora",
                train("meet-lora", "meet", &["--set", "lora.r=4", "--set", "train.control_lr=0.05"]),
                vec!["good", "bad"],
            ),
            (
                "meet-prompt",
                train("meet-prompt", "meet", &["--set", "prompt.n=3", "--set", "train.control_lr=0.05"]),
                vec!["good", "bad"],
            ),
            (
                "control-token",
                train("ct", "control-token", &["--set", "train.lr=0.01", "--set", "model.train_weights=true"]),
                vec!["good", "bad"],
            ),
            (
                "coh",
                train("coh", "coh", &["--set", "train.lr=0.01", "--set", "model.train_weights=true"]),
                vec!["good", "bad"],
            ),
        ];
        Models { plain: model.to_string_lossy().into_owned(), trained, _dir: dir }
    })
}

/// `meet generate`'s text for one prompt (printed with one newline after it).
fn generate(model: &str, prompt: &str, control: Option<&str>, extra: &[&str]) -> String {
    let mut c = meet();
    c.args(["generate", "--model", model, "--prompt", prompt]).args(extra);
    if let Some(ctl) = control {
        c.args(["--control", ctl]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    out.strip_suffix('\n').expect("a final newline").to_string()
}

#[test]
fn chat_and_text_completions_stream_n_logprobs_and_usage() {
    let m = models();
    let s = Server::start(&m.plain, &[], &[]);
    assert_eq!(
        s.get("/health"),
        (200, json!({"status": "ok", "running_rows": 0, "waiting_requests": 0, "peak_rows": 0}))
    );
    let (status, list) = s.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], "m");

    // Text completion, greedy: the text `meet generate` gives.
    let body = json!({"model": "m", "prompt": "hello", "temperature": 0, "max_tokens": 12});
    let (status, r) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, generate(&m.plain, "hello", None, &["--max-new-tokens", "12"]));
    let usage = &r["usage"];
    assert_eq!(usage["prompt_tokens"], 5);
    assert_eq!(usage["total_tokens"].as_u64(), Some(5 + usage["completion_tokens"].as_u64().unwrap()));
    // Streamed: the same text, in pieces, ending in [DONE], with usage when asked.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (texts, finishes, u) = stream(&s, "/v1/completions", &sb);
    assert_eq!(texts, [text]);
    assert_eq!(finishes, [r["choices"][0]["finish_reason"].as_str().unwrap()]);
    assert_eq!(u.as_ref(), Some(usage));

    // Chat: the chat template applied, as `meet generate --chat`.
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi there"}], "temperature": 0,
                      "max_completion_tokens": 10});
    let (status, r) = s.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let reply = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(reply, generate(&m.plain, "hi there", None, &["--chat", "--max-new-tokens", "10"]));
    let mut sc = chat.clone();
    sc["stream"] = json!(true);
    let (texts, _, u) = stream(&s, "/v1/chat/completions", &sc);
    assert_eq!(texts, [reply]);
    assert!(u.is_none(), "usage only when asked");

    // n = 3 sampled choices: choice i is `meet generate --seed SEED+i`.
    let nb = json!({"model": "m", "prompt": "abc", "temperature": 1.0, "seed": 7, "n": 3, "max_tokens": 8});
    let (status, r) = s.post("/v1/completions", &nb);
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let seed = (7 + i).to_string();
        let want = generate(&m.plain, "abc", None, &["--max-new-tokens", "8", "--temperature", "1", "--seed", &seed]);
        assert_eq!(c["text"].as_str().unwrap(), want, "choice {i}");
    }
    let mut ns = nb.clone();
    ns["stream"] = json!(true);
    let (texts, finishes, _) = stream(&s, "/v1/completions", &ns);
    let want: Vec<&str> = choices.iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts, want);
    assert_eq!(finishes.len(), 3);

    // Log-probabilities: one entry per token, the chosen token among the alternatives, each ≤ 0.
    let lb = json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0,
                    "max_tokens": 5, "logprobs": true, "top_logprobs": 3, "ignore_eos": true});
    let (status, r) = s.post("/v1/chat/completions", &lb);
    assert_eq!(status, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], t["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - t["logprob"].as_f64().unwrap()).abs() < 1e-6);
        assert!(top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }
    let tb = json!({"model": "m", "prompt": "x", "temperature": 0, "max_tokens": 4, "logprobs": 2, "ignore_eos": true});
    let (_, r) = s.post("/v1/completions", &tb);
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["text_offset"][0], 0);
    let joined: String = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, r["choices"][0]["text"].as_str().unwrap());

    // A stop string: the text ends before it, streamed or not, and never shows it.
    let full = generate(&m.plain, "hello", None, &["--max-new-tokens", "12"]);
    let stop: String = full.chars().skip(3).take(2).collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let body = json!({"model": "m", "prompt": "hello", "temperature": 0, "max_tokens": 12, "stop": [stop]});
    let (_, r) = s.post("/v1/completions", &body);
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), cut);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    assert_eq!(stream(&s, "/v1/completions", &sb).0, [cut]);
}

#[test]
fn concurrent_requests_under_different_controls_equal_meet_generate() {
    let m = models();
    for (kind, folder, controls) in &m.trained {
        let model = folder.to_str().unwrap();
        let s = Server::start(model, &["--max-batch", "8", "--max-tokens", "4000"], &[]);
        let (_, list) = s.get("/v1/models");
        let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["m", "m:good", "m:bad"], "{kind}");
        // A long request under the first control keeps the batch running (it is dropped at the
        // end); every control on two prompts joins it, by body field and by model-name suffix,
        // streamed and not.
        let blocker = open_stream(&s, 4000, Some(controls[0]));
        let mut cases = vec![];
        for (i, c) in controls.iter().enumerate() {
            for (j, prompt) in ["q1:", "tell me"].iter().enumerate() {
                cases.push((c.to_string(), prompt.to_string(), (i + j) % 2 == 0, j == 1));
            }
        }
        let results: Vec<(String, String, String)> = std::thread::scope(|sc| {
            let handles: Vec<_> = cases
                .iter()
                .map(|(c, prompt, by_field, streamed)| {
                    let s = &s;
                    sc.spawn(move || {
                        let mut body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 16});
                        if *by_field {
                            body["model"] = json!("m");
                            body["control"] = json!(c);
                        } else {
                            body["model"] = json!(format!("m:{c}"));
                        }
                        let text = if *streamed {
                            body["stream"] = json!(true);
                            stream(s, "/v1/completions", &body).0.remove(0)
                        } else {
                            let (status, r) = s.post("/v1/completions", &body);
                            assert_eq!(status, 200, "{r}");
                            r["choices"][0]["text"].as_str().unwrap().to_string()
                        };
                        (c.clone(), prompt.clone(), text)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let peak = s.health()["peak_rows"].as_u64().unwrap();
        assert!(peak >= 3, "{kind}: the requests were never decoded together (peak {peak} rows)");
        drop(blocker);
        let mut per_control = std::collections::BTreeMap::new();
        for (c, prompt, text) in results {
            let want = generate(model, &prompt, Some(&c), &["--max-new-tokens", "16"]);
            assert_eq!(text, want, "{kind}, control {c}, prompt {prompt:?}");
            per_control.entry(prompt).or_insert_with(Vec::new).push(text);
        }
        // The controls change the output (else this test could not tell them apart).
        assert!(per_control.values().any(|texts| texts.iter().any(|t| *t != texts[0])), "{kind}: {per_control:?}");
    }
}

fn error_of(s: &Server, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut r =
        client().post(format!("{}{path}", s.url)).header("content-type", "application/json").body(body.to_string());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap();
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
    assert!(e.as_object().unwrap().contains_key("param") && e.as_object().unwrap().contains_key("code"), "{v}");
    (status, e.clone())
}

#[test]
fn bad_input_gets_an_openai_error_naming_the_field() {
    let m = models();
    let (_, lora, _) = &m.trained[0];
    let s =
        Server::start(lora.to_str().unwrap(), &["--max-tokens", "40", "--max-batch", "4", "--max-body", "9000"], &[]);
    let chat = "/v1/chat/completions";
    let ok = r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}"#;
    assert_eq!(client().post(format!("{}{chat}", s.url)).body(ok).send().unwrap().status().as_u16(), 200);
    let cases: Vec<(&str, String, u16, Option<&str>, &str)> = vec![
        (
            chat,
            format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": "{}"}}]}}"#, "x".repeat(9100)),
            413,
            None,
            "larger than 9000 bytes",
        ),
        (chat, r#"{"model": "m", "messages": [}"#.into(), 400, None, "not valid JSON"),
        (chat, r#"{"model": "m"}"#.into(), 400, Some("messages"), "missing field"),
        (chat, r#"{"messages": [{"role": "user", "content": "hi"}]}"#.into(), 400, Some("model"), "missing field"),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#.into(),
            400,
            Some("temperature"),
            "invalid type",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}"#.into(),
            400,
            Some("temperature"),
            "[0, 2]",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}"#.into(),
            400,
            Some("top_p"),
            "(0, 1]",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 41}"#.into(),
            400,
            Some("max_tokens"),
            "more than this server allows (40",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}"#.into(),
            400,
            Some("max_completion_tokens"),
            "at least 1",
        ),
        (
            chat,
            format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "{}"}}], "max_tokens": 40}}"#,
                "y".repeat(4070)
            ),
            400,
            Some("max_tokens"),
            "maximum context length is 4096 tokens",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "control": "nice"}"#.into(),
            400,
            Some("control"),
            "this model's controls: good, bad",
        ),
        (
            chat,
            r#"{"model": "m:nice", "messages": [{"role": "user", "content": "hi"}]}"#.into(),
            400,
            Some("control"),
            "unknown control 'nice'",
        ),
        (
            chat,
            r#"{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}"#.into(),
            404,
            Some("model"),
            "does not exist",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 5}"#.into(),
            400,
            Some("n"),
            "--max-batch",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}"#
                .into(),
            400,
            Some("tools"),
            "not supported",
        ),
        (
            chat,
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}"#.into(),
            400,
            Some("presence_penalty"),
            "not supported",
        ),
        (chat, r#"{"model": "m", "messages": []}"#.into(), 400, Some("messages"), "must not be empty"),
        (
            "/v1/completions",
            r#"{"model": "m", "prompt": [[1, 99999]]}"#.into(),
            400,
            Some("prompt"),
            "outside the vocabulary",
        ),
        (
            "/v1/completions",
            format!(r#"{{"model": "m", "prompt": "{}"}}"#, "z".repeat(4100)),
            400,
            Some("prompt"),
            "the prompt has 4100",
        ),
        (
            "/v1/completions",
            r#"{"model": "m", "prompt": "a", "echo": true}"#.into(),
            400,
            Some("echo"),
            "not supported",
        ),
        ("/v1/nothing", "{}".into(), 404, None, "no endpoint POST /v1/nothing"),
    ];
    for (path, body, status, param, message) in cases {
        let (got, e) = error_of(&s, path, &body, &[]);
        assert_eq!(got, status, "{path} {body:.80}: {e}");
        assert_eq!(e["param"].as_str(), param, "{body:.80}: {e}");
        assert!(e["message"].as_str().unwrap().contains(message), "{body:.80}: {e}");
    }
    // The server is still there and well.
    assert_eq!(s.health()["status"], "ok");
}

#[test]
fn the_api_key_guards_every_endpoint_but_health() {
    let m = models();
    for from_env in [false, true] {
        let (args, env): (&[&str], &[(&str, &str)]) =
            if from_env { (&[], &[("MEET_API_KEY", "sekret")]) } else { (&["--api-key", "sekret"], &[]) };
        let s = Server::start(&m.plain, args, env);
        assert_eq!(s.get("/health").0, 200);
        let body = r#"{"model": "m", "prompt": "a", "max_tokens": 2}"#;
        for (headers, status) in [
            (vec![], 401),
            (vec![("authorization", "Bearer wrong")], 401),
            (vec![("authorization", "Bearer sekret")], 200),
        ] {
            let mut r = client().post(format!("{}/v1/completions", s.url)).body(body);
            for (k, v) in &headers {
                r = r.header(*k, *v);
            }
            let r = r.send().unwrap();
            assert_eq!(r.status().as_u16(), status, "{headers:?}");
            if status == 401 {
                assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "invalid_api_key");
            }
        }
        assert_eq!(client().get(format!("{}/v1/models", s.url)).send().unwrap().status().as_u16(), 401);
        let ok = client().get(format!("{}/v1/models", s.url)).bearer_auth("sekret").send().unwrap();
        assert_eq!(ok.status().as_u16(), 200);
    }
    // Without a key, no header is needed.
    let s = Server::start(&m.plain, &[], &[]);
    assert_eq!(s.post("/v1/completions", &json!({"model": "m", "prompt": "a", "max_tokens": 2})).0, 200);
}

/// A model slow enough that a long request is still decoding while the test acts: the tiny
/// architecture, wider and with a long context.
fn slow_model() -> &'static str {
    static M: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    &M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = common::tiny_raw(5, 4096);
        raw.config["hidden_size"] = json!(256);
        raw.config["intermediate_size"] = json!(1024);
        raw.config["num_hidden_layers"] = json!(8);
        raw.tensors = meet::models::random_weights(&raw.config, 5, &candle_core::Device::Cpu).unwrap();
        let p = dir.path().join("slow");
        meet::models::pretrained::save_hf_folder(&raw, &p).unwrap();
        let s = p.to_string_lossy().into_owned();
        (dir, s)
    })
    .1
}

/// Opens a streamed request of `tokens` tokens and reads its first chunks.
fn open_stream(s: &Server, tokens: usize, control: Option<&str>) -> BufReader<reqwest::blocking::Response> {
    let mut body = json!({"model": "m", "prompt": "long", "max_tokens": tokens, "ignore_eos": true, "stream": true,
                          "temperature": 0});
    if let Some(c) = control {
        body["control"] = json!(c);
    }
    let r = client().post(format!("{}/v1/completions", s.url)).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    reader
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_leaving_mid_stream_frees_its_row() {
    let s = Server::start(slow_model(), &["--max-batch", "1", "--max-tokens", "4000"], &[]);
    let reader = open_stream(&s, 4000, None);
    assert_eq!(s.health()["running_rows"], 1);
    drop(reader);
    wait_for("the row to be freed", Duration::from_secs(20), || s.health()["running_rows"] == 0);
    // The one row is free again: a new request is served at once.
    let (status, r) = s.post("/v1/completions", &json!({"model": "m", "prompt": "a", "max_tokens": 3}));
    assert_eq!(status, 200, "{r}");
}

#[test]
fn a_panicking_request_fails_alone_and_the_server_goes_on() {
    let m = models();
    let s = Server::start(&m.plain, &[], &[("MEET_SERVE_FAIL_POINT", "BOOM")]);
    let (status, r) = s.post("/v1/completions", &json!({"model": "m", "prompt": "say BOOM", "max_tokens": 3}));
    assert_eq!(status, 500, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("fail point reached"), "{r}");
    let (status, r) = s.post("/v1/completions", &json!({"model": "m", "prompt": "say hi", "max_tokens": 3}));
    assert_eq!(status, 200, "{r}");
    assert!(s.log.lock().unwrap().contains("panicked during prefill"));
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits() {
    let mut s = Server::start(slow_model(), &["--max-tokens", "4000"], &[]);
    let tokens = 300;
    let mut reader = open_stream(&s, tokens, None);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let events = sse_events(&rest);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let finish: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "{rest}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", s.log.lock().unwrap());
    let log = s.log.lock().unwrap().clone();
    assert!(log.contains("shutting down") && log.contains("requests in flight finished"), "{log}");
    // Nobody listens any more.
    assert!(client().get(format!("{}/health", s.url)).send().is_err());
}
