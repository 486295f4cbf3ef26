//! The peers view: what every other node last said about itself and
//! whether it is still alive. Sans-IO: time comes in as an argument, so the
//! liveness rules are tested exactly, without sleeps.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use llmesh_proto::NodeState;

/// When a silent peer becomes suspect, dead, and forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Silence after which a peer is suspect (about three missed beats).
    pub suspect_after: Duration,
    /// Silence after which a peer is dead and out of routing.
    pub dead_after: Duration,
    /// Silence after which a dead peer is dropped from the view.
    pub forget_after: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(10),
            forget_after: Duration::from_secs(600),
        }
    }
}

/// How sure we are that a peer is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Liveness {
    /// Heard from recently.
    Alive,
    /// Missed beats or lost its connection; still routable as a last resort.
    Suspect,
    /// Silent past the timeout; never routed to.
    Dead,
}

impl Liveness {
    /// Lower-case name for JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
        }
    }
}

/// A change the scheduler and the dashboard care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A node was seen for the first time (or again after being forgotten).
    Joined(String),
    /// A node's liveness changed.
    Liveness(String, Liveness),
    /// A node was dropped from the view.
    Forgotten(String),
}

/// One peer as last heard.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerEntry {
    /// Its latest state.
    pub state: NodeState,
    /// When that state arrived.
    pub last_seen: Instant,
    /// Current liveness.
    pub liveness: Liveness,
}

/// Every known peer, keyed by node id.
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    config: LivenessConfig,
    entries: BTreeMap<String, PeerEntry>,
}

impl PeerTable {
    /// An empty table with these liveness rules.
    pub fn new(config: LivenessConfig) -> PeerTable {
        PeerTable { config, entries: BTreeMap::new() }
    }

    /// Records a state a peer published. Older or replayed states (by
    /// sequence number) are ignored, so reordered gossip cannot roll a
    /// node back.
    pub fn observe(&mut self, state: NodeState, now: Instant) -> Vec<Change> {
        let id = state.node_id.clone();
        match self.entries.get_mut(&id) {
            Some(entry) => {
                // A restarted node starts its sequence again; its timestamp
                // moves on, so accept a lower seq with a newer timestamp.
                let restarted = state.seq < entry.state.seq && state.timestamp_ms > entry.state.timestamp_ms;
                if state.seq <= entry.state.seq && !restarted {
                    return Vec::new();
                }
                entry.state = state;
                entry.last_seen = now;
                if entry.liveness != Liveness::Alive {
                    entry.liveness = Liveness::Alive;
                    return vec![Change::Liveness(id, Liveness::Alive)];
                }
                Vec::new()
            }
            None => {
                self.entries.insert(id.clone(), PeerEntry { state, last_seen: now, liveness: Liveness::Alive });
                vec![Change::Joined(id)]
            }
        }
    }

    /// Records a beat from a known peer: it is alive; its state stays the
    /// one last received in full. A beat from an unknown node is ignored
    /// (its signed state, with its certificate, must come first).
    pub fn beat(&mut self, node_id: &str, now: Instant) -> Vec<Change> {
        let Some(entry) = self.entries.get_mut(node_id) else { return Vec::new() };
        entry.last_seen = now;
        if entry.liveness == Liveness::Alive {
            return Vec::new();
        }
        entry.liveness = Liveness::Alive;
        vec![Change::Liveness(node_id.to_string(), Liveness::Alive)]
    }

    /// Whether a peer that is not known dead reads only full states (it
    /// predates beats).
    pub fn has_peers_without_beats(&self) -> bool {
        self.entries.values().any(|e| e.liveness != Liveness::Dead && !e.state.beats)
    }

    /// Marks a peer suspect at once (its connection closed).
    pub fn suspect(&mut self, node_id: &str) -> Vec<Change> {
        match self.entries.get_mut(node_id) {
            Some(entry) if entry.liveness == Liveness::Alive => {
                entry.liveness = Liveness::Suspect;
                vec![Change::Liveness(node_id.to_string(), Liveness::Suspect)]
            }
            _ => Vec::new(),
        }
    }

    /// Drops a peer at once (revoked): it leaves the view without passing
    /// through suspect and dead.
    pub fn forget(&mut self, node_id: &str) -> Vec<Change> {
        match self.entries.remove(node_id) {
            Some(_) => vec![Change::Forgotten(node_id.to_string())],
            None => Vec::new(),
        }
    }

    /// Applies the liveness rules at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        let config = self.config;
        self.entries.retain(|id, entry| {
            let silent = now.saturating_duration_since(entry.last_seen);
            if silent >= config.forget_after {
                changes.push(Change::Forgotten(id.clone()));
                return false;
            }
            let due = if silent >= config.dead_after {
                Liveness::Dead
            } else if silent >= config.suspect_after {
                Liveness::Suspect
            } else {
                entry.liveness
            };
            // Silence only ever makes things worse; news makes them better.
            if due > entry.liveness {
                entry.liveness = due;
                changes.push(Change::Liveness(id.clone(), due));
            }
            true
        });
        changes
    }

    /// Every known peer, in node-id order.
    pub fn entries(&self) -> impl Iterator<Item = &PeerEntry> {
        self.entries.values()
    }

    /// One peer.
    pub fn get(&self, node_id: &str) -> Option<&PeerEntry> {
        self.entries.get(node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(id: &str, seq: u64, ts: i64) -> NodeState {
        NodeState { node_id: id.into(), seq, timestamp_ms: ts, ..NodeState::default() }
    }

    fn config() -> LivenessConfig {
        LivenessConfig {
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
            forget_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn silence_walks_alive_suspect_dead_forgotten() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(config());
        assert_eq!(table.observe(state("b", 1, 1), t0), vec![Change::Joined("b".into())]);
        assert!(table.tick(t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(table.tick(t0 + Duration::from_secs(3)), vec![Change::Liveness("b".into(), Liveness::Suspect)]);
        assert_eq!(table.tick(t0 + Duration::from_secs(6)), vec![Change::Liveness("b".into(), Liveness::Dead)]);
        assert!(table.tick(t0 + Duration::from_secs(7)).is_empty(), "a change is reported once");
        assert_eq!(table.tick(t0 + Duration::from_secs(60)), vec![Change::Forgotten("b".into())]);
        assert!(table.get("b").is_none());
    }

    #[test]
    fn news_revives_and_old_news_is_ignored() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(config());
        table.observe(state("b", 5, 50), t0);
        table.tick(t0 + Duration::from_secs(10));
        assert_eq!(table.get("b").map(|e| e.liveness), Some(Liveness::Dead));
        assert!(table.observe(state("b", 4, 40), t0 + Duration::from_secs(11)).is_empty(), "replayed state");
        assert_eq!(table.get("b").map(|e| e.liveness), Some(Liveness::Dead));
        assert_eq!(
            table.observe(state("b", 6, 60), t0 + Duration::from_secs(11)),
            vec![Change::Liveness("b".into(), Liveness::Alive)]
        );
        // A restart: sequence numbers start over but time moves on.
        table.observe(state("b", 1, 70), t0 + Duration::from_secs(12));
        assert_eq!(table.get("b").map(|e| e.state.seq), Some(1));
    }

    #[test]
    fn beats_keep_a_known_peer_alive_and_revive_it_but_introduce_nobody() {
        let mut t = PeerTable::new(config());
        let t0 = Instant::now();
        assert!(t.beat("a", t0).is_empty() && t.get("a").is_none(), "unknown: ignored");
        t.observe(state("a", 1, 1), t0);
        assert!(t.has_peers_without_beats(), "a state without the flag");
        t.observe(NodeState { beats: true, ..state("a", 2, 2) }, t0);
        assert!(!t.has_peers_without_beats());
        for s in 1..=5 {
            t.beat("a", t0 + Duration::from_secs(s));
        }
        assert!(t.tick(t0 + Duration::from_secs(7)).is_empty(), "beats kept it alive");
        assert_eq!(t.get("a").map(|e| e.state.seq), Some(2), "a beat changes no state");
        t.tick(t0 + Duration::from_secs(16));
        assert_eq!(t.get("a").map(|e| e.liveness), Some(Liveness::Dead));
        let revived = t.beat("a", t0 + Duration::from_secs(17));
        assert_eq!(revived, vec![Change::Liveness("a".into(), Liveness::Alive)]);
    }

    #[test]
    fn a_closed_connection_makes_a_peer_suspect_at_once() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(config());
        table.observe(state("b", 1, 1), t0);
        assert_eq!(table.suspect("b"), vec![Change::Liveness("b".into(), Liveness::Suspect)]);
        assert!(table.suspect("b").is_empty());
        assert!(table.suspect("unknown").is_empty());
    }

    proptest! {
        #[test]
        fn liveness_follows_silence(beats in proptest::collection::vec(0u64..20, 1..20), probe in 0u64..40) {
            let t0 = Instant::now();
            let mut table = PeerTable::new(config());
            let mut last = 0;
            for (i, at) in beats.iter().scan(0u64, |acc, d| { *acc += d; Some(*acc) }).enumerate() {
                table.tick(t0 + Duration::from_secs(at));
                table.observe(state("b", i as u64 + 1, at as i64), t0 + Duration::from_secs(at));
                last = at;
            }
            let now = last + probe;
            table.tick(t0 + Duration::from_secs(now));
            let expected = if probe >= 60 { None } else if probe >= 6 { Some(Liveness::Dead) } else if probe >= 3 { Some(Liveness::Suspect) } else { Some(Liveness::Alive) };
            prop_assert_eq!(table.get("b").map(|e| e.liveness), expected);
        }
    }
}
