//! Serving a request on this node's own backend. This is the
//! [`RequestHandler`] the HTTP API calls for local work and the data plane
//! will call for requests forwarded by peers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::route::candidates::same_model;
use llmesh_mesh::route::prefix::{Held, RecentPrefixes};
use llmesh_mesh::route::{LocalBackend, LocalCapacity};
use llmesh_mesh::{InferenceRequest, InferenceResponse, RequestHandler, RequestMeta, ServeError};

use crate::backend::Backend;
use crate::inventory::InventoryHandle;
use crate::load::LoadTracker;
use crate::stall::{StallConfig, StallWatch};

/// Runs requests on the local backend.
pub struct LocalNode {
    backend: Arc<dyn Backend>,
    inventory: InventoryHandle,
    load: Arc<LoadTracker>,
    response_timeout: Duration,
    slots: u32,
    recent_prefixes: Arc<RecentPrefixes>,
    /// Finds a backend that stopped answering; `None`: off.
    stall: Option<StallWatch>,
}

impl LocalNode {
    /// A local handler; `response_timeout` bounds the wait for a response
    /// head, `slots` is the backend's parallel slots (0: unknown), `stall`
    /// says when to probe a silent backend (`probe_after` zero: never).
    pub fn new(
        backend: Arc<dyn Backend>,
        inventory: InventoryHandle,
        load: Arc<LoadTracker>,
        response_timeout: Duration,
        slots: u32,
        stall: StallConfig,
    ) -> LocalNode {
        let stall = (!stall.probe_after.is_zero()).then(|| StallWatch::new(backend.clone(), inventory.clone(), stall));
        LocalNode { backend, inventory, load, response_timeout, slots, recent_prefixes: Arc::default(), stall }
    }

    /// The conversations this node served lately (gossiped).
    pub fn recent_prefixes(&self) -> &Arc<RecentPrefixes> {
        &self.recent_prefixes
    }

    /// The inventory this node serves from.
    pub fn inventory(&self) -> &InventoryHandle {
        &self.inventory
    }

    /// This node's traffic counters.
    pub fn load(&self) -> &Arc<LoadTracker> {
        &self.load
    }

    /// Loads `model` into the backend's memory without generating
    /// anything (Ollama's empty `/api/generate` with a long keep-alive; the
    /// sim honours the same call). OpenAI-compatible backends have no such
    /// call: they report [`ServeError::Unsupported`].
    pub async fn preload(&self, model: &str, keep_alive: Duration) -> Result<(), ServeError> {
        if self.backend.kind() == crate::config::BackendKind::Openai {
            return Err(ServeError::Unsupported("OpenAI-compatible backends cannot preload a model".into()));
        }
        let body = serde_json::json!({ "model": model, "keep_alive": format!("{}s", keep_alive.as_secs()) });
        let request = InferenceRequest {
            request_id: format!("preload-{model}"),
            api: llmesh_mesh::ApiKind::OllamaGenerate,
            meta: RequestMeta { model: model.to_string(), ..RequestMeta::default() },
            body: body.to_string().into(),
            deadline: None,
            queue_until: None,
            forwarded_by: None,
            on_slot: None,
            traceparent: String::new(),
        };
        // Loading a large model takes minutes; the response only comes after.
        let work = async {
            let response = self.backend.serve(&request).await?;
            let status = response.status;
            let mut body = response.body;
            while let Some(chunk) = body.next().await {
                chunk.map_err(|e| ServeError::BackendUnavailable(e.to_string()))?;
            }
            if status >= 400 {
                return Err(ServeError::BackendUnavailable(format!("preload answered {status}")));
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(600), work)
            .await
            .map_err(|_| ServeError::Timeout(format!("preloading {model} took over 10 minutes")))?
    }

    /// Runs a model-management request (pull, delete, copy, create, push)
    /// on the backend: no slot, no response timeout (a pull answering
    /// with one document only answers when the download is done; the
    /// client's disconnect cancels it). Once its answer has been relayed
    /// the inventory is polled again, so this node's model list, and the
    /// state it gossips, show the change before the client's call returns.
    async fn manage(&self, req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
        let mut response = self.backend.serve(&req).await?;
        let inventory = self.inventory.clone();
        let body = std::mem::replace(&mut response.body, Box::pin(futures::stream::empty()));
        response.body = Box::pin(async_stream::stream! {
            let mut body = body;
            while let Some(chunk) = body.next().await {
                yield chunk;
            }
            inventory.refresh_now().await;
        });
        Ok(response)
    }

    /// Checks that the model exists, refreshing the inventory once before
    /// calling it unknown (it may have been pulled a moment ago).
    async fn check_model(&self, model: &str) -> Result<(), ServeError> {
        let snapshot = self.inventory.current();
        // A backend that stalled holds every request it takes until the
        // outer timeout: requests that were waiting for its slots go
        // elsewhere (retryable) until a poll finds it answering again.
        if snapshot.stalled {
            return Err(ServeError::BackendUnavailable(format!(
                "this node's {} backend stalled ({}); another node takes the request",
                self.backend.kind().as_str(),
                snapshot.last_error.as_deref().unwrap_or("no answer")
            )));
        }
        if snapshot.inventory.resolve(model).is_some() {
            return Ok(());
        }
        let snapshot = self.inventory.refresh().await;
        if snapshot.inventory.resolve(model).is_some() {
            return Ok(());
        }
        if !snapshot.healthy {
            let reason = snapshot.last_error.clone().unwrap_or_else(|| "not polled yet".into());
            return Err(ServeError::BackendUnavailable(format!(
                "the {} backend cannot be reached, so model '{model}' cannot be checked ({reason})",
                self.backend.kind().as_str()
            )));
        }
        Err(ServeError::ModelNotFound(model.to_string()))
    }
}

#[async_trait::async_trait]
impl RequestHandler for LocalNode {
    async fn serve(&self, req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
        use tracing::Instrument;
        // The backend call, to its response head.
        let span = tracing::debug_span!("backend", request_id = %req.request_id, model = %req.meta.model, backend = self.backend.kind().as_str());
        self.serve_here(req).instrument(span).await
    }
}

impl LocalNode {
    async fn serve_here(&self, req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
        if req.api.is_management() {
            return self.manage(req).await;
        }
        self.check_model(&req.meta.model).await?;
        let turn = req.meta.turn();
        let held = turn.and_then(|turn| Some((self.recent_prefixes.record(turn, &req.meta.model)?, turn.depth)));
        let budget = req
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()).min(self.response_timeout))
            .unwrap_or(self.response_timeout);
        let in_flight = self.load.start(&req.meta.model);
        let started = Instant::now();
        let mut response = match &self.stall {
            Some(watch) => watch.first_byte(self.backend.serve(&req), budget).await?,
            None => match tokio::time::timeout(budget, self.backend.serve(&req)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(ServeError::Timeout(format!(
                        "the {} backend sent no response within {budget:?}",
                        self.backend.kind().as_str()
                    )));
                }
            },
        };
        if let Some(watch) = &self.stall {
            let body = std::mem::replace(&mut response.body, Box::pin(futures::stream::empty()));
            response.body = watch.watch_body(body);
        }
        let head_after = started.elapsed();
        self.load.record_ttft(&req.meta.model, head_after);
        // The request counts as in flight until its body is finished or
        // dropped; a streamed body also yields a decode-speed sample.
        let mut meter = DecodeMeter::new(self.load.clone(), &req.meta.model, &response.content_type);
        // The backend's usage (in the body's last bytes) says whether it
        // still held the conversation this node took for cached, and how
        // fast it evaluates prompts. A short prompt says neither (its time
        // is the request's overheads, its cache is worth nothing), and
        // small requests, the hot path, skip the work.
        let mut usage = (req.body.len() >= USAGE_METER_MIN_BODY).then(|| UsageMeter {
            recent: self.recent_prefixes.clone(),
            load: self.load.clone(),
            model: req.meta.model.clone(),
            held,
            body_len: req.body.len(),
            // A stream's head comes with its first token.
            first_token: meter.is_stream().then_some(head_after),
            tail: Default::default(),
        });
        response.body = Box::pin(response.body.map(move |chunk| {
            let _held = &in_flight;
            if let Ok(bytes) = &chunk {
                meter.observe(bytes);
                if let Some(usage) = &mut usage {
                    usage.observe(bytes);
                }
            }
            chunk
        }));
        Ok(response)
    }
}

impl LocalBackend for LocalNode {
    fn capacity(&self, model: &str, prefix: Option<u64>) -> Option<LocalCapacity> {
        let snapshot = self.inventory.current();
        if !snapshot.healthy {
            return None;
        }
        let entry = snapshot.inventory.resolve(model)?;
        let stats = self.load.snapshot().into_iter().find(|m| same_model(&m.model, model));
        Some(LocalCapacity {
            // As configured, else as the backend says (llama-server).
            slots: if self.slots > 0 { self.slots } else { snapshot.inventory.slots.unwrap_or(0) },
            in_flight: self.load.in_flight(),
            loaded: entry.loaded.is_some(),
            ttft_ms: stats.as_ref().map(|s| s.ttft_ewma_ms).filter(|t| *t > 0.0),
            decode_tps: stats.as_ref().map(|s| s.decode_tokens_per_s_ewma).filter(|t| *t > 0.0),
            prefill_bps: stats.as_ref().map(|s| s.prefill_bytes_per_s_ewma).filter(|t| *t > 0.0),
            held_depth: prefix.and_then(|key| self.recent_prefixes.depth(key)),
        })
    }

    fn has_model(&self, model: &str) -> bool {
        self.inventory.current().inventory.resolve(model).is_some()
    }

    fn waiting(&self, model: &str) -> Box<dyn Send + Sync> {
        Box::new(self.load.enqueue(model))
    }
}

/// Requests with a body at least this long have their usage read: below
/// it a prompt's evaluation is too short to time and its cache too small
/// to matter.
const USAGE_METER_MIN_BODY: usize = 512;
/// Uncached prompt tokens a prompt evaluation sample needs: fewer, and
/// the time to first token is mostly the request's own overheads.
const MIN_PREFILL_SAMPLE_TOKENS: u32 = 64;

/// Reads what the backend reports at the end of a response (OpenAI usage,
/// or llama-server's timings): whether it still held the conversation
/// this node took for cached (see [`RecentPrefixes::observe_cache`]), and
/// how fast it evaluates prompts, in request-body bytes per second (what
/// a conversation's cache is worth here; gossiped).
struct UsageMeter {
    recent: Arc<RecentPrefixes>,
    load: Arc<LoadTracker>,
    model: String,
    /// Where the conversation stood here, and this turn's depth.
    held: Option<(Held, u32)>,
    body_len: usize,
    /// Time to the first token, when the response head carried it (a
    /// stream).
    first_token: Option<Duration>,
    /// The last two chunks: usage sits in the last event or at the end of
    /// the document, possibly across a chunk boundary.
    tail: [Bytes; 2],
}

impl UsageMeter {
    fn observe(&mut self, chunk: &Bytes) {
        self.tail = [std::mem::take(&mut self.tail[1]), chunk.clone()];
    }

    /// Prompt evaluation speed in request-body bytes per second: the
    /// backend's own figure (llama-server's `prompt_per_second`), else the
    /// uncached prompt over the time to first token.
    fn prefill_rate(&self, tail: &[u8], prompt: u32, cached: u32) -> Option<f64> {
        let uncached = prompt.saturating_sub(cached);
        if prompt == 0 || uncached < MIN_PREFILL_SAMPLE_TOKENS {
            return None;
        }
        let bytes_per_token = self.body_len as f64 / f64::from(prompt);
        match reported_number(tail, b"\"prompt_per_second\":") {
            Some(tokens_per_s) => Some(tokens_per_s * bytes_per_token),
            None => {
                let ttft = self.first_token?.as_secs_f64();
                (ttft > 0.0).then(|| f64::from(uncached) * bytes_per_token / ttft)
            }
        }
    }
}

impl Drop for UsageMeter {
    fn drop(&mut self) {
        let tail = [self.tail[0].as_ref(), self.tail[1].as_ref()].concat();
        let Some((prompt, cached)) = reported_cache_use(&tail) else { return };
        if let Some((held, depth)) = self.held {
            self.recent.observe_cache(held, depth, prompt, cached);
        }
        if let Some(rate) = self.prefill_rate(&tail, prompt, cached) {
            self.load.record_prefill(&self.model, rate);
        }
    }
}

/// The number after the last `key` in `tail` (JSON, maybe spaced).
fn reported_number(tail: &[u8], key: &[u8]) -> Option<f64> {
    let at = tail.windows(key.len()).rposition(|w| w == key)? + key.len();
    let rest = &tail[at..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let len = rest[start..].iter().take_while(|b| b.is_ascii_digit() || b".eE+-".contains(b)).count();
    std::str::from_utf8(&rest[start..start + len]).ok()?.parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0)
}

/// `(prompt tokens, cached prompt tokens)` from the end of a response:
/// OpenAI usage (`prompt_tokens`, `cached_tokens`: llama-server, vLLM and
/// SGLang report it), else llama-server's timings (`prompt_n` evaluated
/// plus `cache_n` reused), which its streams carry without usage. Ollama
/// reports no cache use.
fn reported_cache_use(tail: &[u8]) -> Option<(u32, u32)> {
    // Token counts: whole numbers within u32.
    let number_after = |key: &[u8]| -> Option<u32> {
        let n = reported_number(tail, key)?;
        (n.fract() == 0.0 && n <= f64::from(u32::MAX)).then_some(n as u32)
    };
    if let (Some(prompt), Some(cached)) = (number_after(b"\"prompt_tokens\":"), number_after(b"\"cached_tokens\":")) {
        return Some((prompt, cached));
    }
    let (evaluated, cached) = (number_after(b"\"prompt_n\":")?, number_after(b"\"cache_n\":")?);
    Some((evaluated.saturating_add(cached), cached))
}

/// Estimates decode speed from a streamed body: one SSE event or NDJSON
/// line per token, timed from the first to the last.
struct DecodeMeter {
    load: Arc<LoadTracker>,
    model: String,
    /// Newlines per token: 2 for SSE (an event ends in a blank line), 1
    /// for NDJSON, 0 for a single document (nothing to measure).
    newlines_per_token: u64,
    newlines: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl DecodeMeter {
    fn new(load: Arc<LoadTracker>, model: &str, content_type: &str) -> DecodeMeter {
        let newlines_per_token = if content_type.starts_with("text/event-stream") {
            2
        } else if content_type.starts_with("application/x-ndjson") {
            1
        } else {
            0
        };
        DecodeMeter { load, model: model.to_string(), newlines_per_token, newlines: 0, first: None, last: None }
    }

    /// Whether the body streams (SSE or NDJSON): its head came with the
    /// first token.
    fn is_stream(&self) -> bool {
        self.newlines_per_token > 0
    }

    fn observe(&mut self, bytes: &[u8]) {
        if self.newlines_per_token == 0 {
            return;
        }
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.newlines += bytes.iter().filter(|b| **b == b'\n').count() as u64;
    }
}

impl Drop for DecodeMeter {
    fn drop(&mut self) {
        let (Some(first), Some(last)) = (self.first, self.last) else { return };
        let Some(tokens) = self.newlines.checked_div(self.newlines_per_token) else { return };
        let span = last.saturating_duration_since(first).as_secs_f64();
        // Too short a stream says nothing about speed.
        if tokens >= 4 && span > 0.0 {
            self.load.record_decode(&self.model, tokens.saturating_sub(1) as f64 / span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{reported_cache_use, reported_number};

    #[test]
    fn cache_use_comes_from_openai_usage_or_llama_server_timings() {
        let usage = br#"{"choices":[],"usage":{"completion_tokens":5,"prompt_tokens":25,"total_tokens":30,"prompt_tokens_details":{"cached_tokens":17}}}"#;
        assert_eq!(reported_cache_use(usage), Some((25, 17)));
        // llama-server's last stream event has timings, not usage.
        let stream = b"data: {\"choices\":[],\"timings\":{\"cache_n\":30,\"prompt_n\":1,\"prompt_ms\":10.6}}\n\ndata: [DONE]\n\n";
        assert_eq!(reported_cache_use(stream), Some((31, 30)));
        // Spaces after the colon (another server's JSON writer).
        assert_eq!(reported_cache_use(br#"{"prompt_tokens": 9, "cached_tokens": 4}"#), Some((9, 4)));
        // Ollama: token counts without cache use.
        assert_eq!(reported_cache_use(br#"{"done":true,"prompt_eval_count":25,"eval_count":5}"#), None);
        assert_eq!(reported_cache_use(br#"{"usage":{"prompt_tokens":25}}"#), None);
        assert_eq!(reported_cache_use(b""), None);
        assert_eq!(reported_cache_use(br#"{"prompt_tokens":-3,"cached_tokens":1.5}"#), None);
    }

    #[test]
    fn llama_servers_prompt_speed_is_read_as_a_number() {
        let timings = br#""timings":{"cache_n":0,"prompt_n":31,"prompt_ms":115.769,"prompt_per_second":267.7746201487445,"predicted_n":3}"#;
        assert_eq!(reported_number(timings, b"\"prompt_per_second\":"), Some(267.7746201487445));
        assert_eq!(reported_number(br#"{"prompt_per_second":2.5e3}"#, b"\"prompt_per_second\":"), Some(2500.0));
        assert_eq!(reported_number(br#"{"prompt_per_second":null}"#, b"\"prompt_per_second\":"), None);
    }
}
