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
/// the deepest turn of it served here, and how many of them the backend
/// is measured to keep cached.
#[derive(Debug)]
pub struct RecentPrefixes(Mutex<Recent>);

#[derive(Debug)]
struct Recent {
    keys: VecDeque<(u64, u32)>,
    /// How many of the newest conversations the backend still holds, as
    /// its reported cache hits say (see [`RecentPrefixes::observe_cache`]);
    /// [`RECENT_PREFIXES`] until a backend reports any.
    retained: f64,
}

impl Default for RecentPrefixes {
    fn default() -> RecentPrefixes {
        RecentPrefixes(Mutex::new(Recent { keys: VecDeque::new(), retained: RECENT_PREFIXES as f64 }))
    }
}

/// Where a conversation stood here when its next turn came: how many
/// conversations were served since (0: it was the newest) and how deep it
/// had got. What the backend then reports as cached says whether it still
/// held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Conversations served here since this one's last turn.
    pub rank: usize,
    /// The deepest turn of it served here (request bytes).
    pub depth: u32,
}

/// The fewest conversations taken for retained, whatever the misses say:
/// a backend keeps at least the one it just served.
const MIN_RETAINED: f64 = 2.0;

impl RecentPrefixes {
    /// Notes that this node just served `turn`; returns where the
    /// conversation stood before, if it was among the recent ones.
    pub fn record(&self, turn: Turn) -> Option<Held> {
        let mut recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let keys = &mut recent.keys;
        let mut depth = turn.depth;
        let mut held = None;
        if let Some(at) = keys.iter().position(|(k, _)| *k == turn.key) {
            let before = keys.remove(at).map_or(0, |(_, d)| d);
            held = Some(Held { rank: keys.len() - at, depth: before });
            // The backend's cache still holds the deeper turn too.
            depth = depth.max(before);
        } else if keys.len() == RECENT_PREFIXES {
            keys.pop_front();
        }
        keys.push_back((turn.key, depth));
        held
    }

    /// What the backend reported for a turn `depth` bytes deep of a
    /// conversation that stood at `held`: `cached` of its `prompt` tokens
    /// came from its cache. A hit this far back says the backend keeps at
    /// least that many conversations; a miss nearer than the current
    /// estimate halves the distance to it. Turns that add most of their
    /// prompt anew say nothing either way.
    pub fn observe_cache(&self, held: Held, depth: u32, prompt: u32, cached: u32) {
        if prompt == 0 || depth == 0 || held.depth == 0 {
            return;
        }
        // The share of this prompt the earlier turn already was.
        let expected = (f64::from(held.depth) / f64::from(depth)).min(1.0);
        if expected < 0.5 {
            return;
        }
        let hit = f64::from(cached) / f64::from(prompt) >= expected * 0.6;
        let mut recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let rank = held.rank as f64;
        if hit {
            recent.retained = recent.retained.max(rank + 1.0).min(RECENT_PREFIXES as f64);
        } else if rank < recent.retained {
            recent.retained = ((recent.retained + rank) / 2.0).max(MIN_RETAINED);
        }
    }

    /// How many of the newest conversations are taken for still cached.
    pub fn retained(&self) -> usize {
        let recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (recent.retained.ceil() as usize).min(recent.keys.len())
    }

    /// How deep the conversation `key` got here, if it is among the recent
    /// ones the backend is taken to hold.
    pub fn depth(&self, key: u64) -> Option<u32> {
        let recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let keep = recent.retained.ceil() as usize;
        recent.keys.iter().rev().take(keep).find(|(k, _)| *k == key).map(|(_, d)| *d)
    }

    /// The keys the backend is taken to hold and their depths (same
    /// order, newest last), for gossip.
    pub fn snapshot(&self) -> (Vec<u64>, Vec<u32>) {
        let recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = recent.keys.len().saturating_sub(recent.retained.ceil() as usize);
        recent.keys.iter().skip(skip).copied().unzip()
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

    #[test]
    fn a_turn_reports_where_its_conversation_stood() {
        let recent = RecentPrefixes::default();
        assert_eq!(recent.record(Turn { key: 1, depth: 100 }), None);
        recent.record(Turn { key: 2, depth: 100 });
        recent.record(Turn { key: 3, depth: 100 });
        assert_eq!(recent.record(Turn { key: 1, depth: 200 }), Some(Held { rank: 2, depth: 100 }));
        assert_eq!(recent.record(Turn { key: 1, depth: 300 }), Some(Held { rank: 0, depth: 200 }));
    }

    #[test]
    fn the_backends_cache_hits_bound_what_is_gossiped_as_held() {
        let recent = RecentPrefixes::default();
        for key in 0..40 {
            recent.record(Turn { key, depth: 100 });
        }
        assert_eq!(recent.retained(), 40, "nothing measured: every recent conversation counts");
        // A turn of a conversation 30 back found nothing cached: the
        // backend keeps fewer; misses further back move the estimate down.
        let (deep, prompt) = (120, 1000);
        for _ in 0..6 {
            recent.observe_cache(Held { rank: 30, depth: 100 }, deep, prompt, 50);
            recent.observe_cache(Held { rank: 10, depth: 100 }, deep, prompt, 0);
        }
        let after_misses = recent.retained();
        assert!(after_misses < 12, "retained {after_misses}");
        let (keys, _) = recent.snapshot();
        assert_eq!(keys.len(), after_misses);
        assert_eq!(keys.last(), Some(&39), "the newest stay");
        assert_eq!(recent.depth(0), None, "an old conversation is no longer claimed");
        assert_eq!(recent.depth(39), Some(100));
        // A hit 7 back proves the backend holds at least 8.
        recent.observe_cache(Held { rank: 7, depth: 100 }, deep, prompt, 800);
        assert!(recent.retained() >= 8);
        // A turn that is mostly new prompt says nothing.
        let before = recent.retained();
        recent.observe_cache(Held { rank: 1, depth: 20 }, deep, prompt, 0);
        assert_eq!(recent.retained(), before);
        // Misses never take it below two.
        for _ in 0..20 {
            recent.observe_cache(Held { rank: 0, depth: 100 }, deep, prompt, 0);
        }
        assert_eq!(recent.retained(), 2);
    }
}
