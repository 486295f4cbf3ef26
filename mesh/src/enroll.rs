//! Getting this node's certificate: rounds of requests to every connected
//! peer at once (any voter may hold the CA key), backing off while no one
//! issues, and a plain account of why when the wait is not ordinary — no
//! peer reachable, or the token refused — for the log and for readiness.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::pki::{MemberProblem, PkiError};

/// First pause between rounds; doubles while nobody issues, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a node may see no peer before that is reported as a problem.
const NO_PEERS_AFTER: Duration = Duration::from_secs(5);
/// How often an unchanged problem is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Where this node's enrollment stands.
#[derive(Debug)]
pub(crate) struct Enrollment {
    started: Instant,
    /// Peers asked in the current round that have not answered.
    asked: HashSet<PeerId>,
    /// Why a peer that could issue refused, in the current round.
    refusal: Option<String>,
    next_round: Instant,
    backoff: Duration,
    /// The last problem logged, and when.
    reported: Option<(MemberProblem, Instant)>,
    /// The last failed dial, for the no-peers hint.
    pub last_dial_error: Option<String>,
}

impl Enrollment {
    pub(crate) fn new(now: Instant) -> Enrollment {
        Enrollment {
            started: now,
            asked: HashSet::new(),
            refusal: None,
            next_round: now,
            backoff: FIRST_BACKOFF,
            reported: None,
            last_dial_error: None,
        }
    }

    /// The peers to ask now: all of `connected` when a round is due.
    pub(crate) fn round(&mut self, connected: &[PeerId], now: Instant) -> Vec<PeerId> {
        if !self.asked.is_empty() || now < self.next_round || connected.is_empty() {
            return Vec::new();
        }
        self.asked = connected.iter().copied().collect();
        self.refusal = None;
        connected.to_vec()
    }

    /// A peer refused (or the request failed: `reason` None). Returns the
    /// problem to report when this ends a round in which a would-be issuer
    /// refused the token.
    pub(crate) fn refused(&mut self, peer: &PeerId, reason: Option<&str>, now: Instant) -> Option<MemberProblem> {
        if let Some(reason) = reason
            && reason != PkiError::NotIssuer.to_string()
            && reason != PkiError::NotReady.to_string()
        {
            self.refusal.get_or_insert_with(|| reason.to_string());
        }
        if !self.asked.remove(peer) || !self.asked.is_empty() {
            return None;
        }
        // The round is over without a certificate.
        self.next_round = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.refusal.take().map(|why| {
            MemberProblem::TokenRefused(format!(
                "the cluster refused this node's join token: {why}. Print a current token on any member with `llmesh init --data-dir <its data dir>` (or `llmesh token rotate`), then restart this agent with it (--join-file)"
            ))
        })
    }

    /// Peers came or went: a new peer may issue, so ask soon.
    pub(crate) fn peers_changed(&mut self, now: Instant) {
        self.backoff = FIRST_BACKOFF;
        self.next_round = self.next_round.min(now + FIRST_BACKOFF);
    }

    /// The problem of a node that has seen no peer for a while.
    pub(crate) fn no_peers(
        &self,
        connected: usize,
        tried: &[String],
        mdns: bool,
        now: Instant,
    ) -> Option<MemberProblem> {
        if connected > 0 || now.duration_since(self.started) < NO_PEERS_AFTER {
            return None;
        }
        let tried = if tried.is_empty() { "no bootstrap address".to_string() } else { tried.join(", ") };
        let dial = self.last_dial_error.as_deref().map(|e| format!(" (last dial error: {e})")).unwrap_or_default();
        Some(MemberProblem::NoPeers(format!(
            "no peer of the cluster is reachable: tried {tried}{dial} and mDNS {}. Pass --bootstrap HOST:PORT of a running node (its `llmesh mesh listening on` address), check that the join token is this cluster's, and that the port is open",
            if mdns { "on the local network" } else { "(off)" }
        )))
    }

    /// Whether `problem` should be logged now: new, or not logged lately.
    pub(crate) fn should_report(&mut self, problem: &MemberProblem, now: Instant) -> bool {
        let due = match &self.reported {
            Some((last, at)) => last != problem || now.duration_since(*at) >= REPORT_EVERY,
            None => true,
        };
        if due {
            self.reported = Some((problem.clone(), now));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_asks_every_peer_and_ends_with_the_refusal_of_a_would_be_issuer() {
        let now = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut enrollment = Enrollment::new(now);
        assert_eq!(enrollment.round(&[a, b], now).len(), 2);
        assert!(enrollment.round(&[a, b], now).is_empty(), "one round at a time");
        assert_eq!(enrollment.refused(&a, Some(&PkiError::NotIssuer.to_string()), now), None);
        let problem = enrollment.refused(&b, Some(&PkiError::BadJoinProof.to_string()), now).expect("refused");
        assert_eq!(problem.code(), "token_refused");
        assert!(problem.detail().contains("no longer) valid"), "{}", problem.detail());
        assert!(enrollment.round(&[a, b], now).is_empty(), "backs off");
        assert_eq!(enrollment.round(&[a, b], now + Duration::from_secs(1)).len(), 2);
    }

    #[test]
    fn nobody_able_to_issue_is_not_a_refusal() {
        let now = Instant::now();
        let a = PeerId::random();
        let mut enrollment = Enrollment::new(now);
        enrollment.round(&[a], now);
        assert_eq!(enrollment.refused(&a, Some(&PkiError::NotIssuer.to_string()), now), None);
        enrollment.round(&[a], now + Duration::from_secs(1));
        assert_eq!(enrollment.refused(&a, None, now), None, "a failed request");
    }

    #[test]
    fn no_peers_is_a_problem_only_after_a_while_and_names_what_was_tried() {
        let now = Instant::now();
        let enrollment = Enrollment::new(now);
        let tried = vec!["/ip4/10.0.0.1/tcp/11441".to_string()];
        assert_eq!(enrollment.no_peers(0, &tried, false, now), None);
        let later = now + NO_PEERS_AFTER;
        let problem = enrollment.no_peers(0, &tried, false, later).expect("no peers");
        assert_eq!(problem.code(), "no_peers");
        assert!(problem.detail().contains("10.0.0.1") && problem.detail().contains("--bootstrap"));
        assert_eq!(enrollment.no_peers(1, &tried, false, later), None);
    }
}
