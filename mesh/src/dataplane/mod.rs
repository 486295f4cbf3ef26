//! The data plane: requests carried between nodes over QUIC.
//!
//! One endpoint per node serves and dials. Each forwarded request is one
//! bidirectional stream: a `RequestHead` and the client's body go out, a
//! `ResponseHead`, body frames as the backend produces them and a
//! `Trailer` come back. Connections are pooled per peer and kept alive, so
//! the hot path opens a stream, never a handshake. Closing a stream cancels
//! the work on the far side.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use llmesh_proto::frame::{Frame, FrameCodec, body_frames};
use llmesh_proto::{ApiKind, PROTOCOL_VERSION, RequestHead, ResponseHead, Trailer};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use libp2p::PeerId;

use crate::membership::MeshView;
use crate::peers::Liveness;
use crate::pki::{PkiError, Trust};
use crate::{InferenceRequest, InferenceResponse, RequestHandler, RequestMeta, ServeError};

/// How long a peer may take to send a request's head and body.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alives make an idle pooled connection survive NATs and let a dead
/// peer be noticed within the idle timeout.
const KEEP_ALIVE: Duration = Duration::from_millis(500);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection to a peer no request used for this long is closed; the
/// next request to that peer opens a new one (one round trip on a LAN).
const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// How long a peer may take to finish the QUIC and TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in quinn's buffer or are refused.
const MAX_INCOMING: usize = 256;
/// Streams one peer may have open at once: forwarded requests in flight.
const MAX_STREAMS_PER_PEER: u32 = 4096;

/// ALPN of the data plane; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"llmesh/1";

/// A failure to start the data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// TLS setup failed (or this node has no certificate yet).
    #[error("data-plane TLS: {0}")]
    Tls(#[from] PkiError),
    /// The UDP port could not be bound.
    #[error("cannot bind the data plane on {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// How this node's data plane behaves.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// This node's name, returned in every response head.
    pub node_name: String,
    /// Time allowed to establish a connection to a peer.
    pub connect_timeout: Duration,
    /// Time allowed until a peer's response head.
    pub head_timeout: Duration,
    /// Largest request body accepted from a peer.
    pub max_body_bytes: usize,
}

/// Where a peer's data plane is and who must answer there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerAddr {
    addr: SocketAddr,
    node: PeerId,
}

pub use exchange::Pending;
pub use pool::InFlight;

mod exchange;
mod pool;

/// A response from a peer, and which node produced it.
#[derive(Debug)]
pub struct Forwarded {
    /// The response, body still streaming.
    pub response: InferenceResponse,
    /// Name of the node that served it.
    pub node: String,
}

/// This node's QUIC endpoint.
pub struct DataPlane {
    endpoint: quinn::Endpoint,
    trust: Arc<Trust>,
    peers: Mutex<HashMap<String, PeerAddr>>,
    /// Connections to peers, opened on demand.
    pool: pool::Pool,
    draining: Arc<AtomicBool>,
    tracker: TaskTracker,
    config: DataPlaneConfig,
    /// The runtime the endpoint was bound on. Connections are dialled on
    /// it, so their driver tasks live with the rest of the mesh: a request
    /// handled on an HTTP connection thread (see the agent's
    /// `http_server::threads`) would otherwise leave the connection's
    /// driver on that thread, where every other thread's streams depend on
    /// it and it ends with that thread.
    runtime: tokio::runtime::Handle,
}

/// The transport of a connection; `keep_alive` on the side that dialled
/// only: its pings and the peer's acknowledgements keep both ends' idle
/// timers at bay, so the accepting side sending its own would double the
/// packets of every idle connection for nothing.
fn transport(keep_alive: bool) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(keep_alive.then_some(KEEP_ALIVE));
    // Within the bounds quinn accepts; 3 s always fits.
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        transport.max_idle_timeout(Some(idle));
    }
    transport.max_concurrent_bidi_streams(MAX_STREAMS_PER_PEER.into());
    transport.max_concurrent_uni_streams(0u32.into());
    Arc::new(transport)
}

impl DataPlane {
    /// Binds the endpoint and starts serving streams with `handler` until
    /// `shutdown`.
    /// Peers must present a certificate of a member that is not revoked.
    pub fn bind(
        config: DataPlaneConfig,
        trust: Arc<Trust>,
        handler: Arc<dyn RequestHandler>,
        shutdown: CancellationToken,
    ) -> Result<Arc<DataPlane>, DataPlaneError> {
        let crypto = crate::pki::tls::server_config(&trust, ALPN)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
            .map_err(|e| PkiError::Invalid(format!("QUIC TLS: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(transport(false));
        server.max_incoming(MAX_INCOMING);
        let endpoint = quinn::Endpoint::server(server, config.listen)
            .map_err(|source| DataPlaneError::Bind { addr: config.listen, source })?;
        let plane = Arc::new(DataPlane {
            endpoint,
            trust,
            peers: Mutex::new(HashMap::new()),
            pool: pool::Pool::default(),
            draining: Arc::new(AtomicBool::new(false)),
            tracker: TaskTracker::new(),
            config,
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(close_idle_connections(Arc::downgrade(&plane), shutdown.clone()));
        tokio::spawn(accept_loop(plane.clone(), handler, shutdown));
        Ok(plane)
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Takes in the latest membership view: where peers are, and which
    /// pooled connections belong to dead or revoked peers.
    pub fn update_peers(&self, view: &MeshView) {
        let mut peers = HashMap::new();
        for peer in view.peers.iter().filter(|p| p.liveness != Liveness::Dead) {
            if self.trust.is_revoked(&peer.state.node_id) {
                continue;
            }
            let Ok(node) = peer.state.node_id.parse::<PeerId>() else { continue };
            let Ok(addr) = peer.state.data_addr.parse::<SocketAddr>() else { continue };
            peers.insert(peer.state.node_id.clone(), PeerAddr { addr, node });
        }
        self.pool.follow(|id| peers.get(id).map(|p| p.addr));
        *self.peers.lock().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// Ids of the peers with a data plane, to connect to ahead of traffic.
    pub fn known_peers(&self) -> Vec<String> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }

    /// Round-trip time to each peer this node has had a connection to, by
    /// peer id (QUIC's own smoothed estimate; the last one measured for a
    /// connection closed since).
    pub fn peer_rtts(&self) -> Vec<(String, Duration)> {
        self.pool.rtts()
    }

    /// Round-trip time to `node_id`, as [`Self::peer_rtts`].
    pub fn peer_rtt(&self, node_id: &str) -> Option<Duration> {
        self.pool.rtt(node_id)
    }

    /// Refuses new requests from now on (they fail over to other nodes);
    /// requests already running continue.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Waits until every request being served has finished, at most `limit`;
    /// returns whether they all did.
    pub async fn drained(&self, limit: Duration) -> bool {
        tracing::debug!(running = self.tracker.len(), "waiting for forwarded requests");
        self.tracker.close();
        tokio::time::timeout(limit, self.tracker.wait()).await.is_ok()
    }

    /// Closes the endpoint.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    async fn connection(&self, node_id: &str, slot: &pool::Slot) -> Result<quinn::Connection, ServeError> {
        let mut slot = slot.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let peer =
            self.peers.lock().unwrap_or_else(PoisonError::into_inner).get(node_id).cloned().ok_or_else(|| {
                ServeError::BackendUnreachable(format!("no data-plane address known for node {node_id}"))
            })?;
        let crypto = crate::pki::tls::client_config(&self.trust, Some(peer.node), ALPN)
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(transport(true));
        // quinn's connection task takes on the current span, and would hold
        // the first request's trace open for as long as the connection
        // lives: it is started from a task of its own, outside any span,
        // on the endpoint's runtime.
        let endpoint = self.endpoint.clone();
        let connecting = self
            .runtime
            .spawn(async move { endpoint.connect_with(client, peer.addr, crate::pki::tls::SERVER_NAME) })
            .await
            .map_err(|e| ServeError::Internal(format!("dialling task failed: {e}")))?
            .map_err(|e| ServeError::BackendUnreachable(format!("cannot dial {}: {e}", peer.addr)))?;
        let conn = tokio::time::timeout(self.config.connect_timeout, connecting)
            .await
            .map_err(|_| ServeError::BackendUnreachable(format!("no QUIC handshake with {} in time", peer.addr)))?
            .map_err(|e| ServeError::BackendUnreachable(format!("QUIC handshake with {} failed: {e}", peer.addr)))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` to `node_id` and returns once its response head arrives.
    pub async fn forward(&self, node_id: &str, req: &InferenceRequest) -> Result<Forwarded, ServeError> {
        self.send(node_id, req, false).await?.response().await
    }

    /// Sends `req` to `node_id`; the answer is read through the returned
    /// [`Pending`]. `reserve`: the request is queued elsewhere too, and the
    /// peer says when it gives it a slot ([`Pending::started`]).
    pub async fn send(&self, node_id: &str, req: &InferenceRequest, reserve: bool) -> Result<Pending, ServeError> {
        let slot = self.pool.slot(node_id);
        let in_flight = slot.begin();
        let conn = self.connection(node_id, &slot).await?;
        let (send, recv) =
            conn.open_bi().await.map_err(|e| ServeError::BackendUnreachable(format!("cannot open a stream: {e}")))?;
        let mut writer = FramedWrite::new(send, FrameCodec::default());
        let left =
            |at: Option<Instant>| at.map_or(0, |d| d.saturating_duration_since(Instant::now()).as_millis() as u64);
        let head = RequestHead {
            protocol_version: PROTOCOL_VERSION,
            request_id: req.request_id.clone(),
            api: req.api as i32,
            model: req.meta.model.clone(),
            stream: req.meta.stream,
            deadline_ms: left(req.deadline),
            tenant: req.meta.tenant.clone(),
            affinity_key: req.meta.prefix.unwrap_or(0),
            max_tokens: req.meta.output_tokens.unwrap_or(0),
            queue_ms: left(req.queue_until),
            reserve,
            traceparent: req.traceparent.clone(),
        };
        let sent = async {
            writer.feed(Frame::RequestHead(head)).await?;
            for frame in body_frames(req.body.clone()) {
                writer.feed(frame).await?;
            }
            writer.flush().await
        };
        sent.await.map_err(|e| ServeError::BackendUnreachable(format!("sending the request failed: {e}")))?;
        // Tell the peer the request is complete; a finished stream stays
        // readable in the other direction.
        writer.get_mut().finish().map_err(|e| ServeError::BackendUnreachable(format!("closing the request: {e}")))?;
        let reader = FramedRead::new(recv, FrameCodec::default());
        Ok(Pending::new(node_id, (writer, reader, in_flight), req, self.config.head_timeout))
    }
}

/// Closes the connections to peers that no request used for
/// [`IDLE_CLOSE`], until `shutdown` or the data plane is gone.
async fn close_idle_connections(plane: std::sync::Weak<DataPlane>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(IDLE_CLOSE / 6);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(plane) = plane.upgrade() else { return };
        plane.pool.close_idle(IDLE_CLOSE);
    }
}

async fn accept_loop(plane: Arc<DataPlane>, handler: Arc<dyn RequestHandler>, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = plane.endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let plane = plane.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(err)) => {
                    // Outsiders, revoked nodes and foreign CAs end here.
                    tracing::debug!(%from, error = %err, "refused a data-plane connection");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%from, "data-plane handshake timed out");
                    return;
                }
            };
            let Some(peer) = peer_of(&conn) else {
                conn.close(1u32.into(), b"no certificate");
                return;
            };
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(streams) => streams,
                    Err(_) => return,
                };
                // Revocation also ends connections opened before it.
                if plane.trust.is_revoked(&peer) {
                    tracing::info!(%peer, "closing the data-plane connection of a revoked node");
                    conn.close(2u32.into(), b"revoked");
                    return;
                }
                let handler = handler.clone();
                let plane = plane.clone();
                let peer = peer.clone();
                plane.tracker.clone().spawn(async move { serve_stream(&plane, handler, &peer, send, recv).await });
            }
        });
    }
    tracing::debug!("data plane stopped accepting");
}

/// The node id behind an accepted connection's client certificate.
fn peer_of(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    crate::pki::node_id_of(certs.first()?).ok().map(|id| id.to_string())
}

/// How long a finished response waits for the peer to acknowledge it.
const FINISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Ends the response stream and waits until the peer has received all of
/// it, so that closing the endpoint right after (at the end of a drain)
/// cannot discard the last frames.
async fn finish(writer: &mut FramedWrite<quinn::SendStream, FrameCodec>) {
    if writer.get_mut().finish().is_ok() {
        let _ = tokio::time::timeout(FINISH_ACK_TIMEOUT, writer.get_mut().stopped()).await;
    }
}

fn refusal(node: &str, err: &ServeError) -> ResponseHead {
    ResponseHead {
        status: u32::from(err.status()),
        content_type: "application/json".into(),
        node: node.to_string(),
        error_code: err.code().to_string(),
        error_message: err.message().to_string(),
    }
}

async fn read_request(
    reader: &mut FramedRead<quinn::RecvStream, FrameCodec>,
    max_body: usize,
) -> Result<(RequestHead, Bytes), ServeError> {
    let head = match reader.next().await {
        Some(Ok(Frame::RequestHead(head))) => head,
        Some(Ok(_)) => return Err(ServeError::BadRequest("protocol error: a request starts with its head".into())),
        Some(Err(e)) => return Err(ServeError::BadRequest(format!("protocol error: {e}"))),
        None => return Err(ServeError::BadRequest("empty stream".into())),
    };
    let mut body = BytesMut::new();
    while let Some(frame) = reader.next().await {
        match frame {
            Ok(Frame::Body(bytes)) => {
                if body.len() + bytes.len() > max_body {
                    return Err(ServeError::BadRequest(format!("request body exceeds {max_body} bytes")));
                }
                body.extend_from_slice(&bytes);
            }
            Ok(_) => return Err(ServeError::BadRequest("protocol error: only body frames follow the head".into())),
            Err(e) => return Err(ServeError::BadRequest(format!("protocol error: {e}"))),
        }
    }
    Ok((head, body.freeze()))
}

async fn serve_stream(
    plane: &DataPlane,
    handler: Arc<dyn RequestHandler>,
    from: &str,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let node = plane.config.node_name.as_str();
    let mut reader = FramedRead::new(recv, FrameCodec::default());
    let mut writer = FramedWrite::new(send, FrameCodec::default());
    let read = tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(&mut reader, plane.config.max_body_bytes)).await;
    let (head, body) = match read {
        Ok(Ok(request)) => request,
        Ok(Err(err)) => {
            let _ = writer.send(Frame::ResponseHead(refusal(node, &err))).await;
            finish(&mut writer).await;
            return;
        }
        Err(_) => return,
    };
    let refuse = |err: ServeError| refusal(node, &err);
    let early = early_refusal(plane, &head).map(&refuse);
    if let Some(refusal) = early {
        let _ = writer.send(Frame::ResponseHead(refusal)).await;
        finish(&mut writer).await;
        return;
    }
    let api = ApiKind::try_from(head.api).unwrap_or(ApiKind::Unspecified);
    tracing::debug!(id = %head.request_id, model = %head.model, api = api.as_str_name(), "serving a forwarded request");
    let request_id = head.request_id.clone();
    let reserved = head.reserve;
    let mut request = request_of(head, api, body, from);
    let on_slot = Arc::new(tokio::sync::Notify::new());
    if reserved {
        request.on_slot = Some(on_slot.clone());
    }
    // A request may wait here for a slot; the entry node giving up (its
    // client left, or another node started it first) takes it out of the
    // queue.
    let serve = handler.serve(request);
    tokio::pin!(serve);
    let mut told = !reserved;
    let served = loop {
        tokio::select! {
            served = &mut serve => break served,
            () = on_slot.notified(), if !told => {
                told = true;
                if writer.send(Frame::Started).await.is_err() {
                    return;
                }
            }
            _ = writer.get_mut().stopped() => {
                tracing::debug!(id = %request_id, "forwarded request cancelled by the entry node before it started");
                return;
            }
        }
    };
    let response = match served {
        Ok(response) => response,
        Err(err) => {
            let _ = writer.send(Frame::ResponseHead(refuse(err))).await;
            finish(&mut writer).await;
            return;
        }
    };
    let head = ResponseHead {
        status: u32::from(response.status),
        content_type: response.content_type.clone(),
        node: node.to_string(),
        ..ResponseHead::default()
    };
    if writer.send(Frame::ResponseHead(head)).await.is_err() {
        return;
    }
    relay_body(&mut writer, response.body).await;
    tracing::debug!(id = %request_id, "forwarded request finished");
}

/// Why a request must be refused before it runs: an incompatible peer, or
/// this node draining.
fn early_refusal(plane: &DataPlane, head: &RequestHead) -> Option<ServeError> {
    if head.protocol_version != PROTOCOL_VERSION {
        Some(ServeError::Unsupported(format!(
            "incompatible llmesh protocol version {} (this node speaks {PROTOCOL_VERSION}); upgrade the older node",
            head.protocol_version
        )))
    } else if plane.draining.load(Ordering::SeqCst) {
        Some(ServeError::BackendUnavailable(format!("node {} is draining", plane.config.node_name)))
    } else {
        None
    }
}

/// The request a head and body describe, as the entry node parsed it.
fn request_of(head: RequestHead, api: ApiKind, body: Bytes, from: &str) -> InferenceRequest {
    let after = |ms: u64| (ms > 0).then(|| Instant::now() + Duration::from_millis(ms));
    let deadline = after(head.deadline_ms);
    let queue_until = after(head.queue_ms);
    let meta = RequestMeta {
        model: head.model,
        stream: head.stream,
        output_tokens: (head.max_tokens > 0).then_some(head.max_tokens),
        prefix: (head.affinity_key != 0).then_some(head.affinity_key),
        // The body crossed the hop unchanged: its length is the entry's.
        depth: u32::try_from(body.len()).unwrap_or(u32::MAX),
        tenant: head.tenant,
    };
    InferenceRequest {
        request_id: head.request_id,
        api,
        meta,
        body,
        deadline,
        queue_until,
        forwarded_by: Some(from.to_string()),
        on_slot: None,
        traceparent: head.traceparent,
    }
}

/// Sends the body as it comes, then the trailer; stops (dropping the body,
/// which cancels the backend request) when the entry node goes away.
async fn relay_body(writer: &mut FramedWrite<quinn::SendStream, FrameCodec>, mut body: crate::BodyStream) {
    loop {
        let mut next = tokio::select! {
            next = body.next() => next,
            _ = writer.get_mut().stopped() => {
                tracing::debug!("forwarded request cancelled by the entry node");
                return;
            }
        };
        // Chunks the backend already sent go out in one flush: a burst of
        // small SSE events costs one wake of the QUIC connection, not one
        // each.
        let end = loop {
            match next {
                Some(Ok(bytes)) => {
                    for frame in body_frames(bytes) {
                        if writer.feed(frame).await.is_err() {
                            return;
                        }
                    }
                    match body.next().now_or_never() {
                        Some(more) => next = more,
                        None => break None,
                    }
                }
                end => break Some(end),
            }
        };
        if writer.flush().await.is_err() {
            return;
        }
        let trailer = match end {
            None => continue,
            Some(Some(Err(err))) => Trailer { error: err.to_string() },
            Some(_) => Trailer::default(),
        };
        let _ = writer.send(Frame::Trailer(trailer)).await;
        finish(writer).await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::PeerSnapshot;
    use llmesh_proto::NodeState;

    /// Streams back the request body in three chunks, or refuses unknown models.
    struct Echo;

    #[async_trait::async_trait]
    impl RequestHandler for Echo {
        async fn serve(&self, req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
            if req.meta.model != "m" {
                return Err(ServeError::ModelNotFound(req.meta.model));
            }
            let mut chunks =
                vec![Ok(Bytes::from_static(b"one ")), Ok(req.body.clone()), Ok(Bytes::from_static(b" three"))];
            if !req.meta.tenant.is_empty() {
                let meta = &req.meta;
                let echo = format!(
                    " tenant={} prefix={:?} tokens={:?} stream={}",
                    meta.tenant, meta.prefix, meta.output_tokens, meta.stream
                );
                chunks.push(Ok(Bytes::from(echo)));
            }
            Ok(InferenceResponse {
                status: 200,
                content_type: "text/event-stream".into(),
                body: Box::pin(futures::stream::iter(chunks)),
            })
        }
    }

    fn plane(name: &str, trust: &Arc<Trust>) -> Arc<DataPlane> {
        let config = DataPlaneConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            node_name: name.into(),
            connect_timeout: Duration::from_secs(2),
            head_timeout: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
        };
        DataPlane::bind(config, trust.clone(), Arc::new(Echo), CancellationToken::new()).expect("binds")
    }

    fn view_of(peers: &[&DataPlane]) -> MeshView {
        MeshView {
            peers: peers
                .iter()
                .map(|p| PeerSnapshot {
                    state: NodeState {
                        node_id: p.trust.node_id().to_string(),
                        data_addr: p.local_addr().expect("addr").to_string(),
                        ..NodeState::default()
                    },
                    liveness: Liveness::Alive,
                    last_seen_ago: Duration::ZERO,
                })
                .collect(),
            ..MeshView::default()
        }
    }

    fn request(model: &str, body: &'static [u8]) -> InferenceRequest {
        InferenceRequest {
            request_id: "r1".into(),
            api: ApiKind::OpenaiChat,
            meta: RequestMeta { model: model.into(), stream: true, ..RequestMeta::default() },
            body: Bytes::from_static(body),
            deadline: None,
            queue_until: None,
            forwarded_by: None,
            on_slot: None,
            traceparent: String::new(),
        }
    }

    async fn body_of(response: InferenceResponse) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let mut body = response.body;
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    /// Two members that know each other (and the directories they live in).
    fn pair() -> (Arc<DataPlane>, Arc<DataPlane>, Vec<tempfile::TempDir>) {
        let (dirs, trust) = crate::pki::test_cluster(2);
        let (a, b) = (plane("node-a", &trust[0]), plane("node-b", &trust[1]));
        a.update_peers(&view_of(&[&b]));
        b.update_peers(&view_of(&[&a]));
        (a, b, dirs)
    }

    fn id(plane: &DataPlane) -> String {
        plane.trust.node_id().to_string()
    }

    #[tokio::test]
    async fn a_request_and_its_streamed_answer_cross_the_hop() {
        let (a, b, _dirs) = pair();
        let forwarded = a.forward(&id(&b), &request("m", b"two")).await.expect("forwards");
        assert_eq!(forwarded.node, "node-b");
        assert_eq!(forwarded.response.status, 200);
        assert_eq!(body_of(forwarded.response).await.expect("complete"), b"one two three");
        // The second request reuses the pooled connection.
        let again = a.forward(&id(&b), &request("m", b"2")).await.expect("forwards");
        assert_eq!(body_of(again.response).await.expect("complete"), b"one 2 three");
    }

    #[tokio::test]
    async fn errors_before_the_first_byte_keep_their_class() {
        let (a, b, _dirs) = pair();
        let err = a.forward(&id(&b), &request("other", b"")).await.expect_err("refused");
        assert_eq!(err, ServeError::ModelNotFound("other".into()));
        b.start_drain();
        let err = a.forward(&id(&b), &request("m", b"")).await.expect_err("draining");
        assert!(matches!(err, ServeError::BackendUnavailable(_)) && err.is_retryable(), "{err}");
    }

    #[tokio::test]
    async fn only_members_that_are_not_revoked_get_through() {
        let (dirs, trust) = crate::pki::test_cluster(3);
        let (a, b) = (plane("node-a", &trust[1]), plane("node-b", &trust[2]));
        a.update_peers(&view_of(&[&b]));
        assert!(a.forward(&id(&b), &request("m", b"x")).await.is_ok());

        // A node of another cluster (its own CA) cannot call b...
        let (_other_dirs, other) = crate::pki::test_cluster(1);
        let outsider = plane("outsider", &other[0]);
        outsider.update_peers(&view_of(&[&b]));
        let err = outsider.forward(&id(&b), &request("m", b"x")).await.expect_err("refused");
        assert!(err.is_retryable(), "{err}");

        // ...and a dialler accepts only the node it meant to reach.
        let c = plane("node-c", &trust[0]);
        let mut wrong = view_of(&[&b]);
        wrong.peers[0].state.node_id = id(&c);
        a.update_peers(&wrong);
        assert!(a.forward(&id(&c), &request("m", b"x")).await.is_err());

        // Once b revokes a, a's connection and certificate are worthless,
        // both for streams on the open connection and for new handshakes.
        a.update_peers(&view_of(&[&b]));
        assert!(a.forward(&id(&b), &request("m", b"x")).await.is_ok());
        trust[2].set_revoked([id(&a)].into());
        assert!(a.forward(&id(&b), &request("m", b"x")).await.is_err());
        assert!(a.forward(&id(&b), &request("m", b"x")).await.is_err());
        drop(dirs);
    }

    #[tokio::test]
    async fn an_idle_connection_closes_and_the_next_request_opens_one() {
        let (a, b, _dirs) = pair();
        assert!(a.peer_rtt(&id(&b)).is_none(), "no connection before the first request");
        let body = |r: Forwarded| body_of(r.response);
        assert_eq!(
            body(a.forward(&id(&b), &request("m", b"1")).await.expect("forwarded")).await.as_deref(),
            Ok(&b"one 1 three"[..])
        );
        let slot = a.pool.slot(&id(&b));
        let first = slot.conn.lock().await.clone().expect("a pooled connection");
        assert!(a.peer_rtt(&id(&b)).is_some(), "measured");

        // In use: a response still streaming keeps its connection.
        let streaming = a.forward(&id(&b), &request("m", b"2")).await.expect("forwarded");
        a.pool.close_idle(Duration::ZERO);
        assert!(first.close_reason().is_none(), "closed under a response");
        assert_eq!(body(streaming).await.as_deref(), Ok(&b"one 2 three"[..]));

        let rtt = first.rtt();
        a.pool.close_idle(Duration::ZERO);
        assert!(first.close_reason().is_some(), "idle, so closed");
        assert_eq!(a.peer_rtt(&id(&b)), Some(rtt), "the last round trip is remembered");
        assert_eq!(
            body(a.forward(&id(&b), &request("m", b"3")).await.expect("forwarded")).await.as_deref(),
            Ok(&b"one 3 three"[..])
        );
        let second = slot.conn.lock().await.clone().expect("a new connection");
        assert_ne!(first.stable_id(), second.stable_id());
    }

    #[tokio::test]
    async fn an_incompatible_peer_gets_a_clear_refusal() {
        let (a, b, _dirs) = pair();
        let conn = a.connection(&id(&b), &a.pool.slot(&id(&b))).await.expect("connects");
        let (send, recv) = conn.open_bi().await.expect("stream");
        let mut writer = FramedWrite::new(send, FrameCodec::default());
        let head = RequestHead { protocol_version: 99, request_id: "old".into(), ..RequestHead::default() };
        writer.send(Frame::RequestHead(head)).await.expect("sent");
        writer.get_mut().finish().expect("finished");
        let mut reader = FramedRead::new(recv, FrameCodec::default());
        let Some(Ok(Frame::ResponseHead(answer))) = reader.next().await else { panic!("expected a response head") };
        assert_eq!(answer.error_code, "unsupported");
        assert!(answer.error_message.contains("incompatible llmesh protocol version 99"), "{}", answer.error_message);
    }

    #[tokio::test]
    async fn the_request_meta_crosses_the_hop() {
        let (a, b, _dirs) = pair();
        let mut req = request("m", b"two");
        req.meta = RequestMeta { tenant: "key_1".into(), prefix: Some(42), output_tokens: Some(7), ..req.meta };
        let forwarded = a.forward(&id(&b), &req).await.expect("forwards");
        let text = String::from_utf8(body_of(forwarded.response).await.expect("complete")).expect("utf-8");
        assert!(text.ends_with("tenant=key_1 prefix=Some(42) tokens=Some(7) stream=true"), "{text}");
    }
}
