//! Who may call the API and what a request's model really is, from the
//! replicated cluster state: API keys (once the first key exists every
//! `/v1` and `/api` call needs one), allowed models, and model routes.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use llmesh_mesh::ClusterState;

use super::{AppState, format_for};
use crate::cloud::{Cloud, CloudPolicy};
use crate::config::CloudPolicyName;
use crate::error::ApiError;
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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Checks the request's key against `state`.
pub fn caller(state: Option<&ClusterState>, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(state) = state.filter(|s| s.auth_required()) else { return Ok(Caller::Open) };
    let Some(secret) = bearer(headers) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "this mesh requires an API key: send `Authorization: Bearer <key>`",
        ));
    };
    match state.key_for_secret(secret) {
        Some(key) if !key.revoked => {
            let limits = key.limits.clone().unwrap_or_default();
            Ok(Caller::Key {
                id: key.id.clone(),
                allowed_models: limits.allowed_models,
                cloud: limits.cloud,
                prefer_cloud: limits.prefer_cloud_models,
            })
        }
        Some(key) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            format!("API key {} has been revoked", key.id),
        )),
        None => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "incorrect API key provided")),
    }
}

/// Header with which a client forbids the cloud for one request.
pub const CLOUD_HEADER: &str = "x-llmesh-cloud";

/// What `caller` may do with the cloud for a request for `model`.
pub fn cloud_policy(
    caller: &Caller,
    headers: &HeaderMap,
    cloud: Option<&Cloud>,
    model: &str,
) -> Result<CloudPolicy, ApiError> {
    let Some(cloud) = cloud else { return Ok(CloudPolicy::default()) };
    if let Some(value) = headers.get(CLOUD_HEADER) {
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
pub async fn authenticate(State(app): State<std::sync::Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let state = app.coordinator.as_ref().map(|c| c.state());
    match caller(state.as_deref(), request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(err) => err.with_format(format_for(request.uri().path())).into_response(),
    }
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

    #[test]
    fn keys_are_required_once_one_exists() {
        assert_eq!(caller(None, &headers(None)), Ok(Caller::Open));
        assert_eq!(caller(Some(&ClusterState::default()), &headers(None)), Ok(Caller::Open));
        let state = state_with_key("s3cret", &[], false);
        assert_eq!(caller(Some(&state), &headers(None)).map_err(|e| e.code), Err("missing_api_key"));
        assert_eq!(caller(Some(&state), &headers(Some("Bearer nope"))).map_err(|e| e.code), Err("invalid_api_key"));
        assert!(matches!(caller(Some(&state), &headers(Some("bearer s3cret"))), Ok(Caller::Key { .. })));
        let revoked = state_with_key("s3cret", &[], true);
        let err = caller(Some(&revoked), &headers(Some("Bearer s3cret"))).expect_err("revoked");
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn allowed_models_are_enforced() {
        let state = state_with_key("k", &["a:1b"], false);
        let caller = caller(Some(&state), &headers(Some("Bearer k"))).expect("valid");
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
