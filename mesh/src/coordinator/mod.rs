//! The coordinator: a raft-rs group over gRPC that replicates
//! [`ClusterState`] to every node. Voters are managed by the leader (see
//! [`voters`]); every node reads the state locally and may propose writes,
//! which raft-rs forwards to the leader.
//!
//! Layout: [`state`] is the sans-IO state machine, [`storage`] the durable
//! log, [`driver`] the task that owns the `RawNode`, [`transport`] the
//! gRPC links, [`admin`] the operator API.

pub mod admin;
mod driver;
mod follow;
pub mod limiter;
pub mod limits;
mod logger;
pub mod placement;
pub mod state;
pub mod storage;
pub mod transport;
pub mod voters;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use llmesh_proto::Command;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::membership::Membership;
use crate::pki::Trust;
use crate::pki::grpc::MembersOnly;
use crate::secret::ClusterSecret;
pub use state::ClusterState;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// This node's libp2p id.
    pub node_id: String,
    /// This node's display name.
    pub name: String,
    /// Where the Raft store lives.
    pub data_dir: PathBuf,
    /// gRPC listen address (Raft transport and Admin).
    pub listen: SocketAddr,
    /// The cluster secret: Raft callers prove they hold it.
    pub secret: ClusterSecret,
    /// Certificates for mutual TLS; the revoked set is fed from the state.
    pub trust: Arc<Trust>,
    /// `Some(admin token hash)` on the node that created the cluster: it
    /// starts the Raft group as its only voter when its store is empty.
    pub seed: Option<Vec<u8>>,
    /// Voters to keep: 1, 3 or 5.
    pub target_voters: usize,
    /// How long a member may be gone before the leader replaces it.
    pub replace_after: Duration,
    /// Raft tick.
    pub tick: Duration,
    /// Ticks without a leader before an election (randomized up to twice).
    pub election_ticks: usize,
    /// Applied entries between snapshots.
    pub snapshot_every: u64,
    /// How long a write waits to commit.
    pub write_timeout: Duration,
    /// Model placement, run by the leader.
    pub placement: placement::PlacementConfig,
}

impl CoordinatorConfig {
    /// Defaults for everything but identity and addresses.
    pub fn new(name: String, data_dir: PathBuf, listen: SocketAddr, secret: ClusterSecret, trust: Arc<Trust>) -> Self {
        CoordinatorConfig {
            node_id: trust.node_id().to_string(),
            name,
            data_dir,
            listen,
            secret,
            trust,
            seed: None,
            target_voters: 3,
            replace_after: Duration::from_secs(30),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            snapshot_every: 1000,
            write_timeout: Duration::from_secs(5),
            placement: placement::PlacementConfig::default(),
        }
    }
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The gRPC port is taken.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The Raft store could not be opened.
    #[error(transparent)]
    Store(#[from] storage::StoreError),
    /// raft-rs refused the configuration or the stored state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The stored snapshot does not decode.
    #[error("raft snapshot does not decode: {0}")]
    Snapshot(#[from] prost::DecodeError),
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
    /// TLS could not be set up (no certificate yet?).
    #[error("control plane TLS: {0}")]
    Tls(#[from] crate::pki::PkiError),
}

/// Why a write did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known (election running, or this node is cut off).
    #[error("no Raft leader reachable from this node (election in progress or no quorum); retry")]
    NoLeader,
    /// The write did not commit in time (no quorum).
    #[error("the write did not commit within {0:?} (no quorum reachable?)")]
    Timeout(Duration),
    /// It committed but changed nothing.
    #[error(transparent)]
    Rejected(#[from] state::ApplyError),
    /// The node is shutting down.
    #[error("the coordinator is shutting down")]
    Stopped,
}

/// A committed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Log index it committed at.
    pub index: u64,
    /// What it did.
    pub message: String,
}

/// This node's view of the Raft group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This node's Raft id.
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `pre-candidate`, or `learner`.
    pub role: &'static str,
    /// The leader's Raft id (0: none known).
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// Highest committed index.
    pub commit: u64,
    /// Highest applied index.
    pub applied: u64,
    /// Highest commit index a leader has announced to this node. Ahead of
    /// `commit` while this node's log is still catching up: Raft clamps a
    /// follower's commit to the entries it holds, so `applied == commit`
    /// alone does not mean up to date.
    pub leader_commit: u64,
    /// The leader's control address, when it is another node.
    pub leader_addr: Option<SocketAddr>,
}

impl RaftStatus {
    /// Whether this node may serve a stale view of the replicated state:
    /// no leader known, or committed entries it has not applied yet.
    pub fn behind(&self) -> bool {
        self.leader == 0 || self.applied < self.commit.max(self.leader_commit)
    }
}

/// Messages into the driver task.
pub enum Input {
    /// A Raft message from a peer.
    Raft(Box<raft::eraftpb::Message>),
    /// A write to propose.
    Propose {
        /// The command.
        command: Command,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<Applied, ProposeError>>,
    },
    /// A peer could not be reached.
    Unreachable(u64),
    /// A snapshot finished sending.
    SnapshotSent {
        /// To whom.
        to: u64,
        /// Whether it arrived.
        ok: bool,
    },
}

/// Handle to the running coordinator.
#[derive(Clone)]
pub struct Coordinator {
    inbox: mpsc::Sender<Input>,
    state: watch::Receiver<Arc<ClusterState>>,
    status: watch::Receiver<RaftStatus>,
    local_addr: SocketAddr,
    write_timeout: Duration,
    limits: Arc<limits::LimitsClient>,
}

/// The Raft id of a node: the first 8 bytes of SHA-256 of its libp2p id
/// (never 0, which raft-rs reserves).
pub fn raft_id(node_id: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, node_id.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(bytes).max(1)
}

/// The tag Raft callers present: derived from the cluster secret, so only
/// nodes holding the secret can send Raft messages.
pub fn cluster_tag(secret: &ClusterSecret) -> String {
    let mut input = b"llmesh-raft-v1:".to_vec();
    input.extend_from_slice(&secret.bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Coordinator {
    /// The replicated state as last applied here.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    /// Watches the replicated state.
    pub fn watch_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    /// This node's view of the Raft group.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// The gRPC address (Raft and Admin).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Admits one request of a rate-limited key: asks the leader, which
    /// keeps the mesh-wide window (see [`limits`]).
    pub async fn acquire(&self, key: &str, rpm: u64, tpm: u64) -> limiter::Decision {
        self.limits.acquire(&self.status(), key, rpm, tpm).await
    }

    /// Reports the tokens a finished request of `key` used (to the leader's
    /// tokens-per-minute window); does not wait.
    pub fn report_tokens(&self, key: &str, tokens: u64) {
        self.limits.report(&self.status(), key, tokens);
    }

    /// Proposes `command` and waits until it is applied on this node.
    pub async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        let (reply, outcome) = oneshot::channel();
        self.inbox.send(Input::Propose { command, reply }).await.map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(self.write_timeout, outcome).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout(self.write_timeout)),
        }
    }
}

/// Binds the gRPC port, opens the Raft store and starts the driver. Runs
/// until `shutdown`.
pub async fn start(
    config: CoordinatorConfig,
    membership: Membership,
    shutdown: CancellationToken,
) -> Result<Coordinator, CoordinatorError> {
    if ![1, 3, 5].contains(&config.target_voters) {
        return Err(CoordinatorError::Config(format!("mesh.voters must be 1, 3 or 5 (got {})", config.target_voters)));
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoordinatorError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| CoordinatorError::Bind { addr: config.listen, source })?;
    let (inbox, rx) = mpsc::channel(4096);
    let tag = cluster_tag(&config.secret);
    let mut driver = driver::Driver::open(&config, membership, inbox.clone(), &tag, shutdown.clone())?;
    driver.catch_up_locally()?;
    let state = driver.state_receiver();
    let status = driver.status_receiver();
    let write_timeout = config.write_timeout;
    tokio::spawn(driver.run(rx));
    let limits = Arc::new(limits::LimitsClient::new(&tag, config.trust.clone()));
    let trust = config.trust.clone();
    let coordinator =
        Coordinator { inbox: inbox.clone(), state, status, local_addr, write_timeout, limits: limits.clone() };
    // Every plane reads the revoked set from the trust, and enrollment the
    // join key (and, on voters, the CA key): keep them current.
    let mut follower =
        follow::Follower::new(trust.clone(), config.secret.clone(), config.data_dir.clone(), raft_id(&config.node_id));
    follower.feed(&coordinator.state());
    tokio::spawn(follow::follow(follower, coordinator.clone(), coordinator.status.clone(), shutdown.clone()));
    let limits_service = llmesh_proto::limits_server::LimitsServer::new(limits::LimitsService {
        limits,
        status: coordinator.status.clone(),
        tag: tag.clone(),
    });

    let members = MembersOnly(trust.clone());
    let raft = tonic::service::interceptor::InterceptedService::new(
        llmesh_proto::raft_server::RaftServer::new(transport::RaftService { inbox, tag })
            .max_decoding_message_size(64 * 1024 * 1024),
        members.clone(),
    );
    let admin = tonic::service::interceptor::InterceptedService::new(
        llmesh_proto::admin_server::AdminServer::new(admin::AdminService::new(coordinator.clone())),
        members.clone(),
    );
    let limits_service = tonic::service::interceptor::InterceptedService::new(limits_service, members.clone());
    let incoming = crate::pki::grpc::incoming(listener, &trust, shutdown.clone())?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .add_service(raft)
            .add_service(admin)
            .add_service(limits_service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(err) = result {
            tracing::warn!(error = %err, "control gRPC server ended");
        }
    });
    tracing::info!(addr = %local_addr, raft_id = raft_id(&config.node_id), "control plane listening");
    Ok(coordinator)
}

#[cfg(test)]
mod status_tests {
    use super::RaftStatus;

    #[test]
    fn a_follower_whose_log_lags_the_leaders_commit_is_behind() {
        let caught_up = RaftStatus { leader: 1, commit: 10, applied: 10, leader_commit: 10, ..RaftStatus::default() };
        assert!(!caught_up.behind());
        // Raft clamps a follower's commit to what its log holds: applied
        // equals commit while the leader has committed more.
        assert!(RaftStatus { leader_commit: 14, ..caught_up.clone() }.behind());
        assert!(RaftStatus { applied: 9, ..caught_up.clone() }.behind());
        assert!(RaftStatus { leader: 0, ..caught_up }.behind(), "no leader known");
    }
}
