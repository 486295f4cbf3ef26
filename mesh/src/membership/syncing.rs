//! The membership loop's side of state sync (see [`crate::statesync`]):
//! when this node pulls a snapshot and when it sends its own state to
//! the whole mesh again.
//!
//! - A starting node pulls [`START_PULLS`] snapshots, [`START_PULL_GAP`]
//!   apart (the second catches what was said while its gossip mesh
//!   formed), and sends its own state for a few heartbeats.
//! - A connection to a peer taken for dead, or forgotten lately, is a
//!   partition healing: this node sends its state again and pulls the
//!   peer's snapshot, so both sides of the cut learn each other.
//! - A peer taken for dead that speaks again (with a newer state) may
//!   come back from the other side of a cut with news: pull from it.
//! - After refuting a suspicion about itself this node pulls too: the
//!   mesh may have moved on while it was not heard.
//!
//! Pulls after the start are at most one per [`PULL_EVERY`], so a flood
//! of revivals costs each node one snapshot, not one per peer.

use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;

use super::EventLoop;
use crate::peers::{Change, Liveness};
use crate::statesync::{self, Pulled};

/// Snapshots a starting node pulls.
const START_PULLS: u32 = 2;
/// Between a starting node's pulls.
const START_PULL_GAP: Duration = Duration::from_secs(3);
/// Empty pulls retried at most (over this node's life).
const EMPTY_PULLS_RETRIED: u32 = 8;
/// The least time between two pulls once started.
const PULL_EVERY: Duration = Duration::from_secs(10);
/// How long a forgotten peer that connects again counts as a healing
/// partition (beyond it, it is a stranger: a newcomer pulls by itself).
const REMEMBER_FORGOTTEN: Duration = Duration::from_secs(3600);
/// The most forgotten peers remembered.
const FORGOTTEN_MAX: usize = 4096;

/// Where this node's pulls stand.
#[derive(Debug, Default)]
pub(super) struct Sync {
    /// Start pulls made.
    start_pulls: u32,
    /// When the last pull began.
    last_pull: Option<Instant>,
    /// Peers forgotten lately, and when.
    forgotten: std::collections::HashMap<String, Instant>,
    /// Peers taken for dead now.
    dead: std::collections::HashSet<String>,
    /// Empty pulls retried so far.
    empty_pulls: u32,
    /// This node's view size when it last pulled from a peer that knew
    /// of more members.
    larger_view_pull_at: Option<u32>,
}

impl EventLoop {
    /// A heartbeat: a starting node's pulls, once it can check states.
    pub(super) fn sync_on_heartbeat(&mut self, now: Instant) {
        if self.sync.start_pulls >= START_PULLS || !self.trust.is_enrolled() {
            return;
        }
        if self.sync.last_pull.is_some_and(|at| now.saturating_duration_since(at) < START_PULL_GAP) {
            return;
        }
        // A member this node already knows alive, else any connection
        // (at first, the bootstrap peer).
        let alive = self.connected_in(Liveness::Alive);
        let Some(peer) = alive.or_else(|| self.swarm.connected_peers().next().copied()) else { return };
        self.sync.start_pulls += 1;
        self.pull_from(peer, now);
    }

    /// A connection: if to a peer across a healing partition, send this
    /// node's state again and pull the peer's snapshot.
    pub(super) fn sync_on_connected(&mut self, peer: PeerId, now: Instant) {
        let id = peer.to_string();
        let dead = self.table.get(&id).is_some_and(|e| e.liveness == Liveness::Dead);
        let forgotten =
            self.sync.forgotten.get(&id).is_some_and(|at| now.saturating_duration_since(*at) < REMEMBER_FORGOTTEN);
        if dead || forgotten {
            tracing::debug!(%peer, "met a peer from across a partition: sending this node's state, pulling theirs");
            self.cadence.peer_joined();
            self.pull_soon(peer, now);
        }
    }

    /// Membership changes: remembers forgotten peers, keeps the shelf of
    /// served states current, pulls from a peer back from the dead.
    pub(super) fn sync_on_changes(&mut self, changes: &[Change], now: Instant) {
        for change in changes {
            match change {
                Change::Forgotten(id) => {
                    self.shelf.remove(id);
                    self.sync.dead.remove(id);
                    if self.sync.forgotten.len() >= FORGOTTEN_MAX {
                        self.sync.forgotten.retain(|_, at| now.saturating_duration_since(*at) < REMEMBER_FORGOTTEN);
                    }
                    if self.sync.forgotten.len() < FORGOTTEN_MAX {
                        self.sync.forgotten.insert(id.clone(), now);
                    }
                }
                Change::Liveness(id, liveness) => {
                    self.shelf.set_alive(id, *liveness == Liveness::Alive);
                    let was_dead = match liveness {
                        Liveness::Dead => !self.sync.dead.insert(id.clone()),
                        _ => self.sync.dead.remove(id),
                    };
                    if *liveness == Liveness::Alive
                        && was_dead
                        && let Ok(peer) = id.parse()
                    {
                        self.pull_soon(peer, now);
                    }
                }
                Change::Joined(id) => {
                    self.sync.forgotten.remove(id);
                    // A node from before state sync waits to be sent
                    // everyone's state, as it was then.
                    if self.table.get(id).is_some_and(|e| !e.state.pulls_states) {
                        self.cadence.peer_joined();
                    }
                }
            }
        }
    }

    /// After refuting a suspicion about this node: it may have missed news.
    pub(super) fn sync_after_refuting(&mut self, by: Option<PeerId>, now: Instant) {
        if let Some(peer) = by {
            self.pull_soon(peer, now);
        }
    }

    /// Pulls from `peer` unless a pull began within [`PULL_EVERY`] (or
    /// this node is still making its start pulls).
    pub(super) fn pull_soon(&mut self, peer: PeerId, now: Instant) {
        if self.sync.start_pulls < START_PULLS
            || self.sync.last_pull.is_some_and(|at| now.saturating_duration_since(at) < PULL_EVERY)
        {
            return;
        }
        self.pull_from(peer, now);
    }

    /// Pulls from `peer`, which knows of more members than this node
    /// (`view_size`), unless a pull began within [`START_PULL_GAP`]:
    /// missing members are worth more than the usual gap. Only while
    /// such pulls help: when the last one left the view no larger (the
    /// peer holds members this node knows dead), the usual gap applies.
    pub(super) fn pull_for_larger_view(&mut self, peer: PeerId, view_size: u32, now: Instant) {
        if self.sync.larger_view_pull_at.is_some_and(|size| view_size <= size) {
            self.pull_soon(peer, now);
            return;
        }
        if self.sync.last_pull.is_some_and(|at| now.saturating_duration_since(at) < START_PULL_GAP) {
            return;
        }
        self.sync.larger_view_pull_at = Some(view_size);
        self.pull_from(peer, now);
    }

    fn pull_from(&mut self, peer: PeerId, now: Instant) {
        tracing::debug!(%peer, "pulling a state snapshot");
        self.sync.last_pull = Some(now);
        statesync::pull(self.control.clone(), peer, self.pulled_tx.clone(), self.watch_stop.child_token());
    }

    /// A snapshot arrived: each state is checked as if gossiped. One
    /// this node already holds at the same sequence number is the peer
    /// vouching that its author is alive.
    pub(super) fn on_pulled(&mut self, pulled: Pulled) {
        tracing::debug!(peer = %pulled.peer, states = pulled.states.len(), "pulled a state snapshot");
        if pulled.snapshot && pulled.states.is_empty() {
            self.retry_pull();
            return;
        }
        let me = self.swarm.local_peer_id().to_string();
        for data in pulled.states {
            self.take_state(None, pulled.peer, data, Some(&me));
        }
        self.retry_awaiting_certs();
    }

    /// A pull came back empty (see [`Pulled::snapshot`]): it does not
    /// count, and the next chance pulls again, [`EMPTY_PULLS_RETRIED`]
    /// times at most.
    fn retry_pull(&mut self) {
        if self.sync.empty_pulls >= EMPTY_PULLS_RETRIED {
            return;
        }
        self.sync.empty_pulls += 1;
        tracing::debug!("a pulled snapshot was empty (the peer dropped the stream): pulling again");
        if (1..=START_PULLS).contains(&self.sync.start_pulls) {
            self.sync.start_pulls -= 1;
        }
        self.sync.last_pull = None;
        self.sync.larger_view_pull_at = None;
    }

    /// Keeps `data` as the state served for `node_id`.
    pub(super) fn shelve(&mut self, node_id: &str, data: Bytes) {
        self.shelf.put(node_id, data);
    }
}
