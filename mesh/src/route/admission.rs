//! The entry node's admission state: the scheduler (with its memory of
//! where conversations went), the fair queue of waiting requests, and the
//! requests this node has running on each node. Sans-IO: the router holds
//! it under one lock, the cluster harness drives it on a virtual clock.

use std::collections::HashMap;
use std::time::Instant;

use super::plan::{Context, Plan, Step};
use super::queue::{FairQueue, QueueError};
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

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// One decision for `plan` among `candidates` (built with this state's
    /// outstanding counts). Choosing and taking the chosen node's slot
    /// happen in this one call, so concurrent requests cannot all see the
    /// last free slot and all take it. On [`Step::Run`] the slot is taken:
    /// give it back with [`Admission::release`] when the attempt ends.
    pub fn step(
        &mut self,
        plan: &mut Plan,
        mut candidates: Vec<Candidate>,
        context: &Context,
        prefix: Option<u64>,
        output_tokens: Option<u32>,
        now: Instant,
    ) -> Step {
        candidates.retain(|c| !plan.excludes(&c.id));
        let choice = self.scheduler.choose(&candidates, prefix, output_tokens);
        let step = plan.decide(choice, context, now);
        if let Step::Run { node, .. } = &step {
            self.take(node);
        }
        step
    }

    /// Counts a request running on `node` that did not come through
    /// [`Admission::step`] (one a peer forwarded to this node).
    pub fn take(&mut self, node: &str) {
        *self.outstanding.entry(node.to_string()).or_default() += 1;
    }

    /// A request on `node` finished (or its attempt failed): its slot is
    /// free. Returns the waiting request to wake, the next in fair order.
    pub fn release(&mut self, node: &str, now: Instant) -> Option<W> {
        if let Some(n) = self.outstanding.get_mut(node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.outstanding.remove(node);
            }
        }
        self.next_waiter(now)
    }

    /// Queues a waiting request of `tenant` until `deadline`.
    pub fn enqueue(&mut self, tenant: &str, waiter: W, deadline: Instant) -> Result<(), QueueError> {
        self.queue.push(tenant, waiter, deadline)
    }

    /// The next waiting request in fair order (one per tenant in turn),
    /// dropping those whose deadline passed: something changed that may let
    /// it run (a slot freed here, or a peer's gossip).
    pub fn next_waiter(&mut self, now: Instant) -> Option<W> {
        let mut expired = Vec::new();
        self.queue.pop(now, &mut expired)
    }

    /// Drops waiters for which `keep` is false (they gave up).
    pub fn retain_waiters(&mut self, keep: impl FnMut(&W) -> bool) {
        self.queue.retain(keep);
    }
}
