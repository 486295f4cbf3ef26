//! The peers view: what every other node last said about itself and
//! whether it is still alive. Sans-IO: time comes in as an argument, so the
//! liveness rules are tested exactly, without sleeps.
//!
//! Two kinds of peer are judged differently:
//! - **by silence**: peers this node watches (their pulse streams, see
//!   [`crate::pulse`]) and peers from before pulses (they beat to everyone
//!   every second): silent past `suspect_after` is suspect, past
//!   `dead_after` dead, as before;
//! - **by the mesh's word**: every other peer. Nobody hears from it at
//!   rest; it stays alive while this node hears the mesh (its own watched
//!   peers' pulses) and nobody has said otherwise. A [`suspicion`] (a
//!   watcher found it silent, or its connection broke) makes it suspect at
//!   once and dead `dead_after - suspect_after` later, unless it refutes
//!   with a newer state. Were this node cut off, its watched peers fall
//!   silent, it stops vouching, and everyone ages into suspect and dead as
//!   under silence, `suspect_after` later.
//!
//! [`suspicion`]: PeerTable::suspicion

use std::collections::{BTreeMap, BTreeSet};
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
    /// When it was last heard from, or vouched for by the mesh.
    pub last_seen: Instant,
    /// Current liveness.
    pub liveness: Liveness,
    /// Someone said it went silent (a watcher, a broken connection) and it
    /// has not been heard since: nobody vouches for it until it is.
    pub suspected: bool,
    /// This node suspects it on its own evidence (a broken connection, a
    /// failed forward) and probes it; on the mesh's word it waits for the
    /// peer's refutation instead, or every node would dial the suspect.
    pub probed: bool,
    /// When (this node's wall clock, ms) it began to suspect it on its own
    /// evidence: a state stamped before then, relayed by others, was in
    /// flight before the peer fell silent and proves nothing.
    pub probed_at_ms: i64,
}

/// What a tick found.
#[derive(Debug, Default, PartialEq)]
pub struct Tick {
    /// Liveness changes.
    pub changes: Vec<Change>,
    /// Watched peers that fell silent just now: the mesh should hear it
    /// (node id and the timestamp of its latest state).
    pub fell_silent: Vec<(String, i64)>,
}

/// How long a newly watched peer's pulse stream may take to open (a dial
/// included) before its silence starts to count: the pulse stream's own
/// open timeout (5 s), then a second try at the next heartbeat. On a box
/// starting a hundred agents at once the first try does time out.
pub const NEW_WATCH_GRACE: Duration = Duration::from_secs(8);

/// Every known peer, keyed by node id.
#[derive(Debug, Clone, Default)]
pub struct PeerTable {
    config: LivenessConfig,
    entries: BTreeMap<String, PeerEntry>,
    /// Peers whose pulses this node reads.
    watched: BTreeSet<String>,
    /// When a watched peer last pulsed (or watching began).
    mesh_heard_at: Option<Instant>,
}

impl PeerTable {
    /// An empty table with these liveness rules.
    pub fn new(config: LivenessConfig) -> PeerTable {
        PeerTable { config, ..PeerTable::default() }
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
                let stale = entry.probed && state.timestamp_ms <= entry.probed_at_ms;
                entry.state = state;
                if stale {
                    return Vec::new();
                }
                heard(&id, entry, now)
            }
            None => {
                let entry = PeerEntry {
                    state,
                    last_seen: now,
                    liveness: Liveness::Alive,
                    suspected: false,
                    probed: false,
                    probed_at_ms: 0,
                };
                self.entries.insert(id.clone(), entry);
                vec![Change::Joined(id)]
            }
        }
    }

    /// Records a beat from a known peer: it is alive; its state stays the
    /// one last received in full. A beat from an unknown node is ignored
    /// (its signed state, with its certificate, must come first).
    pub fn beat(&mut self, node_id: &str, now: Instant) -> Vec<Change> {
        let Some(entry) = self.entries.get_mut(node_id) else { return Vec::new() };
        heard(node_id, entry, now)
    }

    /// Another node holds the same state of a peer as this one: alive on
    /// the mesh's word, unless this node has its own evidence otherwise
    /// (then only the peer itself, or a newer state, revives it).
    pub fn vouch(&mut self, node_id: &str, now: Instant) -> Vec<Change> {
        let Some(entry) = self.entries.get_mut(node_id) else { return Vec::new() };
        if entry.probed {
            return Vec::new();
        }
        heard(node_id, entry, now)
    }

    /// Records a pulse from a watched peer: a beat, and proof that this
    /// node still hears the mesh.
    pub fn pulse(&mut self, node_id: &str, now: Instant) -> Vec<Change> {
        if self.watched.contains(node_id) {
            self.mesh_heard_at = Some(now);
        }
        let changes = self.beat(node_id, now);
        // Its first pulse ends a newly watched peer's grace (a `last_seen`
        // ahead of now): its stream is open, so silence counts from here.
        if let Some(entry) = self.entries.get_mut(node_id) {
            entry.last_seen = now;
        }
        changes
    }

    /// Whether a peer that is not known dead reads only full states (it
    /// predates beats).
    pub fn has_peers_without_beats(&self) -> bool {
        self.entries.values().any(|e| e.liveness != Liveness::Dead && !e.state.beats)
    }

    /// Whether a peer that is not known dead expects a beat from everyone
    /// every heartbeat (it predates pulses).
    pub fn has_peers_without_pulses(&self) -> bool {
        self.entries.values().any(|e| e.liveness != Liveness::Dead && !e.state.pulses)
    }

    /// Whether a live peer needs every state with its certificate (it
    /// predates certificate fetches).
    pub fn has_peers_without_cert_fetch(&self) -> bool {
        self.entries.values().any(|e| e.liveness != Liveness::Dead && !e.state.fetches_certs)
    }

    /// Sets the peers this node watches. One newly watched is given
    /// [`NEW_WATCH_GRACE`] and then a full `suspect_after` before its
    /// silence counts: its pulse stream may need a dial first, which on a
    /// busy machine (a whole mesh starting at once) takes seconds.
    pub fn set_watched(&mut self, watched: BTreeSet<String>, now: Instant) {
        if self.watched.is_empty() && !watched.is_empty() {
            self.mesh_heard_at = Some(now + NEW_WATCH_GRACE);
        }
        for id in watched.difference(&self.watched) {
            if let Some(entry) = self.entries.get_mut(id)
                && !entry.suspected
            {
                entry.last_seen = entry.last_seen.max(now + NEW_WATCH_GRACE);
            }
        }
        self.watched = watched;
    }

    /// Marks a peer suspect at once: its connection closed, a forward to
    /// it failed. It is dead `dead_after - suspect_after` from now unless
    /// heard from before.
    pub fn suspect(&mut self, node_id: &str, now: Instant) -> Vec<Change> {
        if let Some(entry) = self.entries.get_mut(node_id) {
            probe(entry);
        }
        self.suspect_on_word(node_id, now)
    }

    fn suspect_on_word(&mut self, node_id: &str, now: Instant) -> Vec<Change> {
        let config = self.config;
        let Some(entry) = self.entries.get_mut(node_id) else { return Vec::new() };
        entry.suspected = true;
        if let Some(since) = now.checked_sub(config.suspect_after) {
            entry.last_seen = entry.last_seen.min(since);
        }
        if entry.liveness == Liveness::Alive {
            entry.liveness = Liveness::Suspect;
            return vec![Change::Liveness(node_id.to_string(), Liveness::Suspect)];
        }
        Vec::new()
    }

    /// The mesh says a peer went silent when its latest state was the one
    /// stamped `timestamp_ms`. Ignored when this node has a newer state
    /// from it, or watches it and heard it within `suspect_after`: the
    /// peer refutes it itself when it hears it.
    pub fn suspicion(&mut self, node_id: &str, timestamp_ms: i64, now: Instant) -> Vec<Change> {
        let Some(entry) = self.entries.get(node_id) else { return Vec::new() };
        let newer = entry.state.timestamp_ms > timestamp_ms;
        // A `last_seen` ahead of now is a newly watched peer's grace, not
        // a pulse: nothing here speaks against the mesh's word.
        let heard_lately = self.watched.contains(node_id)
            && entry.last_seen <= now
            && now.saturating_duration_since(entry.last_seen) < self.config.suspect_after;
        if newer || heard_lately {
            return Vec::new();
        }
        self.suspect_on_word(node_id, now)
    }

    /// Drops a peer at once (revoked): it leaves the view without passing
    /// through suspect and dead.
    pub fn forget(&mut self, node_id: &str) -> Vec<Change> {
        self.watched.remove(node_id);
        match self.entries.remove(node_id) {
            Some(_) => vec![Change::Forgotten(node_id.to_string())],
            None => Vec::new(),
        }
    }

    /// This node could not run for `lag` (a starved process, a paused
    /// VM): that time does not count as anyone's silence. Peers suspected
    /// on the mesh's word stay as they are.
    pub fn excuse(&mut self, lag: Duration, now: Instant) {
        for entry in self.entries.values_mut().filter(|e| !e.suspected) {
            entry.last_seen = (entry.last_seen + lag).min(now);
        }
        if let Some(at) = self.mesh_heard_at.as_mut() {
            *at = (*at + lag).min(now);
        }
    }

    /// Whether this node watches the peer (reads its pulses).
    pub fn watches(&self, node_id: &str) -> bool {
        self.watched.contains(node_id)
    }

    /// Whether this node hears the mesh: it watches nobody, or a watched
    /// peer pulsed within `suspect_after`.
    fn hears_mesh(&self, now: Instant) -> bool {
        self.watched.is_empty()
            || self.mesh_heard_at.is_some_and(|at| now.saturating_duration_since(at) < self.config.suspect_after)
    }

    /// Applies the liveness rules at `now`.
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut tick = Tick::default();
        let config = self.config;
        let vouch = self.hears_mesh(now);
        let watched = &self.watched;
        self.entries.retain(|id, entry| {
            let by_silence = watched.contains(id) || !entry.state.pulses;
            if !by_silence && vouch && !entry.suspected {
                tick.changes.extend(heard(id, entry, now));
            }
            let silent = now.saturating_duration_since(entry.last_seen);
            if silent >= config.forget_after {
                tick.changes.push(Change::Forgotten(id.clone()));
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
                if entry.liveness == Liveness::Alive && watched.contains(id) && entry.state.pulses {
                    entry.suspected = true;
                    probe(entry);
                    tick.fell_silent.push((id.clone(), entry.state.timestamp_ms));
                }
                entry.liveness = due;
                tick.changes.push(Change::Liveness(id.clone(), due));
            }
            true
        });
        tick
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

/// This node suspects a peer on its own evidence, from now.
fn probe(entry: &mut PeerEntry) {
    if !entry.probed {
        entry.probed = true;
        entry.probed_at_ms = wall_clock_ms();
    }
}

fn wall_clock_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// A peer was heard from (or vouched for): alive, no longer suspected.
fn heard(id: &str, entry: &mut PeerEntry, now: Instant) -> Vec<Change> {
    // `max`: other evidence (a relayed state) does not end a newly
    // watched peer's grace (a `last_seen` ahead of now); only its first
    // pulse does (see `pulse`), or its silence would count before its
    // stream could open.
    entry.last_seen = entry.last_seen.max(now);
    entry.suspected = false;
    entry.probed = false;
    if entry.liveness == Liveness::Alive {
        return Vec::new();
    }
    entry.liveness = Liveness::Alive;
    vec![Change::Liveness(id.to_string(), Liveness::Alive)]
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
        assert!(table.tick(t0 + Duration::from_secs(2)).changes.is_empty());
        assert_eq!(
            table.tick(t0 + Duration::from_secs(3)).changes,
            vec![Change::Liveness("b".into(), Liveness::Suspect)]
        );
        assert_eq!(table.tick(t0 + Duration::from_secs(6)).changes, vec![Change::Liveness("b".into(), Liveness::Dead)]);
        assert!(table.tick(t0 + Duration::from_secs(7)).changes.is_empty(), "a change is reported once");
        assert_eq!(table.tick(t0 + Duration::from_secs(60)).changes, vec![Change::Forgotten("b".into())]);
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
    fn a_state_stamped_before_this_nodes_own_suspicion_does_not_revive() {
        let mut t = PeerTable::new(config());
        let t0 = Instant::now();
        let stamp = wall_clock_ms();
        t.observe(state("a", 1, stamp - 10), t0);
        t.suspect("a", t0);
        let in_flight = t.observe(state("a", 2, stamp - 5), t0 + Duration::from_millis(50));
        assert!(in_flight.is_empty(), "sent before it fell silent: {in_flight:?}");
        assert_eq!(t.get("a").map(|e| e.state.seq), Some(2), "the newer state is still kept");
        assert!(t.vouch("a", t0).is_empty(), "another node's copy proves nothing either");
        let refuted = t.observe(state("a", 3, wall_clock_ms() + 1), t0 + Duration::from_millis(100));
        assert_eq!(refuted, vec![Change::Liveness("a".into(), Liveness::Alive)]);
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
        assert!(t.tick(t0 + Duration::from_secs(7)).changes.is_empty(), "beats kept it alive");
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
        assert_eq!(table.suspect("b", t0), vec![Change::Liveness("b".into(), Liveness::Suspect)]);
        assert!(table.suspect("b", t0).is_empty());
        assert!(table.suspect("unknown", t0).is_empty());
    }

    #[test]
    fn only_a_suspicion_on_this_nodes_own_evidence_is_probed() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(config());
        table.observe(state("b", 1, 1), t0);
        table.observe(state("c", 1, 1), t0);
        table.suspicion("b", 1, t0);
        table.suspect("c", t0);
        let probed = |t: &PeerTable, id: &str| t.get(id).map(|e| (e.suspected, e.probed));
        assert_eq!(probed(&table, "b"), Some((true, false)), "the mesh's word: wait for the refutation");
        assert_eq!(probed(&table, "c"), Some((true, true)), "a broken connection here: probe it");
        table.beat("c", t0 + Duration::from_secs(1));
        assert_eq!(probed(&table, "c"), Some((false, false)));
    }

    #[test]
    fn time_this_node_could_not_run_is_nobodys_silence() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = PeerTable::new(config());
        table.observe(state("b", 1, 1), t0);
        table.observe(state("c", 1, 1), t0);
        table.suspect("c", t0);
        // Stalled from 1 s to 9 s: b's silence is 1 s long, not 9.
        table.excuse(Duration::from_secs(8), at(9));
        assert!(table.tick(at(9)).changes.iter().all(|c| !matches!(c, Change::Liveness(id, _) if id == "b")));
        assert_eq!(liveness(&table, "b"), Some(Liveness::Alive));
        // A suspect on someone's word gets no such grace.
        assert_eq!(liveness(&table, "c"), Some(Liveness::Dead));
    }

    fn pulsing(id: &str, seq: u64, ts: i64) -> NodeState {
        NodeState { pulses: true, beats: true, ..state(id, seq, ts) }
    }

    fn liveness(table: &PeerTable, id: &str) -> Option<Liveness> {
        table.get(id).map(|e| e.liveness)
    }

    fn watching(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_pulsing_peer_nobody_suspects_stays_alive_while_the_mesh_is_heard() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = PeerTable::new(config());
        table.observe(pulsing("b", 1, 1), t0);
        table.observe(pulsing("c", 1, 1), t0);
        table.set_watched(watching(&["c"]), t0);
        for s in 1..=100 {
            table.pulse("c", at(s));
            assert!(table.tick(at(s)).changes.is_empty(), "second {s}");
        }
        assert_eq!(liveness(&table, "b"), Some(Liveness::Alive), "never heard directly, never doubted");
        assert!(!table.has_peers_without_pulses());
    }

    #[test]
    fn a_suspicion_makes_a_peer_suspect_at_once_and_dead_later_unless_refuted() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = PeerTable::new(config());
        table.observe(pulsing("b", 2, 20), t0);
        table.observe(pulsing("c", 1, 1), t0);
        table.set_watched(watching(&["c"]), t0);
        let pulse_and_tick = |table: &mut PeerTable, s: u64| {
            table.pulse("c", at(s));
            table.tick(at(s)).changes
        };
        pulse_and_tick(&mut table, 10);
        assert!(table.suspicion("b", 19, at(10)).is_empty(), "about an older state than the one held");
        assert_eq!(table.suspicion("b", 20, at(10)), vec![Change::Liveness("b".into(), Liveness::Suspect)]);
        assert!(pulse_and_tick(&mut table, 12).is_empty(), "still suspect; no vouching for it");
        assert_eq!(pulse_and_tick(&mut table, 13), vec![Change::Liveness("b".into(), Liveness::Dead)]);
        // The node was alive after all: its newer state refutes it.
        assert_eq!(table.observe(pulsing("b", 3, 30), at(14)), vec![Change::Liveness("b".into(), Liveness::Alive)]);
        assert!(pulse_and_tick(&mut table, 20).is_empty(), "vouched for again");
    }

    #[test]
    fn a_watched_peer_that_falls_silent_is_reported_once_and_its_pulse_clears_it() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = PeerTable::new(config());
        table.observe(pulsing("c", 1, 7), t0);
        table.set_watched(watching(&["c"]), t0);
        table.pulse("c", at(1));
        assert_eq!(table.tick(at(3)), Tick::default());
        let tick = table.tick(at(4));
        assert_eq!(tick.changes, vec![Change::Liveness("c".into(), Liveness::Suspect)]);
        assert_eq!(tick.fell_silent, vec![("c".to_string(), 7)]);
        assert!(table.tick(at(5)).fell_silent.is_empty(), "reported once");
        assert_eq!(table.pulse("c", at(6)), vec![Change::Liveness("c".into(), Liveness::Alive)]);
        assert!(!table.get("c").is_some_and(|e| e.suspected));
    }

    #[test]
    fn the_mesh_s_word_counts_for_a_newly_watched_peer_not_yet_heard() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(config());
        table.observe(pulsing("c", 1, 7), t0);
        table.set_watched(watching(&["c"]), t0);
        let word = table.suspicion("c", 7, t0 + Duration::from_millis(100));
        assert_eq!(word, vec![Change::Liveness("c".into(), Liveness::Suspect)], "its grace is not a pulse");
    }

    #[test]
    fn a_relayed_state_does_not_end_a_newly_watched_peers_grace() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = PeerTable::new(config());
        table.observe(pulsing("c", 1, 7), t0);
        table.set_watched(watching(&["c"]), t0);
        table.observe(pulsing("c", 2, 8), at(1));
        let grace = NEW_WATCH_GRACE.as_secs();
        assert!(table.tick(at(grace + 2)).fell_silent.is_empty(), "its stream may still be opening");
        assert_eq!(table.tick(at(grace + 3)).fell_silent, vec![("c".to_string(), 8)]);
    }

    #[test]
    fn a_newly_watched_peer_has_time_for_its_stream_to_open() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = PeerTable::new(config());
        table.observe(pulsing("c", 1, 7), t0);
        table.observe(pulsing("d", 1, 7), t0);
        table.set_watched(watching(&["c", "d"]), t0);
        let grace = NEW_WATCH_GRACE.as_secs();
        // No pulse yet from either: the dial may be slow.
        assert!(table.tick(at(grace + 2)).fell_silent.is_empty());
        // c's first pulse ends its grace; d never pulses.
        table.pulse("c", at(grace + 2));
        let tick = table.tick(at(grace + 3));
        assert_eq!(tick.fell_silent, vec![("d".to_string(), 7)]);
        assert_eq!(table.tick(at(grace + 5)).fell_silent, vec![("c".to_string(), 7)]);
    }

    #[test]
    fn a_watcher_that_hears_its_peer_ignores_the_mesh_suspecting_it() {
        let t0 = Instant::now();
        let mut table = PeerTable::new(config());
        table.observe(pulsing("c", 1, 1), t0);
        table.set_watched(watching(&["c"]), t0);
        table.pulse("c", t0 + Duration::from_secs(1));
        assert!(table.suspicion("c", 1, t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(liveness(&table, "c"), Some(Liveness::Alive));
    }

    #[test]
    fn a_node_cut_off_from_its_watched_peers_ages_everyone_then_recovers() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = PeerTable::new(config());
        table.observe(pulsing("b", 1, 1), t0);
        table.observe(pulsing("c", 1, 1), t0);
        table.set_watched(watching(&["c"]), t0);
        table.pulse("c", at(1));
        let ticks: Vec<Vec<Change>> = (2..=12).map(|s| table.tick(at(s)).changes).collect();
        // c, watched, is suspect 3 s after its last pulse and dead after 6;
        // b, vouched for until the mesh went quiet (3 s), 3 s after that.
        assert_eq!(ticks[2], vec![Change::Liveness("c".into(), Liveness::Suspect)], "second 4");
        assert_eq!(ticks[4], vec![Change::Liveness("b".into(), Liveness::Suspect)], "second 6");
        assert_eq!(ticks[5], vec![Change::Liveness("c".into(), Liveness::Dead)], "second 7");
        assert_eq!(ticks[7], vec![Change::Liveness("b".into(), Liveness::Dead)], "second 9");
        // Back: c pulses again, and b, which nobody suspected, is vouched for.
        table.pulse("c", at(13));
        assert_eq!(table.tick(at(13)).changes, vec![Change::Liveness("b".into(), Liveness::Alive)]);
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
