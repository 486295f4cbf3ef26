//! Ollama's model management on the simulated disk: pull (with progress
//! lines and disk use), push, create, copy and delete, with the bodies,
//! statuses and errors of Ollama's API reference (docs/api.md).

use std::time::Duration;

use axum::Json;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use super::config::SimModel;
use super::engine::{SimEngine, SimError};
use super::server::{Fail, Family, Sim, digest, error, model_of, ndjson, parse, sim_error, streaming};

/// Progress lines of one simulated transfer.
const STEPS: u64 = 10;

/// Whether `name` is a name Ollama would accept (`[namespace/]model[:tag]`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
        && !name.starts_with(['.', '-', ':', '/'])
}

/// Whether the client asked for one answer instead of progress lines
/// (`"stream": false`; Ollama streams by default).
fn wants_stream(body: &Value) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(true)
}

/// Status lines, then a transfer of `total` bytes in [`STEPS`] steps over
/// `took`, then the closing lines; `finish` runs before the last line and
/// may turn it into an error line.
fn progress(
    opening: Vec<Value>,
    transfer: Option<(String, u64)>,
    took: Duration,
    closing: Vec<Value>,
    finish: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    async_stream::stream! {
        for line in &opening {
            yield Ok(ndjson(line));
        }
        if let Some((layer, total)) = transfer {
            let status = format!("pulling {}", &layer[..12.min(layer.len())]);
            for step in 0..=STEPS {
                if step > 0 {
                    tokio::time::sleep(took / STEPS as u32).await;
                }
                let completed = total * step / STEPS;
                yield Ok(ndjson(&json!({
                    "status": status, "digest": format!("sha256:{layer}"), "total": total, "completed": completed,
                })));
            }
        }
        for line in &closing {
            yield Ok(ndjson(line));
        }
        match finish() {
            Ok(()) => yield Ok(ndjson(&json!({ "status": "success" }))),
            Err(message) => yield Ok(ndjson(&json!({ "error": message }))),
        }
    }
}

/// One answer once the work is done (`"stream": false`).
async fn at_once(took: Duration, finish: impl FnOnce() -> Result<(), String>) -> Response {
    tokio::time::sleep(took).await;
    match finish() {
        Ok(()) => Json(json!({ "status": "success" })).into_response(),
        Err(message) => error(Family::Ollama, StatusCode::INTERNAL_SERVER_ERROR, &message).into_response(),
    }
}

/// The request's body and a valid model name, or the error to answer.
fn body_and_name(engine: &SimEngine, uri: &Uri, raw: &Bytes) -> Result<(Value, String), Fail> {
    let body = parse(Family::Ollama, uri, engine, raw)?;
    let name = model_of(Family::Ollama, &body)?;
    if !valid_name(&name) {
        return Err(error(Family::Ollama, StatusCode::BAD_REQUEST, "invalid model name"));
    }
    Ok((body, name))
}

/// `POST /api/pull`: "downloads" the model (any valid name; its size comes
/// from the name as in `--models`) with progress, then puts it on disk.
pub(crate) async fn pull(axum::extract::State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let (body, name) = match body_and_name(&engine, &uri, &raw) {
        Ok(parsed) => parsed,
        Err(fail) => return fail.into_response(),
    };
    let name = if name.contains(':') { name } else { format!("{name}:latest") };
    let model = match SimModel::parse(&name) {
        Ok(model) => model,
        Err(message) => return error(Family::Ollama, StatusCode::BAD_REQUEST, &message).into_response(),
    };
    let took = Duration::from_millis(engine.config().pull_ms);
    let layer = digest(&model);
    let total = model.size_bytes;
    let disk = engine.clone();
    let finish = move || disk.add_model(model);
    if !wants_stream(&body) {
        return at_once(took, finish).await;
    }
    let opening = vec![json!({ "status": "pulling manifest" })];
    let closing = vec![json!({ "status": "verifying sha256 digest" }), json!({ "status": "writing manifest" })];
    streaming("application/x-ndjson", progress(opening, Some((layer, total)), took, closing, finish))
}

/// `POST /api/push`: the sim has no registry to reach; it reports the
/// upload of a model it has, like Ollama, and changes nothing.
pub(crate) async fn push(axum::extract::State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let (body, name) = match body_and_name(&engine, &uri, &raw) {
        Ok(parsed) => parsed,
        Err(fail) => return fail.into_response(),
    };
    let Some(model) = engine.model(&name) else {
        return sim_error(Family::Ollama, &SimError::ModelNotFound(name)).into_response();
    };
    let took = Duration::from_millis(engine.config().pull_ms);
    if !wants_stream(&body) {
        return at_once(took, || Ok(())).await;
    }
    let opening = vec![json!({ "status": "retrieving manifest" })];
    let closing = vec![json!({ "status": "pushing manifest" })];
    let transfer = Some((digest(&model), model.size_bytes));
    streaming("application/x-ndjson", progress(opening, transfer, took, closing, || Ok(())))
}

/// `POST /api/create` from an existing model (`from`): a new name on the
/// same weights, written to disk.
pub(crate) async fn create(axum::extract::State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let (body, name) = match body_and_name(&engine, &uri, &raw) {
        Ok(parsed) => parsed,
        Err(fail) => return fail.into_response(),
    };
    let Some(from) = body.get("from").and_then(Value::as_str).filter(|f| !f.is_empty()) else {
        return error(Family::Ollama, StatusCode::BAD_REQUEST, "neither 'from' or 'files' was specified")
            .into_response();
    };
    let Some(base) = engine.model(from) else {
        return sim_error(Family::Ollama, &SimError::ModelNotFound(from.to_string())).into_response();
    };
    let created = SimModel { name: if name.contains(':') { name } else { format!("{name}:latest") }, ..base };
    let disk = engine.clone();
    let finish = move || disk.add_model(created);
    if !wants_stream(&body) {
        return at_once(Duration::ZERO, finish).await;
    }
    let opening = vec![json!({ "status": "reading model metadata" }), json!({ "status": "using existing layer" })];
    let closing = vec![json!({ "status": "writing manifest" })];
    streaming("application/x-ndjson", progress(opening, None, Duration::ZERO, closing, finish))
}

/// `POST /api/copy`: `{"source", "destination"}`; 200 with no body.
pub(crate) async fn copy(axum::extract::State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let body = match parse(Family::Ollama, &uri, &engine, &raw) {
        Ok(body) => body,
        Err(fail) => return fail.into_response(),
    };
    let field = |key: &str| body.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let (Some(source), Some(destination)) = (field("source"), field("destination")) else {
        return error(Family::Ollama, StatusCode::BAD_REQUEST, "source and destination are required").into_response();
    };
    if !valid_name(&destination) {
        return error(Family::Ollama, StatusCode::BAD_REQUEST, "invalid destination name").into_response();
    }
    let Some(model) = engine.model(&source) else {
        return error(Family::Ollama, StatusCode::NOT_FOUND, &format!("model '{source}' not found")).into_response();
    };
    let name = if destination.contains(':') { destination } else { format!("{destination}:latest") };
    match engine.add_model(SimModel { name, ..model }) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(message) => error(Family::Ollama, StatusCode::INTERNAL_SERVER_ERROR, &message).into_response(),
    }
}

/// `DELETE /api/delete`: `{"model"}`; 200 with no body, 404 when absent.
pub(crate) async fn delete(axum::extract::State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let body = match parse(Family::Ollama, &uri, &engine, &raw) {
        Ok(body) => body,
        Err(fail) => return fail.into_response(),
    };
    let name = match model_of(Family::Ollama, &body) {
        Ok(name) => name,
        Err(fail) => return fail.into_response(),
    };
    if engine.remove_model(&name) {
        StatusCode::OK.into_response()
    } else {
        error(Family::Ollama, StatusCode::NOT_FOUND, &format!("model '{name}' not found")).into_response()
    }
}
