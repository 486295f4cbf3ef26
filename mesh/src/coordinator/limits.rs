//! Mesh-wide rate limits: the Raft leader keeps one sliding window per API
//! key ([`super::limiter`]); entry nodes ask it before each request of a
//! rate-limited key (one loopback or LAN round trip) and report tokens
//! after. While no leader is reachable each node enforces the limits on
//! its own, so the mesh as a whole may then admit up to one limit per node.
//! A new leader starts with empty windows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use llmesh_proto::limits_client::LimitsClient as GrpcClient;
use llmesh_proto::{AcquireReply, AcquireRequest, RaftAck, TokensReport};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::pki::Trust;
use crate::pki::grpc::ChannelOptions;

use super::RaftStatus;
use super::limiter::{Decision, Limiter};
use super::transport::CLUSTER_HEADER;

const CALL_TIMEOUT: Duration = Duration::from_millis(750);

/// Both halves share the windows: the leader answers from them, and every
/// node falls back to them when it cannot reach the leader.
pub struct LimitsClient {
    limiter: Mutex<Limiter>,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
    tag: MetadataValue<tonic::metadata::Ascii>,
    trust: Arc<Trust>,
    /// The runtime this client was made on: channels are opened on it, so
    /// their connection tasks stay with the mesh and not on whichever
    /// HTTP connection thread asked first.
    runtime: Option<tokio::runtime::Handle>,
}

fn decision(reply: &AcquireReply) -> Decision {
    Decision {
        allowed: reply.allowed,
        remaining_requests: reply.remaining_requests,
        remaining_tokens: reply.remaining_tokens,
        retry_after: Duration::from_millis(reply.retry_after_ms),
        reset_requests: Duration::from_millis(reply.reset_requests_ms),
        reset_tokens: Duration::from_millis(reply.reset_tokens_ms),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl LimitsClient {
    /// A client presenting the cluster tag.
    pub fn new(tag: &str, trust: Arc<Trust>) -> LimitsClient {
        LimitsClient {
            limiter: Mutex::new(Limiter::default()),
            channels: Mutex::new(HashMap::new()),
            tag: tag.parse().unwrap_or_else(|_| MetadataValue::from_static("invalid")),
            trust,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    fn local(&self, key: &str, rpm: u64, tpm: u64) -> Decision {
        let mut limiter = self.limiter.lock().unwrap_or_else(PoisonError::into_inner);
        limiter.sweep(Instant::now());
        limiter.acquire(key, rpm, tpm, Instant::now())
    }

    fn channel(&self, addr: SocketAddr) -> Option<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(&addr) {
            return Some(channel.clone());
        }
        let options = ChannelOptions { connect_timeout: Duration::from_millis(500), timeout: CALL_TIMEOUT };
        let _on_mesh_runtime = self.runtime.as_ref().map(tokio::runtime::Handle::enter);
        let channel = crate::pki::grpc::channel(addr, &self.trust, options).ok()?;
        channels.insert(addr, channel.clone());
        Some(channel)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(CLUSTER_HEADER, self.tag.clone());
        request
    }

    /// Admits one request (see the module docs for where it is decided).
    pub async fn acquire(&self, status: &RaftStatus, key: &str, rpm: u64, tpm: u64) -> Decision {
        if status.role == "leader" {
            return self.local(key, rpm, tpm);
        }
        if let Some(channel) = status.leader_addr.and_then(|addr| self.channel(addr)) {
            let request = self.request(AcquireRequest {
                key_id: key.to_string(),
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            });
            match GrpcClient::new(channel).acquire(request).await {
                Ok(reply) => return decision(&reply.into_inner()),
                Err(status) => {
                    tracing::debug!(error = %status.message(), "rate-limit leader unreachable; limiting locally")
                }
            }
        }
        self.local(key, rpm, tpm)
    }

    /// Reports tokens in the background.
    pub fn report(&self, status: &RaftStatus, key: &str, tokens: u64) {
        if status.role == "leader" || status.leader_addr.is_none() {
            self.limiter.lock().unwrap_or_else(PoisonError::into_inner).record_tokens(key, tokens, Instant::now());
            return;
        }
        let Some(channel) = status.leader_addr.and_then(|addr| self.channel(addr)) else { return };
        let request = self.request(TokensReport { key_id: key.to_string(), tokens });
        tokio::spawn(async move {
            if let Err(status) = GrpcClient::new(channel).report(request).await {
                tracing::debug!(error = %status.message(), "token report to the leader failed");
            }
        });
    }
}

/// The server half, on every node; only the leader answers.
pub struct LimitsService {
    /// The shared windows.
    pub limits: Arc<LimitsClient>,
    /// This node's Raft status.
    pub status: watch::Receiver<RaftStatus>,
    /// Expected cluster tag.
    pub tag: String,
}

impl LimitsService {
    fn check<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let presented = request.metadata().get(CLUSTER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !super::state::constant_time_eq(presented.as_bytes(), self.tag.as_bytes()) {
            return Err(tonic::Status::permission_denied("not a member of this cluster"));
        }
        if self.status.borrow().role != "leader" {
            return Err(tonic::Status::failed_precondition("not the Raft leader"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl llmesh_proto::limits_server::Limits for LimitsService {
    async fn acquire(
        &self,
        request: tonic::Request<AcquireRequest>,
    ) -> Result<tonic::Response<AcquireReply>, tonic::Status> {
        self.check(&request)?;
        let r = request.into_inner();
        let d = self.limits.local(&r.key_id, r.requests_per_minute, r.tokens_per_minute);
        Ok(tonic::Response::new(AcquireReply {
            allowed: d.allowed,
            remaining_requests: d.remaining_requests,
            remaining_tokens: d.remaining_tokens,
            retry_after_ms: ms(d.retry_after),
            reset_requests_ms: ms(d.reset_requests),
            reset_tokens_ms: ms(d.reset_tokens),
        }))
    }

    async fn report(&self, request: tonic::Request<TokensReport>) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        self.check(&request)?;
        let r = request.into_inner();
        self.limits.limiter.lock().unwrap_or_else(PoisonError::into_inner).record_tokens(
            &r.key_id,
            r.tokens,
            Instant::now(),
        );
        Ok(tonic::Response::new(RaftAck {}))
    }
}
