//! Model management through any node: Ollama's `/api/pull`, `/api/delete`,
//! `/api/copy`, `/api/create` and `/api/push`, carried out on the nodes
//! they are meant for.
//!
//! A client names the nodes with `x-llmesh-target` (node names or ids,
//! comma-separated) or lets the mesh choose: a pull goes to the nodes that
//! already hold the model (Ollama's pull of a present model is an update)
//! plus, up to `x-llmesh-replicas` (default 1) copies in all, the nodes
//! with the most free GPU memory that lack it; delete and copy act on
//! every node holding the model, push on one, create where its `from`
//! model is. Each node's backend does the work (an OpenAI-compatible
//! backend cannot, and says so); progress lines stream back as Ollama's
//! NDJSON, tagged with the node when several nodes answer.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::{ApiKind, InferenceRequest, InferenceResponse, Liveness, RequestMeta, ServeError};
use serde_json::Value;

use super::{AppState, AppStateRef, NODE_HEADER, access, read_body, relay, request_id};
use crate::error::{ApiError, ErrorFormat};

/// Header naming the nodes a management call is for (names or ids,
/// comma-separated).
pub const TARGET_HEADER: &str = "x-llmesh-target";
/// Header asking a pull for this many nodes holding the model in all.
pub const REPLICAS_HEADER: &str = "x-llmesh-replicas";

/// What a management call asks for, from its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Which call.
    pub api: ApiKind,
    /// The model it acts on (copy: the destination).
    pub model: String,
    /// The model the work starts from: copy's `source`, create's `from`.
    pub source: Option<String>,
    /// Whether progress lines stream back (Ollama's default).
    pub stream: bool,
}

/// Reads the fields management needs, with Ollama's errors for wrong ones.
pub fn parse_operation(api: ApiKind, body: &[u8]) -> Result<Operation, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let object = value.as_object().ok_or_else(|| ApiError::bad_request("request body must be a JSON object"))?;
    // Ollama decodes bodies into Go structs; a field of the wrong type is
    // a 400 with Go's message.
    let request = match api {
        ApiKind::OllamaPull => "PullRequest",
        ApiKind::OllamaDelete => "DeleteRequest",
        ApiKind::OllamaCopy => "CopyRequest",
        ApiKind::OllamaCreate => "CreateRequest",
        _ => "PushRequest",
    };
    let wrong = |key: &str, found: &Value, go_type: &str| {
        let found = match found {
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            _ => "object",
        };
        ApiError::bad_request(format!(
            "json: cannot unmarshal {found} into Go struct field {request}.{key} of type {go_type}"
        ))
    };
    let text = |key: &str| -> Result<Option<String>, ApiError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(wrong(key, other, "string")),
        }
    };
    let stream = match object.get("stream") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(wrong("stream", other, "bool")),
    };
    let (model, source) = if api == ApiKind::OllamaCopy {
        let (Some(source), Some(destination)) = (text("source")?, text("destination")?) else {
            return Err(ApiError::bad_request("source and destination are required"));
        };
        (destination, Some(source))
    } else {
        let model = text("model")?.or(text("name")?).ok_or_else(|| ApiError::bad_request("model is required"))?;
        let source = if api == ApiKind::OllamaCreate { text("from")? } else { None };
        (model, source)
    };
    // Copy and delete answer with one status; the others stream progress.
    let stream = stream && !matches!(api, ApiKind::OllamaCopy | ApiKind::OllamaDelete);
    Ok(Operation { api, model, source, stream })
}

/// A node as model management sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Whether it is this node.
    pub local: bool,
    /// Whether its backend can manage models (Ollama or the simulator).
    pub manageable: bool,
    /// Whether it can take work now (alive, backend up, not draining).
    pub available: bool,
    /// Models on its disk.
    pub models: Vec<String>,
    /// GPU memory not in use, in bytes (0 without a GPU).
    pub free_vram: u64,
    /// Bytes its models take on disk.
    pub disk_used: u64,
}

impl Node {
    fn holds(&self, model: &str) -> bool {
        self.models.iter().any(|m| same_name(m, model))
    }
}

/// Whether two model names are the same, with Ollama's implicit `:latest`.
fn same_name(a: &str, b: &str) -> bool {
    let full = |n: &str| if n.contains(':') { n.to_string() } else { format!("{n}:latest") };
    full(a) == full(b)
}

fn node_of(state: &llmesh_proto::NodeState, local: bool, available: bool) -> Node {
    let free_vram = state.gpus.iter().map(|g| g.memory_total_bytes.saturating_sub(g.memory_used_bytes)).sum::<u64>();
    Node {
        id: state.node_id.clone(),
        name: state.name.clone(),
        local,
        manageable: matches!(state.backend_kind.as_str(), "ollama" | "sim"),
        available: available && state.backend_healthy && !state.draining,
        models: state.models.iter().map(|m| m.name.clone()).collect(),
        free_vram,
        disk_used: state.models.iter().map(|m| m.size_bytes).sum(),
    }
}

/// This node and every peer that is not dead, this node first.
fn mesh_nodes(state: &AppState) -> Vec<Node> {
    let mut nodes = vec![node_of(&state.node.build(), true, true)];
    if let Some(mesh) = state.mesh() {
        for peer in mesh.view().peers.iter().filter(|p| p.liveness != Liveness::Dead) {
            nodes.push(node_of(&peer.state, false, peer.liveness == Liveness::Alive));
        }
    }
    nodes
}

fn not_found(model: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "model_not_found", format!("model '{model}' not found on any node"))
}

/// The nodes to run `op` on. `named`: the target header's names or ids;
/// `replicas`: how many nodes should hold a pulled model in all.
pub fn choose_targets(
    op: &Operation,
    nodes: &[Node],
    named: &[String],
    replicas: usize,
) -> Result<Vec<Node>, ApiError> {
    if !named.is_empty() {
        let mut chosen: Vec<Node> = Vec::new();
        for wanted in named {
            let node = nodes.iter().find(|n| &n.name == wanted || &n.id == wanted).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "node_not_found",
                    format!("no live node named '{wanted}' in this mesh (see `llmesh status`)"),
                )
            })?;
            if !chosen.iter().any(|c| c.id == node.id) {
                chosen.push(node.clone());
            }
        }
        return Ok(chosen);
    }
    let usable = |n: &&Node| n.manageable && n.available;
    let holders =
        |model: &str| -> Vec<Node> { nodes.iter().filter(usable).filter(|n| n.holds(model)).cloned().collect() };
    match op.api {
        ApiKind::OllamaDelete | ApiKind::OllamaCopy => {
            let model = op.source.as_deref().unwrap_or(&op.model);
            let found = holders(model);
            if found.is_empty() { Err(not_found(model)) } else { Ok(found) }
        }
        ApiKind::OllamaPush => {
            holders(&op.model).into_iter().next().map(|n| vec![n]).ok_or_else(|| not_found(&op.model))
        }
        ApiKind::OllamaCreate if op.source.is_some() => {
            let from = op.source.as_deref().unwrap_or_default();
            let found = holders(from);
            if found.is_empty() { Err(not_found(from)) } else { Ok(found) }
        }
        _ => {
            let mut chosen = holders(&op.model);
            let mut fresh: Vec<&Node> = nodes.iter().filter(usable).filter(|n| !n.holds(&op.model)).collect();
            // Most free GPU memory first, then the fullest disks last.
            fresh.sort_by(|a, b| {
                b.free_vram.cmp(&a.free_vram).then(a.disk_used.cmp(&b.disk_used)).then(a.name.cmp(&b.name))
            });
            let wanted = replicas.max(1).saturating_sub(chosen.len());
            chosen.extend(fresh.into_iter().take(wanted).cloned());
            if chosen.is_empty() {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_node_can_pull",
                    "no live node with an Ollama backend can take this model (OpenAI-compatible backends cannot pull; drained nodes are skipped)",
                ));
            }
            Ok(chosen)
        }
    }
}

/// The target header's node names, and the replica count asked for.
fn wanted(headers: &HeaderMap) -> Result<(Vec<String>, usize), ApiError> {
    let named = headers
        .get_all(TARGET_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect();
    let replicas = match headers.get(REPLICAS_HEADER) {
        None => 1,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("{REPLICAS_HEADER} must be a number from 1 to 1000")))?,
    };
    Ok((named, replicas))
}

/// Runs the request on `node`: here, or over the data plane.
async fn run_on(state: &AppState, node: &Node, req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
    use llmesh_mesh::RequestHandler as _;
    if node.local {
        return state.local.serve(req).await;
    }
    let dataplane =
        state.dataplane().ok_or_else(|| ServeError::BackendUnavailable("this node is not part of a mesh".into()))?;
    Ok(dataplane.forward(&node.id, &req).await?.response)
}

/// Parses, authorizes and places a call: its operation, its nodes and
/// its body.
fn plan(
    state: &AppState,
    api: ApiKind,
    caller: &access::Caller,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Operation, Vec<Node>, Bytes), ApiError> {
    let body = read_body(state, body)?;
    let op = parse_operation(api, &body)?;
    caller.check_model(&op.model)?;
    if let Some(source) = &op.source {
        caller.check_model(source)?;
    }
    let (named, replicas) = wanted(headers)?;
    let targets = choose_targets(&op, &mesh_nodes(state), &named, replicas)?;
    Ok((op, targets, body))
}

/// Serves one management call of kind `api`.
pub async fn manage(
    State(state): AppStateRef,
    api: ApiKind,
    Extension(caller): Extension<access::Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id = request_id(&headers);
    let (op, targets, body) = match plan(&state, api, &caller, &headers, body) {
        Ok(planned) => planned,
        Err(err) => return err.with_format(ErrorFormat::Ollama).into_response(),
    };
    let names: Vec<String> = targets.iter().map(|n| n.name.clone()).collect();
    tracing::info!(id = %request_id, api = api.as_str_name(), model = %op.model, nodes = ?names, "model management");
    let request = InferenceRequest {
        request_id: request_id.clone(),
        api,
        meta: RequestMeta {
            model: op.model.clone(),
            stream: op.stream,
            tenant: caller.tenant(),
            ..RequestMeta::default()
        },
        body,
        deadline: None,
        queue_until: None,
        forwarded_by: None,
        on_slot: None,
        traceparent: String::new(),
    };
    let runs = targets.iter().map(|node| {
        let request = request.clone();
        let state = state.clone();
        async move { (node.name.clone(), run_on(&state, node, request).await) }
    });
    let mut answers = futures::future::join_all(runs).await;
    let mut response = if answers.len() == 1 {
        match answers.pop().map(|(_, answer)| answer) {
            Some(Ok(upstream)) => {
                relay::relay(upstream, state.idle_timeout, state.max_response_bytes, ErrorFormat::Ollama).await
            }
            Some(Err(err)) => ApiError::from(err).with_format(ErrorFormat::Ollama).into_response(),
            None => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no node answered").into_response(),
        }
    } else {
        combine(answers, op.stream).await
    };
    if let Ok(value) = HeaderValue::from_str(&names.join(",")) {
        response.headers_mut().insert(NODE_HEADER, value);
    }
    response
}

/// Largest answer read from one node of a multi-node call that does not
/// stream (a status line or an error).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One node's whole answer: status and body (an error's text when it
/// failed before answering).
async fn collect(answer: Result<InferenceResponse, ServeError>) -> (u16, Bytes) {
    let response = match answer {
        Ok(response) => response,
        Err(err) => {
            let body = serde_json::json!({ "error": err.to_string() }).to_string();
            return (err.status(), Bytes::from(body));
        }
    };
    let mut body = Vec::new();
    let mut stream = response.body;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) if body.len() + bytes.len() <= MAX_ANSWER_BYTES => body.extend_from_slice(&bytes),
            Ok(_) => break,
            Err(err) => {
                let body = serde_json::json!({ "error": format!("the node's answer broke off: {err}") });
                return (502, Bytes::from(body.to_string()));
            }
        }
    }
    (response.status, Bytes::from(body))
}

/// Tags each NDJSON line of `body` with the node it came from.
fn tag_lines(node: &str, body: &[u8]) -> Vec<Bytes> {
    body.split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(|line| {
            let mut value: Value = serde_json::from_slice(line)
                .unwrap_or_else(|_| serde_json::json!({ "status": String::from_utf8_lossy(line) }));
            if let Some(object) = value.as_object_mut() {
                object.insert("node".into(), Value::String(node.to_string()));
            }
            let mut text = value.to_string();
            text.push('\n');
            Bytes::from(text)
        })
        .collect()
}

/// The answer of a call several nodes carried out. Streamed: every node's
/// progress lines, tagged with its name, as they come (an error line from
/// one node makes Ollama's clients raise it). Not streamed: success when
/// every node succeeded, else the first failure, naming its node.
async fn combine(answers: Vec<(String, Result<InferenceResponse, ServeError>)>, stream: bool) -> Response {
    if stream {
        let streams = answers.into_iter().map(|(node, answer)| {
            let lines: futures::stream::BoxStream<'static, Bytes> = match answer {
                Ok(response) => Box::pin(node_lines(node, response)),
                Err(err) => {
                    let line = serde_json::json!({ "error": err.to_string(), "node": node }).to_string() + "\n";
                    Box::pin(futures::stream::once(async move { Bytes::from(line) }))
                }
            };
            lines
        });
        let merged = futures::stream::select_all(streams).map(Ok::<_, std::io::Error>);
        return Response::builder()
            .header(http::header::CONTENT_TYPE, "application/x-ndjson")
            .body(axum::body::Body::from_stream(merged))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    let mut first_ok = None;
    for (node, answer) in answers {
        let (status, body) = collect(answer).await;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = serde_json::json!({ "error": format!("node {node}: {message}") });
            return (status, axum::Json(body)).into_response();
        }
        first_ok.get_or_insert((status, body));
    }
    let (status, body) = first_ok.unwrap_or((200, Bytes::new()));
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if body.is_empty() {
        status.into_response()
    } else {
        (status, [(http::header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// A node's streamed answer as whole NDJSON lines tagged with its name; a
/// refusal (an error status) becomes one error line.
fn node_lines(node: String, response: InferenceResponse) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let status = response.status;
        let mut body = response.body;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    pending.extend_from_slice(&bytes);
                    if let Some(end) = pending.iter().rposition(|b| *b == b'\n') {
                        let complete: Vec<u8> = pending.drain(..=end).collect();
                        for line in tag_lines(&node, &complete) {
                            yield line;
                        }
                    }
                }
                Err(err) => {
                    let line = serde_json::json!({ "error": format!("the answer broke off: {err}"), "node": node });
                    yield Bytes::from(line.to_string() + "\n");
                    return;
                }
            }
        }
        if !pending.is_empty() {
            for line in tag_lines(&node, &pending) {
                yield line;
            }
        }
        if !(200..300).contains(&status) && pending.is_empty() {
            tracing::debug!(%node, status, "a node refused a management call");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, models: &[&str], free_vram: u64) -> Node {
        Node {
            id: format!("id-{name}"),
            name: name.into(),
            local: name == "a",
            manageable: true,
            available: true,
            models: models.iter().map(|m| m.to_string()).collect(),
            free_vram,
            disk_used: 0,
        }
    }

    fn op(api: ApiKind, body: &str) -> Operation {
        parse_operation(api, body.as_bytes()).expect("parses")
    }

    fn names(nodes: &[Node]) -> Vec<&str> {
        nodes.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn bodies_are_checked_like_ollamas() {
        let pull = op(ApiKind::OllamaPull, r#"{"model":"qwen2.5:7b"}"#);
        assert!(pull.stream && pull.model == "qwen2.5:7b");
        assert!(!op(ApiKind::OllamaPull, r#"{"name":"x","stream":false}"#).stream);
        let copy = op(ApiKind::OllamaCopy, r#"{"source":"a","destination":"b"}"#);
        assert_eq!((copy.model.as_str(), copy.source.as_deref()), ("b", Some("a")));
        for (api, bad) in [
            (ApiKind::OllamaPull, r#"{"model":5}"#),
            (ApiKind::OllamaPull, r#"{}"#),
            (ApiKind::OllamaPull, r#"{"model":"x","stream":"yes"}"#),
            (ApiKind::OllamaCopy, r#"{"source":"a"}"#),
            (ApiKind::OllamaDelete, r#"[1]"#),
            (ApiKind::OllamaDelete, r#"{"model":"#),
        ] {
            let err = parse_operation(api, bad.as_bytes()).expect_err(bad);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn a_pull_goes_to_the_holders_and_then_to_the_most_free_gpu_memory() {
        let nodes = [node("a", &["x:latest"], 10), node("b", &[], 50), node("c", &[], 80)];
        let pull = op(ApiKind::OllamaPull, r#"{"model":"y"}"#);
        assert_eq!(names(&choose_targets(&pull, &nodes, &[], 1).expect("placed")), ["c"]);
        assert_eq!(names(&choose_targets(&pull, &nodes, &[], 2).expect("placed")), ["c", "b"]);
        // Present already: pulled again where it is (an update), no new copy.
        let update = op(ApiKind::OllamaPull, r#"{"model":"x"}"#);
        assert_eq!(names(&choose_targets(&update, &nodes, &[], 1).expect("placed")), ["a"]);
        assert_eq!(names(&choose_targets(&update, &nodes, &[], 2).expect("placed")), ["a", "c"]);
        // Named nodes win; unknown names are refused.
        assert_eq!(names(&choose_targets(&pull, &nodes, &["b".into()], 1).expect("named")), ["b"]);
        let err = choose_targets(&pull, &nodes, &["zz".into()], 1).expect_err("unknown");
        assert_eq!(err.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn openai_drained_and_down_nodes_are_not_chosen() {
        let mut openai = node("a", &[], 100);
        openai.manageable = false;
        let mut drained = node("b", &[], 90);
        drained.available = false;
        let nodes = [openai, drained, node("c", &[], 1)];
        let pull = op(ApiKind::OllamaPull, r#"{"model":"y"}"#);
        assert_eq!(names(&choose_targets(&pull, &nodes, &[], 3).expect("placed")), ["c"]);
        let err = choose_targets(&pull, &nodes[..2], &[], 1).expect_err("nobody can pull");
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn delete_and_copy_act_on_every_holder_and_404_without_one() {
        let nodes = [node("a", &["x:latest"], 0), node("b", &["x"], 0), node("c", &[], 0)];
        let delete = op(ApiKind::OllamaDelete, r#"{"model":"x:latest"}"#);
        assert_eq!(names(&choose_targets(&delete, &nodes, &[], 1).expect("holders")), ["a", "b"]);
        let copy = op(ApiKind::OllamaCopy, r#"{"source":"x","destination":"y"}"#);
        assert_eq!(names(&choose_targets(&copy, &nodes, &[], 1).expect("holders")), ["a", "b"]);
        let missing = op(ApiKind::OllamaDelete, r#"{"model":"nope"}"#);
        assert_eq!(choose_targets(&missing, &nodes, &[], 1).expect_err("absent").status, StatusCode::NOT_FOUND);
        let push = op(ApiKind::OllamaPush, r#"{"model":"x"}"#);
        assert_eq!(names(&choose_targets(&push, &nodes, &[], 1).expect("one holder")), ["a"]);
    }

    #[test]
    fn lines_from_several_nodes_are_tagged() {
        let lines = tag_lines("n2", b"{\"status\":\"pulling manifest\"}\n\n{\"status\":\"success\"}\n");
        assert_eq!(lines.len(), 2);
        let last: Value = serde_json::from_slice(&lines[1]).expect("json");
        assert_eq!((last["status"].as_str(), last["node"].as_str()), (Some("success"), Some("n2")));
    }
}
