//! The client-facing HTTP API: OpenAI-compatible `/v1/*`, Ollama-native
//! `/api/*`, and health endpoints. Handlers only parse what routing needs,
//! hand the request to a [`RequestHandler`], and relay what comes back.

pub mod access;
pub mod cluster;
pub mod manage;
pub mod metering;
pub mod model_name;
pub mod models;
pub mod nodes;
pub mod relay;
pub mod resume;
pub mod routing;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use llmesh_mesh::{ApiKind, Coordinator, InferenceRequest, Membership};
use tracing::Instrument;

use crate::error::{ApiError, ErrorFormat};
use crate::local::LocalNode;
use crate::node_state::NodeStateBuilder;
use llmesh_mesh::route::{Route, Routed};

/// The Ollama version `/api/version` reports: the API level whose
/// endpoints and fields this agent serves (clients check it).
pub const OLLAMA_COMPAT_VERSION: &str = "0.12.0";

/// Header naming the node that served a request.
pub const NODE_HEADER: &str = "x-llmesh-node";
/// Header saying how a request was served: `local`, `peer:<node>`, `cloud:<provider>`.
pub const ROUTE_HEADER: &str = "x-llmesh-route";
/// Header carrying the request id (taken from the client when it sends one).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// [`REQUEST_ID_HEADER`], [`NODE_HEADER`] and [`ROUTE_HEADER`] as header
/// names made once: inserting a `&str` name copies it on every response.
const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const NODE_NAME: HeaderName = HeaderName::from_static(NODE_HEADER);
const ROUTE_NAME: HeaderName = HeaderName::from_static(ROUTE_HEADER);
// Headers read on every request, by name built once: looking one up by a
// `&str` parses the name each time.
const TIMEOUT_NAME: HeaderName = HeaderName::from_static(TIMEOUT_HEADER);
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static("traceparent");
const RESUME_NAME: HeaderName = HeaderName::from_static(resume::RESUME_HEADER);
/// Header with which a client shortens the time allowed until the response
/// starts, in milliseconds; the deadline travels with forwarded requests.
pub const TIMEOUT_HEADER: &str = "x-llmesh-timeout-ms";

/// Everything the handlers share.
pub struct AppState {
    /// This node's name, for `x-llmesh-node`.
    pub node_name: String,
    /// Runs requests on this node.
    pub local: Arc<LocalNode>,
    /// Chooses this node, a peer or the cloud for each request.
    pub router: Arc<llmesh_mesh::route::Router>,
    /// Builds this node's state for `/mesh/v1/nodes`.
    pub node: Arc<NodeStateBuilder>,
    /// The mesh planes, once this node is a member of its cluster.
    pub mesh_node: std::sync::OnceLock<llmesh_mesh::node::Node>,
    /// This node's cluster credentials and membership problems, when it
    /// runs with a mesh (set before it is a member).
    pub trust: Option<Arc<llmesh_mesh::pki::Trust>>,
    /// Cloud providers, when configured.
    pub cloud: Option<Arc<crate::cloud::Cloud>>,
    /// Who may call without an API key.
    pub anonymous: crate::config::AnonymousAccess,
    /// Usage waiting to be written to the ledger.
    pub usage: Arc<crate::limits::UsageBatcher>,
    /// The last failed requests, for the dashboard.
    pub errors: RecentErrors,
    /// Longest silence allowed between body chunks from the backend.
    pub idle_timeout: Duration,
    /// Largest non-streaming response relayed.
    pub max_response_bytes: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Time a client has to send its whole request body.
    pub body_read_timeout: Duration,
    /// Whether a streamed chat that breaks after its first token is
    /// resumed on another node (see [`resume`]).
    pub resume_streams: bool,
    /// Whether the dashboard, `/metrics` and `/mesh/v1/*` answer anyone.
    pub public_status: bool,
}

impl AppState {
    /// Membership, once this node is a member of a mesh.
    pub fn mesh(&self) -> Option<&Membership> {
        self.mesh_node.get().map(|n| &n.membership)
    }

    /// The replicated cluster state (keys, routes), once a member.
    pub fn coordinator(&self) -> Option<&Coordinator> {
        self.mesh_node.get().map(|n| &n.coordinator)
    }

    /// The data plane (for per-peer figures in `/metrics`), once a member.
    pub fn dataplane(&self) -> Option<&Arc<llmesh_mesh::DataPlane>> {
        self.mesh_node.get().map(|n| &n.dataplane)
    }

    /// Whether this node runs with a mesh but is not a member yet (or no
    /// longer: revoked).
    pub fn outside_mesh(&self) -> bool {
        self.trust.is_some() && (self.mesh_node.get().is_none() || self.revoked())
    }

    /// Whether the cluster revoked this node.
    pub fn revoked(&self) -> bool {
        self.trust.as_ref().and_then(|t| t.problem()).is_some_and(|p| p.code() == "revoked")
    }
}

type AppStateRef = State<Arc<AppState>>;

/// Builds the HTTP router.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    // The client API: behind API-key checks once the cluster has keys.
    let client_api = Router::new()
        .route("/v1/models", get(models::openai_models))
        .route("/v1/models/{*id}", get(models::openai_model))
        .route("/api/pull", post(|s: AppStateRef, c, h, b| manage::manage(s, ApiKind::OllamaPull, c, h, b)))
        .route("/api/push", post(|s: AppStateRef, c, h, b| manage::manage(s, ApiKind::OllamaPush, c, h, b)))
        .route("/api/create", post(|s: AppStateRef, c, h, b| manage::manage(s, ApiKind::OllamaCreate, c, h, b)))
        .route("/api/copy", post(|s: AppStateRef, c, h, b| manage::manage(s, ApiKind::OllamaCopy, c, h, b)))
        .route("/api/delete", delete(|s: AppStateRef, c, h, b| manage::manage(s, ApiKind::OllamaDelete, c, h, b)))
        .route("/api/tags", get(models::ollama_tags))
        .route("/api/ps", get(models::ollama_ps))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), access::read_body))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), access::authenticate));
    // The inference routes check keys and read the body themselves
    // (`serve_inference`), as they do when `Api` serves them directly.
    let inference = INFERENCE_ROUTES.iter().fold(Router::new(), |routes, &(path, api)| {
        routes
            .route(path, post(move |State(state): AppStateRef, request: Request| serve_inference(state, api, request)))
    });
    // What operators read: open on the LAN unless api.public_status = false.
    let status = Router::new()
        .route("/", get(dashboard))
        .route("/mesh/v1/errors", get(recent_errors))
        .route("/mesh/v1/nodes", get(nodes::mesh_nodes))
        .route("/mesh/v1/cluster", get(cluster::mesh_cluster))
        .route("/mesh/v1/cloud", get(cluster::mesh_cloud))
        .route("/metrics", get(cluster::prometheus))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), access::status_access));
    Router::new()
        .route("/healthz", get(models::healthz))
        .route("/readyz", get(models::readyz))
        .route("/api/version", get(models::ollama_version))
        .merge(status)
        .merge(client_api)
        .merge(inference)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// How many failed requests the dashboard shows.
const RECENT_ERRORS: usize = 50;

/// The last failed requests: when, status, code, message (no bodies, no keys).
#[derive(Debug, Default)]
pub struct RecentErrors(std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>);

impl RecentErrors {
    fn push(&self, err: &ApiError, request_id: &str) {
        let at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut errors = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if errors.len() == RECENT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(serde_json::json!({
            "at_ms": at_ms, "status": err.status.as_u16(), "code": err.code,
            "message": err.message.chars().take(300).collect::<String>(), "request_id": request_id,
        }));
    }
}

/// `GET /`: the dashboard, a single page served from the binary.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

/// `GET /mesh/v1/errors`: the last failed requests on this node.
async fn recent_errors(State(state): AppStateRef) -> axum::Json<serde_json::Value> {
    let errors: Vec<serde_json::Value> =
        state.errors.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect();
    axum::Json(serde_json::json!({ "errors": errors }))
}

/// The error format a path speaks.
pub fn format_for(path: &str) -> ErrorFormat {
    if path.starts_with("/api/") {
        ErrorFormat::Ollama
    } else if path.starts_with("/v1/messages") {
        ErrorFormat::Anthropic
    } else {
        ErrorFormat::OpenAi
    }
}

async fn no_route(method: Method, uri: Uri) -> Response {
    ApiError::no_route(method.as_str(), uri.path()).with_format(format_for(uri.path())).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not accept {method}", uri.path()),
    )
    .with_format(format_for(uri.path()))
    .into_response()
}

/// The client's request id when it is sane, otherwise a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// A fresh request id: a random per-process prefix and a counter, unique
/// across the mesh without a system call per request.
fn new_request_id() -> String {
    static PREFIX: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair().0);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Hex by hand: `format!("{:016x}")` went through the formatting
    // machinery for about a thousand instructions per request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for word in [*PREFIX, n] {
        for shift in (0..16).rev() {
            id.push(char::from(HEX[((word >> (shift * 4)) & 0xf) as usize]));
        }
    }
    id
}

fn stamp(response: &mut Response, node: &str, request_id: &str, route: Option<&Route>) {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_NAME, value);
    }
    if let Ok(value) = HeaderValue::from_str(node) {
        headers.insert(NODE_NAME, value);
    }
    let route = match route {
        Some(Route::Local) => Some(HeaderValue::from_static("local")),
        Some(route) => HeaderValue::from_str(&route.to_string()).ok(),
        None => None,
    };
    if let Some(route) = route {
        headers.insert(ROUTE_NAME, route);
    }
}

/// The client's deadline header, if any.
fn deadline(headers: &HeaderMap) -> Result<Option<Instant>, ApiError> {
    let Some(value) = headers.get(TIMEOUT_NAME) else { return Ok(None) };
    let ms =
        value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|ms| *ms > 0).ok_or_else(|| {
            ApiError::bad_request(format!("{TIMEOUT_HEADER} must be a positive number of milliseconds"))
        })?;
    Ok(Some(Instant::now() + Duration::from_millis(ms)))
}

/// The request body, or the error for one that could not be read (too
/// large, or broken off).
fn read_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.max_body_bytes)
        } else {
            ApiError::bad_request(format!("cannot read request body: {}", rejection.body_text()))
        }
    })
}

/// Reads the body into a request: its meta parsed once, the model checked
/// against the caller's key and the cluster's model routes. Also returns
/// the model the client asked for (before a route renamed it).
fn build_request(
    state: &AppState,
    api: ApiKind,
    caller: &access::Caller,
    headers: &HeaderMap,
    body: Bytes,
    request_id: &str,
) -> Result<(InferenceRequest, String), ApiError> {
    let mut meta = routing::parse(api, &body)?;
    caller.check_model(&meta.model)?;
    let asked = meta.model.clone();
    meta.tenant = caller.tenant();
    let route = state.coordinator().and_then(|c| c.state().route(&meta.model).map(str::to_string));
    let body = match route {
        Some(target) => {
            let body = access::rewrite_model(&body, &target)?;
            meta.model = target;
            body
        }
        None => body,
    };
    let request = InferenceRequest {
        request_id: request_id.to_string(),
        api,
        meta,
        body,
        deadline: deadline(headers)?,
        queue_until: None,
        forwarded_by: None,
        on_slot: None,
        traceparent: String::new(),
    };
    Ok((request, asked))
}

/// Whether the caller's key has a token budget, so its usage is reported.
fn reports_tokens(state: &AppState, key: Option<&String>) -> bool {
    let Some(id) = key else { return false };
    let cluster = state.coordinator().map(|c| c.state());
    cluster
        .as_ref()
        .and_then(|c| c.keys.get(id))
        .and_then(|k| k.limits.as_ref())
        .is_some_and(|l| l.tokens_per_minute > 0)
}

/// Routes an admitted request and relays its response, metered.
async fn run(
    state: &AppState,
    mut request: InferenceRequest,
    asked: String,
    caller: &access::Caller,
    headers: &HeaderMap,
    format: ErrorFormat,
    started: Instant,
) -> Result<(Response, String, Route), ApiError> {
    let rate_headers = crate::limits::admit(caller, state.coordinator(), &state.usage).await?;
    // The entry span: from admission to the response head. Its trace
    // context travels with a forwarded request.
    let span = tracing::info_span!("entry", request_id = %request.request_id, api = request.api.as_str_name(), model = %request.meta.model);
    // A client that traces its own calls sends its context: the entry
    // joins that trace.
    if let Some(parent) = headers.get(TRACEPARENT_NAME).and_then(|v| v.to_str().ok()) {
        crate::telemetry::continue_trace(&span, parent);
    }
    request.traceparent = crate::telemetry::traceparent(&span);
    let prompt_bytes = request.body.len();
    let model = request.meta.model.clone();
    let cloud = access::cloud_policy(caller, headers, state.cloud.as_deref(), &model)?;
    let resumable = state.resume_streams
        && resume::resumable_api(request.api)
        && request.meta.stream
        && headers.get(RESUME_NAME).is_none_or(|v| v != "off");
    let resume = resumable.then(|| (request.clone(), cloud.clone()));
    let Routed { response: mut upstream, node, node_id, route } = state
        .router
        .route(request, cloud)
        .instrument(span)
        .await
        .map_err(|e| ApiError::from(e).with_headers(rate_headers.clone()))?;
    if let Some((request, policy)) = resume.filter(|_| !matches!(route, Route::Cloud(_)) && upstream.status == 200) {
        let resume = resume::Resume { router: state.router.clone(), request, policy, node_id };
        upstream.body = resume::resumable(upstream.body, resume);
    }
    upstream.body = model_name::rename(upstream.body, model.clone(), asked);
    let ttft = started.elapsed();
    let response = relay::relay(upstream, state.idle_timeout, state.max_response_bytes, format).await;
    let key = caller.key_id().cloned();
    let accounting = metering::Accounting {
        model,
        route: route.kind().to_string(),
        report_tokens: reports_tokens(state, key.as_ref()),
        key,
        started,
        ttft,
        status: response.status().as_u16(),
        usage: state.usage.clone(),
        coordinator: state.coordinator().cloned(),
        entry: state.node.entry.clone(),
    };
    let mut response = metering::account(response, accounting, prompt_bytes);
    for (name, value) in rate_headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    Ok((response, node, route))
}

/// Counts, logs and renders a refused request; `model` when the request
/// got as far as the router.
fn refuse(
    state: &AppState,
    err: ApiError,
    caller: &access::Caller,
    request_id: &str,
    started: Instant,
    format: ErrorFormat,
    model: Option<&str>,
) -> Response {
    // Only failures on the way to a node that serves the model label it.
    let served = err.status.is_server_error() && err.code != "model_not_found";
    metering::refused(err.code, model.filter(|_| served), caller.key_id().map(String::as_str), started);
    if err.status.is_server_error() || err.status == StatusCode::TOO_MANY_REQUESTS {
        state.errors.push(&err, request_id);
    }
    if err.status.is_server_error() {
        tracing::warn!(id = %request_id, status = err.status.as_u16(), error = %err.message, "request failed");
    } else {
        tracing::debug!(id = %request_id, status = err.status.as_u16(), error = %err.message, "request rejected");
    }
    err.with_format(format).into_response()
}

/// Serves one inference request from its head and its whole body. It takes
/// the head whole rather than through extractors: the header map and the
/// caller are borrowed from it, not copied for every request.
async fn infer(state: &AppState, api: ApiKind, mut parts: Parts, body: Bytes) -> Response {
    let format = ErrorFormat::of(api);
    let headers = &parts.headers;
    let request_id = request_id(headers);
    let started = Instant::now();
    let Some(caller) = parts.extensions.remove::<access::Caller>() else {
        // `authenticate` runs before every inference request and sets it.
        let err = ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the request reached its handler without an authenticated caller",
        );
        return err.with_format(format).into_response();
    };
    let mut model = None;
    let result = match build_request(state, api, &caller, headers, body, &request_id) {
        Ok((request, asked)) => {
            model = Some(request.meta.model.clone());
            run(state, request, asked, &caller, headers, format, started).await
        }
        Err(err) => Err(err),
    };
    let response = match result {
        Ok((mut response, node, route)) => {
            stamp(&mut response, &node, &request_id, Some(&route));
            response
        }
        Err(err) => {
            let mut response = refuse(state, err, &caller, &request_id, started, format, model.as_deref());
            stamp(&mut response, &state.node_name, &request_id, None);
            response
        }
    };
    tracing::debug!(id = %request_id, status = response.status().as_u16(), head_ms = started.elapsed().as_millis() as u64, "response head sent");
    response
}

/// The API as the HTTP listener serves it: inference requests go straight
/// to their handler through the same checks as behind the router
/// ([`access::admit`], then [`access::read_whole_body`]); everything else
/// goes through the axum [`router`]. The inference routes are most of the
/// traffic, and they skip the router's per-request work: matching, cloning
/// each layer's service, boxing each layer's future, extensions (with the
/// boxing below, 15% fewer instructions per small request in callgrind).
#[derive(Clone)]
pub struct Api {
    router: Router,
    state: Arc<AppState>,
}

impl Api {
    /// The API over `state`.
    pub fn new(state: Arc<AppState>) -> Api {
        Api { router: router(state.clone()), state }
    }

    /// Serves one request.
    pub fn call(&self, request: Request) -> impl Future<Output = Response> + Send + use<> {
        let inference = inference_route(request.method(), request.uri().path());
        // Both clones are reference counts.
        let state = self.state.clone();
        let router = self.router.clone();
        async move {
            match inference {
                // Boxed: the whole request's state machine is several KB,
                // and hyper moves the future it holds (three copies per
                // request, about a seventh of the agent's instructions in
                // callgrind); the box is moved instead.
                Some(api) => Box::pin(serve_inference(state, api, request)).await,
                None => match tower::ServiceExt::oneshot(router, request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
            }
        }
    }
}

/// The inference routes (all POST) and the API each speaks.
const INFERENCE_ROUTES: [(&str, ApiKind); 11] = [
    ("/v1/chat/completions", ApiKind::OpenaiChat),
    ("/v1/completions", ApiKind::OpenaiCompletions),
    ("/v1/embeddings", ApiKind::OpenaiEmbeddings),
    ("/v1/responses", ApiKind::OpenaiResponses),
    ("/v1/messages", ApiKind::AnthropicMessages),
    ("/v1/messages/count_tokens", ApiKind::AnthropicCountTokens),
    ("/api/chat", ApiKind::OllamaChat),
    ("/api/generate", ApiKind::OllamaGenerate),
    ("/api/embed", ApiKind::OllamaEmbed),
    ("/api/embeddings", ApiKind::OllamaEmbeddings),
    ("/api/show", ApiKind::OllamaShow),
];

/// The inference API a request is for, when it is one of
/// [`INFERENCE_ROUTES`].
fn inference_route(method: &Method, path: &str) -> Option<ApiKind> {
    if method != Method::POST {
        return None;
    }
    INFERENCE_ROUTES.iter().find(|(route, _)| *route == path).map(|&(_, api)| api)
}

/// Serves one inference request of kind `api`: the caller authenticated
/// ([`access::admit`], which refuses bad keys before any body is read), the
/// body read ([`access::read_whole_body`]), then routed and relayed.
async fn serve_inference(state: Arc<AppState>, api: ApiKind, request: Request) -> Response {
    let request = match access::admit(&state, request).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    match access::read_whole_body(&state, request).await {
        Ok((parts, body)) => infer(&state, api, parts, body).await,
        Err(refused) => refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
        // The prefix is the process's, the rest a counter.
        assert_eq!(a[..16], b[..16]);
        let (na, nb) = (u64::from_str_radix(&a[16..], 16), u64::from_str_radix(&b[16..], 16));
        assert!(matches!((na, nb), (Ok(x), Ok(y)) if y > x), "{a} {b}");
    }

    #[test]
    fn only_posts_to_the_exact_inference_paths_skip_the_router() {
        assert_eq!(inference_route(&Method::POST, "/v1/chat/completions"), Some(ApiKind::OpenaiChat));
        assert_eq!(inference_route(&Method::POST, "/v1/messages/count_tokens"), Some(ApiKind::AnthropicCountTokens));
        assert_eq!(inference_route(&Method::POST, "/api/show"), Some(ApiKind::OllamaShow));
        // Everything else keeps the router's answers: 405, 404, the
        // management and listing routes.
        assert_eq!(inference_route(&Method::GET, "/v1/chat/completions"), None);
        assert_eq!(inference_route(&Method::POST, "/v1/chat/completions/"), None);
        assert_eq!(inference_route(&Method::POST, "/api/pull"), None);
        assert_eq!(inference_route(&Method::POST, "/v1/models"), None);
    }
}
