//! Serving a request on this node's own backend. This is the
//! [`RequestHandler`] the HTTP API calls for local work and the data plane
//! will call for requests forwarded by peers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use llmesh_mesh::route::candidates::same_model;
use llmesh_mesh::route::prefix::RecentPrefixes;
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
        if let Some(turn) = req.meta.turn() {
            self.recent_prefixes.record(turn);
        }
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
        self.load.record_ttft(&req.meta.model, started.elapsed());
        // The request counts as in flight until its body is finished or
        // dropped; a streamed body also yields a decode-speed sample.
        let mut meter = DecodeMeter::new(self.load.clone(), &req.meta.model, &response.content_type);
        response.body = Box::pin(response.body.map(move |chunk| {
            let _held = &in_flight;
            if let Ok(bytes) = &chunk {
                meter.observe(bytes);
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
