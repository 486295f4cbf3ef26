//! Steady, bounded load: a fixed number of clients, each sending one
//! request at a time to a random node, until told to stop, the time is up
//! or the request budget is spent. Every request gets one [`Record`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rand::Rng as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::accounting::{Outcome, Record, classify_document, classify_stream};

/// Shape of the load.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Clients, each with one request in flight.
    pub clients: usize,
    /// Stop starting requests after this long.
    pub duration: Duration,
    /// Stop starting requests after this many.
    pub max_requests: u64,
    /// A request with no outcome after this long is hung.
    pub deadline: Duration,
    /// Model to ask for.
    pub model: String,
    /// Tokens asked for, drawn uniformly from this range.
    pub tokens: (usize, usize),
    /// Pause between a client's requests.
    pub think: Duration,
    /// API key the clients send (clients off the node's machine need one).
    pub api_key: Option<String>,
    /// Every request streams (else half do).
    pub all_streamed: bool,
    /// Clients ask that broken streams not be resumed (`x-llmesh-resume: off`).
    pub resume_off: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            clients: 8,
            duration: Duration::from_secs(30),
            max_requests: 1_000_000,
            deadline: Duration::from_secs(60),
            model: "qwen2.5:7b".into(),
            tokens: (8, 48),
            think: Duration::from_millis(20),
            api_key: None,
            all_streamed: false,
            resume_off: false,
        }
    }
}

/// The nodes clients may send to: host index and base URL.
pub type Entries = Arc<RwLock<Vec<(usize, String)>>>;

/// A running load; [`Load::finish`] stops it and returns every record.
pub struct Load {
    stop: CancellationToken,
    sent: Arc<AtomicU64>,
    records: Arc<Mutex<Vec<Record>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    deadline: Duration,
}

impl Load {
    /// Starts the clients.
    pub fn start(config: LoadConfig, entries: Entries) -> Load {
        let stop = CancellationToken::new();
        let sent = Arc::new(AtomicU64::new(0));
        let records = Arc::new(Mutex::new(Vec::new()));
        // One connection per request: a pooled connection to a node that
        // was killed and restarted would fail its next request for a reason
        // that has nothing to do with the mesh.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client");
        let ends = Instant::now() + config.duration;
        let clients = (0..config.clients)
            .map(|_| {
                let (config, entries, stop, sent, records, http) =
                    (config.clone(), entries.clone(), stop.clone(), sent.clone(), records.clone(), http.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() && Instant::now() < ends {
                        if sent.fetch_add(1, Ordering::SeqCst) >= config.max_requests {
                            sent.fetch_sub(1, Ordering::SeqCst);
                            break;
                        }
                        let record = one_request(&http, &config, &entries).await;
                        // A client whose node is gone backs off before its
                        // next try, as SDKs do, instead of spinning on refusals.
                        let pause = match record.outcome {
                            Outcome::Transport(_) => Duration::from_millis(250),
                            _ => config.think,
                        };
                        records.lock().unwrap_or_else(PoisonError::into_inner).push(record);
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                })
            })
            .collect();
        Load { stop, sent, records, clients, deadline: config.deadline }
    }

    /// Stops starting requests, waits for those in flight (each is bounded
    /// by the deadline), and returns the number sent and every record.
    pub async fn finish(self) -> (u64, Vec<Record>) {
        self.stop.cancel();
        let grace = self.deadline + Duration::from_secs(5);
        for client in self.clients {
            // A client task cannot outlive its request's deadline; if one
            // did, its request has no record and the accounting shows it.
            let _ = tokio::time::timeout(grace, client).await;
        }
        let records = std::mem::take(&mut *self.records.lock().unwrap_or_else(PoisonError::into_inner));
        (self.sent.load(Ordering::SeqCst), records)
    }
}

async fn one_request(http: &reqwest::Client, config: &LoadConfig, entries: &Entries) -> Record {
    let (entry, url, stream, tokens, nonce) = {
        let entries = entries.read().unwrap_or_else(PoisonError::into_inner);
        let mut rng = rand::thread_rng();
        let (entry, url) = entries[rng.gen_range(0..entries.len())].clone();
        let stream = config.all_streamed || rng.gen_bool(0.5);
        (entry, url, stream, rng.gen_range(config.tokens.0..=config.tokens.1), rng.r#gen::<u64>())
    };
    let body = json!({
        "model": config.model,
        "messages": [{"role": "user", "content": format!("chaos request {nonce:016x}: tell me something")}],
        "max_tokens": tokens,
        "stream": stream,
    });
    let start = Instant::now();
    let (outcome, served_by, forwarded) =
        match tokio::time::timeout(config.deadline, send(http, &url, config, &body, stream, tokens)).await {
            Ok(result) => result,
            Err(_) => (Outcome::Hung, None, false),
        };
    Record { entry, stream, start, end: Instant::now(), outcome, served_by, forwarded }
}

async fn send(
    http: &reqwest::Client,
    url: &str,
    config: &LoadConfig,
    body: &serde_json::Value,
    stream: bool,
    tokens: usize,
) -> (Outcome, Option<String>, bool) {
    // The mesh's own deadline, a little shorter than the client's: a node
    // that cannot start the response in time must say so (504), not hang.
    let mesh_deadline = config.deadline.saturating_sub(Duration::from_secs(10)).max(Duration::from_secs(1));
    let mut request = http
        .post(format!("{url}/v1/chat/completions"))
        .header("x-llmesh-timeout-ms", mesh_deadline.as_millis().to_string())
        .json(body);
    if let Some(key) = &config.api_key {
        request = request.bearer_auth(key);
    }
    if config.resume_off {
        request = request.header("x-llmesh-resume", "off");
    }
    let sent = request.send().await;
    let mut response = match sent {
        Ok(response) => response,
        Err(err) => return (Outcome::Transport(format!("before the response: {}", error_chain(&err))), None, false),
    };
    let status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let served_by = header("x-llmesh-node");
    let forwarded = header("x-llmesh-route").is_some_and(|r| r.starts_with("peer:"));
    let mut received = Vec::new();
    let mut cut = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(err) => {
                cut = Some(error_chain(&err));
                break;
            }
        }
    }
    let outcome = if stream && status == 200 {
        classify_stream(status, &received, cut, tokens)
    } else if let Some(cut) = cut {
        Outcome::Transport(format!("cut mid-body: {cut}"))
    } else {
        classify_document(status, &received, tokens)
    };
    (outcome, served_by, forwarded)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
