//! A deterministic cluster harness, in the spirit of quinn's `Pair`: N
//! nodes, each with a simulated backend (slots and a fixed service time),
//! an [`Admission`] state as an entry node, and a view of its peers that
//! changes only when a gossip round delivers it, all on one virtual clock
//! with in-memory links that tests can cut. Requests are driven through
//! the same [`Plan`] and [`Admission::step`] the router uses, so
//! multi-node behaviour (stale gossip, entry nodes racing for a slot, a
//! node dying between choice and forward) is tested exactly, without
//! processes or sleeps.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use llmesh_proto::{ModelInfo, NodeState};

use super::admission::Admission;
use super::candidates::{self, LocalCapacity, Sources};
use super::plan::{Context, Facts, Plan, Step};
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
    Waiting,
    /// Sent to `node`; `started` once its backend gave it a slot.
    Running {
        node: usize,
        started: Option<Instant>,
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
    plan: Plan,
    status: Status,
}

struct Node {
    id: String,
    serves: bool,
    slots: u32,
    /// Requests on its backend, with their end time once started.
    running: Vec<(usize, Instant)>,
    /// Requests its backend holds beyond its slots.
    backlog: VecDeque<usize>,
    admission: Admission<usize>,
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
                backlog: VecDeque::new(),
                admission: Admission::new(SchedulerConfig::default(), i as u64 + 1, queue_capacity),
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
            in_flight: (node.running.len() + node.backlog.len()) as u32,
            models: if node.serves {
                vec![ModelInfo { name: MODEL.into(), loaded: true, ..ModelInfo::default() }]
            } else {
                vec![]
            },
            ..NodeState::default()
        }
    }

    /// Every node publishes its state; links that are not cut deliver it.
    /// Each entry node then wakes one waiting request, as the router does
    /// on a view change.
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
        for entry in 0..self.nodes.len() {
            if let Some(id) = self.nodes[entry].admission.next_waiter(self.now) {
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
        let facts = Facts {
            model: MODEL.into(),
            deadline: self.now + timeout,
            max_attempts: 3,
            max_expected_wait: Duration::from_secs(3600),
            cloud: None,
        };
        self.requests.push(Request { entry, tenant: tenant.into(), plan: Plan::new(facts), status: Status::Waiting });
        let id = self.requests.len() - 1;
        self.drive(id);
        id
    }

    fn candidates(&self, entry: usize) -> Vec<super::scheduler::Candidate> {
        let node = &self.nodes[entry];
        let local = node.serves.then(|| LocalCapacity {
            slots: node.slots,
            in_flight: (node.running.len() + node.backlog.len()) as u32,
            loaded: true,
            ttft_ms: None,
            decode_tps: None,
            holds_prefix: false,
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
            rtt: &|_| None,
        };
        candidates::build(MODEL, None, &sources)
    }

    /// Steps request `id` until it runs, waits or ends.
    fn drive(&mut self, id: usize) {
        loop {
            let entry = self.requests[id].entry;
            let candidates = self.candidates(entry);
            let now = self.now;
            let request = &mut self.requests[id];
            let step =
                self.nodes[entry].admission.step(&mut request.plan, candidates, &Context::default(), None, None, now);
            match step {
                Step::Run { node, .. } => {
                    let target = if node == LOCAL {
                        entry
                    } else {
                        self.nodes.iter().position(|n| n.id == node).expect("a known node")
                    };
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
                    self.start_on(target, id);
                    return;
                }
                Step::Wait { until } => {
                    let tenant = self.requests[id].tenant.clone();
                    self.requests[id].status = Status::Waiting;
                    if self.nodes[entry].admission.enqueue(&tenant, id, until).is_err() {
                        self.requests[id].status = Status::Failed(ServeError::Overloaded("queue full".into()));
                    }
                    return;
                }
                Step::Fail(err) => {
                    self.requests[id].status = Status::Failed(err);
                    return;
                }
                Step::Cloud(_) | Step::Explain => unreachable!("no cloud and the model is served"),
            }
        }
    }

    fn start_on(&mut self, target: usize, id: usize) {
        let node = &mut self.nodes[target];
        let started = if node.running.len() < node.slots as usize {
            node.running.push((id, self.now + SERVICE));
            Some(self.now)
        } else {
            node.backlog.push_back(id);
            None
        };
        self.requests[id].status = Status::Running { node: target, started };
    }

    /// Moves the clock by `dt`, finishing what ends by then; a finished
    /// request frees its entry's count and wakes that entry's next waiter.
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
            if self.requests[id].status == Status::Waiting && self.requests[id].plan.facts().deadline <= self.now {
                self.drive(id);
            }
        }
    }

    fn finish(&mut self, n: usize, id: usize) {
        let node = &mut self.nodes[n];
        node.running.retain(|(r, _)| *r != id);
        if let Some(next) = node.backlog.pop_front() {
            node.running.push((next, self.now + SERVICE));
            if let Status::Running { started, .. } = &mut self.requests[next].status {
                *started = Some(self.now);
            }
        }
        self.requests[id].status = Status::Done { node: n, at: self.now };
        let entry = self.requests[id].entry;
        let node_id = if entry == n { LOCAL.to_string() } else { self.nodes[n].id.clone() };
        if let Some(waiter) = self.nodes[entry].admission.release(&node_id, self.now) {
            self.drive(waiter);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn an_entry_node_never_sends_a_peer_more_than_its_slots_on_stale_gossip() {
        // n0 enters, n1 serves with 2 slots; gossip says n1 is idle and is
        // never refreshed: n0's own counts stop it at two.
        let mut c = Cluster::new(&[0, 2]);
        c.gossip();
        let ids: Vec<usize> = (0..3).map(|_| c.submit(0, "t", LONG)).collect();
        assert!(matches!(c.status(ids[0]), Status::Running { node: 1, started: Some(_) }));
        assert!(matches!(c.status(ids[1]), Status::Running { node: 1, started: Some(_) }));
        assert_eq!(c.status(ids[2]), &Status::Waiting);
        // The first finishes: the waiter runs at that very instant.
        c.advance(SERVICE);
        assert!(matches!(c.status(ids[2]), Status::Running { node: 1, started: Some(_) }));
        assert_eq!(c.nodes[1].backlog.len(), 0);
    }

    #[test]
    fn two_entry_nodes_racing_for_the_last_slot_both_take_it_until_gossip_says_otherwise() {
        // n0 and n1 enter, n2 has one slot. Both see it free and both send:
        // the backend holds one beyond its slots (what mesh-wide queueing
        // must remove). After a gossip round neither sends more.
        let mut c = Cluster::new(&[0, 0, 1]);
        c.gossip();
        let a = c.submit(0, "t", LONG);
        let b = c.submit(1, "t", LONG);
        assert!(matches!(c.status(a), Status::Running { node: 2, started: Some(_) }));
        assert!(matches!(c.status(b), Status::Running { node: 2, started: None }));
        assert_eq!(c.nodes[2].backlog.len(), 1);
        c.gossip();
        let later = c.submit(1, "t", LONG);
        assert_eq!(c.status(later), &Status::Waiting);
        // a finishes, b starts on the backend; n1's own request is still
        // out, so its waiter stays put.
        c.advance(SERVICE);
        assert!(matches!(c.status(b), Status::Running { node: 2, started: Some(_) }));
        assert_eq!(c.status(later), &Status::Waiting);
        // b ends and frees n1's count, but n2's last gossip still says busy:
        // the waiter runs after the next round, not before.
        c.advance(SERVICE);
        assert_eq!(c.status(later), &Status::Waiting);
        c.gossip();
        assert!(matches!(c.status(later), Status::Running { node: 2, started: Some(_) }));
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
            assert!(matches!(c.status(id), Status::Running { node: 2, .. }), "{:?}", c.status(id));
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
        assert!(matches!(c.status(refused), Status::Failed(ServeError::Overloaded(_))));
        c.advance(Duration::from_millis(600));
        assert!(matches!(c.status(short), Status::Failed(ServeError::Timeout(_))), "{:?}", c.status(short));
        assert!(matches!(c.status(running), Status::Running { .. }));
        c.advance(SERVICE);
        assert!(matches!(c.status(waits), Status::Running { node: 1, .. }));
        assert_eq!(c.queue_capacity, 2);
    }

    #[test]
    fn a_slot_freed_on_another_entry_reaches_waiters_through_gossip() {
        // n1 serves one slot and is busy with its own request; n0's request
        // waits and runs after the gossip that shows n1 free again.
        let mut c = Cluster::new(&[0, 1]);
        c.gossip();
        let own = c.submit(1, "t", LONG);
        assert!(matches!(c.status(own), Status::Running { node: 1, .. }));
        c.gossip();
        let remote = c.submit(0, "t", LONG);
        assert_eq!(c.status(remote), &Status::Waiting);
        c.advance(SERVICE);
        // n1's own count is free, but n0 has not heard yet.
        assert_eq!(c.status(remote), &Status::Waiting);
        c.gossip();
        assert!(matches!(c.status(remote), Status::Running { node: 1, started: Some(_) }));
    }
}
