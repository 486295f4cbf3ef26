//! This node's own traffic: requests in flight per model and a moving
//! average of time to first byte, gossiped so others can route around busy
//! or slow nodes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use llmesh_proto::ModelLoad;

/// Weight of a new sample in the moving averages: recent enough to follow a
/// model warming up, smooth enough to ignore one slow request.
const EWMA_ALPHA: f64 = 0.2;

#[derive(Debug, Default, Clone)]
struct ModelStats {
    in_flight: u32,
    queued: u32,
    ttft_ewma_ms: f64,
    samples: u64,
    decode_ewma: f64,
    decode_samples: u64,
    prefill_ewma: f64,
    prefill_samples: u64,
}

fn ewma(current: f64, samples: u64, sample: f64) -> f64 {
    if samples == 0 { sample } else { EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * current }
}

/// Counts requests in flight and their time to first byte.
#[derive(Debug, Default)]
pub struct LoadTracker {
    in_flight: AtomicU32,
    served: AtomicU64,
    queued: AtomicU32,
    models: Mutex<HashMap<String, ModelStats>>,
}

/// Held while a request runs; dropping it (response finished or client
/// gone) takes the request off the counts.
pub struct InFlight {
    tracker: Arc<LoadTracker>,
    model: String,
}

/// Held while a request waits in this entry node's queue.
pub struct Queued {
    tracker: Arc<LoadTracker>,
    model: String,
}

/// The stats of `model`, made on first use. Runs several times a request:
/// the model's name is copied only when it is new (`entry` would take an
/// owned key every time).
fn stats_of<'a>(models: &'a mut HashMap<String, ModelStats>, model: &str) -> &'a mut ModelStats {
    if !models.contains_key(model) {
        models.insert(model.to_string(), ModelStats::default());
    }
    models.get_mut(model).unwrap_or_else(|| unreachable!("inserted above"))
}

impl LoadTracker {
    /// Counts a request for `model` until the returned guard drops.
    pub fn start(self: &Arc<Self>, model: &str) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        stats_of(&mut models, model).in_flight += 1;
        InFlight { tracker: self.clone(), model: model.to_string() }
    }

    /// Counts a request for `model` waiting in the entry queue until the
    /// returned guard drops.
    pub fn enqueue(self: &Arc<Self>, model: &str) -> Queued {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        stats_of(&mut models, model).queued += 1;
        Queued { tracker: self.clone(), model: model.to_string() }
    }

    /// Requests waiting in this node's entry queue.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Records the time from dispatch to the backend's response head.
    pub fn record_ttft(&self, model: &str, ttft: Duration) {
        let ms = ttft.as_secs_f64() * 1000.0;
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = stats_of(&mut models, model);
        stats.ttft_ewma_ms = ewma(stats.ttft_ewma_ms, stats.samples, ms);
        stats.samples += 1;
    }

    /// Records a decode speed measured on a streamed response (tokens/s).
    pub fn record_decode(&self, model: &str, tokens_per_s: f64) {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = stats_of(&mut models, model);
        stats.decode_ewma = ewma(stats.decode_ewma, stats.decode_samples, tokens_per_s);
        stats.decode_samples += 1;
    }

    /// Records a prompt evaluation speed (request-body bytes of uncached
    /// prompt per second) the backend reported or the response's timing
    /// showed.
    pub fn record_prefill(&self, model: &str, bytes_per_s: f64) {
        if !bytes_per_s.is_finite() || bytes_per_s <= 0.0 {
            return;
        }
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = stats_of(&mut models, model);
        stats.prefill_ewma = ewma(stats.prefill_ewma, stats.prefill_samples, bytes_per_s);
        stats.prefill_samples += 1;
    }

    /// Requests in flight on this node.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests finished on this node's backend since start.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Per-model figures for gossip, in model-name order.
    pub fn snapshot(&self) -> Vec<ModelLoad> {
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<ModelLoad> = models
            .iter()
            .map(|(model, s)| ModelLoad {
                model: model.clone(),
                ttft_ewma_ms: s.ttft_ewma_ms,
                decode_tokens_per_s_ewma: s.decode_ewma,
                in_flight: s.in_flight,
                queued: s.queued,
                prefill_bytes_per_s_ewma: s.prefill_ewma,
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.tracker.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.tracker.served.fetch_add(1, Ordering::Relaxed);
        let mut models = self.tracker.models.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stats) = models.get_mut(&self.model) {
            stats.in_flight = stats.in_flight.saturating_sub(1);
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.tracker.queued.fetch_sub(1, Ordering::Relaxed);
        let mut models = self.tracker.models.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stats) = models.get_mut(&self.model) {
            stats.queued = stats.queued.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_guards_and_ttft_averages() {
        let tracker = Arc::new(LoadTracker::default());
        let a = tracker.start("m");
        let b = tracker.start("m");
        assert_eq!(tracker.in_flight(), 2);
        drop(a);
        assert_eq!(tracker.snapshot()[0].in_flight, 1);
        drop(b);
        assert_eq!(tracker.in_flight(), 0);
        tracker.record_ttft("m", Duration::from_millis(100));
        tracker.record_ttft("m", Duration::from_millis(200));
        let ttft = tracker.snapshot()[0].ttft_ewma_ms;
        assert!((ttft - 120.0).abs() < 1e-6, "{ttft}");
        tracker.record_decode("m", 50.0);
        assert_eq!(tracker.snapshot()[0].decode_tokens_per_s_ewma, 50.0);
        let waiting = tracker.enqueue("m");
        assert_eq!((tracker.queued(), tracker.snapshot()[0].queued), (1, 1));
        drop(waiting);
        assert_eq!((tracker.queued(), tracker.snapshot()[0].queued), (0, 0));
    }
}
