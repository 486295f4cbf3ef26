//! Who may call the API and what a request's model really is, from the
//! replicated cluster state: API keys (once the first key exists every
//! `/v1` and `/api` call needs one), allowed models, and model routes.

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use llmesh_mesh::ClusterState;

use super::{AppState, format_for};
use crate::cloud::Cloud;
use crate::config::AnonymousAccess;
use crate::error::ApiError;
use llmesh_mesh::route::{CloudPolicy, CloudPolicyName};
use llmesh_proto::CloudPolicy as ProtoCloudPolicy;

/// The caller of a request, put into its extensions by [`authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No keys exist yet: the API is open.
    Open,
    /// A valid key.
    Key {
        /// Its id.
        id: String,
        /// Models it may use (empty: all).
        allowed_models: Vec<String>,
        /// Its cloud policy (`CloudPolicy` as stored; 0: the default).
        cloud: i32,
        /// Models it sends to the cloud first.
        prefer_cloud: Vec<String>,
    },
}

impl Caller {
    /// The fairness bucket of this caller in the mesh queue.
    pub fn tenant(&self) -> String {
        match self {
            Caller::Open => "anonymous".into(),
            Caller::Key { id, .. } => id.clone(),
        }
    }

    /// The key's id, when the caller has one.
    pub fn key_id(&self) -> Option<&String> {
        match self {
            Caller::Open => None,
            Caller::Key { id, .. } => Some(id),
        }
    }

    /// Refuses models this caller may not use.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match self {
            Caller::Key { id, allowed_models, .. } if !allowed_models.is_empty() => {
                if allowed_models.iter().any(|m| m == model) {
                    Ok(())
                } else {
                    Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "model_not_allowed",
                        format!("API key {id} may not use model '{model}'"),
                    ))
                }
            }
            _ => Ok(()),
        }
    }
}

/// The caller's key: `Authorization: Bearer <key>`, or `x-api-key: <key>`
/// as Anthropic's SDKs (and Claude Code) send it.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then_some(token.trim());
    }
    headers.get(X_API_KEY).and_then(|v| v.to_str().ok()).map(str::trim).filter(|k| !k.is_empty())
}

/// Whether a request without a key may pass.
fn anonymous_allowed(mode: AnonymousAccess, keys_exist: bool, loopback: bool) -> Result<(), &'static str> {
    match mode {
        AnonymousAccess::Always => Ok(()),
        AnonymousAccess::Never => Err("this node requires an API key (api.anonymous = \"never\")"),
        _ if keys_exist => Err("this mesh requires an API key"),
        AnonymousAccess::Any => Ok(()),
        AnonymousAccess::Loopback if loopback => Ok(()),
        AnonymousAccess::Loopback => Err(
            "anonymous requests are accepted only from this machine (api.anonymous = \"loopback\"); create a key with `llmesh keys create` or set api.anonymous = \"any\"",
        ),
    }
}

/// Checks the request's key against `state`. `loopback` says whether the
/// client connected from this machine.
pub fn caller(
    state: Option<&ClusterState>,
    headers: &HeaderMap,
    mode: AnonymousAccess,
    loopback: bool,
) -> Result<Caller, ApiError> {
    let keys_exist = state.is_some_and(ClusterState::auth_required);
    let secret = bearer(headers);
    let key = secret.zip(state).and_then(|(secret, state)| state.key_for_secret(secret));
    // A node that has joined but not yet received the replicated state
    // (it has no members yet) cannot know the key: saying it is wrong
    // would make clients give up on a key that works a moment later.
    if secret.is_some() && key.is_none() && state.is_some_and(|s| s.members.is_empty() && !s.auth_required()) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_state_pending",
            "this node has not yet received the cluster's state (API keys) from the leader; retry in a moment",
        )
        .with_headers(vec![("retry-after", "1".into())]));
    }
    match (secret, key) {
        (_, Some(key)) if !key.revoked => {
            let limits = key.limits.clone().unwrap_or_default();
            Ok(Caller::Key {
                id: key.id.clone(),
                allowed_models: limits.allowed_models,
                cloud: limits.cloud,
                prefer_cloud: limits.prefer_cloud_models,
            })
        }
        (_, Some(key)) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            format!("API key {} has been revoked", key.id),
        )),
        (Some(_), None) if keys_exist || mode == AnonymousAccess::Never => {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "incorrect API key provided"))
        }
        // No key, or (before any key exists) whatever an SDK sends as one.
        _ => match anonymous_allowed(mode, keys_exist, loopback) {
            Ok(()) => Ok(Caller::Open),
            Err(why) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                format!("{why}: send `Authorization: Bearer <key>`"),
            )),
        },
    }
}

/// Header with which a client forbids the cloud for one request.
pub const CLOUD_HEADER: &str = "x-llmesh-cloud";
const CLOUD_NAME: http::HeaderName = http::HeaderName::from_static(CLOUD_HEADER);
/// Anthropic's key header (its SDKs send no `Authorization`).
const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// What `caller` may do with the cloud for a request for `model`.
pub fn cloud_policy(
    caller: &Caller,
    headers: &HeaderMap,
    cloud: Option<&Cloud>,
    model: &str,
) -> Result<CloudPolicy, ApiError> {
    let Some(cloud) = cloud else { return Ok(CloudPolicy::default()) };
    if let Some(value) = headers.get(CLOUD_NAME) {
        return match value.to_str().map(str::trim) {
            Ok("never") => Ok(CloudPolicy {
                policy: CloudPolicyName::Never,
                source: format!("the request's {CLOUD_HEADER} header"),
                prefer: false,
            }),
            _ => Err(ApiError::bad_request(format!("{CLOUD_HEADER} accepts only `never`"))),
        };
    }
    let (stored, source, prefer) = match caller {
        Caller::Key { id, cloud, prefer_cloud, .. } => {
            (*cloud, format!("API key {id}"), prefer_cloud.iter().any(|m| m == model))
        }
        Caller::Open => (0, String::new(), false),
    };
    let policy = match ProtoCloudPolicy::try_from(stored).unwrap_or(ProtoCloudPolicy::Unspecified) {
        ProtoCloudPolicy::Never => Some(CloudPolicyName::Never),
        ProtoCloudPolicy::Overflow => Some(CloudPolicyName::Overflow),
        ProtoCloudPolicy::Failover => Some(CloudPolicyName::Failover),
        ProtoCloudPolicy::Allowed => Some(CloudPolicyName::Allowed),
        ProtoCloudPolicy::Unspecified => None,
    };
    Ok(match policy {
        Some(policy) => CloudPolicy { policy, source, prefer },
        None => CloudPolicy { policy: cloud.default_policy(), source: "cloud.default_policy".into(), prefer },
    })
}

/// Middleware on the client API: rejects bad keys before any body is read.
pub async fn authenticate(State(app): State<std::sync::Arc<AppState>>, request: Request, next: Next) -> Response {
    match admit(&app, request).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused,
    }
}

/// What [`authenticate`] does, as a plain function: the request with its
/// [`Caller`] in its extensions, or the refusal to send.
pub async fn admit(app: &AppState, mut request: Request) -> Result<Request, Response> {
    // Requests that arrive without a socket (in-process) count as local.
    let loopback = request.extensions().get::<crate::http_server::OnThisMachine>().is_none_or(|here| here.0);
    if let Err(err) = membership_gate(app, loopback).await {
        return Err(err.with_format(format_for(request.uri().path())).into_response());
    }
    let state = app.coordinator().map(|c| c.state());
    let mut result = caller(state.as_deref(), request.headers(), app.anonymous, loopback);
    if let Some(coordinator) = app.coordinator() {
        // Wait, don't refuse: a node that has just joined, or restarted and
        // not yet heard from the leader, gets the cluster's state (the keys)
        // within moments. And a key it does not know may be one created a
        // moment ago that has not reached this node yet (a follower cannot
        // know it is behind until the entry arrives): such a key gets a
        // short grace before it is called wrong.
        let started = tokio::time::Instant::now();
        let stale = |err: &ApiError, headers: &HeaderMap| {
            let unknown_key = bearer(headers).is_some() && matches!(err.code, "missing_api_key" | "invalid_api_key");
            let waited = started.elapsed();
            err.code == "cluster_state_pending"
                || (unknown_key && (waited < NEW_KEY_GRACE || coordinator.status().behind()))
        };
        while let Err(err) = &result {
            if !stale(err, request.headers()) || started.elapsed() >= STATE_WAIT {
                break;
            }
            tokio::time::sleep(STATE_LOOK_AGAIN).await;
            result = caller(Some(&coordinator.state()), request.headers(), app.anonymous, loopback);
        }
    }
    match result {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            Ok(request)
        }
        Err(err) => Err(err.with_format(format_for(request.uri().path())).into_response()),
    }
}

/// Middleware on the status endpoints (dashboard, `/metrics`,
/// `/mesh/v1/*`): with `api.public_status = false`, only this machine and
/// callers with a valid API key get them.
pub async fn status_access(State(app): State<std::sync::Arc<AppState>>, request: Request, next: Next) -> Response {
    let here = request.extensions().get::<crate::http_server::OnThisMachine>().is_none_or(|h| h.0);
    if app.public_status || here {
        return next.run(request).await;
    }
    let state = app.coordinator().map(|c| c.state());
    let key = bearer(request.headers()).zip(state.as_deref()).and_then(|(secret, s)| s.key_for_secret(secret));
    if key.is_some_and(|k| !k.revoked) {
        return next.run(request).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "status_closed",
        "this node's status endpoints are closed (api.public_status = false): call them from this machine or with an API key",
    )
    .into_response()
}

/// Refuses what a node outside its mesh cannot answer for the mesh: all
/// requests once revoked. While it still joins, a request from another
/// machine (whose key it cannot check yet) waits for it to become a member
/// (a second or so), unless it cannot join (refused token, no peer); its
/// own machine keeps using its backend meanwhile.
async fn membership_gate(app: &AppState, loopback: bool) -> Result<(), ApiError> {
    let until = tokio::time::Instant::now() + STATE_WAIT;
    loop {
        let problem = app.trust.as_ref().and_then(|t| t.problem());
        if let Some(problem) = problem.as_ref().filter(|p| p.code() == "revoked") {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_revoked",
                format!("{}: it serves no requests; send them to another node of the mesh", problem.detail()),
            ));
        }
        if !app.outside_mesh() || loopback {
            return Ok(());
        }
        if problem.is_some() || tokio::time::Instant::now() >= until {
            let why = problem.map(|p| p.detail()).unwrap_or_else(|| "waiting for its cluster certificate".into());
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_joining",
                format!("this node is still joining its mesh ({why}); retry shortly or use another node"),
            )
            .with_headers(vec![("retry-after", "2".into())]));
        }
        tokio::time::sleep(STATE_LOOK_AGAIN).await;
    }
}

/// How long a request waits for a joining (or restarted) node to receive
/// the cluster's state before it is answered 503 `cluster_state_pending`
/// (or 401 for a key the cluster really does not know).
const STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a key this node does not know is waited for even when the node
/// looks up to date: a key created through another node reaches this one
/// within a heartbeat or two.
const NEW_KEY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the waiting request looks at the state again.
const STATE_LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads the whole request body within `api.body_read_timeout` (a client
/// trickling its body gets 408 instead of holding a task forever) and at
/// most `api.max_body_bytes` (413), before the handler sees it.
pub async fn read_body(State(app): State<std::sync::Arc<AppState>>, request: Request, next: Next) -> Response {
    match read_whole_body(&app, request).await {
        Ok((parts, body)) => next.run(Request::from_parts(parts, axum::body::Body::from(body))).await,
        Err(refused) => refused,
    }
}

/// What [`read_body`] does, as a plain function: the request's head and its
/// whole body, or the refusal to send.
pub async fn read_whole_body(app: &AppState, request: Request) -> Result<(Parts, Bytes), Response> {
    use http_body_util::BodyExt as _;
    let format = format_for(request.uri().path());
    let (parts, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, app.max_body_bytes);
    let mut collect = std::pin::pin!(limited.collect());
    // A small body usually came in with the head: no timer for it (arming
    // one wakes the connection thread's reactor through its eventfd).
    let read = match futures::poll!(collect.as_mut()) {
        std::task::Poll::Ready(read) => Ok(read),
        std::task::Poll::Pending => tokio::time::timeout(app.body_read_timeout, collect).await,
    };
    let refusal = match read {
        Ok(Ok(collected)) => return Ok((parts, collected.to_bytes())),
        Ok(Err(err)) if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            ApiError::too_large(app.max_body_bytes)
        }
        Ok(Err(err)) => ApiError::bad_request(format!("cannot read request body: {err}")),
        Err(_) => ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {:?} (api.body_read_timeout)", app.body_read_timeout),
        ),
    };
    Err(refusal.with_format(format).into_response())
}

/// Rewrites the body's `model` to `model`, keeping every other field.
pub fn rewrite_model(body: &Bytes, model: &str) -> Result<Bytes, ApiError> {
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    value.insert("model".into(), serde_json::Value::String(model.to_string()));
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| ApiError::bad_request(format!("cannot re-encode the request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::{ApiKey, Command, KeyLimits, command};

    fn state_with_key(secret: &str, allowed: &[&str], revoked: bool) -> ClusterState {
        let mut state = ClusterState::default();
        state
            .apply(&Command {
                kind: Some(command::Kind::CreateKey(ApiKey {
                    id: "key_1".into(),
                    name: "t".into(),
                    secret_sha256: llmesh_mesh::coordinator::state::secret_hash(secret),
                    created_at_ms: 0,
                    revoked,
                    limits: Some(KeyLimits {
                        allowed_models: allowed.iter().map(|s| s.to_string()).collect(),
                        ..KeyLimits::default()
                    }),
                })),
            })
            .expect("applies");
        state
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().expect("header"));
        }
        h
    }

    const LOOPBACK: AnonymousAccess = AnonymousAccess::Loopback;

    #[test]
    fn keys_are_required_once_one_exists() {
        assert_eq!(caller(None, &headers(None), LOOPBACK, true), Ok(Caller::Open));
        assert_eq!(caller(Some(&ClusterState::default()), &headers(None), LOOPBACK, true), Ok(Caller::Open));
        let code = |r: Result<Caller, ApiError>| r.map_err(|e| e.code);
        // Joined but without the replicated state yet: a key cannot be
        // judged, so the client is told to retry rather than that it is wrong.
        let pending = caller(Some(&ClusterState::default()), &headers(Some("Bearer s3cret")), LOOPBACK, false);
        assert_eq!(code(pending), Err("cluster_state_pending"));
        let state = state_with_key("s3cret", &[], false);
        assert_eq!(code(caller(Some(&state), &headers(None), LOOPBACK, true)), Err("missing_api_key"));
        assert_eq!(code(caller(Some(&state), &headers(Some("Bearer nope")), LOOPBACK, true)), Err("invalid_api_key"));
        assert!(matches!(
            caller(Some(&state), &headers(Some("bearer s3cret")), LOOPBACK, false),
            Ok(Caller::Key { .. })
        ));
        let revoked = state_with_key("s3cret", &[], true);
        let err = caller(Some(&revoked), &headers(Some("Bearer s3cret")), LOOPBACK, true).expect_err("revoked");
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn anonymous_access_follows_the_configured_mode() {
        // A node that has the cluster's state (it lists a member) and no key.
        let mut none = ClusterState::default();
        let member = llmesh_proto::Member { raft_id: 1, node_id: "n1".into(), name: "n1".into() };
        none.members.insert(1, member);
        let keyed = state_with_key("k", &[], false);
        let anon = |state: &ClusterState, mode, loopback| caller(Some(state), &headers(None), mode, loopback).is_ok();
        assert!(anon(&none, LOOPBACK, true));
        assert!(!anon(&none, LOOPBACK, false), "remote anonymous needs api.anonymous = any");
        assert!(anon(&none, AnonymousAccess::Any, false));
        assert!(!anon(&keyed, AnonymousAccess::Any, false), "keys end anonymous access");
        assert!(anon(&keyed, AnonymousAccess::Always, false));
        assert!(!anon(&none, AnonymousAccess::Never, true));
        // With `never` and no keys yet, nothing can authenticate: a bearer is refused too.
        assert!(caller(Some(&none), &headers(Some("Bearer x")), AnonymousAccess::Never, true).is_err());
        // Before any key exists, an SDK's placeholder key is anonymous: still loopback only.
        assert!(caller(Some(&none), &headers(Some("Bearer unused")), LOOPBACK, false).is_err());
        assert!(caller(Some(&none), &headers(Some("Bearer unused")), LOOPBACK, true).is_ok());
    }

    #[test]
    fn allowed_models_are_enforced() {
        let state = state_with_key("k", &["a:1b"], false);
        let caller = caller(Some(&state), &headers(Some("Bearer k")), LOOPBACK, true).expect("valid");
        assert!(caller.check_model("a:1b").is_ok());
        assert_eq!(caller.check_model("b:7b").map_err(|e| e.status), Err(StatusCode::FORBIDDEN));
    }

    #[test]
    fn rewriting_keeps_other_fields() {
        let body = Bytes::from_static(br#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"stream":true}"#);
        let out: serde_json::Value =
            serde_json::from_slice(&rewrite_model(&body, "qwen2.5:7b").expect("ok")).expect("json");
        assert_eq!(out["model"], "qwen2.5:7b");
        assert_eq!(out["stream"], true);
        assert_eq!(out["messages"][0]["content"], "hi");
    }
}
