//! Conversation prefixes. A request that continues a conversation carries a
//! key for the conversation so far (made at the HTTP edge from the messages
//! up to the first user turn); later turns share it, so they can go where
//! the conversation's KV cache is. Every node remembers the keys it served
//! lately and gossips them, so an entry node that never saw the
//! conversation still finds its cache.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// Keys a node gossips: more than the conversations a box keeps warm in its
/// KV cache at once (a few slots' worth on llama.cpp, dozens on vLLM's
/// paged cache), small enough for every heartbeat (8 bytes each, 1 KiB).
pub const RECENT_PREFIXES: usize = 128;

/// Builds a prefix key. FNV-1a: stable across processes, versions and
/// machines (keys travel in forwarded requests and in gossip), and fast on
/// the short strings it sees.
#[derive(Debug, Clone, Copy)]
pub struct PrefixKey(u64);

impl PrefixKey {
    /// A key for a conversation with `model`.
    pub fn new(model: &str) -> PrefixKey {
        PrefixKey(0xcbf2_9ce4_8422_2325).push(model.as_bytes())
    }

    /// Adds `bytes` (one message, a system prompt, the head of a prompt).
    #[must_use]
    pub fn push(mut self, bytes: &[u8]) -> PrefixKey {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// The key.
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// The prefix keys this node served most recently, newest last.
#[derive(Debug, Default)]
pub struct RecentPrefixes(Mutex<VecDeque<u64>>);

impl RecentPrefixes {
    /// Notes that this node just served a request with `key`.
    pub fn record(&self, key: u64) {
        let mut keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = keys.iter().position(|k| *k == key) {
            keys.remove(at);
        } else if keys.len() == RECENT_PREFIXES {
            keys.pop_front();
        }
        keys.push_back(key);
    }

    /// Whether `key` is among the recent ones.
    pub fn contains(&self, key: u64) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).contains(&key)
    }

    /// The keys, for gossip.
    pub fn snapshot(&self) -> Vec<u64> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_model_and_content() {
        let a = PrefixKey::new("m").push(b"hello").finish();
        assert_eq!(a, PrefixKey::new("m").push(b"hello").finish());
        assert_ne!(a, PrefixKey::new("n").push(b"hello").finish());
        assert_ne!(a, PrefixKey::new("m").push(b"hellp").finish());
    }

    #[test]
    fn recent_prefixes_keep_the_newest_distinct_keys() {
        let recent = RecentPrefixes::default();
        for key in 0..(RECENT_PREFIXES as u64 + 5) {
            recent.record(key);
        }
        recent.record(10);
        let keys = recent.snapshot();
        assert_eq!(keys.len(), RECENT_PREFIXES);
        assert_eq!(keys.last(), Some(&10));
        assert!(!recent.contains(0) && recent.contains(6));
        assert_eq!(keys.iter().filter(|k| **k == 10).count(), 1);
    }
}
