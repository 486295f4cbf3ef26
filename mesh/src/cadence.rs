//! When a node gossips its full state and when only a beat. Sans-IO: time
//! comes in as an argument, so the rules are tested exactly.
//!
//! A full [`NodeState`] is a kilobyte or more (models, load, recent
//! conversations, and the certificate that travels with it), and every
//! node receives every node's messages several times over (gossipsub's
//! mesh), so sending it every second made an idle mesh of 20 nodes move
//! about 150 KB/s per node. Most seconds nothing has changed. The full
//! state now goes out when it changes in substance, at least every
//! [`FULL_STATE_EVERY`], and for a few heartbeats after a peer joins or
//! comes back (so a newcomer learns everyone at once). In between nothing
//! goes out: liveness is the pulses' job (see [`crate::pulse`]), unless a
//! peer from before pulses is alive, which expects a beat from everyone
//! every heartbeat.

use std::time::{Duration, Instant};

use llmesh_proto::NodeState;

/// The longest a node stays without sending its full state: a peer that
/// missed one (a lost message) is this stale at most. Long, because a
/// peer cut off and back is sent every state again (a join), and because
/// at 100 nodes even one state every few minutes from each is most of
/// what an idle mesh says.
pub const FULL_STATE_EVERY: Duration = Duration::from_secs(300);

/// Full states sent on heartbeats after a peer joins (or this node
/// starts), counting only those that reached a gossip peer: the
/// newcomer's gossipsub mesh takes a heartbeat or two to form, and
/// holes in it are repaired by the next. Each costs every node a
/// signature check or more, so at 100 nodes starting at once every one
/// more is seconds of CPU across the machine (two made a 20-node start
/// take 5 s instead of 1-2: a state that missed a node waited for
/// anti-entropy).
const FULL_AFTER_JOIN: u32 = 3;

/// What the peers alive read, by the oldest of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Every peer reads pulses: nothing between full states.
    Pulses,
    /// A peer predates pulses: a beat every heartbeat.
    Beats,
    /// A peer predates beats: the full state every heartbeat.
    FullOnly,
}

/// What to send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// The full signed state.
    Full,
    /// A beat: alive, with this state sequence number.
    Beat,
    /// Nothing.
    Nothing,
}

/// The publishing rules for one node.
#[derive(Debug, Default)]
pub struct Cadence {
    /// The state last sent in full, in substance (see [`substance`]).
    sent: Option<NodeState>,
    last_full: Option<Instant>,
    /// Full states still to deliver on heartbeats after a join.
    full_due: u32,
}

impl Cadence {
    /// A heartbeat: the full state when it changed, is due, or a peer
    /// reads only full states (nodes before beats, which take a peer for
    /// gone after three silent seconds); else a beat if a peer needs one.
    pub fn on_heartbeat(&mut self, state: &NodeState, readers: Readers, now: Instant) -> Publish {
        let due = self.last_full.is_none_or(|at| now.saturating_duration_since(at) >= FULL_STATE_EVERY);
        let joined = self.full_due > 0;
        if due || joined || readers == Readers::FullOnly || self.changed(state) {
            self.sent_full(state, now);
            Publish::Full
        } else if readers == Readers::Beats {
            Publish::Beat
        } else {
            Publish::Nothing
        }
    }

    /// The mesh suspects this node: the next chance sends the full state
    /// (a newer one refutes the suspicion).
    pub fn refute(&mut self) {
        self.sent = None;
    }

    /// The local state changed between heartbeats: the full state when it
    /// changed in substance, else nothing (the next heartbeat beats).
    /// After a join the next heartbeat sends a full state anyway: a
    /// change waits for it, so a starting node's first changes (models
    /// found, addresses learnt) do not each cost the mesh a state. A
    /// node's very first state goes out at once all the same.
    pub fn on_change(&mut self, state: &NodeState, now: Instant) -> Publish {
        if self.full_due > 0 && self.last_full.is_some() {
            return Publish::Nothing;
        }
        if self.changed(state) {
            self.sent_full(state, now);
            Publish::Full
        } else {
            Publish::Nothing
        }
    }

    /// A peer joined or came back: it has not heard this node's state.
    pub fn peer_joined(&mut self) {
        self.full_due = FULL_AFTER_JOIN;
    }

    /// A full state reached at least one gossip peer (one that reached
    /// nobody, as while alone, does not count toward a join's).
    pub fn delivered(&mut self) {
        self.full_due = self.full_due.saturating_sub(1);
    }

    fn changed(&self, state: &NodeState) -> bool {
        self.sent.as_ref() != Some(&substance(state))
    }

    fn sent_full(&mut self, state: &NodeState, now: Instant) {
        self.sent = Some(substance(state));
        self.last_full = Some(now);
    }
}

/// What of a state is worth sending at once: all of it but the sequence
/// number and timestamp, with GPU readings coarsened (a temperature that
/// wanders by a degree, or utilisation by a few percent, is not news; the
/// periodic full state carries the exact figures).
fn substance(state: &NodeState) -> NodeState {
    let mut state = state.clone();
    state.seq = 0;
    state.timestamp_ms = 0;
    for gpu in &mut state.gpus {
        gpu.temperature_c -= gpu.temperature_c % 5;
        gpu.utilization_percent -= gpu.utilization_percent % 10;
        gpu.memory_used_bytes -= gpu.memory_used_bytes % (256 << 20);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::GpuInfo;

    fn state(in_flight: u32) -> NodeState {
        NodeState { node_id: "n".into(), in_flight, ..NodeState::default() }
    }

    #[test]
    fn an_idle_node_beats_for_older_peers_and_sends_its_full_state_every_few_minutes() {
        let mut c = Cadence::default();
        let t0 = Instant::now();
        assert_eq!(c.on_heartbeat(&state(0), Readers::Beats, t0), Publish::Full, "the first heartbeat");
        let sent: Vec<Publish> =
            (1..=600).map(|s| c.on_heartbeat(&state(0), Readers::Beats, t0 + Duration::from_secs(s))).collect();
        let full: Vec<usize> = (0..600).filter(|i| sent[*i] == Publish::Full).map(|i| i + 1).collect();
        assert_eq!(full, [300, 600]);
        assert!(sent.iter().all(|p| *p != Publish::Nothing));
    }

    #[test]
    fn among_pulsing_peers_an_idle_node_is_quiet_until_its_state_changes_or_is_refuted() {
        let mut c = Cadence::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(c.on_heartbeat(&state(0), Readers::Pulses, t0), Publish::Full);
        assert!((1..=299).all(|s| c.on_heartbeat(&state(0), Readers::Pulses, at(s)) == Publish::Nothing));
        assert_eq!(c.on_heartbeat(&state(0), Readers::Pulses, at(300)), Publish::Full, "the slow refresh");
        assert_eq!(c.on_heartbeat(&state(1), Readers::Pulses, at(301)), Publish::Full, "a change");
        c.refute();
        assert_eq!(c.on_change(&state(1), at(301)), Publish::Full, "a suspicion refuted at once");
        assert_eq!(c.on_heartbeat(&state(1), Readers::Pulses, at(302)), Publish::Nothing);
    }

    #[test]
    fn a_change_goes_out_at_once_and_only_once() {
        let mut c = Cadence::default();
        let t0 = Instant::now();
        c.on_heartbeat(&state(0), Readers::Beats, t0);
        let t = t0 + Duration::from_millis(300);
        assert_eq!(c.on_change(&state(0), t), Publish::Nothing);
        assert_eq!(c.on_change(&state(1), t), Publish::Full);
        assert_eq!(c.on_change(&state(1), t), Publish::Nothing);
        assert_eq!(c.on_heartbeat(&state(1), Readers::Beats, t0 + Duration::from_secs(1)), Publish::Beat);
        // The seq and timestamp the membership task stamps are not news.
        let stamped = NodeState { seq: 9, timestamp_ms: 5, ..state(1) };
        assert_eq!(c.on_heartbeat(&stamped, Readers::Beats, t0 + Duration::from_secs(2)), Publish::Beat);
    }

    #[test]
    fn a_join_and_an_older_peer_bring_full_states_back() {
        let mut c = Cadence::default();
        let t0 = Instant::now();
        c.on_heartbeat(&state(0), Readers::Beats, t0);
        c.peer_joined();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // The second heartbeat's state reaches nobody: it does not count.
        let after_join: Vec<Publish> = (1..=5)
            .map(|s| {
                let what = c.on_heartbeat(&state(0), Readers::Beats, at(s));
                if what == Publish::Full && s != 2 {
                    c.delivered();
                }
                what
            })
            .collect();
        assert_eq!(after_join, [Publish::Full, Publish::Full, Publish::Full, Publish::Full, Publish::Beat]);
        assert_eq!(c.on_heartbeat(&state(0), Readers::FullOnly, at(6)), Publish::Full, "a peer that reads no beats");
    }

    #[test]
    fn a_change_after_a_join_waits_for_the_heartbeat_that_sends_the_full_state_anyway() {
        let mut c = Cadence::default();
        let t0 = Instant::now();
        c.peer_joined();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(c.on_change(&state(0), at(50)), Publish::Full, "the first state, at once");
        c.delivered();
        assert_eq!(c.on_change(&state(1), at(100)), Publish::Nothing, "models found while starting");
        assert_eq!(c.on_heartbeat(&state(1), Readers::Pulses, at(1000)), Publish::Full);
        c.delivered();
        assert_eq!(c.on_change(&state(2), at(1500)), Publish::Nothing);
        assert_eq!(c.on_heartbeat(&state(2), Readers::Pulses, at(2000)), Publish::Full);
        c.delivered();
        assert_eq!(c.on_change(&state(3), at(2500)), Publish::Full, "the join is over: at once again");
        assert_eq!(c.on_heartbeat(&state(3), Readers::Pulses, at(3000)), Publish::Nothing);
    }

    #[test]
    fn gpu_readings_that_wander_are_not_news() {
        let gpu = |temperature_c, utilization_percent| GpuInfo {
            temperature_c,
            utilization_percent,
            memory_used_bytes: 8 << 30,
            ..GpuInfo::default()
        };
        let mut c = Cadence::default();
        let t0 = Instant::now();
        c.on_heartbeat(&NodeState { gpus: vec![gpu(61, 0)], ..state(0) }, Readers::Beats, t0);
        assert_eq!(c.on_change(&NodeState { gpus: vec![gpu(63, 4)], ..state(0) }, t0), Publish::Nothing);
        assert_eq!(c.on_change(&NodeState { gpus: vec![gpu(66, 4)], ..state(0) }, t0), Publish::Full);
        assert_eq!(c.on_change(&NodeState { gpus: vec![gpu(66, 90)], ..state(0) }, t0), Publish::Full);
    }
}
