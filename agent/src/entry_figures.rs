//! What the clients entering at this node saw: output tokens and time to
//! first byte, as running totals gossiped so that any node's dashboard can
//! show the mesh's tokens/s and TTFT percentiles, not just its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use llmesh_proto::TTFT_BUCKETS_MS;

/// Running totals of the requests that entered at this node.
#[derive(Debug, Default)]
pub struct EntryFigures {
    tokens_out: AtomicU64,
    ttft: [AtomicU64; TTFT_BUCKETS_MS.len() + 1],
}

impl EntryFigures {
    /// Counts a finished request: its output tokens always, its time to
    /// first byte only when it succeeded (a refusal's is no TTFT).
    pub fn record(&self, ttft: Duration, tokens_out: u64, succeeded: bool) {
        self.tokens_out.fetch_add(tokens_out, Ordering::Relaxed);
        if succeeded {
            let ms = ttft.as_millis();
            let bucket =
                TTFT_BUCKETS_MS.iter().position(|bound| ms <= u128::from(*bound)).unwrap_or(TTFT_BUCKETS_MS.len());
            self.ttft[bucket].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Output tokens since start.
    pub fn tokens_out(&self) -> u64 {
        self.tokens_out.load(Ordering::Relaxed)
    }

    /// Successful requests per TTFT bucket since start.
    pub fn ttft_histogram(&self) -> Vec<u64> {
        self.ttft.iter().map(|count| count.load(Ordering::Relaxed)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_the_bucket_of_their_ttft_and_failures_count_only_tokens() {
        let figures = EntryFigures::default();
        figures.record(Duration::from_millis(5), 3, true);
        figures.record(Duration::from_millis(6), 4, true);
        figures.record(Duration::from_secs(120), 5, true);
        figures.record(Duration::from_millis(10), 7, false);
        let histogram = figures.ttft_histogram();
        assert_eq!(histogram.len(), TTFT_BUCKETS_MS.len() + 1);
        assert_eq!((histogram[0], histogram[1], histogram[TTFT_BUCKETS_MS.len()]), (1, 1, 1));
        assert_eq!(histogram.iter().sum::<u64>(), 3);
        assert_eq!(figures.tokens_out(), 19);
    }
}
