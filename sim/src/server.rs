//! HTTP face of the simulated backend: Ollama's `/api/*` and its OpenAI
//! compatible `/v1/*`, plus `/sim/*` endpoints that tests use to observe
//! and steer it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine as _;
use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};

use super::config::{Faults, SimModel};
use super::engine::{GenRequest, OutputShape, Prompt, Run, SimEngine, SimError};
use super::text;

/// The Ollama API version the sim (and the agent) report at `/api/version`.
pub const OLLAMA_COMPAT_VERSION: &str = "0.12.0";

static IDS: AtomicU64 = AtomicU64::new(1);

/// Builds the sim's router around `engine`.
pub fn router(engine: Arc<SimEngine>) -> Router {
    if engine.config().deterministic {
        DETERMINISTIC.store(true, Ordering::Relaxed);
    }
    let chat_only = engine.config().chat_only;
    let router = Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        // llama-server's, vLLM's and SGLang's liveness probe, which their
        // routers poll before sending a worker anything.
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/api/version", get(|| async { Json(json!({ "version": OLLAMA_COMPAT_VERSION })) }))
        // llama-server's server properties: its parallel slots.
        .route("/props", get(props))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/pull", post(crate::manage::pull))
        .route("/api/push", post(crate::manage::push))
        .route("/api/create", post(crate::manage::create))
        .route("/api/copy", post(crate::manage::copy))
        .route("/api/delete", delete(crate::manage::delete))
        .route("/api/chat", post(ollama_chat))
        .route("/api/generate", post(ollama_generate))
        .route("/api/embed", post(ollama_embed))
        .route("/api/embeddings", post(ollama_embeddings))
        .route("/v1/models", get(openai_models))
        .route("/v1/models/{*id}", get(openai_model))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/sim/stats", get(stats))
        .route("/sim/faults", get(get_faults).post(set_faults))
        .route("/sim/last-request", get(last_request));
    // Without the newer APIs (Ollama before 0.13.3, older vLLM): their
    // paths are unknown routes, answered as Ollama's router does.
    let router = if chat_only {
        router
    } else {
        router
            .route("/v1/messages", post(crate::apis::anthropic_messages))
            .route("/v1/messages/count_tokens", post(crate::apis::anthropic_count_tokens))
            .route("/v1/responses", post(crate::apis::openai_responses))
    };
    router
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
        .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(engine)
}

pub(crate) type Sim = State<Arc<SimEngine>>;

/// Which error body shape a route speaks.
#[derive(Clone, Copy)]
pub(crate) enum Family {
    OpenAi,
    Ollama,
    Anthropic,
}

/// An error answer, rendered in the route's family's shape.
pub(crate) struct Fail {
    family: Family,
    status: StatusCode,
    message: String,
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let body = match self.family {
            Family::OpenAi => json!({
                "error": { "message": self.message, "type": "api_error", "param": null, "code": null }
            }),
            Family::Ollama => json!({ "error": self.message }),
            Family::Anthropic => json!({
                "type": "error",
                "error": { "type": if self.status == StatusCode::NOT_FOUND { "not_found_error" } else { "api_error" }, "message": self.message },
            }),
        };
        (self.status, Json(body)).into_response()
    }
}

pub(crate) fn error(family: Family, status: StatusCode, message: &str) -> Fail {
    Fail { family, status, message: message.to_string() }
}

pub(crate) fn sim_error(family: Family, err: &SimError) -> Fail {
    let status = match err {
        SimError::ModelNotFound(_) => StatusCode::NOT_FOUND,
        SimError::Injected => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(family, status, &err.to_string())
}

pub(crate) fn parse(family: Family, uri: &Uri, engine: &SimEngine, body: &Bytes) -> Result<Value, Fail> {
    engine.record(uri.path(), body);
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| error(family, StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(error(family, StatusCode::BAD_REQUEST, "request body must be a JSON object"));
    }
    Ok(value)
}

/// A generation request's body and model, or the error to answer.
pub(crate) fn body_and_model(
    family: Family,
    uri: &Uri,
    engine: &SimEngine,
    raw: &Bytes,
) -> Result<(Value, String), Fail> {
    let body = parse(family, uri, engine, raw)?;
    let model = model_of(family, &body)?;
    Ok((body, model))
}

pub(crate) fn model_of(family: Family, body: &Value) -> Result<String, Fail> {
    body.get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .ok_or_else(|| error(family, StatusCode::BAD_REQUEST, "model is required"))
}

/// Text of a message's content: a string, or OpenAI's array of parts.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join(" ")
        }
        _ => String::new(),
    }
}

fn chat_prompt(body: &Value) -> Prompt {
    let mut prompt = Prompt::default();
    for message in body.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let role = message.get("role").and_then(Value::as_str).unwrap_or("user");
        prompt.push(role, &content_text(message.get("content")));
    }
    prompt
}

fn text_prompt(body: &Value, field: &str) -> Prompt {
    let mut prompt = Prompt::default();
    if let Some(system) = body.get("system").and_then(Value::as_str) {
        prompt.push("system", system);
    }
    let text = match body.get(field) {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
        other => content_text(other),
    };
    prompt.push("user", &text);
    prompt
}

/// The tool to call: the first offered, unless tools are off or the last
/// turn is already a tool's result (so a tool round trip ends in text).
fn tool_name(body: &Value) -> Option<String> {
    if body.get("tool_choice").and_then(Value::as_str) == Some("none") {
        return None;
    }
    let last_role = body.get("messages").and_then(Value::as_array).and_then(|m| m.last()).and_then(|m| m.get("role"));
    if last_role.and_then(Value::as_str) == Some("tool") {
        return None;
    }
    let tool = body.get("tools")?.as_array()?.first()?;
    tool.pointer("/function/name").and_then(Value::as_str).map(str::to_string)
}

fn shape(body: &Value, family: Family) -> OutputShape {
    if let Some(name) = tool_name(body) {
        return OutputShape::ToolCall(name);
    }
    let json_mode = match family {
        Family::OpenAi => {
            matches!(body.pointer("/response_format/type").and_then(Value::as_str), Some("json_object" | "json_schema"))
        }
        Family::Ollama => {
            !matches!(body.get("format"), None | Some(Value::Null)) && body.get("format") != Some(&json!(""))
        }
        Family::Anthropic => false,
    };
    if json_mode { OutputShape::Json } else { OutputShape::Text }
}

pub(crate) fn max_tokens(body: &Value, family: Family) -> Option<u32> {
    let value = match family {
        Family::OpenAi => body.get("max_completion_tokens").or_else(|| body.get("max_tokens")),
        Family::Ollama => body.pointer("/options/num_predict"),
        Family::Anthropic => body.get("max_tokens").or_else(|| body.get("max_output_tokens")),
    };
    value.and_then(Value::as_i64).filter(|n| *n > 0).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

pub(crate) fn stream_flag(body: &Value, default: bool) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(default)
}

/// Set by `--deterministic`: ids, timestamps and durations stop varying, so
/// the same request gives byte-identical responses (for relay tests).
static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

fn deterministic() -> bool {
    DETERMINISTIC.load(Ordering::Relaxed)
}

pub(crate) fn unix_now() -> u64 {
    if deterministic() {
        return 1_700_000_000;
    }
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339_now() -> String {
    rfc3339_at(SystemTime::now())
}

fn rfc3339_at(at: SystemTime) -> String {
    if deterministic() {
        return "2026-01-01T00:00:00Z".to_string();
    }
    humantime::format_rfc3339_nanos(at).to_string()
}

/// A response id: a counter, or in deterministic mode a hash of the body.
pub(crate) fn next_id(prefix: &str, body: &[u8]) -> String {
    if deterministic() {
        return format!("{prefix}-sim{:x}", text::fnv1a(0, body));
    }
    format!("{prefix}-sim{}", IDS.fetch_add(1, Ordering::Relaxed))
}

fn nanos(d: std::time::Duration) -> u64 {
    if deterministic() { 0 } else { d.as_nanos() as u64 }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

pub(crate) fn ndjson(value: &Value) -> Bytes {
    let mut line = value.to_string();
    line.push('\n');
    Bytes::from(line)
}

pub(crate) fn streaming(
    content_type: &'static str,
    stream: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Lets the server flush the tokens already produced before the drop
/// fault cuts the connection, so a client really receives N tokens first.
pub(crate) async fn drop_pause() {
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
}

/// A 200 whose body breaks at once: how the drop fault looks to a client
/// of a non-streaming request.
pub(crate) fn dropped_connection() -> Response {
    streaming(
        "application/json",
        futures::stream::once(async { Err(std::io::Error::other("connection dropped (injected fault)")) }),
    )
}

fn usage_json(run: &Run) -> Value {
    json!({
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": run.completion_tokens,
        "total_tokens": run.prompt_tokens + run.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": run.cached_tokens },
    })
}

fn finish_reason(run: &Run) -> &'static str {
    match run.shape {
        OutputShape::ToolCall(_) => "tool_calls",
        _ if run.truncated => "length",
        _ => "stop",
    }
}

fn tool_call_id(run: &Run) -> String {
    format!("call_{:x}", text::fnv1a(run.prompt_tokens.into(), run.model.as_bytes()))
}

async fn openai_chat(State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let family = Family::OpenAi;
    let (body, model) = match body_and_model(family, &uri, &engine, &raw) {
        Ok(parsed) => parsed,
        Err(r) => return r.into_response(),
    };
    let req = GenRequest {
        prompt: chat_prompt(&body),
        max_tokens: max_tokens(&body, family),
        shape: shape(&body, family),
        model,
    };
    let mut run = match engine.start(req).await {
        Ok(run) => run,
        Err(e) => return sim_error(family, &e).into_response(),
    };
    let id = next_id("chatcmpl", &raw);
    let created = unix_now();
    if !stream_flag(&body, false) {
        let Ok(text) = run.collect().await else {
            return dropped_connection();
        };
        let message = match &run.shape {
            OutputShape::ToolCall(name) => json!({
                "role": "assistant", "content": null,
                "tool_calls": [{ "id": tool_call_id(&run), "type": "function", "function": { "name": name, "arguments": "{}" } }],
            }),
            _ => json!({ "role": "assistant", "content": text }),
        };
        let response = json!({
            "id": id, "object": "chat.completion", "created": created, "model": run.model,
            "system_fingerprint": "fp_llmesh_sim",
            "choices": [{ "index": 0, "message": message, "finish_reason": finish_reason(&run) }],
            "usage": usage_json(&run),
        });
        engine.finish(run);
        return Json(response).into_response();
    }
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let model = run.model.clone();
    let stream = async_stream::stream! {
        let chunk = |delta: Value, finish: Option<&str>| json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_llmesh_sim",
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        });
        yield Ok(sse(&chunk(json!({ "role": "assistant", "content": "" }), None)));
        if let OutputShape::ToolCall(name) = &run.shape {
            let call = json!({ "tool_calls": [{ "index": 0, "id": tool_call_id(&run), "type": "function",
                "function": { "name": name, "arguments": "{}" } }] });
            yield Ok(sse(&chunk(call, None)));
        }
        loop {
            match run.next_token().await {
                Some(Ok(token)) => yield Ok(sse(&chunk(json!({ "content": token }), None))),
                Some(Err(_)) => {
                    drop_pause().await;
                    yield Err(std::io::Error::other("connection dropped (injected fault)"));
                    return;
                }
                None => break,
            }
        }
        yield Ok(sse(&chunk(json!({}), Some(finish_reason(&run)))));
        if include_usage {
            yield Ok(sse(&json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": run.model,
                "system_fingerprint": "fp_llmesh_sim", "choices": [], "usage": usage_json(&run),
            })));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
        engine.finish(run);
    };
    streaming("text/event-stream", stream)
}

async fn openai_completions(State(engine): Sim, uri: Uri, raw: Bytes) -> Response {
    let family = Family::OpenAi;
    let (body, model) = match body_and_model(family, &uri, &engine, &raw) {
        Ok(parsed) => parsed,
        Err(r) => return r.into_response(),
    };
    let req = GenRequest {
        prompt: text_prompt(&body, "prompt"),
        max_tokens: max_tokens(&body, family),
        shape: OutputShape::Text,
        model,
    };
    let mut run = match engine.start(req).await {
        Ok(run) => run,
        Err(e) => return sim_error(family, &e).into_response(),
    };
    let id = next_id("cmpl", &raw);
    let created = unix_now();
    if !stream_flag(&body, false) {
        let Ok(text) = run.collect().await else {
            return dropped_connection();
        };
        let response = json!({
            "id": id, "object": "text_completion", "created": created, "model": run.model,
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason(&run) }],
            "usage": usage_json(&run),
        });
        engine.finish(run);
        return Json(response).into_response();
    }
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let model = run.model.clone();
    let stream = async_stream::stream! {
        let chunk = |text: &str, finish: Option<&str>| json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
        });
        loop {
            match run.next_token().await {
                Some(Ok(token)) => yield Ok(sse(&chunk(&token, None))),
                Some(Err(_)) => {
                    drop_pause().await;
                    yield Err(std::io::Error::other("connection dropped (injected fault)"));
                    return;
                }
                None => break,
            }
        }
        yield Ok(sse(&chunk("", Some(finish_reason(&run)))));
        if include_usage {
            yield Ok(sse(&json!({
                "id": id, "object": "text_completion", "created": created, "model": run.model,
                "choices": [], "usage": usage_json(&run),
            })));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
        engine.finish(run);
    };
    streaming("text/event-stream", stream)
}

/// Inputs of an embedding request: a string, a list of strings, or token
/// arrays (rendered as text so they still embed deterministically).
fn embedding_inputs(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) => {
            items.iter().map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string)).collect()
        }
        _ => Vec::new(),
    }
}

fn embedding_model(engine: &SimEngine, family: Family, body: &Value) -> Result<SimModel, Fail> {
    let model = model_of(family, body)?;
    if engine.injected_error() {
        return Err(sim_error(family, &SimError::Injected));
    }
    engine.model(&model).ok_or_else(|| sim_error(family, &SimError::ModelNotFound(model)))
}

async fn openai_embeddings(State(engine): Sim, uri: Uri, body: Bytes) -> Response {
    let family = Family::OpenAi;
    let body = match parse(family, &uri, &engine, &body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let model = match embedding_model(&engine, family, &body) {
        Ok(m) => m.name.clone(),
        Err(r) => return r.into_response(),
    };
    let inputs = embedding_inputs(body.get("input"));
    if inputs.is_empty() {
        return error(family, StatusCode::BAD_REQUEST, "input is required").into_response();
    }
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let dim = engine.config().embedding_dim;
    let tokens: u32 = inputs.iter().map(|i| text::count_tokens(i)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = text::embedding(input, dim);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    engine.count_embedding(tokens);
    Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
    .into_response()
}

fn ollama_details(model: &SimModel) -> Value {
    json!({
        "parent_model": "", "format": "gguf", "family": model.family, "families": [model.family],
        "parameter_size": model.parameter_size, "quantization_level": model.quantization,
    })
}

pub(crate) fn digest(model: &SimModel) -> String {
    format!("{:016x}{:016x}", text::fnv1a(1, model.name.as_bytes()), text::fnv1a(2, model.name.as_bytes()))
}

async fn tags(State(engine): Sim) -> Json<Value> {
    let modified = rfc3339_at(engine.started_at());
    let models: Vec<Value> = engine
        .models()
        .iter()
        .map(|m| {
            json!({
                "name": m.name, "model": m.name, "modified_at": modified, "size": m.size_bytes,
                "digest": digest(m), "details": ollama_details(m),
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

async fn props(State(engine): Sim) -> Json<Value> {
    Json(json!({ "total_slots": engine.config().slots, "chat_template": "" }))
}

async fn ps(State(engine): Sim) -> Json<Value> {
    let models: Vec<Value> = engine
        .loaded_used_at()
        .into_iter()
        .filter_map(|(name, used_at)| Some((engine.model(&name)?, used_at)))
        .map(|(m, used_at)| {
            let m = &m;
            // Ollama's default keep-alive: five minutes after the last use.
            let expires = humantime::format_rfc3339_seconds(used_at + std::time::Duration::from_secs(300)).to_string();
            json!({
                "name": m.name, "model": m.name, "size": m.size_bytes, "digest": digest(m),
                "details": ollama_details(m), "expires_at": expires, "size_vram": m.size_bytes,
                "context_length": 4096,
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

async fn show(State(engine): Sim, uri: Uri, body: Bytes) -> Response {
    let family = Family::Ollama;
    let body = match parse(family, &uri, &engine, &body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let name = match model_of(family, &body) {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    let Some(model) = engine.model(&name) else {
        return sim_error(family, &SimError::ModelNotFound(name)).into_response();
    };
    let capabilities = if model.is_embedding() { json!(["embedding"]) } else { json!(["completion", "tools"]) };
    Json(json!({
        "modelfile": format!("FROM {}\n", model.name),
        "parameters": "num_ctx 4096",
        "template": "{{ .Prompt }}",
        "details": ollama_details(&model),
        "model_info": {
            "general.architecture": model.family,
            "general.parameter_count": model.size_bytes / 2 * 3,
            format!("{}.context_length", model.family): 4096,
        },
        "capabilities": capabilities,
        "modified_at": rfc3339_now(),
    }))
    .into_response()
}

fn ollama_final(run: &Run, body_field: &str) -> Value {
    let mut done = json!({
        "model": run.model, "created_at": rfc3339_now(), "done": true,
        "done_reason": if run.truncated { "length" } else { "stop" },
        "total_duration": nanos(run.total()),
        "load_duration": nanos(run.load),
        "prompt_eval_count": run.prompt_tokens,
        "prompt_eval_duration": nanos(run.prompt_eval),
        "eval_count": run.completion_tokens,
        "eval_duration": nanos(run.decode_time()),
    });
    if body_field == "message" {
        done["message"] = json!({ "role": "assistant", "content": "" });
    } else {
        done["response"] = json!("");
    }
    done
}

async fn ollama_generation(engine: Arc<SimEngine>, body: Value, prompt: Prompt, field: &'static str) -> Response {
    let family = Family::Ollama;
    let model = match model_of(family, &body) {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    // Ollama treats an empty generate prompt, or a chat without messages,
    // as "load the model" (preload).
    let load = match field {
        "response" => body.get("prompt").and_then(Value::as_str).is_none_or(str::is_empty),
        _ => body.get("messages").and_then(Value::as_array).is_none_or(Vec::is_empty),
    };
    if load {
        let Some(found) = engine.model(&model).map(|m| m.name) else {
            return sim_error(family, &SimError::ModelNotFound(model)).into_response();
        };
        engine.ensure_loaded(&found).await;
        let mut answer = json!({ "model": found, "created_at": rfc3339_now(), "done": true, "done_reason": "load" });
        answer[field] = if field == "response" { json!("") } else { json!({ "role": "assistant", "content": "" }) };
        return Json(answer).into_response();
    }
    let req = GenRequest { prompt, max_tokens: max_tokens(&body, family), shape: shape(&body, family), model };
    let mut run = match engine.start(req).await {
        Ok(run) => run,
        Err(e) => return sim_error(family, &e).into_response(),
    };
    let tool_calls = match &run.shape {
        OutputShape::ToolCall(name) => Some(json!([{ "function": { "name": name, "arguments": {} } }])),
        _ => None,
    };
    if !stream_flag(&body, true) {
        let Ok(text) = run.collect().await else {
            return dropped_connection();
        };
        let mut response = ollama_final(&run, field);
        if field == "message" {
            response["message"]["content"] = json!(text);
            if let Some(calls) = tool_calls {
                response["message"]["tool_calls"] = calls;
            }
        } else {
            response["response"] = json!(text);
        }
        engine.finish(run);
        return Json(response).into_response();
    }
    let stream = async_stream::stream! {
        if let Some(calls) = tool_calls {
            yield Ok::<_, std::io::Error>(ndjson(&json!({
                "model": run.model, "created_at": rfc3339_now(),
                "message": { "role": "assistant", "content": "", "tool_calls": calls }, "done": false,
            })));
        }
        loop {
            match run.next_token().await {
                Some(Ok(token)) => {
                    let mut line = json!({ "model": run.model, "created_at": rfc3339_now(), "done": false });
                    if field == "message" {
                        line["message"] = json!({ "role": "assistant", "content": token });
                    } else {
                        line["response"] = json!(token);
                    }
                    yield Ok(ndjson(&line));
                }
                Some(Err(_)) => {
                    drop_pause().await;
                    yield Err(std::io::Error::other("connection dropped (injected fault)"));
                    return;
                }
                None => break,
            }
        }
        yield Ok(ndjson(&ollama_final(&run, field)));
        engine.finish(run);
    };
    streaming("application/x-ndjson", stream)
}

async fn ollama_chat(State(engine): Sim, uri: Uri, body: Bytes) -> Response {
    match parse(Family::Ollama, &uri, &engine, &body) {
        Ok(body) => {
            let prompt = chat_prompt(&body);
            ollama_generation(engine, body, prompt, "message").await
        }
        Err(r) => r.into_response(),
    }
}

async fn ollama_generate(State(engine): Sim, uri: Uri, body: Bytes) -> Response {
    match parse(Family::Ollama, &uri, &engine, &body) {
        Ok(body) => {
            let prompt = text_prompt(&body, "prompt");
            ollama_generation(engine, body, prompt, "response").await
        }
        Err(r) => r.into_response(),
    }
}

async fn ollama_embed(State(engine): Sim, uri: Uri, body: Bytes) -> Response {
    let family = Family::Ollama;
    let body = match parse(family, &uri, &engine, &body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let model = match embedding_model(&engine, family, &body) {
        Ok(m) => m.name.clone(),
        Err(r) => return r.into_response(),
    };
    let inputs = embedding_inputs(body.get("input"));
    let dim = engine.config().embedding_dim;
    let tokens: u32 = inputs.iter().map(|i| text::count_tokens(i)).sum();
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|i| text::embedding(i, dim)).collect();
    engine.count_embedding(tokens);
    Json(json!({
        "model": model, "embeddings": embeddings, "total_duration": 1000, "load_duration": 0,
        "prompt_eval_count": tokens,
    }))
    .into_response()
}

async fn ollama_embeddings(State(engine): Sim, uri: Uri, body: Bytes) -> Response {
    let family = Family::Ollama;
    let body = match parse(family, &uri, &engine, &body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = embedding_model(&engine, family, &body) {
        return r.into_response();
    }
    let prompt = body.get("prompt").and_then(Value::as_str).unwrap_or_default();
    engine.count_embedding(text::count_tokens(prompt));
    Json(json!({ "embedding": text::embedding(prompt, engine.config().embedding_dim) })).into_response()
}

fn openai_model_json(model: &SimModel) -> Value {
    json!({ "id": model.name, "object": "model", "created": 1_700_000_000, "owned_by": "library" })
}

async fn openai_models(State(engine): Sim) -> Json<Value> {
    let data: Vec<Value> = engine.models().iter().map(openai_model_json).collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn openai_model(State(engine): Sim, Path(id): Path<String>) -> Response {
    match engine.model(&id) {
        Some(model) => Json(openai_model_json(&model)).into_response(),
        None => sim_error(Family::OpenAi, &SimError::ModelNotFound(id)).into_response(),
    }
}

async fn stats(State(engine): Sim) -> Json<Value> {
    Json(json!(engine.stats()))
}

async fn get_faults(State(engine): Sim) -> Json<Faults> {
    Json(engine.faults())
}

async fn set_faults(State(engine): Sim, Json(faults): Json<Faults>) -> Result<Json<Faults>, Infallible> {
    engine.set_faults(faults);
    Ok(Json(engine.faults()))
}

async fn last_request(State(engine): Sim) -> Response {
    match engine.last_request() {
        Some(req) => Json(req).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}
