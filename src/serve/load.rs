//! `meet bench serve`: a bounded load test of `meet serve` over loopback HTTP. It starts the server
//! as a child process, then at each concurrency level runs a fixed number of streamed chat
//! requests (fixed output length, controls cycled per request) from that many client threads, and
//! reports requests/s, output tokens/s, time to first token and latency (p50/p99), errors, and
//! the server's peak memory.

use crate::{Error, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to load the server with.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `meet serve` flags after `serve` (model, weights, max batch, ...).
    pub serve_args: Vec<String>,
    pub prompts: Vec<String>,
    /// Concurrency levels, each measured in turn.
    pub clients: Vec<usize>,
    /// Requests per level.
    pub requests: usize,
    /// New tokens per request (EOS ignored, so every request has the same output length).
    pub max_tokens: usize,
    /// Controls cycled over the requests (empty: none); `None` in the list: the plain model.
    pub controls: Vec<Option<String>>,
    /// A level stops issuing requests after this long (the ones in flight finish).
    pub max_seconds: f64,
}

/// One concurrency level's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LevelFigures {
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
}

/// Every level's figures and the server's peak resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub levels: Vec<LevelFigures>,
    pub server_peak_rss_mib: Option<f64>,
    pub max_tokens: usize,
    pub controls: Vec<Option<String>>,
}

struct ServerProcess {
    child: Child,
    url: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &[String]) -> Result<ServerProcess> {
    let exe = std::env::current_exe().map_err(|e| Error::Invalid(format!("cannot find the meet binary: {e}")))?;
    let mut child = Command::new(exe)
        .arg("serve")
        .args(args)
        .args(["--addr", "127.0.0.1:0", "--served-model-name", "bench"])
        .env_remove("MEET_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Invalid(format!("cannot start meet serve: {e}")))?;
    let stderr = child.stderr.take().ok_or_else(|| Error::Invalid("no stderr from meet serve".into()))?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    let url = loop {
        let Some(Ok(line)) = lines.next() else {
            return Err(Error::Invalid(format!("meet serve ended before listening:\n{seen}")));
        };
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.split("on http://").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default().trim_end_matches("/v1");
            break format!("http://{addr}");
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(ServerProcess { child, url })
}

/// One streamed request: (time to first token, latency, output tokens).
fn one_request(client: &reqwest::blocking::Client, url: &str, body: &Value) -> Result<(f64, f64, usize)> {
    let t0 = Instant::now();
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .map_err(|e| Error::Invalid(format!("request failed: {e}")))?;
    if !r.status().is_success() {
        let status = r.status();
        return Err(Error::Invalid(format!("HTTP {status}: {}", r.text().unwrap_or_default())));
    }
    let mut ttft = None;
    let mut tokens = None;
    let mut done = false;
    for line in BufReader::new(r).lines() {
        let line = line.map_err(|e| Error::Invalid(format!("reading the stream: {e}")))?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| Error::Invalid(format!("bad chunk {data}: {e}")))?;
        if v.get("error").is_some() {
            return Err(Error::Invalid(format!("error in the stream: {data}")));
        }
        if ttft.is_none() && v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
            ttft = Some(t0.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    if !done {
        return Err(Error::Invalid("the stream ended without [DONE]".into()));
    }
    let latency = t0.elapsed().as_secs_f64();
    Ok((ttft.unwrap_or(latency), latency, tokens.ok_or_else(|| Error::Invalid("no usage chunk".into()))?))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank, as load-testing tools report.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs the load test.
pub fn run(opts: &LoadOptions) -> Result<LoadReport> {
    if opts.prompts.is_empty() || opts.clients.is_empty() || opts.requests == 0 {
        return Err(Error::Invalid("the load test needs prompts, client counts and requests".into()));
    }
    if opts.clients.contains(&0) {
        return Err(Error::Invalid("--clients: every level needs at least one client".into()));
    }
    let server = start_server(&opts.serve_args)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs_f64(opts.max_seconds + 600.0))
        .build()
        .map_err(|e| Error::Invalid(format!("HTTP client: {e}")))?;
    let controls = if opts.controls.is_empty() { vec![None] } else { opts.controls.clone() };
    let body = |i: usize| {
        let mut b = json!({
            "model": "bench",
            "messages": [{"role": "user", "content": opts.prompts[i % opts.prompts.len()]}],
            "max_tokens": opts.max_tokens, "ignore_eos": true, "temperature": 0.7, "seed": i,
            "stream": true, "stream_options": {"include_usage": true},
        });
        if let Some(c) = &controls[i % controls.len()] {
            b["control"] = json!(c);
        }
        b
    };
    // One untimed request: the first one pays for page faults and the kernels' warm-up.
    one_request(&client, &server.url, &body(0))?;
    let mut levels = vec![];
    for &clients in &opts.clients {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Result<(f64, f64, usize)>>> = Mutex::new(vec![]);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..clients {
                s.spawn(|| loop {
                    if t0.elapsed().as_secs_f64() > opts.max_seconds {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= opts.requests {
                        break;
                    }
                    let r = one_request(&client, &server.url, &body(i));
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                });
            }
        });
        let seconds = t0.elapsed().as_secs_f64();
        let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        let errors: Vec<&Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        if let Some(e) = errors.first() {
            tracing::warn!("{} of {} requests failed at {clients} clients; first: {e}", errors.len(), results.len());
        }
        let ok: Vec<(f64, f64, usize)> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
        let mut ttft: Vec<f64> = ok.iter().map(|r| r.0).collect();
        let mut lat: Vec<f64> = ok.iter().map(|r| r.1).collect();
        ttft.sort_by(f64::total_cmp);
        lat.sort_by(f64::total_cmp);
        let tokens: usize = ok.iter().map(|r| r.2).sum();
        levels.push(LevelFigures {
            clients,
            requests: results.len(),
            errors: errors.len(),
            seconds,
            requests_per_s: ok.len() as f64 / seconds,
            output_tokens_per_s: tokens as f64 / seconds,
            ttft_p50_s: percentile(&ttft, 0.5),
            ttft_p99_s: percentile(&ttft, 0.99),
            latency_p50_s: percentile(&lat, 0.5),
            latency_p99_s: percentile(&lat, 0.99),
        });
    }
    Ok(LoadReport {
        levels,
        server_peak_rss_mib: crate::bench::peak_rss_mib_of(&server.child.id().to_string()),
        max_tokens: opts.max_tokens,
        controls: opts.controls.clone(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::percentile(&v, 0.5), 50.0);
        assert_eq!(super::percentile(&v, 0.99), 99.0);
        assert_eq!(super::percentile(&[3.0], 0.99), 3.0);
    }
}
