//! The nodes that could serve a request, as the entry node sees them: this
//! node's own backend and every peer whose gossip says it has the model,
//! less those that are dead, shutting down, without a healthy backend, or
//! drained, removed or revoked in the replicated state. Pure functions of
//! the views, so the rules are tested without a mesh.

use std::time::Duration;

use llmesh_proto::NodeState;

use super::router::LOCAL;
use super::scheduler::Candidate;
use crate::coordinator::ClusterState;
use crate::membership::PeerSnapshot;
use crate::peers::Liveness;

/// Whether `name` (as a client wrote it) names `model`, with Ollama's
/// implicit `:latest`.
pub fn same_model(model: &str, name: &str) -> bool {
    model == name || model.strip_suffix(":latest") == Some(name) || name.strip_suffix(":latest") == Some(model)
}

/// This node's backend, as far as the scheduler needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalCapacity {
    /// Requests it serves at once; 0 when unknown.
    pub slots: u32,
    /// Requests running on it now.
    pub in_flight: u32,
    /// Whether the model is loaded.
    pub loaded: bool,
    /// Its average time to first token for the model.
    pub ttft_ms: Option<f64>,
    /// Its average decode speed for the model.
    pub decode_tps: Option<f64>,
    /// Its average prompt evaluation speed for the model (request-body
    /// bytes of uncached prompt per second).
    pub prefill_bps: Option<f64>,
    /// How deep this conversation got here lately (see
    /// [`super::prefix::Turn`]); `None` when it did not serve it.
    pub held_depth: Option<u32>,
}

/// Everything the candidate list is built from.
pub struct Sources<'a> {
    /// This node's id in the cluster (drains name it); empty off the mesh.
    pub node_id: &'a str,
    /// This node's backend, when it is healthy and has the model.
    pub local: Option<LocalCapacity>,
    /// Peers as gossip shows them.
    pub peers: &'a [PeerSnapshot],
    /// The replicated state (drains, removals, revocations).
    pub cluster: Option<&'a ClusterState>,
    /// Requests this entry node has running on each node.
    pub outstanding: &'a dyn Fn(&str) -> u32,
    /// Requests waiting for one of this node's own slots.
    pub local_queued: u32,
    /// Measured round trip to a peer.
    pub rtt: &'a dyn Fn(&str) -> Option<Duration>,
}

/// Why a peer cannot take work, or `None` when it can.
pub fn unusable(peer: &PeerSnapshot, cluster: Option<&ClusterState>) -> Option<&'static str> {
    let state = &peer.state;
    if peer.liveness == Liveness::Dead {
        Some("unreachable")
    } else if state.draining {
        Some("shutting down")
    } else if !state.backend_healthy {
        Some("backend down")
    } else if state.data_addr.is_empty() || cluster.is_some_and(|c| c.is_out_of_service(&state.node_id)) {
        Some("out of service")
    } else {
        None
    }
}

/// The candidates for `model` (with the conversation `prefix`, if any).
pub fn build(model: &str, prefix: Option<u64>, sources: &Sources<'_>) -> Vec<Candidate> {
    let out_of_service = |id: &str| sources.cluster.is_some_and(|c| c.is_out_of_service(id));
    let mut candidates = Vec::with_capacity(sources.peers.len() + 1);
    if let Some(local) = sources.local.filter(|_| !out_of_service(sources.node_id)) {
        candidates.push(Candidate {
            id: LOCAL.to_string(),
            is_local: true,
            liveness: Liveness::Alive,
            draining: false,
            slots: local.slots,
            in_flight: local.in_flight,
            queued: sources.local_queued,
            dispatched: (sources.outstanding)(LOCAL),
            loaded: local.loaded,
            ttft_ms: local.ttft_ms,
            decode_tps: local.decode_tps,
            prefill_bps: local.prefill_bps,
            rtt_ms: 0.0,
            held_depth: local.held_depth,
        });
    }
    let first = candidates.len();
    for peer in sources.peers {
        if unusable(peer, sources.cluster).is_some() {
            continue;
        }
        if let Some(candidate) = peer_candidate(&peer.state, peer.liveness, model, prefix, sources) {
            candidates.push(candidate);
        }
    }
    // A peer not measured yet (its connection is still being made) counts
    // as far as the median measured peer.
    let mut measured: Vec<f64> =
        candidates[first..].iter().filter_map(|c| c.rtt_ms.is_finite().then_some(c.rtt_ms)).collect();
    measured.sort_by(f64::total_cmp);
    let typical = measured.get(measured.len() / 2).copied().unwrap_or(UNMEASURED_RTT_MS);
    for candidate in &mut candidates[first..] {
        if !candidate.rtt_ms.is_finite() {
            candidate.rtt_ms = typical;
        }
    }
    candidates
}

/// The round trip assumed when no peer has been measured at all (the first
/// moments after start-up): a LAN's, a fraction of a millisecond; the
/// scheduler's near-equal margin (50 ms) dwarfs the error.
const UNMEASURED_RTT_MS: f64 = 0.5;

fn peer_candidate(
    state: &NodeState,
    liveness: Liveness,
    model: &str,
    prefix: Option<u64>,
    sources: &Sources<'_>,
) -> Option<Candidate> {
    let info = state.models.iter().find(|m| same_model(&m.name, model))?;
    let stats = state.model_load.iter().find(|m| same_model(&m.model, model));
    Some(Candidate {
        id: state.node_id.clone(),
        is_local: false,
        liveness,
        draining: false,
        slots: state.parallel_slots,
        in_flight: state.in_flight,
        queued: state.queued,
        dispatched: (sources.outstanding)(&state.node_id),
        loaded: info.loaded,
        ttft_ms: stats.map(|s| s.ttft_ewma_ms).filter(|t| *t > 0.0),
        decode_tps: stats.map(|s| s.decode_tokens_per_s_ewma).filter(|t| *t > 0.0),
        prefill_bps: stats.map(|s| s.prefill_bytes_per_s_ewma).filter(|t| *t > 0.0),
        // Not measured yet: filled in by `build` from the measured peers.
        rtt_ms: (sources.rtt)(&state.node_id).map_or(f64::INFINITY, |d| d.as_secs_f64() * 1000.0),
        // A node that predates the depths holds the conversation at an
        // unknown depth: the shallowest.
        held_depth: prefix
            .and_then(|key| state.recent_prefixes.iter().position(|k| *k == key))
            .map(|at| state.recent_prefix_depths.get(at).copied().unwrap_or(0)),
    })
}

/// Why no node can take `model` now although peers serve it: they are
/// dead, draining or without a backend. `None` when no peer has it.
pub fn why_unavailable(model: &str, peers: &[PeerSnapshot], cluster: Option<&ClusterState>) -> Option<String> {
    let holders: Vec<String> = peers
        .iter()
        .filter(|p| p.state.models.iter().any(|m| same_model(&m.name, model)))
        .map(|p| format!("{} ({})", p.state.name, unusable(p, cluster).unwrap_or("out of service")))
        .collect();
    (!holders.is_empty())
        .then(|| format!("no node can serve '{model}' now: {} serve it; retry shortly", holders.join(", ")))
}

/// Whether peers serve `model` and an operator took every one of them out
/// of service (drained, removed, revoked).
pub fn only_drained_hold(model: &str, peers: &[PeerSnapshot], cluster: Option<&ClusterState>) -> bool {
    let Some(cluster) = cluster else { return false };
    let mut holders = peers.iter().filter(|p| p.state.models.iter().any(|m| same_model(&m.name, model))).peekable();
    holders.peek().is_some() && holders.all(|p| cluster.is_out_of_service(&p.state.node_id))
}

/// How long a lost peer that served a model is waited for: a restart or a
/// healed partition is back within this; a box gone longer is not counted on.
pub const EXPECTED_BACK_WITHIN: Duration = Duration::from_secs(60);

/// Whether a node that serves `model` but cannot be reached now is
/// expected back: suspect (its connection just broke, or a heartbeat is
/// late), lost within [`EXPECTED_BACK_WITHIN`], or still starting (no data
/// plane yet). A node whose backend is down, or that an operator drained
/// or removed, is not: nothing says when it returns.
pub fn expected_back(model: &str, peers: &[PeerSnapshot], cluster: Option<&ClusterState>) -> bool {
    peers.iter().filter(|p| p.state.models.iter().any(|m| same_model(&m.name, model))).any(|p| {
        let operator_out = cluster.is_some_and(|c| c.is_out_of_service(&p.state.node_id));
        let transient = match p.liveness {
            Liveness::Suspect => true,
            Liveness::Dead => p.last_seen_ago < EXPECTED_BACK_WITHIN,
            Liveness::Alive => p.state.data_addr.is_empty(),
        };
        !operator_out && p.state.backend_healthy && transient
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use llmesh_proto::{ModelInfo, ModelLoad};

    /// A healthy peer serving `models` (loaded) with `slots` slots.
    pub(crate) fn peer(id: &str, models: &[&str], slots: u32) -> PeerSnapshot {
        PeerSnapshot {
            state: NodeState {
                node_id: id.into(),
                name: format!("name-{id}"),
                data_addr: "127.0.0.1:1".into(),
                backend_healthy: true,
                parallel_slots: slots,
                models: models
                    .iter()
                    .map(|m| ModelInfo { name: m.to_string(), loaded: true, ..ModelInfo::default() })
                    .collect(),
                model_load: models
                    .iter()
                    .map(|m| ModelLoad {
                        model: m.to_string(),
                        ttft_ewma_ms: 100.0,
                        decode_tokens_per_s_ewma: 50.0,
                        ..ModelLoad::default()
                    })
                    .collect(),
                ..NodeState::default()
            },
            liveness: Liveness::Alive,
            last_seen_ago: Duration::ZERO,
        }
    }

    fn sources<'a>(peers: &'a [PeerSnapshot], cluster: Option<&'a ClusterState>) -> Sources<'a> {
        Sources { node_id: "me", local: None, peers, cluster, outstanding: &|_| 0, local_queued: 0, rtt: &|_| None }
    }

    #[test]
    fn a_peer_not_measured_yet_counts_as_far_as_the_measured_ones() {
        let peers = [peer("a", &["m"], 1), peer("b", &["m"], 1), peer("c", &["m"], 1)];
        let rtt = |id: &str| match id {
            "a" => Some(Duration::from_millis(3)),
            "b" => Some(Duration::from_millis(7)),
            _ => None,
        };
        let s = Sources { rtt: &rtt, ..sources(&peers, None) };
        let rtts: Vec<f64> = build("m", None, &s).iter().map(|c| c.rtt_ms).collect();
        assert_eq!(rtts, [3.0, 7.0, 7.0], "the median of 3 and 7 ms is taken as 7 (upper middle)");
        let none = |_: &str| None;
        let s = Sources { rtt: &none, ..sources(&peers, None) };
        assert!(build("m", None, &s).iter().all(|c| c.rtt_ms == UNMEASURED_RTT_MS), "nothing measured yet");
    }

    #[test]
    fn never_a_dead_draining_unhealthy_or_revoked_node() {
        let mut dead = peer("dead", &["m"], 2);
        dead.liveness = Liveness::Dead;
        let mut draining = peer("draining", &["m"], 2);
        draining.state.draining = true;
        let mut sick = peer("sick", &["m"], 2);
        sick.state.backend_healthy = false;
        let mut suspect = peer("suspect", &["m"], 2);
        suspect.liveness = Liveness::Suspect;
        let peers = vec![
            dead,
            draining,
            sick,
            peer("revoked", &["m"], 2),
            suspect,
            peer("other", &["x"], 2),
            peer("ok", &["m:latest"], 2),
        ];
        let mut cluster = ClusterState::default();
        cluster.revoked.insert("revoked".into());
        let ids: Vec<String> = build("m", None, &sources(&peers, Some(&cluster))).into_iter().map(|c| c.id).collect();
        assert_eq!(ids, ["suspect", "ok"]);
        let why = why_unavailable("m", &peers, Some(&cluster)).expect("holders");
        assert!(why.contains("name-dead (unreachable)") && why.contains("name-draining (shutting down)"), "{why}");
        assert!(why.contains("name-sick (backend down)") && why.contains("name-revoked (out of service)"), "{why}");
        assert_eq!(why_unavailable("absent", &peers, None), None);
    }

    #[test]
    fn signals_come_from_gossip_and_measurement() {
        let mut p = peer("p", &["m"], 3);
        p.state.recent_prefixes = vec![7, 9];
        p.state.recent_prefix_depths = vec![30, 40];
        p.state.in_flight = 2;
        let peers = [p];
        let rtt = |_: &str| Some(Duration::from_millis(4));
        let outstanding = |id: &str| if id == "p" { 1 } else { 0 };
        let local = LocalCapacity {
            slots: 1,
            in_flight: 0,
            loaded: false,
            ttft_ms: None,
            decode_tps: None,
            prefill_bps: None,
            held_depth: None,
        };
        let s = Sources { local: Some(local), rtt: &rtt, outstanding: &outstanding, ..sources(&peers, None) };
        let candidates = build("m", Some(9), &s);
        assert_eq!(candidates.len(), 2);
        assert!(candidates[0].is_local && candidates[0].rtt_ms == 0.0 && !candidates[0].loaded);
        let c = &candidates[1];
        assert!(c.held_depth == Some(40) && c.rtt_ms == 4.0 && c.dispatched == 1 && c.in_flight == 2 && c.slots == 3);
        assert_eq!(build("m", Some(8), &s)[1].held_depth, None);
        // A peer that predates the depths holds its conversations shallowest.
        let mut old = peers[0].clone();
        old.state.recent_prefix_depths.clear();
        let old = [old];
        assert_eq!(build("m", Some(9), &Sources { peers: &old, ..s })[1].held_depth, Some(0));
        // A drained local node is left out.
        let mut cluster = ClusterState::default();
        cluster.drained.insert("me".into());
        assert!(build("m", None, &Sources { cluster: Some(&cluster), ..s }).iter().all(|c| !c.is_local));
    }
}
