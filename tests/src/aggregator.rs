//! A fake cloud aggregator for tests: an OpenAI-compatible server on
//! loopback that checks its API key, logs every request it receives, and
//! fails on command (an HTTP status, or hanging).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// How the aggregator misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It serves normally.
    None,
    /// Every completion gets this HTTP status.
    Status(u16),
    /// Completions never answer.
    Hang,
}

struct Inner {
    key: String,
    models: Vec<String>,
    log: Mutex<Vec<Value>>,
    fault: Mutex<Fault>,
}

/// A running fake aggregator; it stops when dropped.
pub struct Aggregator {
    /// Base URL (`http://127.0.0.1:PORT/v1`).
    pub url: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Aggregator {
    /// Starts one that accepts `key` and lists `models`.
    pub async fn start(key: &str, models: &[&str]) -> Aggregator {
        let inner = Arc::new(Inner {
            key: key.to_string(),
            models: models.iter().map(|m| m.to_string()).collect(),
            log: Mutex::new(Vec::new()),
            fault: Mutex::new(Fault::None),
        });
        let app = Router::new()
            .route("/v1/models", get(list_models))
            .route("/v1/chat/completions", post(chat))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Aggregator { url: format!("http://{addr}/v1"), inner, task }
    }

    /// Every request received so far: `{path, model, stream, authorization, x_title}`.
    pub fn requests(&self) -> Vec<Value> {
        self.inner.log.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sets how it misbehaves from now on.
    pub fn set_fault(&self, fault: Fault) {
        *self.inner.fault.lock().unwrap_or_else(PoisonError::into_inner) = fault;
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn list_models(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let data: Vec<Value> =
        inner.models.iter().map(|m| json!({ "id": m, "object": "model", "owned_by": "fake" })).collect();
    Json(json!({ "object": "list", "data": data }))
}

fn header(headers: &HeaderMap, name: &str) -> Value {
    headers.get(name).and_then(|v| v.to_str().ok()).map_or(Value::Null, |v| json!(v))
}

async fn chat(State(inner): State<Arc<Inner>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    inner.log.lock().unwrap_or_else(PoisonError::into_inner).push(json!({
        "path": "/v1/chat/completions", "model": model, "stream": stream,
        "authorization": header(&headers, "authorization"), "x_title": header(&headers, "x-title"),
    }));
    if header(&headers, "authorization") != json!(format!("Bearer {}", inner.key)) {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "error": { "message": "invalid api key" } }))).into_response();
    }
    let fault = *inner.fault.lock().unwrap_or_else(PoisonError::into_inner);
    match fault {
        Fault::Status(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, Json(json!({ "error": { "message": "injected fault" } }))).into_response();
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Fault::None => {}
    }
    let words = ["the", " cloud", " answers"];
    if stream {
        let mut events = String::new();
        for word in words {
            let chunk = json!({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                "choices": [{ "index": 0, "delta": { "content": word }, "finish_reason": null }],
            });
            events.push_str(&format!("data: {chunk}\n\n"));
        }
        let last = json!({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
            "choices": [{ "index": 0, "delta": {}, "finish_reason": "stop" }],
        });
        events.push_str(&format!("data: {last}\n\ndata: [DONE]\n\n"));
        return ([("content-type", "text/event-stream")], events).into_response();
    }
    Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": words.concat() }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12 },
    }))
    .into_response()
}
