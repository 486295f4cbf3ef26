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
/// the deepest turn of it served here; what the backend reports about its
/// cache removes those it no longer holds.
#[derive(Debug, Default)]
pub struct RecentPrefixes(Mutex<Recent>);

#[derive(Debug, Default)]
struct Recent {
    /// Newest last.
    entries: VecDeque<Entry>,
    /// Counts records: an entry's `at` orders entries by last use.
    records: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u64,
    depth: u32,
    /// Which model's cache holds it (a hash of the name).
    model: u64,
    /// When it was last served here (see [`Recent::records`]).
    at: u64,
}

/// Where a conversation stood here when its next turn came. What the
/// backend then reports as cached says whether it still held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The deepest turn of it served here (request bytes).
    pub depth: u32,
    model: u64,
    /// When it was last served here.
    at: u64,
}

fn model_tag(model: &str) -> u64 {
    PrefixKey::new(model).finish()
}

impl RecentPrefixes {
    /// Notes that this node just served `turn` with `model`; returns where
    /// the conversation stood before, if it was among the recent ones.
    pub fn record(&self, turn: Turn, model: &str) -> Option<Held> {
        let mut recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        recent.records += 1;
        let (at, model) = (recent.records, model_tag(model));
        let entries = &mut recent.entries;
        let mut depth = turn.depth;
        let mut held = None;
        if let Some(i) = entries.iter().position(|e| e.key == turn.key) {
            let before = entries.remove(i);
            if let Some(before) = before {
                held = Some(Held { depth: before.depth, model: before.model, at: before.at });
                // The backend's cache still holds the deeper turn too.
                depth = depth.max(before.depth);
            }
        } else if entries.len() == RECENT_PREFIXES {
            entries.pop_front();
        }
        entries.push_back(Entry { key: turn.key, depth, model, at });
        held
    }

    /// What the backend reported for a turn `depth` bytes deep of a
    /// conversation that stood at `held`: `cached` of its `prompt` tokens
    /// came from its cache. A turn that was mostly the earlier one's
    /// prompt but found little of it cached shows the conversation was
    /// evicted, and with it every conversation of that model served
    /// before it (caches evict the least recently used first; a model
    /// unloaded loses all): they are no longer claimed. Turns that add
    /// most of their prompt anew say nothing.
    pub fn observe_cache(&self, held: Held, depth: u32, prompt: u32, cached: u32) {
        if prompt == 0 || depth == 0 || held.depth == 0 {
            return;
        }
        // The share of this prompt the earlier turn already was.
        let expected = (f64::from(held.depth) / f64::from(depth)).min(1.0);
        if expected < 0.5 || f64::from(cached) / f64::from(prompt) >= expected * 0.6 {
            return;
        }
        let mut recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        recent.entries.retain(|e| e.model != held.model || e.at > held.at);
    }

    /// How many conversations this node claims to hold.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).entries.len()
    }

    /// Whether it claims none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How deep the conversation `key` got here, if it is among the recent
    /// ones.
    pub fn depth(&self, key: u64) -> Option<u32> {
        let recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        recent.entries.iter().find(|e| e.key == key).map(|e| e.depth)
    }

    /// The keys and their depths (same order, newest last), for gossip.
    pub fn snapshot(&self) -> (Vec<u64>, Vec<u32>) {
        let recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        recent.entries.iter().map(|e| (e.key, e.depth)).unzip()
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
            recent.record(Turn { key, depth: 100 }, "m");
        }
        recent.record(Turn { key: 10, depth: 300 }, "m");
        recent.record(Turn { key: 10, depth: 200 }, "m");
        let (keys, depths) = recent.snapshot();
        assert_eq!((keys.len(), depths.len()), (RECENT_PREFIXES, RECENT_PREFIXES));
        assert_eq!((keys.last(), depths.last()), (Some(&10), Some(&300)));
        assert_eq!((recent.depth(0), recent.depth(6)), (None, Some(100)));
        assert_eq!(keys.iter().filter(|k| **k == 10).count(), 1);
    }

    #[test]
    fn a_turn_reports_where_its_conversation_stood() {
        let recent = RecentPrefixes::default();
        assert_eq!(recent.record(Turn { key: 1, depth: 100 }, "m"), None);
        let held = recent.record(Turn { key: 1, depth: 200 }, "m").expect("held");
        assert_eq!(held.depth, 100);
        assert_eq!(recent.record(Turn { key: 1, depth: 150 }, "m").map(|h| h.depth), Some(200));
    }

    #[test]
    fn a_reported_miss_drops_that_models_older_conversations() {
        let recent = RecentPrefixes::default();
        // Conversations 0..10 of model a, 100..105 of model b, interleaved.
        for key in 0..10 {
            recent.record(Turn { key, depth: 100 }, "a");
            if key < 5 {
                recent.record(Turn { key: 100 + key, depth: 100 }, "b");
            }
        }
        let (deep, prompt) = (120, 1000);
        // Conversation 6's next turn hit the cache: nothing changes.
        let held = recent.record(Turn { key: 6, depth: deep }, "a").expect("held");
        recent.observe_cache(held, deep, prompt, 800);
        assert_eq!(recent.len(), 15);
        // A turn that is mostly new prompt says nothing either way.
        let held = recent.record(Turn { key: 4, depth: 400 }, "a").expect("held");
        recent.observe_cache(held, 400, prompt, 0);
        assert_eq!(recent.len(), 15);
        // Conversation 3 of a was evicted: so were a's 0, 1 and 2; b's
        // and a's later ones stay, and 3 itself is cached again.
        let held = recent.record(Turn { key: 3, depth: deep }, "a").expect("held");
        recent.observe_cache(held, deep, prompt, 30);
        let (keys, _) = recent.snapshot();
        for gone in [0, 1, 2] {
            assert!(!keys.contains(&gone), "{gone} still claimed: {keys:?}");
        }
        for kept in [3, 4, 5, 6, 7, 8, 9, 100, 101, 102, 103, 104] {
            assert!(keys.contains(&kept), "{kept} dropped: {keys:?}");
        }
        assert_eq!(recent.len(), 12);
    }
}
