//! What this node tells the mesh about itself ([`NodeState`]), and the way
//! back from gossiped models to the API's model lists.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llmesh_proto::{ModelInfo, NodeState};
use tokio_util::sync::CancellationToken;

use crate::backend::{LoadedInfo, ModelDetails, ModelEntry};
use crate::config::BackendKind;
use crate::gpu::GpuProbe;
use crate::inventory::InventoryHandle;
use crate::load::LoadTracker;

/// Assembles this node's [`NodeState`] from its parts.
pub struct NodeStateBuilder {
    /// Node id (libp2p peer id), empty without a mesh.
    pub node_id: String,
    /// Human name.
    pub name: String,
    /// Base URL of this node's HTTP API.
    pub api_addr: String,
    /// Backend kind.
    pub backend_kind: BackendKind,
    /// Parallel slots of the backend, 0 when unknown.
    pub parallel_slots: u32,
    /// The backend's models.
    pub inventory: InventoryHandle,
    /// This node's traffic.
    pub load: Arc<LoadTracker>,
    /// The conversations this node served lately.
    pub recent_prefixes: Arc<llmesh_mesh::route::prefix::RecentPrefixes>,
    /// GPU telemetry.
    pub gpu: GpuProbe,
    /// `IP:PORT` of this node's data plane, set once it runs.
    pub data_addr: std::sync::OnceLock<String>,
    /// Where peers reach this node's control plane (Raft, Admin), set once
    /// it runs.
    pub control_addr: std::sync::OnceLock<String>,
    /// Set once the node starts draining.
    pub draining: std::sync::atomic::AtomicBool,
    /// What the clients entering here saw.
    pub entry: Arc<crate::entry_figures::EntryFigures>,
}

fn rfc3339_to_ms(text: &str) -> i64 {
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms_to_rfc3339(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let time = UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A backend model as gossip carries it.
pub fn model_info(entry: &ModelEntry) -> ModelInfo {
    let loaded = entry.loaded.as_ref();
    ModelInfo {
        name: entry.name.clone(),
        size_bytes: entry.size,
        digest: entry.digest.clone(),
        family: entry.details.family.clone(),
        parameter_size: entry.details.parameter_size.clone(),
        quantization: entry.details.quantization_level.clone(),
        format: entry.details.format.clone(),
        loaded: loaded.is_some(),
        vram_bytes: loaded.map_or(0, |l| l.size_vram),
        context_length: loaded.map_or(0, |l| l.context_length),
        modified_at_ms: rfc3339_to_ms(&entry.modified_at),
        expires_at_ms: loaded.map_or(0, |l| rfc3339_to_ms(&l.expires_at)),
    }
}

/// A gossiped model in the shape the API lists.
pub fn model_entry(info: &ModelInfo) -> ModelEntry {
    ModelEntry {
        name: info.name.clone(),
        size: info.size_bytes,
        digest: info.digest.clone(),
        modified_at: ms_to_rfc3339(info.modified_at_ms),
        details: ModelDetails {
            parent_model: String::new(),
            format: info.format.clone(),
            family: info.family.clone(),
            families: (!info.family.is_empty()).then(|| vec![info.family.clone()]),
            parameter_size: info.parameter_size.clone(),
            quantization_level: info.quantization.clone(),
        },
        loaded: info.loaded.then(|| LoadedInfo {
            size_vram: info.vram_bytes,
            expires_at: ms_to_rfc3339(info.expires_at_ms),
            context_length: info.context_length,
        }),
    }
}

impl NodeStateBuilder {
    /// This node's state now (sequence number and timestamp are left to
    /// the membership task).
    pub fn build(&self) -> NodeState {
        let snapshot = self.inventory.current();
        let (recent_prefixes, recent_prefix_depths) = self.recent_prefixes.snapshot();
        NodeState {
            node_id: self.node_id.clone(),
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_addr: self.api_addr.clone(),
            data_addr: self.data_addr.get().cloned().unwrap_or_default(),
            control_addr: self.control_addr.get().cloned().unwrap_or_default(),
            backend_kind: self.backend_kind.as_str().to_string(),
            backend_healthy: snapshot.healthy,
            models: snapshot.inventory.models.iter().map(model_info).collect(),
            gpus: self.gpu.read(),
            parallel_slots: if self.parallel_slots > 0 {
                self.parallel_slots
            } else {
                snapshot.inventory.slots.unwrap_or(0)
            },
            in_flight: self.load.in_flight(),
            served_total: self.load.served(),
            tokens_out_total: self.entry.tokens_out(),
            ttft_ms_histogram: self.entry.ttft_histogram(),
            queued: self.load.queued(),
            model_load: self.load.snapshot(),
            recent_prefixes,
            recent_prefix_depths,
            // Stamped by membership, which sends the beats.
            beats: false,
            pulses: false,
            // Stamped by membership, which knows its listen addresses.
            p2p_addrs: Vec::new(),
            pulls_states: false,
            fetches_certs: false,
            draining: self.draining.load(std::sync::atomic::Ordering::SeqCst),
            seq: 0,
            timestamp_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
        }
    }

    /// Hands the current state to membership every `interval` until
    /// `shutdown`; membership publishes it on change and every heartbeat.
    pub async fn publish(
        self: Arc<Self>,
        membership: llmesh_mesh::Membership,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let mut state = self.build();
                    // Time is stamped by membership; leave it out so an
                    // unchanged node does not look changed.
                    state.timestamp_ms = 0;
                    membership.set_local_state(state);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_survive_the_trip_through_gossip() {
        let entry = ModelEntry {
            name: "qwen2.5:7b".into(),
            size: 4_200_000_000,
            digest: "abc".into(),
            modified_at: "2026-11-01T10:00:00Z".into(),
            details: ModelDetails {
                parent_model: String::new(),
                format: "gguf".into(),
                family: "qwen2".into(),
                families: Some(vec!["qwen2".into()]),
                parameter_size: "7B".into(),
                quantization_level: "Q4_K_M".into(),
            },
            loaded: Some(LoadedInfo {
                size_vram: 5_000_000_000,
                expires_at: "2026-11-01T10:05:00Z".into(),
                context_length: 8192,
            }),
        };
        assert_eq!(model_entry(&model_info(&entry)), entry);
    }
}
