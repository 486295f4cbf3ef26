//! A node's admission state: the scheduler (with its memory of where
//! conversations went), the requests this node has sent to each node, and
//! the fair queue of requests waiting for one of this node's own slots,
//! whether they entered here or were forwarded by a peer. Sans-IO: the
//! router holds it under one lock, the cluster harness drives it on a
//! virtual clock.
//!
//! The wait happens where the slot is: when every node that could serve a
//! request is busy, the entry node sends it to the one expected to free a
//! slot first, and that node queues it beside its own clients' requests.
//! A freed slot passes straight to the next request in fair order, so a
//! request that entered at the serving node gets no head start on one
//! forwarded to it, and none waits in a backend's own queue.

use std::collections::HashMap;
use std::time::Instant;

use super::plan::{Context, Plan, Step};
use super::prefix::Turn;
use super::queue::{FairQueue, Lane, QueueError};
use super::router::LOCAL;
use super::scheduler::{Candidate, Scheduler, SchedulerConfig};

/// Scheduler, queue and outstanding counts of one entry node. `W` is what
/// a waiting request leaves in the queue to be woken by.
#[derive(Debug)]
pub struct Admission<W> {
    scheduler: Scheduler,
    queue: FairQueue<W>,
    outstanding: HashMap<String, u32>,
}

impl<W> Admission<W> {
    /// Empty state; `seed` makes the scheduler's draws reproducible.
    pub fn new(config: SchedulerConfig, seed: u64, queue_capacity: usize) -> Admission<W> {
        Admission {
            scheduler: Scheduler::new(config, seed),
            queue: FairQueue::new(queue_capacity),
            outstanding: HashMap::new(),
        }
    }

    /// Requests this node has running on `node`.
    pub fn outstanding(&self, node: &str) -> u32 {
        self.outstanding.get(node).copied().unwrap_or(0)
    }

    /// Requests waiting for one of this node's slots.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Takes one of this node's `slots` for a forwarded request if one is
    /// free (`in_flight` is what the backend itself reports running).
    /// `false`: the request must queue.
    pub fn admit_forwarded(&mut self, slots: u32, in_flight: u32) -> bool {
        let free = self.outstanding(LOCAL).max(in_flight) < slots.max(1);
        if free {
            self.take(LOCAL);
        }
        free
    }

    /// One decision for `plan` among `candidates` (built with this state's
    /// outstanding counts). Choosing and taking the chosen node's slot
    /// happen in this one call, so concurrent requests cannot all see the
    /// last free slot and all take it. On [`Step::Run`] the slot is taken
    /// (on [`Step::Reserve`], each peer's): give it back with
    /// [`Admission::release`] when the attempt ends.
    pub fn step(
        &mut self,
        plan: &mut Plan,
        mut candidates: Vec<Candidate>,
        context: &Context,
        turn: Option<Turn>,
        output_tokens: Option<u32>,
        now: Instant,
    ) -> Step {
        candidates.retain(|c| !plan.excludes(&c.id));
        let choice = self.scheduler.choose(&candidates, turn, output_tokens);
        let step = plan.decide(choice, context, now);
        match &step {
            Step::Run { node, .. } => self.take(node),
            // Each peer place counts as sent there until it is cancelled;
            // this node's own place is a place in its queue.
            Step::Reserve { nodes } => nodes.iter().filter(|n| *n != LOCAL).for_each(|n| self.take(n)),
            _ => {}
        }
        step
    }

    /// Counts a request running on `node` that did not come through
    /// [`Admission::step`] (one a peer forwarded to this node).
    pub fn take(&mut self, node: &str) {
        // Runs on every request: the id is copied only for a new node.
        match self.outstanding.get_mut(node) {
            Some(count) => *count += 1,
            None => {
                self.outstanding.insert(node.to_string(), 1);
            }
        }
    }

    /// A request on `node` finished (or its attempt failed). When it held
    /// one of this node's own slots and a request waits for one, the slot
    /// passes to that request, the next in fair order, which is returned:
    /// it now holds the slot. A waiter that cannot take it (it gave up)
    /// must hand it on with another `release(LOCAL)`.
    pub fn release(&mut self, node: &str, now: Instant) -> Option<W> {
        if node == LOCAL {
            let mut expired = Vec::new();
            if let Some(next) = self.queue.pop(now, &mut expired) {
                return Some(next);
            }
        }
        if let Some(n) = self.outstanding.get_mut(node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.outstanding.remove(node);
            }
        }
        None
    }

    /// Queues a request in `lane` to wait for one of this node's slots
    /// until `deadline`.
    pub fn enqueue(&mut self, lane: &Lane, waiter: W, deadline: Instant) -> Result<(), QueueError> {
        self.queue.push(lane, waiter, deadline)
    }

    /// Drops waiters for which `keep` is false (they gave up).
    pub fn retain_waiters(&mut self, keep: impl FnMut(&W) -> bool) {
        self.queue.retain(keep);
    }
}
