//! `GET /mesh/v1/cluster`: the Raft group and the replicated state as this
//! node sees them (no secrets: keys are only counted).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppStateRef;

/// The coordinator's view, or `{"enabled": false}` outside a mesh.
pub async fn mesh_cluster(State(app): AppStateRef) -> Json<Value> {
    let Some(coordinator) = app.coordinator() else { return Json(json!({ "enabled": false })) };
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
        "revoked": state
            .revoked
            .iter()
            .map(|n| json!({ "node_id": n, "name": state.revoked_names.get(n).cloned().unwrap_or_else(|| name_of(n)) }))
            .collect::<Vec<_>>(),
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

/// `GET /metrics`: Prometheus text format. Mesh-wide figures (Raft,
/// peers, queue, per-peer RTT) are sampled now.
pub async fn prometheus(State(app): AppStateRef) -> axum::response::Response {
    use crate::metrics::set;
    use axum::response::IntoResponse;
    let Some(handle) = crate::metrics::handle() else {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "metrics are disabled\n").into_response();
    };
    set("llmesh_queue_depth", &[], app.router.queued() as f64);
    set("llmesh_in_flight", &[], f64::from(app.local.load().in_flight()));
    if let Some(coordinator) = app.coordinator() {
        let status = coordinator.status();
        set("llmesh_raft_term", &[], status.term as f64);
        set("llmesh_raft_commit_index", &[], status.commit as f64);
        set("llmesh_raft_applied_index", &[], status.applied as f64);
        set("llmesh_raft_is_leader", &[], if status.role == "leader" { 1.0 } else { 0.0 });
        let leader = coordinator.state().members.get(&status.leader).map(|m| m.name.clone()).unwrap_or_default();
        set("llmesh_raft_leader", &[("name", leader)], 1.0);
    }
    if let Some(mesh) = app.mesh() {
        let view = mesh.view();
        for liveness in ["alive", "suspect", "dead"] {
            let count = view.peers.iter().filter(|p| p.liveness.as_str() == liveness).count();
            set("llmesh_gossip_peers", &[("liveness", liveness.to_string())], count as f64);
        }
        if let Some(dataplane) = app.dataplane() {
            for (id, rtt) in dataplane.peer_rtts() {
                let name =
                    view.peers.iter().find(|p| p.state.node_id == id).map_or(id.clone(), |p| p.state.name.clone());
                set("llmesh_peer_rtt_seconds", &[("peer", name)], rtt.as_secs_f64());
            }
        }
    }
    handle.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
