//! `GET /mesh/v1/cluster`: the Raft group and the replicated state as this
//! node sees them (no secrets: keys are only counted).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppStateRef;

/// The coordinator's view, or `{"enabled": false}` outside a mesh.
pub async fn mesh_cluster(State(app): AppStateRef) -> Json<Value> {
    let Some(coordinator) = &app.coordinator else { return Json(json!({ "enabled": false })) };
    let status = coordinator.status();
    let state = coordinator.state();
    let member = |id: &u64| match state.members.get(id) {
        Some(m) => json!({ "raft_id": id, "node_id": m.node_id, "name": m.name }),
        None => json!({ "raft_id": id }),
    };
    let name_of = |node_id: &String| {
        state.members.values().find(|m| &m.node_id == node_id).map(|m| m.name.clone()).unwrap_or_default()
    };
    Json(json!({
        "enabled": true,
        "raft_id": status.id,
        "role": status.role,
        "leader": {
            "raft_id": status.leader,
            "name": state.members.get(&status.leader).map(|m| m.name.clone()),
        },
        "term": status.term,
        "commit_index": status.commit,
        "applied_index": status.applied,
        "control_port": coordinator.local_addr().port(),
        "voters": state.voters.iter().map(member).collect::<Vec<_>>(),
        "learners": state.learners.iter().map(member).collect::<Vec<_>>(),
        "keys": {
            "total": state.keys.len(),
            "active": state.keys.values().filter(|k| !k.revoked).count(),
        },
        "auth_required": state.auth_required(),
        "routes": state.routes,
        "drained": state.drained.iter().map(|n| json!({ "node_id": n, "name": name_of(n) })).collect::<Vec<_>>(),
        "removed": state.removed,
        "placement": state.placement,
    }))
}

/// `GET /mesh/v1/cloud`: providers, their breakers, and spend per key and
/// provider on this node (never API keys).
pub async fn mesh_cloud(State(app): AppStateRef) -> Json<Value> {
    match &app.cloud {
        Some(cloud) => {
            let mut status = cloud.status();
            status["enabled"] = json!(true);
            Json(status)
        }
        None => Json(json!({ "enabled": false })),
    }
}
