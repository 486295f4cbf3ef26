//! A deterministic cluster harness, in the spirit of quinn's `Pair`: N
//! nodes, each with a simulated backend (slots and a fixed service time),
//! an [`Admission`] state, and a view of its peers that changes only when
//! a gossip round delivers it, all on one virtual clock with in-memory
//! links that tests can cut. Requests are driven through the same
//! [`Plan`] and [`Admission`] calls the router makes: a request for a busy
//! mesh waits in the queue of the node where a slot frees first, beside
//! that node's own clients, and a freed slot passes to the next in fair
//! order. Multi-node behaviour (stale gossip, entry nodes racing for the
//! last slot, a node dying between choice and forward, fairness between
//! entries, conversations finding their cache from any entry) is tested
//! exactly, without processes or sleeps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use llmesh_proto::{ModelInfo, NodeState};

use super::admission::Admission;
use super::candidates::{self, LocalCapacity, Sources};
use super::plan::{Context, Facts, Plan, Step};
use super::prefix::Turn;
use super::queue::Lane;
use super::router::LOCAL;
use super::scheduler::SchedulerConfig;
use crate::ServeError;
use crate::membership::PeerSnapshot;
use crate::peers::Liveness;

const MODEL: &str = "m";
const SERVICE: Duration = Duration::from_secs(1);

/// Where a request is.
#[derive(Debug, Clone, PartialEq)]
enum Status {
    /// In its entry node's own queue.
    Waiting,
    /// No node could take it; it looks again at `until`.
    Awaiting {
        until: Instant,
    },
    /// In `node`'s queue, forwarded there to wait for a slot.
    Queued {
        node: usize,
    },
    /// In the queues of `places` (the entry's own included), to run at the
    /// first that gives it a slot.
    Reserved {
        places: Vec<usize>,
    },
    /// On `node`'s backend since `started`.
    Running {
        node: usize,
        started: Instant,
    },
    Done {
        node: usize,
        at: Instant,
    },
    Failed(ServeError),
}

struct Request {
    entry: usize,
    tenant: String,
    turn: Option<Turn>,
    plan: Plan,
    status: Status,
    /// A slot was handed over while it waited at its entry node.
    granted: bool,
    /// It has a place in its entry node's queue.
    in_queue: bool,
}

struct Node {
    id: String,
    serves: bool,
    slots: u32,
    /// Requests on its backend, with their end time.
    running: Vec<(usize, Instant)>,
    admission: Admission<usize>,
    /// Conversations whose KV cache its backend holds, each at the
    /// deepest turn it served.
    prefixes: Vec<(u64, u32)>,
    /// What this node last heard from each peer (index → snapshot).
    view: HashMap<usize, PeerSnapshot>,
}

/// N nodes on one clock.
pub struct Cluster {
    now: Instant,
    nodes: Vec<Node>,
    /// `cut[a][b]`: nothing from `a` reaches `b`.
    cut: Vec<Vec<bool>>,
    requests: Vec<Request>,
    queue_capacity: usize,
}

impl Cluster {
    /// Nodes with these slots; 0 slots: the node does not serve the model.
    pub fn new(slots: &[u32]) -> Cluster {
        Cluster::with_queue(slots, 64)
    }

    fn with_queue(slots: &[u32], queue_capacity: usize) -> Cluster {
        let nodes = slots
            .iter()
            .enumerate()
            .map(|(i, s)| Node {
                id: format!("n{i}"),
                serves: *s > 0,
                slots: *s,
                running: Vec::new(),
                admission: Admission::new(SchedulerConfig::default(), i as u64 + 1, queue_capacity),
                prefixes: Vec::new(),
                view: HashMap::new(),
            })
            .collect();
        Cluster {
            now: Instant::now(),
            nodes,
            cut: vec![vec![false; slots.len()]; slots.len()],
            requests: Vec::new(),
            queue_capacity,
        }
    }

    fn state_of(&self, i: usize) -> NodeState {
        let node = &self.nodes[i];
        NodeState {
            node_id: node.id.clone(),
            name: node.id.clone(),
            data_addr: "127.0.0.1:1".into(),
            backend_healthy: true,
            parallel_slots: node.slots,
            in_flight: node.running.len() as u32,
            queued: node.admission.queued() as u32,
            recent_prefixes: node.prefixes.iter().map(|(key, _)| *key).collect(),
            recent_prefix_depths: node.prefixes.iter().map(|(_, depth)| *depth).collect(),
            models: if node.serves {
                vec![ModelInfo { name: MODEL.into(), loaded: true, ..ModelInfo::default() }]
            } else {
                vec![]
            },
            ..NodeState::default()
        }
    }

    /// Every node publishes its state; links that are not cut deliver it.
    /// The requests waiting at each entry node then look again, as the
    /// router's do on a view change.
    pub fn gossip(&mut self) {
        for from in 0..self.nodes.len() {
            let state = self.state_of(from);
            for to in 0..self.nodes.len() {
                if to != from && !self.cut[from][to] {
                    let snapshot =
                        PeerSnapshot { state: state.clone(), liveness: Liveness::Alive, last_seen_ago: Duration::ZERO };
                    self.nodes[to].view.insert(from, snapshot);
                }
            }
        }
        self.recheck_all();
    }

    fn recheck_all(&mut self) {
        for id in 0..self.requests.len() {
            if self.requests[id].status == Status::Waiting {
                self.drive(id);
            }
        }
    }

    /// Cuts every link to and from `node` (it died; gossip still shows it).
    pub fn kill(&mut self, node: usize) {
        for other in 0..self.nodes.len() {
            self.cut[node][other] = true;
            self.cut[other][node] = true;
        }
    }

    /// A request for the model entering at `entry` for `tenant`, deadline
    /// `timeout` from now; driven at once.
    pub fn submit(&mut self, entry: usize, tenant: &str, timeout: Duration) -> usize {
        self.submit_turn(entry, tenant, None, timeout)
    }

    /// A turn of a conversation.
    fn submit_turn(&mut self, entry: usize, tenant: &str, turn: Option<Turn>, timeout: Duration) -> usize {
        let facts = Facts {
            model: MODEL.into(),
            deadline: self.now + timeout,
            max_attempts: 3,
            max_expected_wait: Duration::from_secs(3600),
            cloud: None,
        };
        let request = Request {
            entry,
            tenant: tenant.into(),
            turn,
            plan: Plan::new(facts),
            status: Status::Waiting,
            granted: false,
            in_queue: false,
        };
        self.requests.push(request);
        let id = self.requests.len() - 1;
        self.drive(id);
        id
    }

    fn candidates(&self, entry: usize, turn: Option<Turn>) -> Vec<super::scheduler::Candidate> {
        let prefix = turn.map(|t| t.key);
        let node = &self.nodes[entry];
        let local = node.serves.then(|| LocalCapacity {
            slots: node.slots,
            in_flight: node.running.len() as u32,
            loaded: true,
            ttft_ms: None,
            decode_tps: None,
            prefill_bps: None,
            held_depth: node.prefixes.iter().find(|(key, _)| Some(*key) == prefix).map(|(_, depth)| *depth),
        });
        let mut peers: Vec<(usize, PeerSnapshot)> = node.view.iter().map(|(i, p)| (*i, p.clone())).collect();
        peers.sort_by_key(|(i, _)| *i);
        let peers: Vec<PeerSnapshot> = peers.into_iter().map(|(_, p)| p).collect();
        let outstanding = |id: &str| node.admission.outstanding(id);
        let sources = Sources {
            node_id: &node.id,
            local,
            peers: &peers,
            cluster: None,
            outstanding: &outstanding,
            local_queued: node.admission.queued() as u32,
            rtt: &|_| None,
        };
        candidates::build(MODEL, prefix, &sources)
    }

    fn index_of(&self, entry: usize, node: &str) -> usize {
        if node == LOCAL { entry } else { self.nodes.iter().position(|n| n.id == node).expect("a known node") }
    }

    /// Steps request `id` until it runs, waits or ends.
    fn drive(&mut self, id: usize) {
        loop {
            let Request { entry, turn, .. } = self.requests[id];
            if std::mem::take(&mut self.requests[id].granted) {
                self.start(entry, id);
                return;
            }
            let candidates = self.candidates(entry, turn);
            let now = self.now;
            let request = &mut self.requests[id];
            let step =
                self.nodes[entry].admission.step(&mut request.plan, candidates, &Context::default(), turn, None, now);
            match step {
                Step::Run { node, .. } => {
                    if std::mem::take(&mut self.requests[id].in_queue) {
                        // It leaves its place for a better one.
                        self.nodes[entry].admission.retain_waiters(|w| *w != id);
                    }
                    let target = self.index_of(entry, &node);
                    if self.cut[entry][target] {
                        // The forward finds the node gone: its slot comes back
                        // and the entry suspects it at once.
                        self.nodes[entry].admission.release(&node, now);
                        if let Some(peer) = self.nodes[entry].view.get_mut(&target) {
                            peer.liveness = Liveness::Suspect;
                        }
                        self.requests[id].plan.failed(
                            &node,
                            true,
                            ServeError::BackendUnreachable("connection lost".into()),
                        );
                        continue;
                    }
                    if target == entry {
                        self.start(target, id);
                    } else {
                        self.arrive(target, id);
                    }
                    return;
                }
                Step::Wait { until } => {
                    if self.requests[id].in_queue {
                        return; // It keeps its place.
                    }
                    let lane = Lane::new(&self.requests[id].tenant, LOCAL);
                    match self.nodes[entry].admission.enqueue(&lane, id, until) {
                        Ok(()) => self.requests[id].in_queue = true,
                        Err(_) => {
                            self.requests[id].status = Status::Failed(ServeError::Overloaded("queue full".into()));
                        }
                    }
                    return;
                }
                Step::Reserve { nodes } => {
                    if self.reserve(id, &nodes) {
                        return;
                    }
                }
                Step::Fail(err) => {
                    self.requests[id].status = Status::Failed(err);
                    return;
                }
                Step::Await { until } => {
                    self.requests[id].status = Status::Awaiting { until };
                    return;
                }
                Step::Cloud(_) | Step::Explain => unreachable!("no cloud and the model is served"),
            }
        }
    }

    /// Queues `id` at each of `nodes`, as the router's race does: a place
    /// that starts at once wins outright. `false`: every place failed (the
    /// plan decides again).
    fn reserve(&mut self, id: usize, nodes: &[String]) -> bool {
        let entry = self.requests[id].entry;
        let until = self.requests[id].plan.facts().deadline;
        let mut places = Vec::new();
        for node in nodes {
            let target = self.index_of(entry, node);
            if target == entry {
                if !self.requests[id].in_queue {
                    let lane = Lane::new(&self.requests[id].tenant, LOCAL);
                    if self.nodes[entry].admission.enqueue(&lane, id, until).is_err() {
                        continue;
                    }
                    self.requests[id].in_queue = true;
                }
                places.push(entry);
                continue;
            }
            if self.cut[entry][target] {
                self.nodes[entry].admission.release(node, self.now);
                let lost = ServeError::BackendUnreachable("connection lost".into());
                self.requests[id].plan.failed(node, true, lost);
                continue;
            }
            let t = &mut self.nodes[target];
            if t.admission.admit_forwarded(t.slots, t.running.len() as u32) {
                self.requests[id].status = Status::Reserved { places: places.clone() };
                self.win(id, target);
                return true;
            }
            let lane = Lane::new(&self.requests[id].tenant, &self.nodes[entry].id);
            if self.nodes[target].admission.enqueue(&lane, id, until).is_ok() {
                places.push(target);
            } else {
                self.nodes[entry].admission.release(node, self.now);
            }
        }
        if places.is_empty() {
            return false;
        }
        self.requests[id].status = Status::Reserved { places };
        true
    }

    /// `id` got a slot on `winner` (which holds it): it runs there, and its
    /// other places are cancelled.
    fn win(&mut self, id: usize, winner: usize) {
        let entry = self.requests[id].entry;
        if let Status::Reserved { places } = self.requests[id].status.clone() {
            for place in places.into_iter().filter(|p| *p != winner) {
                self.nodes[place].admission.retain_waiters(|w| *w != id);
                if place != entry {
                    let peer = self.nodes[place].id.clone();
                    self.nodes[entry].admission.release(&peer, self.now);
                }
            }
        }
        self.requests[id].in_queue = false;
        self.run_on(winner, id);
    }

    /// A forwarded request reaches `target`: a free slot, or its queue.
    fn arrive(&mut self, target: usize, id: usize) {
        let node = &mut self.nodes[target];
        if node.admission.admit_forwarded(node.slots, node.running.len() as u32) {
            self.run_on(target, id);
            return;
        }
        let entry = self.nodes[self.requests[id].entry].id.clone();
        let lane = Lane::new(&self.requests[id].tenant, &entry);
        let until = self.requests[id].plan.facts().deadline;
        self.requests[id].status = match self.nodes[target].admission.enqueue(&lane, id, until) {
            Ok(()) => Status::Queued { node: target },
            Err(_) => Status::Failed(ServeError::Overloaded("queue full".into())),
        };
    }

    /// Starts `id` on `target`, whose slot it holds.
    fn start(&mut self, target: usize, id: usize) {
        self.run_on(target, id);
    }

    fn run_on(&mut self, target: usize, id: usize) {
        let node = &mut self.nodes[target];
        assert!(node.running.len() < node.slots as usize, "{} was given more work than its slots", node.id);
        node.running.push((id, self.now + SERVICE));
        if let Some(turn) = self.requests[id].turn {
            match node.prefixes.iter_mut().find(|(key, _)| *key == turn.key) {
                Some((_, depth)) => *depth = (*depth).max(turn.depth),
                None => node.prefixes.push((turn.key, turn.depth)),
            }
        }
        self.requests[id].status = Status::Running { node: target, started: self.now };
    }

    /// Moves the clock by `dt`, finishing what ends by then.
    pub fn advance(&mut self, dt: Duration) {
        let end = self.now + dt;
        loop {
            let next = self
                .nodes
                .iter()
                .enumerate()
                .flat_map(|(n, node)| node.running.iter().map(move |(id, at)| (*at, n, *id)))
                .filter(|(at, _, _)| *at <= end)
                .min();
            let Some((at, n, id)) = next else { break };
            self.now = at;
            self.finish(n, id);
        }
        self.now = end;
        for id in 0..self.requests.len() {
            let expired = self.requests[id].plan.facts().deadline <= self.now;
            match self.requests[id].status {
                Status::Waiting if expired => self.drive(id),
                Status::Awaiting { until } if until <= self.now => self.drive(id),
                Status::Queued { .. } if expired => {
                    self.requests[id].status = Status::Failed(ServeError::Timeout("no slot freed".into()));
                }
                Status::Reserved { .. } if expired => {
                    let entry = self.requests[id].entry;
                    if let Status::Reserved { places } = self.requests[id].status.clone() {
                        for place in places.into_iter().filter(|p| *p != entry) {
                            let peer = self.nodes[place].id.clone();
                            self.nodes[entry].admission.release(&peer, self.now);
                        }
                    }
                    self.requests[id].status = Status::Failed(ServeError::Timeout("no slot freed".into()));
                }
                _ => {}
            }
        }
    }

    /// Request `id` ends on node `n`: the slot passes to the next request
    /// waiting there, in fair order; the entry's count for `n` drops and
    /// its waiters look again.
    fn finish(&mut self, n: usize, id: usize) {
        self.nodes[n].running.retain(|(r, _)| *r != id);
        self.requests[id].status = Status::Done { node: n, at: self.now };
        let entry = self.requests[id].entry;
        let now = self.now;
        if entry != n {
            let peer = self.nodes[n].id.clone();
            self.nodes[entry].admission.release(&peer, now);
        }
        while let Some(next) = self.nodes[n].admission.release(LOCAL, now) {
            match &self.requests[next].status {
                Status::Queued { node } if *node == n => self.run_on(n, next),
                Status::Reserved { places } if places.contains(&n) => self.win(next, n),
                Status::Waiting if self.requests[next].in_queue => {
                    self.requests[next].granted = true;
                    self.requests[next].in_queue = false;
                    self.drive(next);
                }
                // It gave up: the slot goes on to the next.
                _ => continue,
            }
            break;
        }
        if entry != n {
            self.recheck_all();
        }
    }

    fn status(&self, id: usize) -> &Status {
        &self.requests[id].status
    }

    fn done_at(&self, id: usize) -> Option<Instant> {
        match self.status(id) {
            Status::Done { at, .. } => Some(*at),
            _ => None,
        }
    }

    fn started(&self, id: usize) -> Option<Instant> {
        match self.status(id) {
            Status::Running { started, .. } => Some(*started),
            _ => None,
        }
    }

    fn ran_on(&self, id: usize) -> Option<usize> {
        match self.status(id) {
            Status::Running { node, .. } | Status::Done { node, .. } => Some(*node),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(key: u64, depth: u32) -> Option<Turn> {
        Some(Turn { key, depth })
    }

    const LONG: Duration = Duration::from_secs(60);

    fn running_on(c: &Cluster, id: usize, node: usize) -> bool {
        matches!(c.status(id), Status::Running { node: n, .. } if *n == node)
    }

    #[test]
    fn an_entry_node_never_sends_a_peer_more_than_its_slots_on_stale_gossip() {
        // n0 enters, n1 serves with 2 slots; gossip says n1 is idle and is
        // never refreshed: the third request waits in n1's queue (not in its
        // backend) and starts the instant a slot frees.
        let mut c = Cluster::new(&[0, 2]);
        c.gossip();
        let ids: Vec<usize> = (0..3).map(|_| c.submit(0, "t", LONG)).collect();
        assert!(running_on(&c, ids[0], 1) && running_on(&c, ids[1], 1));
        assert_eq!(c.status(ids[2]), &Status::Queued { node: 1 });
        c.advance(SERVICE);
        assert!(running_on(&c, ids[2], 1));
        assert_eq!(c.started(ids[2]), Some(c.now));
    }

    #[test]
    fn two_entry_nodes_racing_for_the_last_slot_queue_at_the_node_not_in_its_backend() {
        // n0 and n1 enter, n2 has one slot. Both see it free and both send:
        // the second waits in n2's queue and starts the instant the first
        // ends, with no gossip round in between.
        let mut c = Cluster::new(&[0, 0, 1]);
        c.gossip();
        let a = c.submit(0, "t", LONG);
        let b = c.submit(1, "t", LONG);
        assert!(running_on(&c, a, 2));
        assert_eq!(c.status(b), &Status::Queued { node: 2 });
        c.gossip();
        let later = c.submit(1, "t", LONG);
        assert_eq!(c.status(later), &Status::Queued { node: 2 });
        c.advance(SERVICE);
        assert!(running_on(&c, b, 2));
        c.advance(SERVICE);
        assert!(running_on(&c, later, 2));
        assert_eq!(c.started(later), Some(c.now));
    }

    #[test]
    fn a_node_dying_between_choice_and_forward_costs_one_attempt_then_is_avoided() {
        // n0 enters; n1 and n2 serve. n1 dies after the last gossip.
        let mut c = Cluster::new(&[0, 4, 4]);
        c.gossip();
        c.kill(1);
        let mut tried_dead = 0;
        for _ in 0..4 {
            let id = c.submit(0, "t", LONG);
            assert!(running_on(&c, id, 2), "{:?}", c.status(id));
            tried_dead += c.requests[id].plan.tried().len();
        }
        // At most the first request tried the dead node; then it was
        // suspect (a large penalty) and never chosen over a live one.
        assert!(tried_dead <= 1, "{tried_dead} attempts on the dead node");
        assert_eq!(c.nodes[0].view[&1].liveness, if tried_dead == 1 { Liveness::Suspect } else { Liveness::Alive });
    }

    #[test]
    fn every_node_failing_ends_with_the_last_error() {
        let mut c = Cluster::new(&[0, 1, 1]);
        c.gossip();
        c.kill(1);
        c.kill(2);
        let id = c.submit(0, "t", LONG);
        // (The harness gives no context: no node is expected back.)
        assert_eq!(c.status(id), &Status::Failed(ServeError::BackendUnreachable("connection lost".into())));
        assert_eq!(c.requests[id].plan.tried().len(), 2);
        // Both slots came back.
        assert_eq!(c.nodes[0].admission.outstanding("n1") + c.nodes[0].admission.outstanding("n2"), 0);
    }

    #[test]
    fn the_queue_serves_tenants_in_turn() {
        let mut c = Cluster::new(&[0, 1]);
        c.gossip();
        let heavy: Vec<usize> = (0..4).map(|_| c.submit(0, "heavy", LONG)).collect();
        let light = c.submit(0, "light", LONG);
        c.advance(10 * SERVICE);
        let mut order: Vec<usize> = heavy.iter().copied().chain([light]).collect();
        order.sort_by_key(|id| c.done_at(*id));
        assert_eq!(order, [heavy[0], heavy[1], light, heavy[2], heavy[3]]);
    }

    #[test]
    fn a_waiting_request_fails_at_its_deadline_and_the_queue_is_bounded() {
        let mut c = Cluster::with_queue(&[0, 1], 2);
        c.gossip();
        let running = c.submit(0, "t", LONG);
        let short = c.submit(0, "t", Duration::from_millis(500));
        let waits = c.submit(0, "t", LONG);
        let refused = c.submit(0, "t", LONG);
        // The third found n1's queue full: it tried n1 and has nowhere else.
        assert!(matches!(c.status(refused), Status::Failed(ServeError::Overloaded(_))), "{:?}", c.status(refused));
        c.advance(Duration::from_millis(600));
        assert!(matches!(c.status(short), Status::Failed(ServeError::Timeout(_))), "{:?}", c.status(short));
        assert!(running_on(&c, running, 1));
        c.advance(SERVICE);
        assert!(running_on(&c, waits, 1));
        assert_eq!(c.queue_capacity, 2);
    }

    #[test]
    fn a_slot_freed_by_a_nodes_own_client_goes_to_the_request_forwarded_first() {
        // n1 serves one slot and is busy with its own request; n0's request
        // waits in n1's queue, then n1's own client sends another. The
        // forwarded one came first, so it gets the slot, without waiting
        // for gossip.
        let mut c = Cluster::new(&[0, 1]);
        c.gossip();
        let own = c.submit(1, "t", LONG);
        assert!(running_on(&c, own, 1));
        c.gossip();
        let remote = c.submit(0, "t", LONG);
        assert_eq!(c.status(remote), &Status::Queued { node: 1 });
        let own_again = c.submit(1, "t", LONG);
        assert_eq!(c.status(own_again), &Status::Waiting);
        c.advance(SERVICE);
        assert!(running_on(&c, remote, 1));
        c.advance(SERVICE);
        assert!(running_on(&c, own_again, 1));
    }

    /// Closed-loop clients: each sends its next request when the last ends.
    fn closed_loop(c: &mut Cluster, clients: &[(usize, usize)], seconds: u64) -> Vec<usize> {
        let mut current: Vec<usize> = clients.iter().map(|(entry, _)| c.submit(*entry, "t", LONG)).collect();
        let mut completed = vec![0; clients.len()];
        for tick in 0..seconds * 10 {
            c.advance(SERVICE / 10);
            if tick % 10 == 0 {
                c.gossip();
            }
            for (i, (entry, _)) in clients.iter().enumerate() {
                if c.done_at(current[i]).is_some() {
                    completed[i] += 1;
                    current[i] = c.submit(*entry, "t", LONG);
                } else if let Status::Failed(err) = c.status(current[i]) {
                    panic!("client {i} failed: {err}");
                }
            }
        }
        completed
    }

    #[test]
    fn no_entry_node_starves_when_one_node_serves_everyone() {
        // The measured starvation case: n0 serves 4 slots, n1 forwards all;
        // 8 streaming clients at each. Each entry's share of completions
        // stays within 15% of its share of arrivals (a half).
        let mut c = Cluster::new(&[4, 0]);
        c.gossip();
        let clients: Vec<(usize, usize)> = (0..16).map(|i| (i % 2, i)).collect();
        let completed = closed_loop(&mut c, &clients, 60);
        let at = |entry: usize| {
            clients.iter().zip(&completed).filter(|((e, _), _)| *e == entry).map(|(_, n)| n).sum::<usize>()
        };
        let (here, forwarded) = (at(0), at(1));
        let share = forwarded as f64 / (here + forwarded) as f64;
        assert!((share - 0.5).abs() <= 0.5 * 0.15, "n0's clients {here}, n1's {forwarded}");
        // The backend never idled with work waiting: 4 slots x 60 s.
        assert!(here + forwarded >= 4 * 59, "{} completions", here + forwarded);
    }

    #[test]
    fn a_conversation_finds_its_cache_from_any_entry_node() {
        // n0 and n1 enter; n2 and n3 serve. Each conversation's later turns
        // enter at the other entry and still go where its first turn ran.
        let mut c = Cluster::new(&[0, 0, 2, 2]);
        c.gossip();
        let mut first_on = Vec::new();
        for conversation in 0..4u64 {
            let id = c.submit_turn(0, "t", turn(conversation, 100), LONG);
            first_on.push(c.ran_on(id).expect("runs"));
        }
        c.advance(SERVICE);
        c.gossip();
        for conversation in 0..4u64 {
            let id = c.submit_turn(1, "t", turn(conversation, 200), LONG);
            assert_eq!(c.ran_on(id), Some(first_on[conversation as usize]), "conversation {conversation}");
            c.advance(SERVICE);
            c.gossip();
        }
    }

    #[test]
    fn a_conversation_follows_its_deepest_turn_when_entries_remember_different_nodes() {
        // n0 sent turn 1 to n2. Turn 2 entered at n1 while n2 was busy and
        // ran on n3. Turn 3 enters at n0 again: n0 remembers n2, but n3
        // holds the deeper cache (turns 1 and 2), so it goes to n3.
        let mut c = Cluster::new(&[0, 0, 1, 1]);
        c.gossip();
        let first = c.submit_turn(0, "t", turn(7, 100), LONG);
        let on = c.ran_on(first).expect("runs");
        let other = if on == 2 { 3 } else { 2 };
        c.advance(SERVICE);
        // The first turn is done; its holder got another request meanwhile.
        let hog = c.submit(on, "t", LONG);
        c.gossip();
        let second = c.submit_turn(1, "t", turn(7, 200), LONG);
        assert_eq!(c.ran_on(second), Some(other), "the holder is busy: the second turn moves");
        c.advance(SERVICE);
        assert!(c.done_at(hog).is_some());
        c.gossip();
        let third = c.submit_turn(0, "t", turn(7, 300), LONG);
        assert_eq!(c.ran_on(third), Some(other), "n0 remembered n{on}, but n{other} holds turn 2");
    }

    #[test]
    fn a_hot_conversation_holder_does_not_collect_every_conversation() {
        // Every conversation last ran on n1; n2 is as fast. While n1's line
        // is short they stay; once it is long they go to n2 instead of
        // piling up (the cache-affinity death spiral).
        let mut c = Cluster::new(&[0, 1, 1]);
        c.nodes[1].prefixes = (0..20).map(|key| (key, 100)).collect();
        c.gossip();
        let ids: Vec<usize> = (0..20u64).map(|p| c.submit_turn(0, "t", turn(p, 200), LONG)).collect();
        // Bound to a node, or free to run at the first of its places.
        let on = |node: usize| {
            let at = |id: &usize| match c.status(*id) {
                Status::Running { node: n, .. } | Status::Queued { node: n } => *n == node,
                Status::Reserved { places } => places.contains(&node),
                _ => false,
            };
            ids.iter().filter(|id| at(id)).count()
        };
        let only_holder = ids.iter().filter(|id| matches!(c.status(**id), Status::Queued { node: 1 })).count();
        assert!(on(1) >= 2, "the holder keeps conversations while it can");
        assert!(on(2) >= 8, "{} of 20 may run on the other node", on(2));
        assert!(only_holder < 10, "{only_holder} of 20 wait for the holder alone");
    }

    #[test]
    fn a_request_for_a_busy_mesh_runs_at_whichever_of_its_places_frees_first() {
        // n1 and n2 serve one slot each and look alike; n2 got busy first,
        // so it frees first. The request entering at n0 is queued at both
        // (n1 first by id) and runs on n2 the instant n2 frees; its place
        // at n1 is cancelled and no count is left behind.
        let mut c = Cluster::new(&[0, 1, 1]);
        c.gossip();
        let on_n2 = c.submit(2, "t", LONG);
        c.advance(SERVICE / 2);
        let on_n1 = c.submit(1, "t", LONG);
        c.gossip();
        let late = c.submit(0, "t", LONG);
        assert_eq!(c.status(late), &Status::Reserved { places: vec![1, 2] });
        c.advance(SERVICE / 2);
        assert!(running_on(&c, late, 2), "{:?}", c.status(late));
        assert!(c.done_at(on_n2).is_some() && c.done_at(on_n1).is_none());
        assert_eq!(c.nodes[1].admission.queued(), 0, "its place at n1 was cancelled");
        assert_eq!(c.nodes[0].admission.outstanding("n1"), 0);
        c.advance(SERVICE);
        assert!(c.done_at(late).is_some() && c.done_at(on_n1).is_some());
        assert_eq!(c.nodes[0].admission.outstanding("n2"), 0);
        assert_eq!(c.nodes[1].running.len() + c.nodes[2].running.len(), 0);
    }
}
