//! Deterministic text, token counts and embeddings for the simulated backend.
//!
//! The sim's tokenizer is deliberately simple: one token per
//! whitespace-separated word. Generated text is made of words, one per
//! streamed chunk, so the usage it reports matches what it sent.

/// Words the sim draws its output from.
const VOCABULARY: &[&str] = &[
    "the",
    "mesh",
    "routes",
    "each",
    "request",
    "to",
    "a",
    "node",
    "that",
    "holds",
    "model",
    "warm",
    "and",
    "streams",
    "tokens",
    "back",
    "while",
    "peers",
    "share",
    "load",
    "over",
    "gossip",
    "so",
    "no",
    "box",
    "sits",
    "idle",
    "when",
    "another",
    "is",
    "busy",
    "queue",
    "cache",
    "prefix",
    "leader",
    "keeps",
    "policy",
    "same",
    "everywhere",
    "quietly",
    "fast",
    "steady",
    "local",
    "cloud",
    "only",
    "if",
    "allowed",
    "bright",
    "river",
    "stone",
];

/// A stable 64-bit hash (FNV-1a), the same on every run and platform, so
/// prefix hashes and generated text are reproducible.
pub fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Mixes a 64-bit value into a well-spread one (SplitMix64 finaliser).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Number of sim tokens in `text`.
pub fn count_tokens(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

/// The `n` output tokens for a prompt: the first without a leading space,
/// the rest with one, so concatenating them gives readable text.
pub fn generate_tokens(seed: u64, n: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            let word = VOCABULARY[(mix(seed ^ u64::from(i)) % VOCABULARY.len() as u64) as usize];
            if i == 0 { word.to_string() } else { format!(" {word}") }
        })
        .collect()
}

/// A unit-length embedding of `text` with `dim` dimensions.
pub fn embedding(text: &str, dim: usize) -> Vec<f32> {
    let base = fnv1a(0, text.as_bytes());
    let mut v: Vec<f32> =
        (0..dim as u64).map(|i| (mix(base ^ i) as f64 / u64::MAX as f64 * 2.0 - 1.0) as f32).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_counts_match() {
        let a = generate_tokens(7, 12);
        assert_eq!(a, generate_tokens(7, 12));
        assert_ne!(a, generate_tokens(8, 12));
        assert_eq!(count_tokens(&a.concat()), 12);
    }

    #[test]
    fn embeddings_are_unit_length_and_stable() {
        let e = embedding("hello", 64);
        assert_eq!(e.len(), 64);
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_eq!(e, embedding("hello", 64));
        assert_ne!(e, embedding("world", 64));
    }
}
