//! `GET /mesh/v1/nodes`: every node this one knows, itself first. The
//! types are the endpoint's schema: the handler serializes them and
//! `llmesh status` (and the demo) deserialize them, so the two cannot drift.

use axum::Json;
use axum::extract::State;
use llmesh_mesh::{Liveness, NodeState};
use serde::{Deserialize, Serialize};

use super::AppStateRef;

/// The body of `GET /mesh/v1/nodes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodesView {
    /// The answering node's id.
    pub node_id: String,
    /// Peers it has a libp2p connection to.
    pub connected_peers: usize,
    /// Itself first, then every peer it has heard from.
    pub nodes: Vec<NodeView>,
    /// Upper bounds (ms) of the TTFT histogram buckets; one more bucket
    /// holds the rest.
    #[serde(default)]
    pub ttft_buckets_ms: Vec<u64>,
}

/// One node as the answering node sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id (libp2p peer id).
    pub id: String,
    /// Operator-given name.
    pub name: String,
    /// Whether this is the answering node.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// llmesh version it runs.
    pub version: String,
    /// Where it listens.
    pub addresses: Addresses,
    /// Its inference backend.
    pub backend: BackendView,
    /// Models it has and has loaded.
    pub models: ModelsView,
    /// Its GPUs (empty without NVIDIA GPUs).
    pub gpus: Vec<GpuView>,
    /// Its load.
    pub load: LoadView,
    /// Whether it is shutting down.
    pub draining: bool,
    /// `alive`, `suspect` or `dead`.
    pub liveness: String,
    /// Milliseconds since its last gossip arrived.
    pub last_seen_ms: u64,
}

/// A node's listening addresses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Addresses {
    /// HTTP API.
    pub api: String,
    /// QUIC data plane.
    pub data: String,
    /// Raft control plane.
    pub control: String,
    /// libp2p listen addresses (known for the answering node only).
    pub p2p: Vec<String>,
}

/// A node's backend.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackendView {
    /// `ollama`, `openai` or `sim`.
    pub kind: String,
    /// Whether its last health check passed.
    pub healthy: bool,
}

/// A node's models.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelsView {
    /// Models in memory.
    pub loaded: Vec<LoadedModel>,
    /// Every model it can serve.
    pub available: Vec<String>,
}

/// A model in memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Memory it takes on the GPU.
    pub vram_bytes: u64,
    /// Context window it was loaded with.
    pub context_length: u32,
    /// Quantization, as the backend names it.
    pub quantization: String,
    /// Model family.
    pub family: String,
}

/// One GPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GpuView {
    /// Product name.
    pub name: String,
    /// Busy percentage.
    pub utilization_percent: u32,
    /// Memory in use.
    pub memory_used_bytes: u64,
    /// Memory in all.
    pub memory_total_bytes: u64,
    /// Temperature.
    pub temperature_c: u32,
}

/// A node's load.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadView {
    /// Requests running on its backend.
    pub in_flight: u32,
    /// Requests waiting for one of its slots.
    pub queued: u32,
    /// Requests its backend runs at once.
    pub slots: u32,
    /// Requests its backend finished since its agent started.
    #[serde(default)]
    pub served_total: u64,
    /// Output tokens of the requests that entered there, since its start.
    #[serde(default)]
    pub tokens_out_total: u64,
    /// Successful requests that entered there, per time-to-first-byte
    /// bucket (bounds in [`NodesView::ttft_buckets_ms`]), since its start.
    #[serde(default)]
    pub ttft_ms_histogram: Vec<u64>,
    /// When the node took these figures (its clock, Unix milliseconds):
    /// rates divide by the node's own time, not by gossip's delays.
    #[serde(default)]
    pub sampled_at_ms: i64,
    /// Conversations whose KV cache it is taken to hold (the prefix keys
    /// it gossips: those it served lately, less those its backend's
    /// reported cache use showed evicted).
    #[serde(default)]
    pub cached_conversations: usize,
    /// Per model.
    pub models: Vec<ModelLoadView>,
}

/// A node's load for one model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelLoadView {
    /// Model name.
    pub model: String,
    /// Requests running.
    pub in_flight: u32,
    /// Requests waiting.
    pub queued: u32,
    /// Moving average of time to first token.
    pub ttft_ewma_ms: f64,
    /// Moving average of decode speed.
    pub decode_tokens_per_s_ewma: f64,
    /// Moving average of prompt evaluation speed, in request-body bytes of
    /// uncached prompt per second (0: not measured).
    #[serde(default)]
    pub prefill_bytes_per_s_ewma: f64,
}

impl NodeView {
    fn of(state: &NodeState, liveness: Liveness, last_seen_ms: u64, is_self: bool, p2p: Vec<String>) -> NodeView {
        let loaded = state
            .models
            .iter()
            .filter(|m| m.loaded)
            .map(|m| LoadedModel {
                name: m.name.clone(),
                vram_bytes: m.vram_bytes,
                context_length: m.context_length,
                quantization: m.quantization.clone(),
                family: m.family.clone(),
            })
            .collect();
        let gpus = state
            .gpus
            .iter()
            .map(|g| GpuView {
                name: g.name.clone(),
                utilization_percent: g.utilization_percent,
                memory_used_bytes: g.memory_used_bytes,
                memory_total_bytes: g.memory_total_bytes,
                temperature_c: g.temperature_c,
            })
            .collect();
        let per_model = state
            .model_load
            .iter()
            .map(|m| ModelLoadView {
                model: m.model.clone(),
                in_flight: m.in_flight,
                queued: m.queued,
                ttft_ewma_ms: m.ttft_ewma_ms,
                decode_tokens_per_s_ewma: m.decode_tokens_per_s_ewma,
                prefill_bytes_per_s_ewma: m.prefill_bytes_per_s_ewma,
            })
            .collect();
        NodeView {
            id: state.node_id.clone(),
            name: state.name.clone(),
            is_self,
            version: state.version.clone(),
            addresses: Addresses {
                api: state.api_addr.clone(),
                data: state.data_addr.clone(),
                control: state.control_addr.clone(),
                p2p,
            },
            backend: BackendView { kind: state.backend_kind.clone(), healthy: state.backend_healthy },
            models: ModelsView { loaded, available: state.models.iter().map(|m| m.name.clone()).collect() },
            gpus,
            load: LoadView {
                in_flight: state.in_flight,
                queued: state.queued,
                slots: state.parallel_slots,
                served_total: state.served_total,
                tokens_out_total: state.tokens_out_total,
                ttft_ms_histogram: state.ttft_ms_histogram.clone(),
                sampled_at_ms: state.timestamp_ms,
                cached_conversations: state.recent_prefixes.len(),
                models: per_model,
            },
            draining: state.draining,
            liveness: liveness.as_str().to_string(),
            last_seen_ms,
        }
    }
}

/// `GET /mesh/v1/nodes`
pub async fn mesh_nodes(State(state): AppStateRef) -> Json<NodesView> {
    let local = state.node.build();
    let view = state.mesh().map(|m| m.view());
    let own_p2p: Vec<String> =
        view.as_ref().map(|v| v.listen_addrs.iter().map(ToString::to_string).collect()).unwrap_or_default();
    let mut nodes = vec![NodeView::of(&local, Liveness::Alive, 0, true, own_p2p)];
    if let Some(view) = &view {
        nodes.extend(
            view.peers
                .iter()
                .map(|p| NodeView::of(&p.state, p.liveness, p.last_seen_ago.as_millis() as u64, false, Vec::new())),
        );
    }
    let connected_peers = view.as_ref().map_or(0, |v| v.connected);
    Json(NodesView {
        node_id: local.node_id,
        connected_peers,
        nodes,
        ttft_buckets_ms: llmesh_proto::TTFT_BUCKETS_MS.to_vec(),
    })
}
