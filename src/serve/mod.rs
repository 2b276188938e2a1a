//! `meet serve`: an OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`) over one loaded model, each request under its own preference control
//! (`"control"` in the body, or `model: "NAME:CONTROL"`), every request in flight decoded in one
//! continuously batched loop ([`engine`]).

pub mod api;
pub mod engine;
pub mod load;

use crate::controls::Controlled;
use crate::generate::FinishReason;
use crate::{Error, Result};
use api::{ApiError, Limits, Plan};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use engine::{Engine, Event, Job, TokenLogprob};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// How `meet serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `host:port`; port 0 picks a free one (the address is printed).
    pub addr: String,
    /// The name clients give as `model`.
    pub name: String,
    /// Required as `Authorization: Bearer KEY` on every endpoint but `/health`.
    pub api_key: Option<String>,
    /// Rows decoded at once.
    pub max_batch: usize,
    /// Most new tokens per request.
    pub max_tokens: usize,
    /// Largest request body, bytes.
    pub max_body: usize,
}

struct AppState {
    model: Arc<Controlled>,
    engine: Engine,
    limits: Limits,
    api_key: Option<String>,
    max_body: usize,
    created: u64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

/// Serves `model` until SIGTERM or Ctrl-C: then no new connection is accepted, the requests in
/// flight finish, and the call returns.
pub fn serve(model: Controlled, opts: &ServeOptions) -> Result<()> {
    let model = Arc::new(model);
    let (engine, worker) = Engine::start(model.clone(), opts.max_batch)?;
    let state = Arc::new(AppState {
        model,
        engine,
        limits: Limits { name: opts.name.clone(), max_tokens: opts.max_tokens, max_n: opts.max_batch },
        api_key: opts.api_key.clone().filter(|k| !k.is_empty()),
        max_body: opts.max_body,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&opts.addr)
            .await
            .map_err(|e| Error::Invalid(format!("cannot listen on {}: {e}", opts.addr)))?;
        let local = listener.local_addr().map_err(|e| Error::Invalid(e.to_string()))?;
        eprintln!("meet serve: '{}' on http://{local}/v1 (max batch {})", opts.name, opts.max_batch);
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::Invalid(format!("server error: {e}")))
    })?;
    eprintln!("meet serve: stopped accepting; requests in flight finished");
    // Every engine handle is gone with the router: the engine finishes and stops.
    worker.join().map_err(|_| Error::Invalid("the engine thread panicked".into()))?;
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    eprintln!("meet serve: shutting down");
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|req: Request| async move {
            ApiError::invalid(None, format!("no endpoint {} {}", req.method(), req.uri().path()))
                .with(404, "unknown_url")
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|p: Box<dyn std::any::Any + Send>| {
            ApiError::internal(format!("internal error: {}", engine::panic_message(&p))).into_response()
        }))
        .with_state(state)
}

/// Every endpoint but `/health` wants the API key, when there is one.
async fn auth(State(s): State<Arc<AppState>>, req: Request, next: axum::middleware::Next) -> Response {
    if let Some(key) = &s.api_key {
        if req.uri().path() != "/health" {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            let ok = given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|g| g.trim() == key);
            if !ok {
                let msg = if given.is_none() {
                    "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
                } else {
                    "Incorrect API key provided"
                };
                return ApiError::invalid(None, msg).with(401, "invalid_api_key").into_response();
            }
        }
    }
    next.run(req).await
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let l = &s.engine.load;
    let (running, waiting) = (l.running.load(Ordering::Relaxed), l.waiting.load(Ordering::Relaxed));
    let peak = l.peak.load(Ordering::Relaxed);
    axum::Json(json!({"status": "ok", "running_rows": running, "waiting_requests": waiting, "peak_rows": peak}))
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let entry = |id: String| json!({"id": id, "object": "model", "created": s.created, "owned_by": "meet"});
    let mut data = vec![entry(s.limits.name.clone())];
    if let Some(spec) = &s.model.spec {
        data.extend(spec.names.iter().map(|c| entry(format!("{}:{c}", s.limits.name))));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The body, at most `max_body` bytes.
async fn body(s: &AppState, req: Request) -> std::result::Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::invalid(None, format!("the request body is larger than {} bytes (see --max-body)", s.max_body))
            .with(413, "request_too_large")
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > s.max_body) {
        return Err(too_large());
    }
    match axum::body::to_bytes(req.into_body(), s.max_body).await {
        Ok(b) => Ok(b.to_vec()),
        // A chunked body over the limit.
        Err(e) if format!("{e:?}").contains("LengthLimit") => Err(too_large()),
        Err(e) => Err(ApiError::invalid(None, format!("cannot read the request body: {e}"))),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Text,
}

/// A request's plan from its body, by endpoint.
fn plan(s: &AppState, endpoint: Endpoint, bytes: &[u8]) -> std::result::Result<(String, Plan), ApiError> {
    let (c, plan) = match endpoint {
        Endpoint::Chat => {
            let (c, r) = api::parse::<api::ChatRequest>(bytes)?;
            let p = api::chat_plan(&c, &r, &s.model, &s.limits)?;
            (c, p)
        }
        Endpoint::Text => {
            let (c, r) = api::parse::<api::CompletionRequest>(bytes)?;
            let p = api::completion_plan(&c, &r, &s.model, &s.limits)?;
            (c, p)
        }
    };
    Ok((c.model, plan))
}

async fn handle(s: Arc<AppState>, endpoint: Endpoint, req: Request) -> Response {
    let planned = match body(&s, req).await {
        Ok(bytes) => plan(&s, endpoint, &bytes),
        Err(e) => Err(e),
    };
    match planned {
        Ok((model, plan)) => respond(s, endpoint, model, plan).await,
        Err(e) => e.into_response(),
    }
}

async fn chat(State(s): State<Arc<AppState>>, req: Request) -> Response {
    handle(s, Endpoint::Chat, req).await
}

async fn completions(State(s): State<Arc<AppState>>, req: Request) -> Response {
    handle(s, Endpoint::Text, req).await
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Submits one job per prompt; their events come through one channel, tagged by prompt.
fn submit(s: &AppState, plan: &Plan) -> std::result::Result<mpsc::UnboundedReceiver<(usize, Event)>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (i, ids) in plan.prompts.iter().enumerate() {
        let prepared = s
            .model
            .prepare(std::slice::from_ref(ids), plan.control.as_deref())
            .map_err(|e| ApiError::invalid(Some("control"), e.to_string()))?;
        let mut params = plan.params.clone();
        params.stop_strings.extend(prepared.stop_strings);
        params.suppress_tokens.extend(prepared.suppress_tokens);
        // Each job's events are tagged with its prompt by a forwarding task.
        let (jtx, mut jrx) = mpsc::unbounded_channel();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = jrx.recv().await {
                if tx.send((i, e)).is_err() {
                    break;
                }
            }
        });
        let job = Job {
            ids: prepared.ids.into_iter().next().unwrap_or_default(),
            prefix: prepared.prefix,
            adapters: prepared.adapters,
            params,
            n: plan.n,
            top_logprobs: plan.top_logprobs,
            events: jtx,
        };
        s.engine.submit(job).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    Ok(rx)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

/// Log-probabilities in the endpoint's shape: chat's `content` list, or the text endpoint's
/// parallel lists (`text_offset` counted from the choice's start).
fn logprobs_json(s: &AppState, endpoint: Endpoint, lps: &[TokenLogprob], offset: &mut usize) -> Value {
    let tok = s.model.tokenizer();
    let text = |t: u32| tok.decode(&[t], false).unwrap_or_default();
    match endpoint {
        Endpoint::Chat => {
            let content: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let top: Vec<Value> = l
                        .top
                        .iter()
                        .map(|&(t, lp)| {
                            let s = text(t);
                            json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                        })
                        .collect();
                    let s = text(l.token);
                    json!({"token": s, "logprob": l.logprob, "bytes": s.as_bytes(), "top_logprobs": top})
                })
                .collect();
            json!({"content": content})
        }
        Endpoint::Text => {
            let mut tokens = vec![];
            let mut offsets = vec![];
            for l in lps {
                let s = text(l.token);
                offsets.push(*offset);
                *offset += s.len();
                tokens.push(s);
            }
            let top: Vec<Value> = lps
                .iter()
                .map(|l| Value::Object(l.top.iter().map(|&(t, lp)| (text(t), json!(lp))).collect()))
                .collect();
            let lp: Vec<f32> = lps.iter().map(|l| l.logprob).collect();
            json!({"tokens": tokens, "token_logprobs": lp, "top_logprobs": top, "text_offset": offsets})
        }
    }
}

async fn respond(s: Arc<AppState>, endpoint: Endpoint, model: String, plan: Plan) -> Response {
    let mut rx = match submit(&s, &plan) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let id = request_id(if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" });
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let object = if endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
    let prompt_tokens: usize = plan.prompts.iter().map(Vec::len).sum();
    let choices = plan.prompts.len() * plan.n;
    let index = move |prompt: usize, choice: usize| prompt * plan.n + choice;
    if !plan.stream {
        let mut texts = vec![String::new(); choices];
        let mut finishes: Vec<Option<&str>> = vec![None; choices];
        let mut lps: Vec<Vec<TokenLogprob>> = vec![vec![]; choices];
        let mut completion_tokens = 0;
        while finishes.iter().any(Option::is_none) {
            match rx.recv().await {
                Some((p, Event::Delta { choice, logprobs, .. })) => lps[index(p, choice)].extend(logprobs),
                Some((p, Event::Done { choice, text, finish, tokens })) => {
                    texts[index(p, choice)] = text;
                    finishes[index(p, choice)] = Some(finish_reason(finish));
                    completion_tokens += tokens;
                }
                Some((_, Event::Failed(m))) => return ApiError::internal(m).into_response(),
                None => return ApiError::internal("the engine stopped before the request finished").into_response(),
            }
        }
        let choices: Vec<Value> = (0..choices)
            .map(|i| {
                let logprobs = plan.top_logprobs.map(|_| logprobs_json(&s, endpoint, &lps[i], &mut 0));
                match endpoint {
                    Endpoint::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": logprobs,
                        "finish_reason": finishes[i],
                    }),
                    Endpoint::Text => json!({
                        "index": i, "text": texts[i], "logprobs": logprobs, "finish_reason": finishes[i],
                    }),
                }
            })
            .collect();
        return axum::Json(json!({
            "id": id, "object": object, "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": null,
        }))
        .into_response();
    }
    // Streaming: chunks as server-sent events, then `data: [DONE]`. The client leaving drops the
    // stream, which closes the job's channels, which frees its rows in the batch.
    let object = if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
    let (tx, out) = mpsc::channel::<std::result::Result<SseEvent, Infallible>>(64);
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u;
        }
        SseEvent::default().data(c.to_string())
    };
    tokio::spawn(async move {
        let send = |e: SseEvent| tx.send(Ok(e));
        if endpoint == Endpoint::Chat {
            let first: Vec<Value> = (0..choices)
                .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
                .collect();
            if send(chunk(json!(first), None)).await.is_err() {
                return;
            }
        }
        let mut left = choices;
        let mut completion_tokens = 0;
        let mut offsets = vec![0usize; choices];
        while left > 0 {
            let (p, event) = match rx.recv().await {
                Some(x) => x,
                None => break,
            };
            let c = match event {
                Event::Delta { choice, text, logprobs } => {
                    let i = index(p, choice);
                    let lp = plan.top_logprobs.map(|_| logprobs_json(&s, endpoint, &logprobs, &mut offsets[i]));
                    match endpoint {
                        Endpoint::Chat => {
                            json!([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}])
                        }
                        Endpoint::Text => json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": null}]),
                    }
                }
                Event::Done { choice, finish, tokens, .. } => {
                    left -= 1;
                    completion_tokens += tokens;
                    let i = index(p, choice);
                    match endpoint {
                        Endpoint::Chat => {
                            json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(finish)}])
                        }
                        Endpoint::Text => {
                            json!([{"index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(finish)}])
                        }
                    }
                }
                Event::Failed(m) => {
                    let _ = send(SseEvent::default().data(ApiError::internal(m).body().to_string())).await;
                    break;
                }
            };
            if send(chunk(c, None)).await.is_err() {
                return;
            }
        }
        if plan.include_usage {
            let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens});
            if send(chunk(json!([]), Some(usage))).await.is_err() {
                return;
            }
        }
        let _ = send(SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).into_response()
}
