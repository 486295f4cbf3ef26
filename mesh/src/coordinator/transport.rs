//! Raft messages between nodes over tonic gRPC: one sender task per peer
//! batches whatever is queued into one `Send` call; the server side checks
//! the caller's cluster tag and hands messages to the local Raft driver.
//!
//! Raft tolerates lost messages, so nothing here retries or blocks the
//! driver: a full queue or a failed call drops the batch and reports the
//! peer unreachable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::Input;
use crate::pki::Trust;
use crate::pki::grpc::{ChannelOptions, channel};
use llmesh_proto::raft_client::RaftClient;
use llmesh_proto::{RaftAck, RaftBatch};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;

/// Metadata header that carries the cluster tag on Raft calls.
pub const CLUSTER_HEADER: &str = "x-llmesh-cluster";

const QUEUE: usize = 4096;
const BATCH: usize = 256;

/// Outgoing links, one per peer address.
pub struct Transport {
    links: HashMap<u64, Link>,
    local_id: u64,
    tag: MetadataValue<tonic::metadata::Ascii>,
    inbox: mpsc::Sender<Input>,
    trust: Arc<Trust>,
    shutdown: CancellationToken,
}

struct Link {
    addr: SocketAddr,
    queue: mpsc::Sender<Message>,
    stop: CancellationToken,
}

impl Transport {
    /// A transport that reports failures to `inbox`.
    pub fn new(
        local_id: u64,
        tag: &str,
        inbox: mpsc::Sender<Input>,
        trust: Arc<Trust>,
        shutdown: CancellationToken,
    ) -> Transport {
        let tag = tag.parse().unwrap_or_else(|_| MetadataValue::from_static("invalid"));
        Transport { links: HashMap::new(), local_id, tag, inbox, trust, shutdown }
    }

    /// Queues `message` for its peer at `addr`; false when it was dropped.
    pub fn send(&mut self, message: Message, addr: SocketAddr) -> bool {
        let to = message.to;
        let stale = self.links.get(&to).is_some_and(|l| l.addr != addr || l.queue.is_closed());
        if stale && let Some(old) = self.links.remove(&to) {
            old.stop.cancel();
        }
        let link = self.links.entry(to).or_insert_with(|| {
            let link = LinkConfig { to, addr, from: self.local_id, tag: self.tag.clone() };
            spawn_link(link, &self.trust, self.inbox.clone(), self.shutdown.child_token())
        });
        link.queue.try_send(message).is_ok()
    }

    /// Stops links to peers that are no longer members.
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.links.retain(|id, link| {
            let kept = keep(*id);
            if !kept {
                link.stop.cancel();
            }
            kept
        });
    }
}

/// Who a link talks to, and as whom.
struct LinkConfig {
    to: u64,
    addr: SocketAddr,
    from: u64,
    tag: MetadataValue<tonic::metadata::Ascii>,
}

fn spawn_link(link: LinkConfig, trust: &Arc<Trust>, inbox: mpsc::Sender<Input>, stop: CancellationToken) -> Link {
    let LinkConfig { to, addr, from, tag } = link;
    let (queue, mut rx) = mpsc::channel::<Message>(QUEUE);
    let options = ChannelOptions { connect_timeout: Duration::from_millis(500), timeout: Duration::from_secs(3) };
    let channel = channel(addr, trust, options);
    let task_stop = stop.clone();
    tokio::spawn(async move {
        let channel = match channel {
            Ok(channel) => channel,
            Err(err) => {
                tracing::warn!(peer = to, %addr, error = %err, "bad control address");
                return;
            }
        };
        let mut client = RaftClient::new(channel);
        loop {
            let first = tokio::select! {
                () = task_stop.cancelled() => return,
                next = rx.recv() => match next { Some(m) => m, None => return },
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let snapshots = batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).count();
            let messages: Vec<Vec<u8>> = batch.iter().filter_map(|m| m.write_to_bytes().ok()).collect();
            let mut request = tonic::Request::new(RaftBatch { from, messages });
            request.metadata_mut().insert(CLUSTER_HEADER, tag.clone());
            let result = tokio::select! {
                () = task_stop.cancelled() => return,
                r = client.send(request) => r,
            };
            let ok = match result {
                Ok(_) => true,
                Err(status) => {
                    tracing::debug!(peer = to, %addr, error = %status.message(), "raft send failed");
                    false
                }
            };
            if !ok && inbox.try_send(Input::Unreachable(to)).is_err() {
                tracing::debug!("raft inbox full; unreachable report dropped");
            }
            for _ in 0..snapshots {
                let _ = inbox.send(Input::SnapshotSent { to, ok }).await;
            }
        }
    });
    Link { addr, queue, stop }
}

/// Whether `message`, in a batch from `sender`, may be applied: a node
/// speaks only for itself, except that it may pass on a proposal it was
/// handed (raft-rs keeps the proposer's id when a follower that lost its
/// leadership forwards a proposal to the new leader).
fn speaks_for_itself(message: &Message, sender: u64) -> bool {
    message.from == sender || matches!(message.get_msg_type(), MessageType::MsgPropose | MessageType::MsgReadIndex)
}

/// The server half: accepts batches from peers that know the cluster tag.
pub struct RaftService {
    /// Where accepted messages go.
    pub inbox: mpsc::Sender<Input>,
    /// Expected value of [`CLUSTER_HEADER`].
    pub tag: String,
}

#[tonic::async_trait]
impl llmesh_proto::raft_server::Raft for RaftService {
    async fn send(&self, request: tonic::Request<RaftBatch>) -> Result<tonic::Response<RaftAck>, tonic::Status> {
        let presented = request.metadata().get(CLUSTER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !super::state::constant_time_eq(presented.as_bytes(), self.tag.as_bytes()) {
            return Err(tonic::Status::permission_denied("not a member of this cluster"));
        }
        let batch = request.into_inner();
        for bytes in batch.messages {
            let message = Message::parse_from_bytes(&bytes)
                .map_err(|e| tonic::Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            if !speaks_for_itself(&message, batch.from) {
                // One bad message must not cost the rest of the batch: it
                // holds the sender's votes and acknowledgements, and losing
                // those made leaders step down for want of a quorum.
                tracing::warn!(
                    from = message.from,
                    batch = batch.from,
                    "dropped a raft message sent on another node's behalf"
                );
                continue;
            }
            self.inbox
                .send(Input::Raft(Box::new(message)))
                .await
                .map_err(|_| tonic::Status::unavailable("raft node is shutting down"))?;
        }
        Ok(tonic::Response::new(RaftAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: MessageType, from: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = from;
        m
    }

    #[test]
    fn a_node_may_pass_on_proposals_but_not_speak_for_others() {
        assert!(speaks_for_itself(&message(MessageType::MsgHeartbeatResponse, 7), 7));
        assert!(speaks_for_itself(&message(MessageType::MsgPropose, 3), 7));
        assert!(!speaks_for_itself(&message(MessageType::MsgHeartbeatResponse, 3), 7));
        assert!(!speaks_for_itself(&message(MessageType::MsgRequestVoteResponse, 3), 7));
        assert!(!speaks_for_itself(&message(MessageType::MsgAppendResponse, 3), 7));
    }
}
