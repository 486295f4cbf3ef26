//! The membership loop's side of pulses and suspicions: whom this node
//! watches, what the watches heard, and what it tells the mesh about a
//! peer that fell silent (see [`crate::pulse`] and [`crate::peers`]).

use std::collections::BTreeSet;
use std::time::Instant;

use libp2p::PeerId;
use llmesh_proto::Suspicion;
use prost::Message;

use super::{EventLoop, SUSPICION_REPEAT};
use crate::peers::Liveness;
use crate::pulse::{self, Heard};

/// Pulses in a row telling of other news before this node pulls.
const MISMATCHED_PULSES: u32 = 5;

/// Pulses in a row from a peer that knows of more members than this node
/// before this node pulls from it.
const LARGER_VIEW_PULSES: u32 = 2;

/// The least time between two refutations of suspicions about this node.
const REFUTE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl EventLoop {
    /// Watches the ring neighbours after this node among the live peers
    /// that speak pulses, and probes the ones it suspects or took for dead
    /// on its own evidence (their first pulse clears them); stops watching
    /// the rest.
    ///
    /// Dead ones too: this node's evidence may only say that it was cut
    /// off itself. Nothing else can clear it: the mesh's word (a pulled
    /// snapshot holding the same state) does not count against this node's
    /// own evidence, and a peer whose state does not change publishes no
    /// newer one. A chaos drill that cut the leader off found it seeing two
    /// live peers dead for good once the cut healed. A peer that is really
    /// dead costs a failed stream open per heartbeat until it is forgotten.
    pub(super) fn rewatch(&mut self, now: Instant) {
        let me = self.swarm.local_peer_id().to_string();
        let alive = self
            .table
            .entries()
            .filter(|e| e.state.pulses && e.liveness == Liveness::Alive)
            .map(|e| e.state.node_id.clone());
        let mut want = pulse::watched_by(&me, alive, pulse::WATCHED);
        want.extend(
            self.table
                .entries()
                .filter(|e| e.state.pulses && e.liveness != Liveness::Alive && e.probed)
                .map(|e| e.state.node_id.clone()),
        );
        let peers: BTreeSet<PeerId> = want.iter().filter_map(|id| id.parse().ok()).collect();
        self.table.set_watched(want, now);
        self.mismatched.retain(|peer, _| peers.contains(peer));
        self.watching.retain(|peer, (_, stop)| {
            let keep = peers.contains(peer);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for peer in peers {
            if self.watching.contains_key(&peer) {
                continue;
            }
            // Not connected yet, perhaps: tell the swarm where it listens.
            let addrs = self.table.get(&peer.to_string()).map(|e| e.state.p2p_addrs.clone()).unwrap_or_default();
            for addr in addrs.iter().filter_map(|a| a.parse::<libp2p::Multiaddr>().ok()) {
                self.swarm.add_peer_address(peer, addr);
            }
            self.next_watch += 1;
            let stop = self.watch_stop.child_token();
            pulse::watch(self.control.clone(), peer, self.next_watch, self.heard_tx.clone(), stop.clone());
            self.watching.insert(peer, (self.next_watch, stop));
        }
    }

    /// A watch heard a pulse, or ended (the next heartbeat opens it again
    /// if the peer is still wanted).
    pub(super) fn on_heard(&mut self, heard: Heard) {
        match heard {
            Heard::Pulse { peer, watch, state_seq, view_digest, members } => {
                if self.watching.get(&peer).map(|w| w.0) != Some(watch) {
                    return;
                }
                self.compare_views(peer, state_seq, view_digest, members);
                let changes = self.table.pulse(&peer.to_string(), Instant::now());
                if !changes.is_empty() {
                    self.report(changes);
                    self.refresh_view();
                }
            }
            Heard::Ended { peer, watch } => {
                if self.watching.get(&peer).is_some_and(|w| w.0 == watch) {
                    self.watching.remove(&peer);
                }
            }
        }
    }

    /// Sets the digest of this node's view, and its size, that its
    /// pulses carry.
    pub(super) fn digest_view(&mut self) {
        let me = self.swarm.local_peer_id().to_string();
        let digest = self.view_digest(&me);
        let members = self.view_size();
        self.pulse_news.send_if_modified(|news| {
            let changed = news.view_digest != digest || news.members != members;
            news.view_digest = digest;
            news.members = members;
            changed
        });
    }

    /// The members in this node's view digest: those not known dead,
    /// this node included.
    fn view_size(&self) -> u32 {
        let others = self.table.entries().filter(|e| e.liveness != Liveness::Dead).count();
        u32::try_from(others + 1).unwrap_or(u32::MAX)
    }

    fn view_digest(&self, me: &str) -> u64 {
        let members = self
            .table
            .entries()
            .filter(|e| e.liveness != Liveness::Dead)
            .map(|e| (e.state.node_id.as_str(), e.state.seq))
            .chain(std::iter::once((me, self.seq)));
        pulse::view_digest(members)
    }

    /// Anti-entropy: a watched peer whose pulses keep telling of a newer
    /// state than the one held, or of a view other than this node's, has
    /// news this node missed (a lost gossip message): pull its snapshot.
    /// Views differ for a moment whenever news travels, hence the wait.
    /// A peer that knows of more members is a newcomer's case (its start
    /// pulls came from a peer that had not heard of everyone yet): that
    /// waits only [`LARGER_VIEW_PULSES`] and not the usual gap between
    /// pulls, so a late starter is not left with half a view for 10 s.
    fn compare_views(&mut self, peer: PeerId, state_seq: u64, view_digest: u64, members: u32) {
        let me = self.swarm.local_peer_id().to_string();
        let held = self.table.get(&peer.to_string()).map_or(0, |e| e.state.seq);
        let differs = state_seq > held || (view_digest != 0 && view_digest != self.view_digest(&me));
        let view_size = self.view_size();
        let larger = members > view_size;
        let count = self.mismatched.entry(peer).or_default();
        *count = if differs || larger { *count + 1 } else { 0 };
        if larger && *count >= LARGER_VIEW_PULSES {
            tracing::debug!(%peer, members, "a watched peer knows of more members than this node: pulling its snapshot");
            *count = 0;
            self.pull_for_larger_view(peer, view_size, Instant::now());
        } else if *count >= MISMATCHED_PULSES {
            tracing::debug!(%peer, "a watched peer's view differs from this node's: pulling its snapshot");
            *count = 0;
            self.pull_soon(peer, Instant::now());
        }
    }

    /// Tells the mesh that watched peers fell silent, and says it again
    /// every [`SUSPICION_REPEAT`] for those still suspect or dead here.
    pub(super) fn announce_silent(&mut self, silent: Vec<(String, i64)>, now: Instant) {
        for (node_id, timestamp_ms) in silent {
            tracing::info!(node = %node_id, "a watched peer fell silent: telling the mesh");
            self.publish_suspicion(&node_id, timestamp_ms);
            self.announced.insert(node_id, now);
        }
        let table = &self.table;
        self.announced.retain(|id, _| table.get(id).is_some_and(|e| e.suspected));
        let again: Vec<(String, i64)> = self
            .announced
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) >= SUSPICION_REPEAT)
            .filter_map(|(id, _)| Some((id.clone(), self.table.get(id)?.state.timestamp_ms)))
            .collect();
        for (node_id, timestamp_ms) in again {
            self.publish_suspicion(&node_id, timestamp_ms);
            self.announced.insert(node_id, now);
        }
    }

    fn publish_suspicion(&mut self, node_id: &str, timestamp_ms: i64) {
        let data = Suspicion { node_id: node_id.to_string(), timestamp_ms }.encode_to_vec();
        let topic = self.suspicion_topic.clone();
        if let Err(err) = self.swarm.behaviour_mut().gossipsub.publish(topic, data) {
            tracing::debug!(error = %err, node = %node_id, "cannot publish a suspicion");
        }
    }

    /// The mesh says a peer went silent: suspect it here (see
    /// [`crate::peers::PeerTable::suspicion`]), or, about this node,
    /// refute it with a newer state.
    pub(super) fn on_suspicion(&mut self, source: Option<PeerId>, data: &[u8]) {
        // Gossipsub checked the author's signature; take it only from
        // members, as beats.
        let known = source.is_some_and(|s| self.table.get(&s.to_string()).is_some());
        let Ok(suspicion) = Suspicion::decode(data) else {
            tracing::debug!(source = ?source, "dropping an undecodable suspicion");
            return;
        };
        if !known {
            return;
        }
        let now = Instant::now();
        if suspicion.node_id == self.swarm.local_peer_id().to_string() {
            if self.refuted_at.is_some_and(|at| now.saturating_duration_since(at) < REFUTE_EVERY) {
                return;
            }
            tracing::info!(by = ?source, "the mesh suspects this node: refuting with a newer state");
            self.refuted_at = Some(now);
            self.cadence.refute();
            self.publish(false);
            self.sync_after_refuting(source, now);
            return;
        }
        let changes = self.table.suspicion(&suspicion.node_id, suspicion.timestamp_ms, now);
        if !changes.is_empty() {
            self.report(changes);
            self.refresh_view();
        }
    }
}
