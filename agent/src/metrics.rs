//! Prometheus metrics: the `metrics` facade with the Prometheus recorder
//! (no HTTP listener of its own: `/metrics` on the API port renders it).
//! Gauges that describe the mesh (Raft, peers, queue) are set when scraped.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The process's recorder (installed once; in-process demo nodes share it).
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = match PrometheusBuilder::new().set_buckets(BUCKETS) {
                Ok(builder) => builder.build_recorder(),
                Err(err) => {
                    tracing::warn!(error = %err, "metrics disabled");
                    return None;
                }
            };
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "another metrics recorder is installed; /metrics is empty");
                    None
                }
            }
        })
        .as_ref()
}

/// `# HELP` text for every family `/metrics` serves (the recorder adds
/// `# TYPE`).
const FAMILIES: &[(&str, &str, &str)] = &[
    ("counter", "llmesh_requests_total", "Client requests finished, by model, route, outcome and key."),
    ("counter", "llmesh_tokens_total", "Tokens read (in) and generated (out), by model, route and key."),
    ("counter", "llmesh_scheduler_decisions_total", "Where the scheduler sent requests, by reason."),
    ("counter", "llmesh_forward_errors_total", "Failures forwarding to a peer before its first byte, by peer."),
    ("counter", "llmesh_cloud_requests_total", "Requests sent to a cloud provider, by provider and outcome."),
    ("counter", "llmesh_cloud_tokens_total", "Tokens a cloud provider billed, by provider and direction."),
    ("counter", "llmesh_cloud_spend_microdollars_total", "Estimated cloud spend in millionths of a dollar."),
    ("histogram", "llmesh_time_to_first_byte_seconds", "Time from request to the response head."),
    ("histogram", "llmesh_request_duration_seconds", "Time from request to the end of the response body."),
    ("histogram", "llmesh_queue_wait_seconds", "Time requests waited in this entry node's queue."),
    ("gauge", "llmesh_queue_depth", "Requests waiting in this entry node's queue now."),
    ("gauge", "llmesh_in_flight", "Requests running on this node's backend now."),
    ("gauge", "llmesh_raft_term", "Current Raft term."),
    ("gauge", "llmesh_raft_commit_index", "Highest Raft log index this node knows committed."),
    ("gauge", "llmesh_raft_applied_index", "Highest Raft log index this node applied."),
    ("gauge", "llmesh_raft_is_leader", "1 when this node leads the Raft group."),
    ("gauge", "llmesh_raft_leader", "1, labelled with the current leader's name."),
    ("gauge", "llmesh_gossip_peers", "Peers in this node's gossip view, by liveness."),
    ("gauge", "llmesh_peer_rtt_seconds", "Data-plane round-trip time to each peer."),
];

fn describe() {
    for (kind, name, help) in FAMILIES {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *help),
            "histogram" => metrics::describe_histogram!(*name, *help),
            _ => metrics::describe_gauge!(*name, *help),
        }
    }
}

/// What one finished client request looked like.
pub struct RequestOutcome<'a> {
    /// Model as routed.
    pub model: &'a str,
    /// `local`, `peer`, `cloud:<provider>` or `none`.
    pub route: &'a str,
    /// `ok`, `client_error`, `server_error`, `cancelled`, or an error code.
    pub outcome: &'a str,
    /// API key id or `anonymous`.
    pub key: &'a str,
    /// Time to the response head.
    pub ttft: Duration,
    /// Time to the end of the body.
    pub total: Duration,
    /// Prompt tokens.
    pub tokens_in: u64,
    /// Completion tokens.
    pub tokens_out: u64,
}

/// The metric handles of one label set of [`request`]: registering them
/// costs eleven label strings and five registry look-ups, so they are made
/// once per (model, route, outcome, key) and kept.
#[derive(Clone)]
struct RequestHandles {
    requests: metrics::Counter,
    ttfb: metrics::Histogram,
    duration: metrics::Histogram,
    tokens_in: metrics::Counter,
    tokens_out: metrics::Counter,
}

impl RequestHandles {
    fn register(o: &RequestOutcome<'_>) -> RequestHandles {
        let labels = [
            ("model", o.model.to_string()),
            ("route", o.route.to_string()),
            ("outcome", o.outcome.to_string()),
            ("key", o.key.to_string()),
        ];
        let timing = [("model", o.model.to_string()), ("route", o.route.to_string())];
        let tokens = |direction: &'static str| {
            [("model", o.model.to_string()), ("direction", direction.to_string()), ("key", o.key.to_string())]
        };
        RequestHandles {
            requests: counter!("llmesh_requests_total", &labels),
            ttfb: histogram!("llmesh_time_to_first_byte_seconds", &timing),
            duration: histogram!("llmesh_request_duration_seconds", &timing),
            tokens_in: counter!("llmesh_tokens_total", &tokens("in")),
            tokens_out: counter!("llmesh_tokens_total", &tokens("out")),
        }
    }
}

/// Label sets kept at most; past it (a flood of made-up keys or models
/// cannot get this far, but the bound costs nothing) handles are
/// registered per request as before.
const MAX_CACHED_LABEL_SETS: usize = 4096;

type HandleCache = std::sync::Mutex<HashMap<u64, Vec<([String; 4], RequestHandles)>>>;

fn cached_handles(o: &RequestOutcome<'_>) -> RequestHandles {
    static CACHE: OnceLock<HandleCache> = OnceLock::new();
    // Handles made before the recorder exists would record nowhere.
    if handle().is_none() {
        return RequestHandles::register(o);
    }
    let names = [o.model, o.route, o.outcome, o.key];
    // Made-up models and keys never get here, and the sets are bounded:
    // a fast hash will do (SipHash cost a thousand instructions a request).
    let mut hasher = rustc_hash::FxHasher::default();
    names.hash(&mut hasher);
    let hash = hasher.finish();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, handles)) = cache.get(&hash).and_then(|bucket| bucket.iter().find(|(labels, _)| labels == &names)) {
        return handles.clone();
    }
    let handles = RequestHandles::register(o);
    if cache.len() < MAX_CACHED_LABEL_SETS {
        cache.entry(hash).or_default().push((names.map(str::to_string), handles.clone()));
    }
    handles
}

/// Records one finished request.
pub fn request(o: &RequestOutcome<'_>) {
    let handles = cached_handles(o);
    handles.requests.increment(1);
    handles.ttfb.record(o.ttft.as_secs_f64());
    handles.duration.record(o.total.as_secs_f64());
    handles.tokens_in.increment(o.tokens_in);
    handles.tokens_out.increment(o.tokens_out);
}

/// Spend at a cloud provider.
pub fn cloud_spend(provider: &str, key: &str, cost_usd: f64, tokens: u64) {
    let labels = [("provider", provider.to_string()), ("key", key.to_string())];
    counter!("llmesh_cloud_requests_total", &labels).increment(1);
    counter!("llmesh_cloud_tokens_total", &labels).increment(tokens);
    // Counters are integers: spend is kept in micro-dollars.
    counter!("llmesh_cloud_spend_microdollars_total", &labels).increment((cost_usd * 1e6).round() as u64);
}

/// Sets a gauge (scrape-time figures).
pub fn set(name: &'static str, labels: &[(&'static str, String)], value: f64) {
    gauge!(name, labels).set(value);
}
