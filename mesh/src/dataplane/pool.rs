//! Data-plane connections to peers, opened on demand and closed after a
//! while without requests: a node at rest keeps no connection (and sends no
//! keep-alive) to the peers it does not forward to, so what it costs the
//! network does not grow with the mesh. The last round-trip time measured
//! to a peer is kept after its connection closes: the scheduler still
//! knows how far the peer is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One peer's pooled connection and what uses it.
#[derive(Debug)]
pub(super) struct Slot {
    /// The connection; its async lock makes concurrent requests to a peer
    /// wait for one handshake instead of each starting their own.
    pub(super) conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    in_flight: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            conn: tokio::sync::Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        }
    }
}

/// A request on a pooled connection: while one lives, the connection is
/// not closed for idleness.
#[derive(Debug)]
pub struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slot {
    /// Marks a request as using this connection until the guard drops.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        *self.last_used.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        InFlight(Arc::clone(self))
    }

    /// The open connection's round-trip time.
    pub(super) fn rtt(&self) -> Option<Duration> {
        let conn = self.conn.try_lock().ok()?;
        conn.as_ref().filter(|c| c.close_reason().is_none()).map(quinn::Connection::rtt)
    }

    /// Closes the connection if no request used it for `idle`; returns its
    /// last round-trip time when it did.
    fn close_if_idle(&self, idle: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.last_used.lock().unwrap_or_else(PoisonError::into_inner).elapsed() < idle {
            return None;
        }
        // Locked: a handshake is on its way; look again next round.
        let mut conn = self.conn.try_lock().ok()?;
        let open = conn.take()?;
        let rtt = open.rtt();
        open.close(0u32.into(), b"idle");
        Some(rtt)
    }
}

/// Every peer's slot, and the round-trip times of closed connections.
#[derive(Debug, Default)]
pub(super) struct Pool {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    last_rtt: Mutex<HashMap<String, Duration>>,
}

impl Pool {
    /// The slot of `node_id`, created empty.
    pub(super) fn slot(&self, node_id: &str) -> Arc<Slot> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).entry(node_id.to_string()).or_default().clone()
    }

    /// The round-trip time to `node_id`: its open connection's, else the
    /// last one measured.
    pub(super) fn rtt(&self, node_id: &str) -> Option<Duration> {
        let slot = self.slots.lock().unwrap_or_else(PoisonError::into_inner).get(node_id).cloned();
        slot.and_then(|s| s.rtt())
            .or_else(|| self.last_rtt.lock().unwrap_or_else(PoisonError::into_inner).get(node_id).copied())
    }

    /// Every peer's round-trip time, as [`Pool::rtt`].
    pub(super) fn rtts(&self) -> Vec<(String, Duration)> {
        let mut rtts = self.last_rtt.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for (id, slot) in self.slots.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            if let Some(rtt) = slot.rtt() {
                rtts.insert(id.clone(), rtt);
            }
        }
        rtts.into_iter().collect()
    }

    /// Follows membership: `addr_of` gives a peer's current data-plane
    /// address, or none for a peer that is gone (its slot goes, its
    /// connection closes); a peer that moved gets a new connection.
    pub(super) fn follow(&self, addr_of: impl Fn(&str) -> Option<SocketAddr>) {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).retain(|id, slot| {
            let Some(addr) = addr_of(id) else {
                if let Ok(mut conn) = slot.conn.try_lock()
                    && let Some(conn) = conn.take()
                {
                    conn.close(0u32.into(), b"peer left");
                }
                return false;
            };
            if let Ok(mut conn) = slot.conn.try_lock()
                && conn.as_ref().is_some_and(|c| c.remote_address() != addr)
                && let Some(stale) = conn.take()
            {
                stale.close(0u32.into(), b"peer moved");
            }
            true
        });
        self.last_rtt.lock().unwrap_or_else(PoisonError::into_inner).retain(|id, _| addr_of(id).is_some());
    }

    /// Closes the connections no request used for `idle`.
    pub(super) fn close_idle(&self, idle: Duration) {
        let slots: Vec<(String, Arc<Slot>)> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, slot) in slots {
            if let Some(rtt) = slot.close_if_idle(idle) {
                tracing::debug!(peer = %id, "closed an idle data-plane connection");
                self.last_rtt.lock().unwrap_or_else(PoisonError::into_inner).insert(id, rtt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_with_a_request_in_flight_is_never_idle() {
        let slot = Arc::new(Slot::default());
        let guard = slot.begin();
        assert_eq!(slot.in_flight.load(Ordering::Acquire), 1);
        *slot.last_used.lock().expect("lock") = Instant::now() - Duration::from_secs(3600);
        assert!(slot.close_if_idle(Duration::from_secs(1)).is_none(), "in use");
        drop(guard);
        assert_eq!(slot.in_flight.load(Ordering::Acquire), 0);
        assert!(
            slot.last_used.lock().expect("lock").elapsed() < Duration::from_secs(1),
            "the end of a request counts as use"
        );
    }
}
