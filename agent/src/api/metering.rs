//! What happens when a response ends (or its client goes away): tokens
//! counted from the relayed bytes go to the usage ledger, the leader's
//! tokens-per-minute window, and the metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use llmesh_mesh::Coordinator;

use crate::limits::UsageBatcher;
use crate::metrics::{RequestOutcome, request};
use crate::usage::UsageMeter;

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
    /// This node's running totals, gossiped for the mesh's figures.
    pub entry: Arc<crate::entry_figures::EntryFigures>,
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
        a.entry.record(a.ttft, tokens.completion, outcome == "ok");
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

/// The relayed body with the meter alongside; it forwards the inner
/// body's size hint, so a response of known length keeps its
/// Content-Length (no chunked encoding, no extra write).
struct Metered {
    inner: Body,
    meter: Meter,
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(meter)) = (frame.data_ref(), this.meter.meter.as_mut()) {
                    meter.push(data);
                }
                // hyper stops polling a body that says it has ended.
                if this.inner.is_end_stream() {
                    this.meter.ended = true;
                }
            }
            Poll::Ready(None) => this.meter.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps `response`'s body so that `accounting` runs when it ends (or is
/// dropped because the client went away).
pub fn account(response: Response, accounting: Accounting, prompt_bytes: usize) -> Response {
    let (parts, inner) = response.into_parts();
    let meter = Meter { accounting, meter: Some(UsageMeter::new(prompt_bytes)), ended: false };
    Response::from_parts(parts, Body::new(Metered { inner, meter }))
}

/// Records a request that failed before any backend answered. `model` is
/// a label only once the mesh found it served (a failure on the way to a
/// node): a client could send any number of made-up names.
pub fn refused(code: &str, model: Option<&str>, key: Option<&str>, started: Instant) {
    request(&RequestOutcome {
        model: model.unwrap_or("none"),
        route: "none",
        outcome: code,
        key: key.unwrap_or("anonymous"),
        ttft: started.elapsed(),
        total: started.elapsed(),
        tokens_in: 0,
        tokens_out: 0,
    });
}
