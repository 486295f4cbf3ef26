//! Per-key limits at the entry node: requests and tokens per minute across
//! the mesh (decided by the Raft leader, see `llmesh_mesh::coordinator::limits`),
//! and token budgets per day or month from the replicated usage ledger,
//! which every entry node feeds with batched proposals.
//!
//! Worst-case overshoot, documented for operators: rate limits are exact
//! while a leader is reachable (one window for the whole mesh); during a
//! leader change each node limits on its own, so up to one limit per node
//! may pass in that minute. Tokens per minute count tokens of finished
//! requests, so requests already running when the limit is reached still
//! finish. Budgets see other nodes' use up to one flush interval (2 s) late
//! plus the requests running at that moment.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use llmesh_mesh::Coordinator;
use llmesh_proto::{Command, KeyUsageDelta, RecordUsage, command};
use tokio_util::sync::CancellationToken;

use crate::api::access::Caller;
use crate::error::ApiError;

/// How often each node proposes the usage it has seen.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// The UTC day (`2026-11-24`) and month (`2026-11`) at `now`.
pub fn periods(now: SystemTime) -> (String, String) {
    let text = humantime::format_rfc3339_seconds(now).to_string();
    (text[..10].to_string(), text[..7].to_string())
}

/// Time until the current UTC day or month ends.
fn until_period_end(period: &str, now: SystemTime) -> Duration {
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let day_left = 86_400 - secs % 86_400;
    if period != "month" {
        return Duration::from_secs(day_left);
    }
    // Walk forward day by day to the 1st: at most 31 steps.
    let mut at = secs + day_left;
    for _ in 0..31 {
        let day = humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(at)).to_string();
        if &day[8..10] == "01" {
            break;
        }
        at += 86_400;
    }
    Duration::from_secs(at - secs)
}

fn openai_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs >= 60.0 { format!("{}m{}s", (secs / 60.0) as u64, (secs % 60.0) as u64) } else { format!("{secs:.3}s") }
}

/// Usage seen here and not yet in the ledger.
#[derive(Debug, Default)]
pub struct UsageBatcher {
    pending: Mutex<HashMap<String, (u64, u64)>>,
}

impl UsageBatcher {
    /// Counts a finished request of `key`.
    pub fn record(&self, key: &str, tokens: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = pending.entry(key.to_string()).or_default();
        entry.0 += tokens;
        entry.1 += 1;
    }

    fn pending_tokens(&self, key: &str) -> u64 {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).get(key).map_or(0, |p| p.0)
    }

    /// Proposes the pending usage every [`FLUSH_EVERY`] until `shutdown`
    /// (and once more then). A batch that does not commit is kept.
    pub async fn run(self: std::sync::Arc<Self>, coordinator: Coordinator, shutdown: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                () = shutdown.cancelled() => true,
                () = tokio::time::sleep(FLUSH_EVERY) => false,
            };
            let batch: HashMap<String, (u64, u64)> =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
            if !batch.is_empty() {
                let (day, month) = periods(SystemTime::now());
                let usage = batch
                    .iter()
                    .map(|(key, (tokens, requests))| KeyUsageDelta {
                        key_id: key.clone(),
                        tokens: *tokens,
                        requests: *requests,
                    })
                    .collect();
                let command = Command { kind: Some(command::Kind::RecordUsage(RecordUsage { day, month, usage })) };
                if let Err(err) = coordinator.propose(command).await {
                    tracing::warn!(error = %err, "usage batch not committed; keeping it for the next flush");
                    let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                    for (key, (tokens, requests)) in batch {
                        let entry = pending.entry(key).or_default();
                        entry.0 += tokens;
                        entry.1 += requests;
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}

/// Rate-limit headers for a response, as OpenAI sends them.
pub type RateHeaders = Vec<(&'static str, String)>;

/// Admits a request of `caller` or refuses it with 429 (rate limit) or
/// 429 `insufficient_quota` (budget spent); returns the headers to send.
pub async fn admit(
    caller: &Caller,
    coordinator: Option<&Coordinator>,
    batcher: &UsageBatcher,
) -> Result<RateHeaders, ApiError> {
    let (Caller::Key { id, .. }, Some(coordinator)) = (caller, coordinator) else { return Ok(Vec::new()) };
    let state = coordinator.state();
    let Some(limits) = state.keys.get(id).and_then(|k| k.limits.clone()) else { return Ok(Vec::new()) };
    if limits.token_budget > 0 {
        let now = SystemTime::now();
        let (day, month) = periods(now);
        let period = if limits.budget_period == "month" { month } else { day };
        let used = state.tokens_used(id, &period) + batcher.pending_tokens(id);
        if used >= limits.token_budget {
            let wait = until_period_end(&limits.budget_period, now);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                format!(
                    "API key {id} has used its budget of {} tokens for {period} ({used} used); it resets in {}",
                    limits.token_budget,
                    humantime::format_duration(Duration::from_secs(wait.as_secs()))
                ),
            )
            .with_headers(vec![("retry-after", wait.as_secs().max(1).to_string())]));
        }
    }
    let (rpm, tpm) = (limits.requests_per_minute, limits.tokens_per_minute);
    if rpm == 0 && tpm == 0 {
        return Ok(Vec::new());
    }
    let decision = coordinator.acquire(id, rpm, tpm).await;
    let mut headers = Vec::new();
    if rpm > 0 {
        headers.push(("x-ratelimit-limit-requests", rpm.to_string()));
        headers.push(("x-ratelimit-remaining-requests", decision.remaining_requests.to_string()));
        headers.push(("x-ratelimit-reset-requests", openai_duration(decision.reset_requests)));
    }
    if tpm > 0 {
        headers.push(("x-ratelimit-limit-tokens", tpm.to_string()));
        headers.push(("x-ratelimit-remaining-tokens", decision.remaining_tokens.to_string()));
        headers.push(("x-ratelimit-reset-tokens", openai_duration(decision.reset_tokens)));
    }
    if decision.allowed {
        return Ok(headers);
    }
    let what = if rpm > 0 && decision.remaining_requests == 0 {
        format!("{rpm} requests per minute")
    } else {
        format!("{tpm} tokens per minute")
    };
    headers.push(("retry-after", decision.retry_after.as_secs_f64().ceil().max(1.0).to_string()));
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        format!(
            "API key {id} is limited to {what} across the mesh; retry in {:.1} s",
            decision.retry_after.as_secs_f64()
        ),
    )
    .with_headers(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_day_and_month() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_478_400 + 3_600); // 2026-11-24T01:00:00Z
        assert_eq!(periods(at), ("2026-11-24".to_string(), "2026-11".to_string()));
        assert_eq!(until_period_end("day", at), Duration::from_secs(23 * 3600));
        assert_eq!(until_period_end("month", at), Duration::from_secs(6 * 86_400 + 23 * 3600), "to 2026-12-01");
    }

    #[test]
    fn reset_durations_look_like_openais() {
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.500s");
        assert_eq!(openai_duration(Duration::from_secs(125)), "2m5s");
    }
}
