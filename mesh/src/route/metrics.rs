//! What routing counts, for `/metrics` (the agent installs the exporter).

use std::time::Duration;

use metrics::{Counter, counter, histogram};

use super::scheduler::Reason;

/// Time a request waited in the entry queue.
pub fn queue_wait(wait: Duration) {
    histogram!("llmesh_queue_wait_seconds").record(wait.as_secs_f64());
}

/// The scheduler's decisions by reason, one counter handle per reason,
/// registered when the router is made (the agent installs its recorder
/// first): registering on every request built and looked up the label
/// set each time, about a thousand instructions.
pub(crate) struct Decisions([Counter; Reason::ALL.len()]);

impl Decisions {
    pub(crate) fn new() -> Decisions {
        Decisions(Reason::ALL.map(|reason| counter!("llmesh_scheduler_decisions_total", "reason" => reason.as_str())))
    }

    /// Counts one decision.
    pub(crate) fn count(&self, reason: Reason) {
        self.0[reason as usize].increment(1);
    }
}

/// A forwarded attempt that failed before its first byte.
pub fn forward_error(peer: &str) {
    counter!("llmesh_forward_errors_total", "peer" => peer.to_string()).increment(1);
}
