//! The entry node's queue: bounded, fair between tenants, deadline-aware.

use std::collections::VecDeque;
use std::time::Instant;

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue holds as many requests as it may.
    #[error("the mesh queue is full")]
    Full,
}

/// A bounded queue, fair between tenants (round-robin across tenants, a
/// form of deficit round-robin with equal costs), that drops requests whose
/// deadline has passed.
#[derive(Debug)]
pub struct FairQueue<T> {
    capacity: usize,
    len: usize,
    tenants: VecDeque<(String, VecDeque<(Instant, T)>)>,
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
        for (_, items) in self.tenants.iter_mut() {
            items.retain(|(_, item)| keep(item));
        }
        self.tenants.retain(|(_, items)| !items.is_empty());
        self.len = self.tenants.iter().map(|(_, items)| items.len()).sum();
    }

    /// Queues `item` for `tenant` until `deadline`.
    pub fn push(&mut self, tenant: &str, item: T, deadline: Instant) -> Result<(), QueueError> {
        if self.len >= self.capacity {
            return Err(QueueError::Full);
        }
        match self.tenants.iter_mut().find(|(t, _)| t == tenant) {
            Some((_, items)) => items.push_back((deadline, item)),
            None => self.tenants.push_back((tenant.to_string(), VecDeque::from([(deadline, item)]))),
        }
        self.len += 1;
        Ok(())
    }

    /// The next request to dispatch: one per tenant in turn. Requests whose
    /// deadline passed by `now` come back in `expired` instead.
    pub fn pop(&mut self, now: Instant, expired: &mut Vec<T>) -> Option<T> {
        while let Some((tenant, mut items)) = self.tenants.pop_front() {
            while let Some((deadline, item)) = items.pop_front() {
                self.len -= 1;
                if deadline <= now {
                    expired.push(item);
                    continue;
                }
                if !items.is_empty() {
                    // This tenant goes to the back of the line.
                    self.tenants.push_back((tenant, items));
                }
                return Some(item);
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
            q.push("heavy", format!("h{i}"), later).expect("room");
        }
        q.push("light", "l0".to_string(), later).expect("room");
        q.push("late", "x".to_string(), now).expect("room");
        let mut expired = Vec::new();
        let order: Vec<String> = std::iter::from_fn(|| q.pop(now, &mut expired)).collect();
        assert_eq!(order, ["h0", "l0", "h1", "h2", "h3"]);
        assert_eq!(expired, ["x"]);
        assert!(q.is_empty());
        let mut q = FairQueue::new(3);
        for i in 0..3 {
            q.push("t", i, later).expect("room");
        }
        q.retain(|i| *i != 1);
        assert_eq!(q.len(), 2);
        q.push("u", 9, later).expect("room again");
        let mut small = FairQueue::new(1);
        small.push("t", 1, later).expect("room");
        assert_eq!(small.push("t", 2, later), Err(QueueError::Full));
    }

    proptest! {
        #[test]
        fn the_queue_never_exceeds_its_capacity(ops in proptest::collection::vec((any::<bool>(), 0u8..3), 0..100), capacity in 1usize..10) {
            let now = Instant::now();
            let mut q = FairQueue::new(capacity);
            let mut expired = Vec::new();
            for (push, tenant) in ops {
                if push {
                    let _ = q.push(&tenant.to_string(), (), now + Duration::from_secs(5));
                } else {
                    q.pop(now, &mut expired);
                }
                prop_assert!(q.len() <= capacity);
            }
        }
    }
}
