//! Stall detection: a backend that stops answering is found in about a
//! second, not at the response timeout.
//!
//! A request that has no first byte (or a stream with no next chunk) after
//! `probe_after` makes the agent ask the backend a cheap question (its
//! version, or its model list) with a short timeout. A backend that answers is busy, not
//! stalled (a long prompt's evaluation sends nothing for a while), and the
//! request keeps waiting up to its outer bound (`backend.response_timeout`,
//! `backend.idle_timeout`); one that does not is stalled: the request fails
//! over before its first byte, or its stream ends with a clean error, and
//! the backend is marked unhealthy (so peers stop sending work) until its
//! next successful poll.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use llmesh_mesh::{BodyStream, ServeError, StreamError};

use crate::backend::Backend;
use crate::inventory::InventoryHandle;

/// When to suspect a stall and how long a probe may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallConfig {
    /// Silence after which the backend is probed.
    pub probe_after: Duration,
    /// How long the probe may take before the backend counts as stalled.
    pub probe_timeout: Duration,
}

impl Default for StallConfig {
    fn default() -> Self {
        StallConfig { probe_after: Duration::from_secs(1), probe_timeout: Duration::from_secs(2) }
    }
}

/// Probes a backend and marks it unhealthy when it does not answer.
#[derive(Clone)]
pub struct StallWatch {
    backend: Arc<dyn Backend>,
    inventory: InventoryHandle,
    config: StallConfig,
}

impl StallWatch {
    /// A watch over `backend`, whose health `inventory` publishes.
    pub fn new(backend: Arc<dyn Backend>, inventory: InventoryHandle, config: StallConfig) -> StallWatch {
        StallWatch { backend, inventory, config }
    }

    /// Whether the backend answers a probe in time; marks it unhealthy when
    /// it does not.
    async fn answers(&self, silent_for: Duration) -> bool {
        let probe = tokio::time::timeout(self.config.probe_timeout, self.backend.probe()).await;
        if matches!(probe, Ok(Ok(_))) {
            return true;
        }
        let why = format!(
            "stalled: nothing for {:.1} s and no answer to a health probe within {:?}",
            silent_for.as_secs_f64(),
            self.config.probe_timeout
        );
        tracing::warn!(backend = self.backend.kind().as_str(), reason = %why, "the backend stalled; marked unhealthy until it answers again");
        self.inventory.mark_unhealthy(why);
        false
    }

    /// Waits for `head` (a backend call that returns once its response
    /// head arrives) until `budget` runs out, failing early when the
    /// backend stalls.
    pub async fn first_byte<T>(
        &self,
        head: impl Future<Output = Result<T, ServeError>>,
        budget: Duration,
    ) -> Result<T, ServeError> {
        let started = Instant::now();
        let deadline = started + budget;
        tokio::pin!(head);
        let mut probe_at = started + self.config.probe_after;
        loop {
            tokio::select! {
                result = &mut head => return result,
                () = tokio::time::sleep_until(probe_at.min(deadline).into()) => {}
            }
            if Instant::now() >= deadline {
                return Err(ServeError::Timeout(format!(
                    "the {} backend sent no response within {budget:?}",
                    self.backend.kind().as_str()
                )));
            }
            if !self.answers(started.elapsed()).await {
                return Err(ServeError::BackendUnavailable(format!(
                    "the {} backend stopped answering (no response after {:.1} s and no answer to a health probe)",
                    self.backend.kind().as_str(),
                    started.elapsed().as_secs_f64()
                )));
            }
            probe_at = Instant::now() + self.config.probe_after;
        }
    }

    /// `body` ended with an error as soon as the backend stalls in the
    /// middle of it (a chunk overdue and a probe unanswered). One timer for
    /// the whole body, moved on only when it fires: no timer work per chunk.
    pub fn watch_body(&self, body: BodyStream) -> BodyStream {
        let watch = self.clone();
        Box::pin(async_stream::stream! {
            let mut body = body;
            let quiet = watch.config.probe_after;
            let mut last = Instant::now();
            let timer = tokio::time::sleep(quiet);
            tokio::pin!(timer);
            loop {
                tokio::select! {
                    biased;
                    next = body.next() => match next {
                        Some(chunk) => {
                            last = Instant::now();
                            let failed = chunk.is_err();
                            yield chunk;
                            if failed {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = &mut timer => {
                        let due = last + quiet;
                        if Instant::now() < due {
                            timer.as_mut().reset(due.into());
                            continue;
                        }
                        if !watch.answers(last.elapsed()).await {
                            yield Err(StreamError::Backend(format!(
                                "the backend stalled mid-response: nothing for {:.1} s and no answer to a health probe",
                                last.elapsed().as_secs_f64()
                            )));
                            return;
                        }
                        timer.as_mut().reset((Instant::now() + quiet).into());
                    }
                }
            }
        })
    }
}
