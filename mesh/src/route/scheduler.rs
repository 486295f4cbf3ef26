//! Scheduling: run each request where it will *start* soonest.
//!
//! Sans-IO: candidates, time and randomness come in as arguments, the
//! decision comes out; no sockets, no clocks, no sleeps. The agent builds
//! the candidates from gossip and its own counters and acts on the choice.
//!
//! For each candidate the start time is estimated as the queue ahead of the
//! request divided by the node's parallel slots, times the service time of
//! one request (from the node's moving averages), plus a cold-load time
//! when the model is not loaded, plus the network round trip. The holder of
//! the conversation's prefix (its KV cache) is preferred while it is not
//! much slower than the best; among near-equal candidates two are drawn at
//! random and the better kept (power of two choices), so entry nodes that
//! share a stale view do not all pile onto the same box.

use std::collections::HashMap;
use std::time::Duration;

use super::prefix::Turn;
use crate::peers::Liveness;

/// Where this entry node last sent a conversation, and how deep it was.
#[derive(Debug)]
struct Remembered {
    node: String,
    depth: u32,
    /// For evicting the least recently used.
    tick: u64,
}

/// Tuning of the estimates. The defaults are what an unknown Ollama box
/// looks like before its averages exist.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// Time to load a model that is on disk but not in memory.
    pub cold_load_ms: f64,
    /// Time to first token when a node has no average yet.
    pub default_ttft_ms: f64,
    /// Decode speed when a node has no average yet.
    pub default_decode_tps: f64,
    /// Output length assumed for a request that does not say.
    pub default_output_tokens: f64,
    /// Parallel slots of a backend that does not report them.
    pub default_slots: u32,
    /// Added to a suspect node's estimate: used only when nothing better is left.
    pub suspect_penalty_ms: f64,
    /// Estimates closer than this are treated as equal.
    pub near_equal_ms: f64,
    /// The prefix holder is kept while its estimate is within this factor
    /// of the best plus `affinity_extra_ms` (bounded load): a warm KV cache
    /// saves the prompt evaluation of the whole conversation so far.
    pub affinity_slack: f64,
    /// Extra wait accepted to reuse a conversation's cache at a holder
    /// whose prompt evaluation speed is not measured yet (measured, the
    /// cache is worth the evaluation of the conversation so far there).
    pub affinity_extra_ms: f64,
    /// Extra wait accepted to reuse a conversation's cache when every node
    /// is busy (every choice waits then, so the estimates are waits, not
    /// service times). Measured side by side: 2 s instead of 1 s raised the
    /// warm benchmark's hit rate at 95% load (0.83 vs 0.77) and cut its
    /// TTFT p95, but in the cold-load scenario, where slow boxes hold
    /// conversations, it tripled TTFT p95 at 95%; 1 s is kept. Like
    /// `affinity_extra_ms`, only while the holder's prompt evaluation
    /// speed is not measured.
    pub affinity_extra_busy_ms: f64,
    /// Conversations remembered for affinity.
    pub affinity_entries: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            cold_load_ms: 10_000.0,
            default_ttft_ms: 300.0,
            default_decode_tps: 30.0,
            default_output_tokens: 256.0,
            default_slots: 4,
            suspect_penalty_ms: 5_000.0,
            near_equal_ms: 50.0,
            affinity_slack: 1.5,
            affinity_extra_ms: 1_000.0,
            affinity_extra_busy_ms: 1_000.0,
            affinity_entries: 100_000,
        }
    }
}

/// One node that could serve the request, as the entry node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Node id.
    pub id: String,
    /// Whether it is the entry node itself.
    pub is_local: bool,
    /// Liveness (dead nodes must not be passed in; they are ignored).
    pub liveness: Liveness,
    /// Draining nodes are ignored.
    pub draining: bool,
    /// Requests it serves at once; 0 when unknown.
    pub slots: u32,
    /// Requests in flight there, from its gossip.
    pub in_flight: u32,
    /// Requests waiting there for one of its slots, from its gossip.
    pub queued: u32,
    /// Requests this entry node has sent there and not seen finish.
    pub dispatched: u32,
    /// Whether the model is loaded (else it is on disk and must load).
    pub loaded: bool,
    /// Its average time to first token for the model, when known.
    pub ttft_ms: Option<f64>,
    /// Its average decode speed for the model, when known.
    pub decode_tps: Option<f64>,
    /// Its average prompt evaluation speed for the model (request-body
    /// bytes of uncached prompt per second), when known.
    pub prefill_bps: Option<f64>,
    /// Round trip to it; 0 for the entry node.
    pub rtt_ms: f64,
    /// How deep it says this conversation got there (see
    /// [`super::prefix::Turn`]); `None` when it does not hold it.
    pub held_depth: Option<u32>,
}

/// Why the first node was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It holds the conversation's prefix and is not overloaded.
    Affinity,
    /// The best estimate by a clear margin.
    Soonest,
    /// Picked by power of two choices among near-equals.
    TwoChoices,
    /// Every node is busy: it is expected to free a slot first, and the
    /// request waits in its queue.
    Queued,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [Reason; 4] = [Reason::Affinity, Reason::Soonest, Reason::TwoChoices, Reason::Queued];

    /// Lower-case name (metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Affinity => "affinity",
            Reason::Soonest => "soonest",
            Reason::TwoChoices => "two_choices",
            Reason::Queued => "queued",
        }
    }
}

/// The scheduler's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Node ids in the order to try them.
    pub order: Vec<String>,
    /// Estimated wait before the first node starts the request.
    pub estimate: Duration,
    /// Every candidate is busy in every slot (or a free one is much slower
    /// than waiting): the request should wait in the first node's queue.
    pub saturated: bool,
    /// Why the first node won.
    pub reason: Reason,
}

/// Chooses nodes and remembers where conversations went.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    rng: u64,
    affinity: HashMap<u64, Remembered>,
    tick: u64,
}

impl Scheduler {
    /// A scheduler; `seed` makes its random draws reproducible.
    pub fn new(config: SchedulerConfig, seed: u64) -> Scheduler {
        Scheduler { config, rng: seed | 1, affinity: HashMap::new(), tick: 0 }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: fast, and enough for choosing between two nodes.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn slots(&self, c: &Candidate) -> u32 {
        if c.slots == 0 { self.config.default_slots } else { c.slots }
    }

    /// Requests that would be ahead of or beside this one on `c`: those
    /// running and waiting there, corrected upwards by what this entry
    /// node has just sent (the gossiped counts are up to a heartbeat old).
    fn busy(&self, c: &Candidate) -> u32 {
        (c.in_flight + c.queued).max(c.dispatched)
    }

    /// Estimated wait before `c` would start the request.
    pub fn estimate_ms(&self, c: &Candidate, output_tokens: Option<u32>) -> f64 {
        let slots = self.slots(c);
        let tokens = output_tokens.map_or(self.config.default_output_tokens, f64::from);
        let ttft = c.ttft_ms.unwrap_or(self.config.default_ttft_ms);
        let tps = c.decode_tps.filter(|t| *t > 0.0).unwrap_or(self.config.default_decode_tps);
        let service = ttft + tokens / tps * 1000.0;
        let busy = self.busy(c);
        let queue = if busy < slots { 0.0 } else { f64::from(busy - slots + 1) / f64::from(slots) * service };
        let cold = if c.loaded { 0.0 } else { self.config.cold_load_ms };
        let suspect = if c.liveness == Liveness::Alive { 0.0 } else { self.config.suspect_penalty_ms };
        queue + cold + suspect + c.rtt_ms
    }

    /// Chooses where to run a request for which `candidates` could serve the
    /// model. `turn` places it in its conversation (for KV-cache affinity).
    /// `None` when there is no usable candidate.
    pub fn choose(
        &mut self,
        candidates: &[Candidate],
        turn: Option<Turn>,
        output_tokens: Option<u32>,
    ) -> Option<Choice> {
        let usable: Vec<&Candidate> =
            candidates.iter().filter(|c| c.liveness != Liveness::Dead && !c.draining).collect();
        if usable.is_empty() {
            return None;
        }
        let mut scored: Vec<(f64, &Candidate)> =
            usable.iter().map(|c| (self.estimate_ms(c, output_tokens), *c)).collect();
        // Soonest first; the entry node wins ties (no hop), then node id for
        // a stable order.
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.is_local.cmp(&a.1.is_local)).then(a.1.id.cmp(&b.1.id)));
        // Only nodes with a free slot are sent work to start at once. When
        // none has one, or waiting for a busy warm node beats every free
        // one (which would have to load the model), the request is
        // saturated: it goes to wait in the queue of the node expected to
        // free a slot first (never in a backend's own queue).
        let free: Vec<usize> =
            (0..scored.len()).filter(|i| self.busy(scored[*i].1) < self.slots(scored[*i].1)).collect();
        let near = self.config.near_equal_ms;
        let soonest = scored[0].0;
        let mut saturated = free.first().is_none_or(|i| scored[*i].0 > soonest + near);
        let pool: Vec<usize> = if saturated { (0..scored.len()).collect() } else { free };
        let mut first = pool[0];
        let mut reason = if saturated { Reason::Queued } else { Reason::Soonest };
        let best = scored[first].0;
        // The conversation's KV cache is worth a bounded extra wait (it
        // saves the prompt evaluation of the whole conversation so far): its
        // holder wins while its estimate is within the allowance, even with
        // every slot busy (the request then waits in the holder's queue), so
        // a hot holder stops collecting conversations once its line grows.
        let holder = turn.and_then(|turn| self.holder(&scored, turn.key));
        // With every node busy the estimates are waits, not service times:
        // the cache is worth a fixed extra wait, not a multiple of a long one
        // (else a slow, busy holder keeps conversations for seconds).
        let allowance = |(i, depth): (usize, u32)| {
            let worth = self.cache_worth_ms(scored[i].1, depth, saturated);
            if saturated { best + worth } else { best * self.config.affinity_slack + worth }
        };
        if let Some((i, _)) = holder.filter(|h| scored[h.0].0 <= allowance(*h)) {
            first = i;
            reason = Reason::Affinity;
            // Busy in every slot: it waits there rather than in the backend.
            saturated = self.busy(scored[i].1) >= self.slots(scored[i].1);
        } else if !saturated && !scored[first].1.is_local {
            let equals: Vec<usize> = pool.iter().copied().filter(|i| scored[*i].0 <= best + near).collect();
            if let Some(picked) = self.two_choices(&scored, &equals) {
                first = picked;
                reason = Reason::TwoChoices;
            }
        }
        let chosen = scored.remove(first);
        let estimate = Duration::from_secs_f64(chosen.0.max(0.0) / 1000.0);
        let mut order = vec![chosen.1.id.clone()];
        order.extend(scored.iter().map(|(_, c)| c.id.clone()));
        if let Some(turn) = turn {
            self.remember(turn, &order[0]);
        }
        Some(Choice { order, estimate, saturated, reason })
    }

    /// The candidate (index into `scored`) with the deepest turn of the
    /// conversation `key`, by gossip or by what this entry node sent where
    /// (fresher than gossip, so it wins a tie). Entries that each saw only
    /// some turns disagree on where a conversation went last; the depth
    /// settles it.
    fn holder(&self, scored: &[(f64, &Candidate)], key: u64) -> Option<(usize, u32)> {
        let remembered = self.affinity.get(&key);
        (0..scored.len())
            .filter_map(|i| {
                let sent = remembered.filter(|r| r.node == scored[i].1.id).map(|r| r.depth);
                let depth = scored[i].1.held_depth.max(sent)?;
                Some(((depth, sent.is_some()), i))
            })
            .max_by_key(|(rank, i)| (*rank, std::cmp::Reverse(*i)))
            .map(|((depth, _), i)| (i, depth))
    }

    /// The extra wait a conversation `depth` bytes deep is worth at its
    /// holder `c`: the prompt evaluation its KV cache saves there, at the
    /// holder's measured speed (a slow CPU box saves seconds, a fast GPU a
    /// few milliseconds); the configured extra while unmeasured.
    pub fn cache_worth_ms(&self, c: &Candidate, depth: u32, saturated: bool) -> f64 {
        match c.prefill_bps.filter(|b| *b > 0.0) {
            Some(bytes_per_s) => f64::from(depth) / bytes_per_s * 1000.0,
            None if saturated => self.config.affinity_extra_busy_ms,
            None => self.config.affinity_extra_ms,
        }
    }

    /// Power of two choices among near-equal candidates (indices into
    /// `scored`): two distinct draws, the better kept. `None` for fewer
    /// than two.
    fn two_choices(&mut self, scored: &[(f64, &Candidate)], equals: &[usize]) -> Option<usize> {
        if equals.len() < 2 {
            return None;
        }
        let n = equals.len() as u64;
        let ia = (self.next_random() % n) as usize;
        let mut ib = (self.next_random() % (n - 1)) as usize;
        if ib >= ia {
            ib += 1;
        }
        let (a, b) = (equals[ia], equals[ib]);
        let pick = |i: usize| (scored[i].0, !scored[i].1.is_local);
        Some(if pick(a) <= pick(b) { a } else { b })
    }

    fn remember(&mut self, turn: Turn, node: &str) {
        self.tick += 1;
        if self.affinity.len() >= self.config.affinity_entries && !self.affinity.contains_key(&turn.key) {
            // Evict the least recently used conversation.
            if let Some(oldest) = self.affinity.iter().min_by_key(|(_, r)| r.tick).map(|(k, _)| *k) {
                self.affinity.remove(&oldest);
            }
        }
        self.affinity.insert(turn.key, Remembered { node: node.to_string(), depth: turn.depth, tick: self.tick });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_indexes_its_own_place_in_all() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{}", reason.as_str());
        }
    }

    fn turn(key: u64) -> Option<Turn> {
        Some(Turn { key, depth: 100 })
    }
    use proptest::prelude::*;

    fn node(id: &str) -> Candidate {
        Candidate {
            id: id.into(),
            is_local: false,
            liveness: Liveness::Alive,
            draining: false,
            slots: 2,
            in_flight: 0,
            queued: 0,
            dispatched: 0,
            loaded: true,
            ttft_ms: Some(100.0),
            decode_tps: Some(50.0),
            prefill_bps: None,
            rtt_ms: 1.0,
            held_depth: None,
        }
    }

    fn scheduler() -> Scheduler {
        Scheduler::new(SchedulerConfig::default(), 7)
    }

    #[test]
    fn a_warm_idle_node_beats_a_busy_or_cold_one() {
        let busy = Candidate { in_flight: 6, ..node("busy") };
        let cold = Candidate { loaded: false, ..node("cold") };
        let idle = node("idle");
        let choice = scheduler().choose(&[busy, cold, idle], None, Some(100)).expect("a choice");
        assert_eq!(choice.order[0], "idle");
        assert_eq!(choice.order.len(), 3);
        assert!(!choice.saturated);
    }

    #[test]
    fn the_local_node_wins_a_tie() {
        let local = Candidate { is_local: true, rtt_ms: 0.0, ..node("me") };
        let peer = Candidate { rtt_ms: 0.0, ..node("peer") };
        for _ in 0..20 {
            let choice = scheduler().choose(&[peer.clone(), local.clone()], None, None).expect("a choice");
            assert_eq!(choice.order[0], "me");
        }
    }

    #[test]
    fn own_dispatches_correct_stale_gossip() {
        let s = scheduler();
        let stale = Candidate { in_flight: 0, dispatched: 5, ..node("a") };
        assert!(s.estimate_ms(&stale, Some(10)) > s.estimate_ms(&node("b"), Some(10)));
    }

    #[test]
    fn saturation_is_every_warm_slot_busy() {
        let full = |id: &str| Candidate { in_flight: 2, ..node(id) };
        let mut s = scheduler();
        assert!(s.choose(&[full("a"), full("b")], None, None).expect("choice").saturated);
        assert!(!s.choose(&[full("a"), node("b")], None, None).expect("choice").saturated);
    }

    #[test]
    fn a_conversation_stays_on_its_node_until_it_is_overloaded() {
        let mut s = scheduler();
        let first = s.choose(&[node("a"), node("b")], turn(42), Some(50)).expect("choice").order[0].clone();
        let other = if first == "a" { "b" } else { "a" };
        // Its node is busier than the other now but has a free slot: the
        // conversation stays, every time (no random spreading).
        let mut nodes = vec![Candidate { in_flight: 1, ..node(&first) }, node(other)];
        for _ in 0..10 {
            assert_eq!(s.choose(&nodes, turn(42), Some(50)).expect("choice").order[0], first);
        }
        // Every slot busy but a short line: it stays, to wait in that node's
        // queue (saturated), never in its backend.
        nodes[0].in_flight = 2;
        let choice = s.choose(&nodes, turn(42), Some(50)).expect("choice");
        assert_eq!((choice.order[0].as_str(), choice.saturated), (first.as_str(), true));
        // A long line: it moves to the free node.
        nodes[0].queued = 4;
        assert_eq!(s.choose(&nodes, turn(42), Some(50)).expect("choice").order[0], other);
    }

    #[test]
    fn when_every_node_is_busy_the_request_queues_where_a_slot_frees_first() {
        let mut s = scheduler();
        // b has the shorter line (queued work counts, from gossip).
        let a = Candidate { in_flight: 2, queued: 3, ..node("a") };
        let b = Candidate { in_flight: 2, queued: 1, ..node("b") };
        let choice = s.choose(&[a.clone(), b.clone()], None, Some(50)).expect("choice");
        assert!(choice.saturated);
        assert_eq!((choice.order[0].as_str(), choice.reason), ("b", Reason::Queued));
        // A free node that must first load the model loses to a short line
        // on a warm one: the request queues at the warm one.
        let cold = Candidate { loaded: false, ..node("cold") };
        let choice = s.choose(&[a, b, cold], None, Some(50)).expect("choice");
        assert!(choice.saturated);
        assert_eq!(choice.order[0], "b");
    }

    #[test]
    fn a_busy_conversation_holder_keeps_it_only_within_the_allowance() {
        let mut s = scheduler();
        // The holder's line is a little longer than the other's: the
        // conversation waits for its cache.
        let holder = Candidate { in_flight: 2, queued: 2, held_depth: Some(100), ..node("holder") };
        let other = Candidate { in_flight: 2, queued: 1, ..node("other") };
        let choice = s.choose(&[holder.clone(), other.clone()], turn(9), Some(50)).expect("choice");
        assert_eq!((choice.order[0].as_str(), choice.reason), ("holder", Reason::Affinity));
        // Its line grew long (a hot node collecting conversations): it goes
        // elsewhere, and is remembered there.
        let hot = Candidate { queued: 12, ..holder };
        let choice = s.choose(&[hot.clone(), other.clone()], turn(9), Some(50)).expect("choice");
        assert_eq!(choice.order[0], "other");
        let hot = Candidate { held_depth: None, ..hot };
        let choice = s.choose(&[hot, Candidate { in_flight: 1, ..node("other") }], turn(9), Some(50)).expect("choice");
        assert_eq!((choice.order[0].as_str(), choice.reason), ("other", Reason::Affinity));
    }

    #[test]
    fn a_cache_is_worth_the_prompt_evaluation_it_saves_at_its_holder() {
        let s = scheduler();
        let deep = 40_000;
        // Unmeasured: the configured extra.
        assert_eq!(s.cache_worth_ms(&node("a"), deep, false), 1_000.0);
        assert_eq!(s.cache_worth_ms(&node("a"), deep, true), 1_000.0);
        // A CPU box evaluating 4 kB of prompt a second saves 10 s; a GPU
        // at 400 kB/s saves 100 ms.
        let slow = Candidate { prefill_bps: Some(4_000.0), ..node("cpu") };
        let fast = Candidate { prefill_bps: Some(400_000.0), ..node("gpu") };
        assert_eq!(s.cache_worth_ms(&slow, deep, true), 10_000.0);
        assert_eq!(s.cache_worth_ms(&fast, deep, true), 100.0);

        // Both holders have a line of the same length, 1.1 s past the other
        // node's: the slow box keeps its conversation (re-reading it
        // elsewhere would cost more), the fast one lets it go.
        let other = Candidate { in_flight: 2, queued: 1, ..node("other") };
        let line = |c: Candidate| Candidate { in_flight: 2, queued: 3, held_depth: Some(deep), ..c };
        let turn = Some(Turn { key: 5, depth: deep + 100 });
        let kept = scheduler().choose(&[line(slow), other.clone()], turn, Some(50)).expect("choice");
        assert_eq!((kept.order[0].as_str(), kept.reason), ("cpu", Reason::Affinity));
        let moved = scheduler().choose(&[line(fast), other], turn, Some(50)).expect("choice");
        assert_eq!(moved.order[0], "other");
    }

    #[test]
    fn near_equals_are_spread_by_two_choices() {
        let mut s = scheduler();
        let nodes: Vec<Candidate> = ["a", "b", "c", "d"].iter().map(|id| node(id)).collect();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let choice = s.choose(&nodes, None, None).expect("choice");
            assert_eq!(choice.reason, Reason::TwoChoices);
            seen.insert(choice.order[0].clone());
        }
        assert!(seen.len() >= 3, "{seen:?}");
    }

    fn arb_candidates() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec((0u8..3, any::<bool>(), 0u32..5, 0u32..12, 0u32..12, any::<bool>()), 0..8).prop_map(
            |v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (liveness, draining, slots, in_flight, dispatched, loaded))| Candidate {
                        id: format!("n{i}"),
                        draining,
                        slots,
                        in_flight,
                        dispatched,
                        loaded,
                        liveness: [Liveness::Alive, Liveness::Suspect, Liveness::Dead][liveness as usize],
                        ..node("x")
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn never_a_dead_or_draining_node(nodes in arb_candidates(), prefix in proptest::option::of((0u64..4).prop_map(|key| Turn { key, depth: 1 }))) {
            let mut s = scheduler();
            match s.choose(&nodes, prefix, None) {
                None => prop_assert!(nodes.iter().all(|c| c.liveness == Liveness::Dead || c.draining)),
                Some(choice) => {
                    for id in &choice.order {
                        let c = nodes.iter().find(|c| &c.id == id).expect("a candidate");
                        prop_assert!(c.liveness != Liveness::Dead && !c.draining);
                    }
                }
            }
        }

        #[test]
        fn work_goes_only_to_nodes_with_a_free_slot(nodes in arb_candidates(), prefix in proptest::option::of((0u64..4).prop_map(|key| Turn { key, depth: 1 }))) {
            let mut s = scheduler();
            if let Some(choice) = s.choose(&nodes, prefix, None)
                && !choice.saturated
            {
                let c = nodes.iter().find(|c| c.id == choice.order[0]).expect("a candidate");
                let slots = if c.slots == 0 { SchedulerConfig::default().default_slots } else { c.slots };
                prop_assert!(c.in_flight.max(c.dispatched) < slots, "{:?} got work with every slot busy", c);
            }
        }

        #[test]
        fn affinity_moves_only_for_keys_whose_node_left(keys in proptest::collection::vec(0u64..1000, 1..60), leaving in 0usize..4) {
            let names = ["a", "b", "c", "d"];
            let all: Vec<Candidate> = names.iter().map(|id| node(id)).collect();
            let mut s = scheduler();
            let before: Vec<String> = keys.iter().map(|k| s.choose(&all, turn(*k), None).expect("choice").order[0].clone()).collect();
            let remaining: Vec<Candidate> = all.iter().filter(|c| c.id != names[leaving]).cloned().collect();
            for (k, was) in keys.iter().zip(&before) {
                let now = s.choose(&remaining, turn(*k), None).expect("choice").order[0].clone();
                if was != names[leaving] {
                    prop_assert_eq!(&now, was);
                } else {
                    prop_assert_ne!(now.as_str(), names[leaving]);
                }
            }
        }

    }
}
