//! What routing counts, for `/metrics` (the agent installs the exporter).

use std::time::Duration;

use metrics::{counter, histogram};

/// Time a request waited in the entry queue.
pub fn queue_wait(wait: Duration) {
    histogram!("llmesh_queue_wait_seconds").record(wait.as_secs_f64());
}

/// Why the scheduler picked a node.
pub fn scheduled(reason: &'static str) {
    counter!("llmesh_scheduler_decisions_total", "reason" => reason).increment(1);
}

/// A forwarded attempt that failed before its first byte.
pub fn forward_error(peer: &str) {
    counter!("llmesh_forward_errors_total", "peer" => peer.to_string()).increment(1);
}
