//! A node's queue of requests waiting for one of its backend's slots:
//! bounded, deadline-aware, and fair twice over: tenants take turns, and
//! within a tenant the entry nodes its requests came through take turns,
//! so where a request entered the mesh buys it no place in the line.

use std::collections::VecDeque;
use std::time::Instant;

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue holds as many requests as it may.
    #[error("the mesh queue is full")]
    Full,
}

/// Whose turn a waiting request takes: its tenant's, and within that its
/// entry node's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// The fairness bucket (API key id, or `anonymous`).
    pub tenant: String,
    /// The node the request entered the mesh at.
    pub entry: String,
}

impl Lane {
    /// The lane of `tenant`'s requests that entered at `entry`.
    pub fn new(tenant: &str, entry: &str) -> Lane {
        Lane { tenant: tenant.to_string(), entry: entry.to_string() }
    }
}

/// One entry node's waiting requests, with their deadlines.
type Items<T> = VecDeque<(Instant, T)>;
/// One tenant's entry nodes, in turn order.
type Entries<T> = VecDeque<(String, Items<T>)>;

/// A bounded queue served in round-robin across tenants and, within a
/// tenant, across entry nodes (deficit round-robin with equal costs; a
/// request's cost is not known before it runs). Requests whose deadline
/// passed are dropped as they come up.
#[derive(Debug)]
pub struct FairQueue<T> {
    capacity: usize,
    len: usize,
    tenants: VecDeque<(String, Entries<T>)>,
}

impl<T> FairQueue<T> {
    /// A queue holding at most `capacity` requests.
    pub fn new(capacity: usize) -> FairQueue<T> {
        FairQueue { capacity, len: 0, tenants: VecDeque::new() }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops the requests for which `keep` is false (they gave up waiting).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for (_, entries) in self.tenants.iter_mut() {
            for (_, items) in entries.iter_mut() {
                items.retain(|(_, item)| keep(item));
            }
            entries.retain(|(_, items)| !items.is_empty());
        }
        self.tenants.retain(|(_, entries)| !entries.is_empty());
        self.len = self.tenants.iter().flat_map(|(_, e)| e.iter()).map(|(_, items)| items.len()).sum();
    }

    /// Queues `item` in `lane` until `deadline`.
    pub fn push(&mut self, lane: &Lane, item: T, deadline: Instant) -> Result<(), QueueError> {
        if self.len >= self.capacity {
            return Err(QueueError::Full);
        }
        let entries = match self.tenants.iter_mut().position(|(t, _)| *t == lane.tenant) {
            Some(at) => &mut self.tenants[at].1,
            None => {
                self.tenants.push_back((lane.tenant.clone(), VecDeque::new()));
                &mut self.tenants.back_mut().expect("just pushed").1
            }
        };
        match entries.iter_mut().find(|(e, _)| *e == lane.entry) {
            Some((_, items)) => items.push_back((deadline, item)),
            None => entries.push_back((lane.entry.clone(), VecDeque::from([(deadline, item)]))),
        }
        self.len += 1;
        Ok(())
    }

    /// The next request to run: tenants in turn, and within the tenant its
    /// entry nodes in turn. Requests whose deadline passed by `now` come
    /// back in `expired` instead.
    pub fn pop(&mut self, now: Instant, expired: &mut Vec<T>) -> Option<T> {
        while let Some((tenant, mut entries)) = self.tenants.pop_front() {
            let mut found = None;
            while let Some((entry, mut items)) = entries.pop_front() {
                while let Some((deadline, item)) = items.pop_front() {
                    self.len -= 1;
                    if deadline <= now {
                        expired.push(item);
                    } else {
                        found = Some(item);
                        break;
                    }
                }
                if !items.is_empty() {
                    // This entry node goes to the back of its tenant's line.
                    entries.push_back((entry, items));
                }
                if found.is_some() {
                    break;
                }
            }
            if !entries.is_empty() {
                // And the tenant to the back of the line of tenants.
                self.tenants.push_back((tenant, entries));
            }
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn queue_is_fair_between_tenants_and_drops_expired_requests() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        let mut q = FairQueue::new(10);
        for i in 0..4 {
            q.push(&lane("heavy"), format!("h{i}"), later).expect("room");
        }
        q.push(&lane("light"), "l0".to_string(), later).expect("room");
        q.push(&lane("late"), "x".to_string(), now).expect("room");
        let mut expired = Vec::new();
        let order: Vec<String> = std::iter::from_fn(|| q.pop(now, &mut expired)).collect();
        assert_eq!(order, ["h0", "l0", "h1", "h2", "h3"]);
        assert_eq!(expired, ["x"]);
        assert!(q.is_empty());
        let mut q = FairQueue::new(3);
        for i in 0..3 {
            q.push(&lane("t"), i, later).expect("room");
        }
        q.retain(|i| *i != 1);
        assert_eq!(q.len(), 2);
        q.push(&lane("u"), 9, later).expect("room again");
        let mut small = FairQueue::new(1);
        small.push(&lane("t"), 1, later).expect("room");
        assert_eq!(small.push(&lane("t"), 2, later), Err(QueueError::Full));
    }

    fn lane(tenant: &str) -> Lane {
        Lane::new(tenant, "e")
    }

    #[test]
    fn within_a_tenant_entry_nodes_take_turns_however_many_each_sends() {
        let later = Instant::now() + Duration::from_secs(10);
        let mut q = FairQueue::new(32);
        // The serving node's own clients queue eight before any forwarded
        // request arrives; then another tenant shows up.
        for i in 0..8 {
            q.push(&Lane::new("t", "here"), format!("h{i}"), later).expect("room");
        }
        for i in 0..3 {
            q.push(&Lane::new("t", "peer"), format!("p{i}"), later).expect("room");
        }
        q.push(&Lane::new("u", "peer"), "u0".to_string(), later).expect("room");
        let mut expired = Vec::new();
        let order: Vec<String> = std::iter::from_fn(|| q.pop(later - Duration::from_secs(1), &mut expired)).collect();
        assert_eq!(order, ["h0", "u0", "p0", "h1", "p1", "h2", "p2", "h3", "h4", "h5", "h6", "h7"]);
    }

    proptest! {
        #[test]
        fn the_queue_never_exceeds_its_capacity(ops in proptest::collection::vec((any::<bool>(), 0u8..3), 0..100), capacity in 1usize..10) {
            let now = Instant::now();
            let mut q = FairQueue::new(capacity);
            let mut expired = Vec::new();
            for (push, tenant) in ops {
                if push {
                    let _ = q.push(&Lane::new(&tenant.to_string(), "e"), (), now + Duration::from_secs(5));
                } else {
                    q.pop(now, &mut expired);
                }
                prop_assert!(q.len() <= capacity);
            }
        }
    }
}
