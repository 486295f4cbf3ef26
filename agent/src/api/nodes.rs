//! `GET /mesh/v1/nodes`: every node this one knows, itself first.

use axum::Json;
use axum::extract::State;
use llmesh_mesh::{Liveness, NodeState};
use serde_json::{Value, json};

use super::AppStateRef;

fn node_json(state: &NodeState, liveness: Liveness, last_seen_ms: u64, is_self: bool, p2p: &[String]) -> Value {
    let loaded: Vec<Value> = state
        .models
        .iter()
        .filter(|m| m.loaded)
        .map(|m| {
            json!({
                "name": m.name, "vram_bytes": m.vram_bytes, "context_length": m.context_length,
                "quantization": m.quantization, "family": m.family,
            })
        })
        .collect();
    let available: Vec<&str> = state.models.iter().map(|m| m.name.as_str()).collect();
    let gpus: Vec<Value> = state
        .gpus
        .iter()
        .map(|g| {
            json!({
                "name": g.name, "utilization_percent": g.utilization_percent,
                "memory_used_bytes": g.memory_used_bytes, "memory_total_bytes": g.memory_total_bytes,
                "temperature_c": g.temperature_c,
            })
        })
        .collect();
    let per_model: Vec<Value> = state
        .model_load
        .iter()
        .map(|m| {
            json!({
                "model": m.model, "in_flight": m.in_flight, "queued": m.queued,
                "ttft_ewma_ms": m.ttft_ewma_ms, "decode_tokens_per_s_ewma": m.decode_tokens_per_s_ewma,
            })
        })
        .collect();
    json!({
        "id": state.node_id,
        "name": state.name,
        "self": is_self,
        "version": state.version,
        "addresses": { "api": state.api_addr, "data": state.data_addr, "control": state.control_addr, "p2p": p2p },
        "backend": { "kind": state.backend_kind, "healthy": state.backend_healthy },
        "models": { "loaded": loaded, "available": available },
        "gpus": gpus,
        "load": { "in_flight": state.in_flight, "queued": state.queued, "slots": state.parallel_slots, "models": per_model },
        "draining": state.draining,
        "liveness": liveness.as_str(),
        "last_seen_ms": last_seen_ms,
    })
}

/// `GET /mesh/v1/nodes`
pub async fn mesh_nodes(State(state): AppStateRef) -> Json<Value> {
    let local = state.node.build();
    let view = state.mesh.as_ref().map(|m| m.view());
    let own_p2p: Vec<String> =
        view.as_ref().map(|v| v.listen_addrs.iter().map(ToString::to_string).collect()).unwrap_or_default();
    let mut nodes = vec![node_json(&local, Liveness::Alive, 0, true, &own_p2p)];
    if let Some(view) = &view {
        nodes.extend(
            view.peers.iter().map(|p| node_json(&p.state, p.liveness, p.last_seen_ago.as_millis() as u64, false, &[])),
        );
    }
    let connected = view.as_ref().map_or(0, |v| v.connected);
    Json(json!({ "node_id": local.node_id, "connected_peers": connected, "nodes": nodes }))
}
