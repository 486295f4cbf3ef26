//! What happens when a response ends (or its client goes away): tokens
//! counted from the relayed bytes go to the usage ledger, the leader's
//! tokens-per-minute window, and the metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use futures::StreamExt;
use llmesh_mesh::Coordinator;

use crate::cloud::usage::UsageMeter;
use crate::limits::UsageBatcher;
use crate::metrics::{RequestOutcome, request};

/// Everything needed to account for one request once its body ends.
pub struct Accounting {
    /// Model as routed.
    pub model: String,
    /// Route label (`local`, `peer`, `cloud:<provider>`).
    pub route: String,
    /// API key id, when the caller has one.
    pub key: Option<String>,
    /// Whether the key has a tokens-per-minute limit (report to the leader).
    pub report_tokens: bool,
    /// When the request arrived.
    pub started: Instant,
    /// Time to the response head.
    pub ttft: Duration,
    /// The response status.
    pub status: u16,
    /// Ledger feed.
    pub usage: Arc<UsageBatcher>,
    /// Leader link.
    pub coordinator: Option<Coordinator>,
}

struct Meter {
    accounting: Accounting,
    meter: Option<UsageMeter>,
    ended: bool,
}

impl Drop for Meter {
    fn drop(&mut self) {
        let tokens = self.meter.take().map(UsageMeter::finish).unwrap_or_default();
        let a = &self.accounting;
        let key = a.key.as_deref().unwrap_or("anonymous");
        let outcome = match (self.ended, a.status) {
            (false, _) => "cancelled",
            (true, 200..=399) => "ok",
            (true, 400..=499) => "client_error",
            _ => "server_error",
        };
        request(&RequestOutcome {
            model: &a.model,
            route: &a.route,
            outcome,
            key,
            ttft: a.ttft,
            total: a.started.elapsed(),
            tokens_in: tokens.prompt,
            tokens_out: tokens.completion,
        });
        if let Some(id) = &a.key {
            let total = tokens.prompt + tokens.completion;
            a.usage.record(id, total);
            if a.report_tokens
                && let Some(coordinator) = &a.coordinator
            {
                coordinator.report_tokens(id, total);
            }
        }
    }
}

/// Wraps `response`'s body so that `accounting` runs when it ends.
pub fn account(response: Response, accounting: Accounting, prompt_bytes: usize) -> Response {
    let (parts, body) = response.into_parts();
    let mut body = body.into_data_stream();
    let mut meter = Meter { accounting, meter: Some(UsageMeter::new(prompt_bytes)), ended: false };
    let stream = async_stream::stream! {
        while let Some(chunk) = body.next().await {
            if let (Ok(bytes), Some(m)) = (&chunk, meter.meter.as_mut()) {
                m.push(bytes);
            }
            yield chunk;
        }
        meter.ended = true;
        drop(meter);
    };
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Records a request refused before any backend answered. Its model is
/// not a label: a client could send any number of made-up names.
pub fn refused(code: &str, key: Option<&str>, started: Instant) {
    request(&RequestOutcome {
        model: "none",
        route: "none",
        outcome: code,
        key: key.unwrap_or("anonymous"),
        ttft: started.elapsed(),
        total: started.elapsed(),
        tokens_in: 0,
        tokens_out: 0,
    });
}
