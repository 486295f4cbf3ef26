//! The membership loop's side of certificate fetches: a node sends its
//! certificate with its first few states (and with every state while a
//! peer from before fetches is alive), then states travel without it.
//! A reader that meets a state from an author whose certificate it does
//! not hold (it missed those first states: a partition, a lost message)
//! keeps the state aside and asks for the certificate: first the peer
//! that relayed the state, then the author itself.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;

use super::EventLoop;
use crate::statesync;

/// Full publishes after start that carry this node's certificate (counting
/// only those that reached a gossip peer): the first reaches every peer
/// that is up, the others cover a gossip mesh still forming.
const CERT_PUBLISHES: u32 = 3;
/// The least time between two fetches for one author's certificate.
const ASK_AGAIN: Duration = Duration::from_secs(2);
/// Fetches for one author's certificate before its state is dropped.
const MAX_ASKS: u32 = 4;
/// The most states kept waiting for certificates.
const AWAITING_MAX: usize = 1024;

/// Where certificate fetches stand.
#[derive(Debug, Default)]
pub(super) struct Certs {
    /// Full publishes that carried this node's certificate.
    sent_with: u32,
    /// The latest state of each author whose certificate is missing.
    awaiting: HashMap<PeerId, Awaiting>,
}

#[derive(Debug)]
struct Awaiting {
    data: Bytes,
    relay: PeerId,
    asked_at: Option<Instant>,
    asks: u32,
}

impl EventLoop {
    /// Whether the full state about to be published carries this node's
    /// certificate.
    pub(super) fn publish_with_cert(&self) -> bool {
        self.certs.sent_with < CERT_PUBLISHES || self.table.has_peers_without_cert_fetch()
    }

    /// A full state with the certificate reached gossip peers.
    pub(super) fn sent_cert(&mut self) {
        self.certs.sent_with = self.certs.sent_with.saturating_add(1);
    }

    /// A state from `author`, whose certificate this node lacks, came
    /// through `relay`: keep it and ask for the certificate.
    pub(super) fn await_cert(&mut self, author: PeerId, relay: PeerId, data: Bytes, now: Instant) {
        if author == *self.swarm.local_peer_id() {
            return;
        }
        if self.certs.awaiting.len() >= AWAITING_MAX && !self.certs.awaiting.contains_key(&author) {
            tracing::debug!(%author, "too many states waiting for certificates: dropping them");
            self.certs.awaiting.clear();
        }
        let waiting = self.certs.awaiting.entry(author).or_insert(Awaiting {
            data: data.clone(),
            relay,
            asked_at: None,
            asks: 0,
        });
        (waiting.data, waiting.relay) = (data, relay);
        self.ask_for_cert(author, now);
    }

    /// A heartbeat: asks again for the certificates still missing (a relay
    /// may not have held the state yet), and gives up after [`MAX_ASKS`].
    pub(super) fn certs_on_heartbeat(&mut self, now: Instant) {
        self.certs.awaiting.retain(|author, waiting| {
            let done = waiting.asks >= MAX_ASKS
                && waiting.asked_at.is_some_and(|at| now.saturating_duration_since(at) >= ASK_AGAIN);
            if done {
                tracing::debug!(%author, "no peer sent this node's certificate: dropping its state until it sends one");
            }
            !done
        });
        let authors: Vec<PeerId> = self.certs.awaiting.keys().copied().collect();
        for author in authors {
            self.ask_for_cert(author, now);
        }
    }

    /// Asks for `author`'s certificate unless asked within [`ASK_AGAIN`]
    /// or [`MAX_ASKS`] times already: the relay first, then the author,
    /// alternating.
    fn ask_for_cert(&mut self, author: PeerId, now: Instant) {
        let me = *self.swarm.local_peer_id();
        let Some(waiting) = self.certs.awaiting.get_mut(&author) else { return };
        if waiting.asks >= MAX_ASKS || waiting.asked_at.is_some_and(|at| now.saturating_duration_since(at) < ASK_AGAIN)
        {
            return;
        }
        let ask = if waiting.asks % 2 == 0 && waiting.relay != me { waiting.relay } else { author };
        waiting.asked_at = Some(now);
        waiting.asks += 1;
        tracing::debug!(%author, %ask, "a state came without a certificate this node holds: fetching it");
        statesync::fetch_certs(
            self.control.clone(),
            ask,
            vec![author.to_string()],
            self.pulled_tx.clone(),
            self.watch_stop.child_token(),
        );
    }

    /// After states were taken: opens the waiting states whose authors'
    /// certificates arrived with them.
    pub(super) fn retry_awaiting_certs(&mut self) {
        let ready: Vec<PeerId> =
            self.certs.awaiting.keys().filter(|author| self.trust.member_cert(author).is_some()).copied().collect();
        for author in ready {
            if let Some(waiting) = self.certs.awaiting.remove(&author) {
                self.take_state(Some(author), waiting.relay, waiting.data, None);
            }
        }
    }
}
