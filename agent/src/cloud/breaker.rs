//! A circuit breaker per cloud provider: after `threshold` failures in a
//! row it opens and the provider is skipped; after `cooldown` one probe
//! request goes through (half-open) and its outcome closes or re-opens it.
//! Plain data with the clock passed in.

use std::time::{Duration, Instant};

/// The breaker's state, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests skip this provider.
    Open,
    /// One probe is allowed (or running).
    HalfOpen,
}

impl BreakerState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

/// One provider's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probe_started: Option<Instant>,
    opened: u64,
}

impl Breaker {
    /// Opens after `threshold` failures in a row; probes after `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker { threshold: threshold.max(1), cooldown, failures: 0, open_until: None, probe_started: None, opened: 0 }
    }

    /// Whether a request may go to the provider now. In half-open state
    /// only one probe runs at a time (a probe abandoned for a whole
    /// cooldown lets another one through).
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) => match self.probe_started {
                Some(started) if now.duration_since(started) < self.cooldown => false,
                _ => {
                    self.probe_started = Some(now);
                    true
                }
            },
        }
    }

    /// A request succeeded: close.
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probe_started = None;
    }

    /// A request failed: count it, open at the threshold, re-open after a
    /// failed probe.
    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.open_until.is_some() || self.failures >= self.threshold {
            if self.open_until.is_none() || self.probe_started.is_some() {
                self.opened += 1;
            }
            self.open_until = Some(now + self.cooldown);
            self.probe_started = None;
        }
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// How many times it has opened.
    pub fn times_opened(&self) -> u64 {
        self.opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_after_the_cooldown_and_closes_on_success() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(10);
        let mut b = Breaker::new(3, cooldown);
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.allow(t0 + Duration::from_secs(5)));
        let later = t0 + cooldown;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.allow(later), "one probe");
        assert!(!b.allow(later), "only one probe at a time");
        b.success();
        assert_eq!(b.state(later), BreakerState::Closed);
        assert!(b.allow(later));
        assert_eq!(b.times_opened(), 1);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cooldown() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(10);
        let mut b = Breaker::new(1, cooldown);
        b.failure(t0);
        let probe = t0 + cooldown;
        assert!(b.allow(probe));
        b.failure(probe);
        assert_eq!(b.state(probe + Duration::from_secs(9)), BreakerState::Open);
        assert!(b.allow(probe + cooldown));
        assert_eq!(b.times_opened(), 2);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_secs(1));
        b.failure(t0);
        b.success();
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
    }
}
