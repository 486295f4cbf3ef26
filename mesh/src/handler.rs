//! The seam between the data plane and whatever runs requests.

use std::pin::Pin;
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use llmesh_proto::ApiKind;

use crate::ServeError;

/// Response body bytes as the backend produced them (SSE events, NDJSON
/// lines or one JSON document). An `Err` item means the stream broke after
/// it started; the relay turns it into an error event in the API's format.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, StreamError>> + Send>>;

/// Why a response body broke after it started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The backend's connection broke or it sent something unreadable.
    #[error("the backend's stream broke: {0}")]
    Backend(String),
    /// The peer serving a forwarded request went away or broke the protocol.
    #[error("{0}")]
    Peer(String),
    /// Nothing arrived for longer than the idle timeout.
    #[error("backend sent nothing for {0:?}; stream abandoned")]
    Idle(std::time::Duration),
    /// The serving node reported an error in its trailer.
    #[error("{0}")]
    Remote(String),
}

/// What the HTTP edge read from a request's body, once: everything that
/// decides where and how it runs. The body itself is never parsed again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMeta {
    /// The model name (after the cluster's model routes).
    pub model: String,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    /// The output length the request asks for, when it says.
    pub output_tokens: Option<u32>,
    /// The conversation so far (see [`crate::route::prefix`]), for KV-cache
    /// affinity; `None` for requests that continue nothing (embeddings).
    pub prefix: Option<u64>,
    /// How far the conversation has got: the request body's length in
    /// bytes (see [`crate::route::prefix::Turn`]).
    pub depth: u32,
    /// The fairness bucket in the entry queue: the API key's id, or
    /// `anonymous`.
    pub tenant: String,
}

impl RequestMeta {
    /// The request's place in its conversation, when it continues one.
    pub fn turn(&self) -> Option<crate::route::prefix::Turn> {
        self.prefix.map(|key| crate::route::prefix::Turn { key, depth: self.depth })
    }
}

/// A request ready to run: its meta parsed, its body kept as received.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    /// Id that follows the request across hops and into every log line.
    pub request_id: String,
    /// The client-facing API it arrived on.
    pub api: ApiKind,
    /// What routing needs to know about it.
    pub meta: RequestMeta,
    /// The client's body, byte for byte.
    pub body: Bytes,
    /// When the request must be abandoned, if it has a deadline.
    pub deadline: Option<Instant>,
    /// How long the serving node may hold it waiting for a slot (the entry
    /// node's queue deadline); `None`: the serving node's own queue timeout.
    pub queue_until: Option<Instant>,
    /// The peer that forwarded it here; `None` when it entered here.
    pub forwarded_by: Option<String>,
    /// Told the moment the request takes a slot here, when the entry node
    /// queued it at other nodes too (they are then cancelled).
    pub on_slot: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The W3C `traceparent` of the entry node's span; empty when the
    /// request is not traced.
    pub traceparent: String,
}

/// A response whose head is known and whose body is still streaming.
pub struct InferenceResponse {
    /// HTTP status from the backend.
    pub status: u16,
    /// Content type of the body (`text/event-stream`, `application/x-ndjson`,
    /// `application/json`).
    pub content_type: String,
    /// The body, relayed chunk by chunk; dropping it cancels the work.
    pub body: BodyStream,
}

impl std::fmt::Debug for InferenceResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceResponse")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

/// Runs requests on this node. The HTTP API calls it for local work and the
/// data-plane server calls it for requests forwarded by peers.
#[async_trait::async_trait]
pub trait RequestHandler: Send + Sync + 'static {
    /// Start serving `req`; returns once the response head is known.
    async fn serve(&self, req: InferenceRequest) -> Result<InferenceResponse, ServeError>;
}
