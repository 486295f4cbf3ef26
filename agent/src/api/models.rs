//! Read-only endpoints: model lists in OpenAI and Ollama shapes, version,
//! health and readiness.

use std::time::UNIX_EPOCH;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use llmesh_mesh::ServeError;
use serde_json::{Value, json};

use llmesh_mesh::Liveness;

use super::{AppState, AppStateRef};
use crate::backend::{Inventory, ModelEntry};
use crate::error::ApiError;
use crate::node_state::model_entry;

fn created(entry: &ModelEntry) -> u64 {
    humantime::parse_rfc3339_weak(&entry.modified_at)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn openai_entry(entry: &ModelEntry) -> Value {
    json!({ "id": entry.name, "object": "model", "created": created(entry), "owned_by": "llmesh" })
}

/// Sets `key` to `value` unless the backend did not say (empty): Ollama's
/// clients parse `modified_at` and `expires_at` as times, so an unknown one
/// is left out rather than faked.
fn set_known(object: &mut Value, key: &str, value: &str) {
    if !value.is_empty() {
        object[key] = json!(value);
    }
}

fn ollama_entry(entry: &ModelEntry) -> Value {
    let mut value = json!({ "name": entry.name, "model": entry.name, "size": entry.size, "details": entry.details });
    set_known(&mut value, "modified_at", &entry.modified_at);
    set_known(&mut value, "digest", &entry.digest);
    value
}

/// A model only a cloud provider serves, as Ollama lists its own cloud
/// models: name and where it runs, nothing local to report.
fn ollama_cloud_entry(model: &str, provider: &str) -> Value {
    json!({ "name": model, "model": model, "remote_model": model, "remote_host": provider, "size": 0 })
}

/// Every model the mesh can serve: this node's first, then those of live
/// peers, each name once. A model loaded anywhere counts as loaded.
fn mesh_models(state: &AppState) -> Inventory {
    let snapshot = state.local.inventory().current();
    let mut models = snapshot.inventory.models.clone();
    if let Some(mesh) = state.mesh() {
        let view = mesh.view();
        for peer in view.peers.iter().filter(|p| p.liveness != Liveness::Dead) {
            for info in &peer.state.models {
                match models.iter_mut().find(|m| m.name == info.name) {
                    Some(existing) => {
                        if existing.loaded.is_none() && info.loaded {
                            existing.loaded = model_entry(info).loaded;
                        }
                    }
                    None => models.push(model_entry(info)),
                }
            }
        }
    }
    Inventory { models, slots: snapshot.inventory.slots }
}

/// Models only a cloud provider serves, with that provider's name.
fn cloud_only(state: &AppState, mesh: &Inventory) -> Vec<(String, String)> {
    let Some(cloud) = &state.cloud else { return Vec::new() };
    cloud.models().into_iter().filter(|(model, _)| mesh.resolve(model).is_none()).collect()
}

fn cloud_entry(model: &str, provider: &str) -> Value {
    json!({ "id": model, "object": "model", "created": 0, "owned_by": provider })
}

/// `GET /v1/models`: the union across the mesh, then models only a cloud
/// provider serves (owned by that provider).
pub async fn openai_models(State(state): AppStateRef) -> Json<Value> {
    let mesh = mesh_models(&state);
    let mut data: Vec<Value> = mesh.models.iter().map(openai_entry).collect();
    data.extend(cloud_only(&state, &mesh).iter().map(|(model, provider)| cloud_entry(model, provider)));
    Json(json!({ "object": "list", "data": data }))
}

/// `GET /v1/models/{id}` (ids may contain `/`, as in `hf.co/org/model`).
pub async fn openai_model(State(state): AppStateRef, Path(id): Path<String>) -> Response {
    let mesh = mesh_models(&state);
    if let Some(entry) = mesh.resolve(&id) {
        return Json(openai_entry(entry)).into_response();
    }
    match cloud_only(&state, &mesh).into_iter().find(|(model, _)| *model == id) {
        Some((model, provider)) => Json(cloud_entry(&model, &provider)).into_response(),
        None => ApiError::from(ServeError::ModelNotFound(id)).into_response(),
    }
}

/// `GET /api/tags`: the union across the mesh, then models only a cloud
/// provider serves (as `/v1/models` lists them).
pub async fn ollama_tags(State(state): AppStateRef) -> Json<Value> {
    let mesh = mesh_models(&state);
    let mut models: Vec<Value> = mesh.models.iter().map(ollama_entry).collect();
    models.extend(cloud_only(&state, &mesh).iter().map(|(model, provider)| ollama_cloud_entry(model, provider)));
    Json(json!({ "models": models }))
}

/// `GET /api/ps`
pub async fn ollama_ps(State(state): AppStateRef) -> Json<Value> {
    let snapshot = state.local.inventory().current();
    let models: Vec<Value> = snapshot
        .inventory
        .models
        .iter()
        .filter_map(|entry| {
            let loaded = entry.loaded.as_ref()?;
            let mut value = ollama_entry(entry);
            set_known(&mut value, "expires_at", &loaded.expires_at);
            value["size_vram"] = json!(loaded.size_vram);
            value["context_length"] = json!(loaded.context_length);
            Some(value)
        })
        .collect();
    Json(json!({ "models": models }))
}

/// `GET /api/version`: the Ollama API level the agent speaks, so clients
/// that check a minimum version accept it.
pub async fn ollama_version() -> Json<Value> {
    Json(json!({ "version": crate::api::OLLAMA_COMPAT_VERSION, "llmesh": env!("CARGO_PKG_VERSION") }))
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when this node serves: a member of its mesh (when
/// it runs with one) whose backend answers. Otherwise 503 with a `reason`
/// a load balancer or an operator can act on: `revoked`, `token_refused`,
/// `no_peers`, `enrolling`, `backend_down`, and a `detail` in words.
pub async fn readyz(State(state): AppStateRef) -> Response {
    match readiness(&state) {
        Ok(models) => Json(json!({ "status": "ready", "models": models })).into_response(),
        Err(NotReady { reason, detail }) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": reason, "detail": detail })),
        )
            .into_response(),
    }
}

/// Why a node does not serve yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// Machine-readable: `revoked`, `token_refused`, `no_peers`,
    /// `enrolling`, `backend_down`.
    pub reason: &'static str,
    /// In words, for an operator.
    pub detail: String,
}

impl NotReady {
    /// Whether the node serves requests anyway (it forwards them to peers
    /// while its own backend is down).
    pub fn still_serves(&self) -> bool {
        self.reason == "backend_down"
    }
}

/// Whether this node serves: `Ok(models its backend has)` or why not.
pub fn readiness(state: &crate::api::AppState) -> Result<usize, NotReady> {
    if let Some(trust) = &state.trust {
        if let Some(problem) = trust.problem() {
            return Err(NotReady { reason: problem.code(), detail: problem.detail() });
        }
        if state.mesh_node.get().is_none() {
            return Err(NotReady {
                reason: "enrolling",
                detail: "waiting for this node's cluster certificate from a voter".into(),
            });
        }
    }
    let snapshot = state.local.inventory().current();
    if snapshot.healthy {
        Ok(snapshot.inventory.models.len())
    } else {
        let detail = snapshot.last_error.clone().unwrap_or_else(|| "backend not polled yet".into());
        Err(NotReady { reason: "backend_down", detail })
    }
}
