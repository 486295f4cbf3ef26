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

/// A request's place in its conversation: the conversation's key and how
/// far it has got (the request body's length in bytes, which grows turn by
/// turn). Of two nodes that served the conversation, the one that served
/// the deeper turn holds more of its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// The conversation's key (see [`PrefixKey`]).
    pub key: u64,
    /// The request body's length in bytes.
    pub depth: u32,
}

/// The prefix keys this node served most recently, newest last, each with
/// the deepest turn of it served here.
#[derive(Debug, Default)]
pub struct RecentPrefixes(Mutex<VecDeque<(u64, u32)>>);

impl RecentPrefixes {
    /// Notes that this node just served `turn`.
    pub fn record(&self, turn: Turn) {
        let mut keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut depth = turn.depth;
        if let Some(at) = keys.iter().position(|(k, _)| *k == turn.key) {
            // The backend's cache still holds the deeper turn too.
            depth = depth.max(keys.remove(at).map_or(0, |(_, d)| d));
        } else if keys.len() == RECENT_PREFIXES {
            keys.pop_front();
        }
        keys.push_back((turn.key, depth));
    }

    /// How deep the conversation `key` got here, if it is among the recent
    /// ones.
    pub fn depth(&self, key: u64) -> Option<u32> {
        let keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter().find(|(k, _)| *k == key).map(|(_, d)| *d)
    }

    /// The keys and their depths (same order), for gossip.
    pub fn snapshot(&self) -> (Vec<u64>, Vec<u32>) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().unzip()
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
    fn recent_prefixes_keep_the_newest_distinct_keys_at_their_deepest() {
        let recent = RecentPrefixes::default();
        for key in 0..(RECENT_PREFIXES as u64 + 5) {
            recent.record(Turn { key, depth: 100 });
        }
        recent.record(Turn { key: 10, depth: 300 });
        recent.record(Turn { key: 10, depth: 200 });
        let (keys, depths) = recent.snapshot();
        assert_eq!((keys.len(), depths.len()), (RECENT_PREFIXES, RECENT_PREFIXES));
        assert_eq!((keys.last(), depths.last()), (Some(&10), Some(&300)));
        assert_eq!((recent.depth(0), recent.depth(6)), (None, Some(100)));
        assert_eq!(keys.iter().filter(|k| **k == 10).count(), 1);
    }
}
