//! `llmesh models pull|rm`: Ollama's `/api/pull` and `/api/delete` through
//! any node, with the nodes named (`--node`) or chosen by the mesh, and the
//! pull's progress lines shown as they arrive.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::args::{ApiArgs, ModelsCommand};
use llmesh::api::NODE_HEADER;
use llmesh::api::manage::{REPLICAS_HEADER, TARGET_HEADER};

/// Runs a `llmesh models` command.
pub async fn run(command: &ModelsCommand, api: &ApiArgs) -> ExitCode {
    let result = match command {
        ModelsCommand::Pull { model, nodes, replicas } => {
            let mut headers = targets(nodes);
            if let Some(k) = replicas {
                headers.push((REPLICAS_HEADER, k.to_string()));
            }
            call(api, http::Method::POST, "/api/pull", json!({ "model": model }), &headers).await
        }
        ModelsCommand::Rm { model, nodes } => {
            call(api, http::Method::DELETE, "/api/delete", json!({ "model": model }), &targets(nodes)).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("llmesh models: {message}");
            ExitCode::FAILURE
        }
    }
}

fn targets(nodes: &[String]) -> Vec<(&'static str, String)> {
    if nodes.is_empty() { Vec::new() } else { vec![(TARGET_HEADER, nodes.join(","))] }
}

/// Sends one management call and prints what comes back: progress lines
/// as they arrive, one line per node and step.
async fn call(
    api: &ApiArgs,
    method: http::Method,
    path: &str,
    body: Value,
    headers: &[(&'static str, String)],
) -> Result<(), String> {
    let url = format!("{}{path}", api.url.trim_end_matches('/'));
    let mut request =
        http::Request::builder().method(method).uri(&url).header(http::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    if let Some(key) = &api.api_key {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request =
        request.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| format!("bad request to {url}: {e}"))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| format!("{url} did not answer within 30s"))?
        .map_err(|e| format!("cannot reach {url}: {e} (is an agent running there? set --url)"))?;
    let status = response.status();
    let nodes = response.headers().get(NODE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
    let mut body = response.into_body();
    let mut progress = Progress::default();
    let mut pending = Vec::new();
    let mut failed = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the answer from {url} broke off: {e}"))?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(err) = progress.show(&line, &nodes) {
                failed = Some(err);
            }
        }
    }
    if let Some(err) = progress.show(&pending, &nodes) {
        failed = Some(err);
    }
    if let Some(err) = failed {
        return Err(err);
    }
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    if !progress.any {
        println!("{nodes}: done");
    }
    Ok(())
}

/// Prints progress lines without flooding: a line per node when its
/// status changes or its download passes another tenth.
#[derive(Default)]
struct Progress {
    last: std::collections::HashMap<String, (String, u64)>,
    any: bool,
}

impl Progress {
    /// Shows one NDJSON line; returns the error it carries, if any.
    fn show(&mut self, line: &[u8], nodes: &str) -> Option<String> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            println!("{text}");
            return None;
        };
        let node = value.get("node").and_then(Value::as_str).unwrap_or(nodes).to_string();
        if let Some(err) = value.get("error").and_then(Value::as_str) {
            return Some(format!("{node}: {err}"));
        }
        let status = value.get("status").and_then(Value::as_str).unwrap_or_default().to_string();
        let total = value.get("total").and_then(Value::as_u64).unwrap_or(0);
        let completed = value.get("completed").and_then(Value::as_u64).unwrap_or(0);
        let tenth = (completed * 10).checked_div(total).unwrap_or(0);
        if self.last.get(&node) == Some(&(status.clone(), tenth)) {
            return None;
        }
        self.last.insert(node.clone(), (status.clone(), tenth));
        self.any = true;
        if total > 0 {
            println!("{node}: {status} {}% of {:.1} MB", tenth * 10, total as f64 / 1e6);
        } else {
            println!("{node}: {status}");
        }
        None
    }
}
