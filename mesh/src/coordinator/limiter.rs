//! Sliding one-minute windows of requests and tokens per API key, kept by
//! the Raft leader so that a limit holds across every entry node. Plain
//! data with the clock passed in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// The answer to one request for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may run.
    pub allowed: bool,
    /// Requests left in the window after this one (`u64::MAX`: no limit).
    pub remaining_requests: u64,
    /// Tokens left in the window (`u64::MAX`: no limit).
    pub remaining_tokens: u64,
    /// When a refused request may try again.
    pub retry_after: Duration,
    /// Until the oldest counted request leaves the window.
    pub reset_requests: Duration,
    /// Until the oldest counted tokens leave the window.
    pub reset_tokens: Duration,
}

#[derive(Debug, Default)]
struct KeyWindow {
    requests: VecDeque<Instant>,
    tokens: VecDeque<(Instant, u64)>,
    token_sum: u64,
}

impl KeyWindow {
    fn prune(&mut self, now: Instant) {
        while self.requests.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            self.requests.pop_front();
        }
        while let Some((t, n)) = self.tokens.front().copied() {
            if now.duration_since(t) < WINDOW {
                break;
            }
            self.tokens.pop_front();
            self.token_sum = self.token_sum.saturating_sub(n);
        }
    }

    fn until_expiry(at: Option<Instant>, now: Instant) -> Duration {
        at.map_or(Duration::ZERO, |t| (t + WINDOW).saturating_duration_since(now))
    }
}

/// Per-key windows.
#[derive(Debug, Default)]
pub struct Limiter {
    keys: HashMap<String, KeyWindow>,
}

impl Limiter {
    /// Admits one request of `key` under `rpm` requests and `tpm` tokens
    /// per minute (0: unlimited), counting it when admitted.
    pub fn acquire(&mut self, key: &str, rpm: u64, tpm: u64, now: Instant) -> Decision {
        let window = self.keys.entry(key.to_string()).or_default();
        window.prune(now);
        let reset_requests = KeyWindow::until_expiry(window.requests.front().copied(), now);
        let reset_tokens = KeyWindow::until_expiry(window.tokens.front().map(|(t, _)| *t), now);
        let over_requests = rpm > 0 && window.requests.len() as u64 >= rpm;
        let over_tokens = tpm > 0 && window.token_sum >= tpm;
        let remaining = |limit: u64, used: u64| if limit == 0 { u64::MAX } else { limit.saturating_sub(used) };
        if over_requests || over_tokens {
            let retry_after = match (over_requests, over_tokens) {
                (true, true) => reset_requests.max(reset_tokens),
                (true, false) => reset_requests,
                _ => reset_tokens,
            };
            return Decision {
                allowed: false,
                remaining_requests: remaining(rpm, window.requests.len() as u64),
                remaining_tokens: remaining(tpm, window.token_sum),
                retry_after: retry_after.max(Duration::from_millis(1)),
                reset_requests,
                reset_tokens,
            };
        }
        window.requests.push_back(now);
        Decision {
            allowed: true,
            remaining_requests: remaining(rpm, window.requests.len() as u64),
            remaining_tokens: remaining(tpm, window.token_sum),
            retry_after: Duration::ZERO,
            reset_requests: KeyWindow::until_expiry(window.requests.front().copied(), now),
            reset_tokens,
        }
    }

    /// Counts `tokens` a finished request of `key` used.
    pub fn record_tokens(&mut self, key: &str, tokens: u64, now: Instant) {
        let window = self.keys.entry(key.to_string()).or_default();
        window.prune(now);
        window.tokens.push_back((now, tokens));
        window.token_sum += tokens;
    }

    /// Drops keys with nothing in their window (bounded memory).
    pub fn sweep(&mut self, now: Instant) {
        self.keys.retain(|_, w| {
            w.prune(now);
            !w.requests.is_empty() || !w.tokens.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_per_minute_hold_and_free_up_as_the_window_slides() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        for i in 0..10 {
            let d = limiter.acquire("k", 10, 0, t0 + Duration::from_secs(i));
            assert!(d.allowed);
            assert_eq!(d.remaining_requests, 9 - i);
        }
        let refused = limiter.acquire("k", 10, 0, t0 + Duration::from_secs(30));
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(30), "the first request leaves the window at 60 s");
        assert!(limiter.acquire("k", 10, 0, t0 + Duration::from_secs(60)).allowed);
        assert!(limiter.acquire("other", 10, 0, t0 + Duration::from_secs(30)).allowed, "keys are separate");
    }

    #[test]
    fn tokens_per_minute_refuse_once_spent() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        assert!(limiter.acquire("k", 0, 100, t0).allowed);
        limiter.record_tokens("k", 120, t0);
        let refused = limiter.acquire("k", 0, 100, t0 + Duration::from_secs(1));
        assert!(!refused.allowed);
        assert_eq!(refused.remaining_tokens, 0);
        assert!(limiter.acquire("k", 0, 100, t0 + Duration::from_secs(61)).allowed);
        limiter.sweep(t0 + Duration::from_secs(200));
        assert!(limiter.keys.is_empty());
    }

    proptest! {
        /// However requests arrive, no 60-second span admits more than the limit.
        #[test]
        fn never_more_than_the_limit_in_any_window(gaps in prop::collection::vec(0u64..20_000, 1..200), rpm in 1u64..20) {
            let mut limiter = Limiter::default();
            let t0 = Instant::now();
            let mut at = t0;
            let mut admitted: Vec<Instant> = Vec::new();
            for gap in gaps {
                at += Duration::from_millis(gap);
                if limiter.acquire("k", rpm, 0, at).allowed {
                    admitted.push(at);
                }
            }
            for (i, start) in admitted.iter().enumerate() {
                let within = admitted[i..].iter().take_while(|t| t.duration_since(*start) < WINDOW).count() as u64;
                prop_assert!(within <= rpm);
            }
        }
    }
}
