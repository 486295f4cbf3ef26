//! A node's mesh start-up, in one place: cluster secret and CA (created for
//! a new cluster, or taken from a join token), node identity, membership,
//! the wait for this node's certificate, the Raft coordinator, the data
//! plane, and the glue that keeps the data plane's peer table in step with
//! membership. The agent calls [`start`] with its `[mesh]` config and gets
//! back a running [`Node`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio_util::sync::CancellationToken;

use crate::config::MeshConfig;
use crate::coordinator::placement::PlacementConfig;
use crate::pki::Trust;
use crate::{
    ClusterSecret, Coordinator, CoordinatorConfig, DataPlane, DataPlaneConfig, JoinToken, LivenessConfig, Membership,
    MembershipConfig, RequestHandler,
};

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A setting is wrong (a bad address or join token).
    #[error("{0}")]
    Config(String),
    /// A key, secret or certificate could not be read or written.
    #[error("{0}")]
    Files(String),
    /// A plane could not start (a port taken, TLS not set up).
    #[error("{0}")]
    Plane(String),
}

fn files(err: impl std::fmt::Display) -> NodeError {
    NodeError::Files(err.to_string())
}

fn plane(err: impl std::fmt::Display) -> NodeError {
    NodeError::Plane(err.to_string())
}

/// What the rest of the node needs to know to run beside the mesh.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// This node's name.
    pub name: String,
    /// The configured HTTP port: the other planes sit next to it. When it
    /// is 0 (OS-chosen) they get OS-chosen ports too, never the bound port
    /// + N, which may belong to someone else.
    pub http_port: u16,
    /// Time allowed until a peer's response head.
    pub head_timeout: std::time::Duration,
    /// Largest request body accepted from a peer.
    pub max_body_bytes: usize,
}

/// A node that has joined the mesh.
pub struct Node {
    /// Peers and gossip.
    pub membership: Membership,
    /// The replicated state.
    pub coordinator: Coordinator,
    /// Forwarding to and from peers.
    pub dataplane: Arc<DataPlane>,
    /// This node's certificate and the cluster CA.
    pub trust: Arc<Trust>,
    /// The data-plane address peers dial.
    pub data_addr: SocketAddr,
    /// The control-plane address peers dial.
    pub control_addr: SocketAddr,
    /// Held while the node runs: no second agent on its data directory.
    _lock: std::fs::File,
}

impl Node {
    /// libp2p addresses peers can bootstrap from.
    pub fn p2p_addrs(&self) -> Vec<Multiaddr> {
        self.membership.view().listen_addrs.clone()
    }
}

/// The cluster secret, with what a join token adds: the expected CA, the
/// join key and more bootstrap peers.
struct Cluster {
    secret: ClusterSecret,
    expected_ca: Option<[u8; 32]>,
    join_key: Option<[u8; 32]>,
    bootstrap: Vec<Multiaddr>,
}

fn load_cluster(config: &MeshConfig) -> Result<Cluster, NodeError> {
    let data_dir = config.data_dir();
    let bootstrap = config.bootstrap_addrs().map_err(|e| NodeError::Config(e.to_string()))?;
    if let Some(token) = &config.join {
        let token = JoinToken::decode(token).map_err(|e| NodeError::Config(e.to_string()))?;
        token.secret.store(&data_dir).map_err(files)?;
        let bootstrap = bootstrap.into_iter().chain(token.bootstrap).collect();
        return Ok(Cluster {
            secret: token.secret,
            expected_ca: Some(token.ca),
            join_key: Some(token.join),
            bootstrap,
        });
    }
    let (secret, created) = ClusterSecret::load_or_create(&data_dir).map_err(files)?;
    if created {
        crate::seed::make_seed(&data_dir).map_err(files)?;
        tracing::info!(
            dir = %data_dir.display(),
            "created a new cluster; run `llmesh init --data-dir {}` to print its join token",
            data_dir.display()
        );
    }
    if crate::seed::is_seed(&data_dir) {
        // Data directories from before the cluster CA get one now.
        crate::pki::create_ca(&data_dir).map_err(files)?;
    }
    Ok(Cluster { secret, expected_ca: None, join_key: None, bootstrap })
}

/// Loads or creates the identity, secret and certificates and starts
/// membership.
async fn start_membership(
    config: &MeshConfig,
    http_port: u16,
    shutdown: &CancellationToken,
) -> Result<(Membership, ClusterSecret, Arc<Trust>), NodeError> {
    let data_dir = config.data_dir();
    let cluster = load_cluster(config)?;
    let (keypair, created) = crate::identity::load_or_create(&data_dir).map_err(files)?;
    if created {
        tracing::info!(node_id = %keypair.public().to_peer_id(), "created a node identity");
    }
    let trust = Trust::load(&data_dir, keypair.clone(), cluster.expected_ca).map_err(files)?;
    let listen = config.listen_addr(http_port).map_err(|e| NodeError::Config(e.to_string()))?;
    tracing::info!(cluster = %cluster.secret.fingerprint(), %listen, "joining the mesh");
    let membership_config = MembershipConfig {
        keypair,
        secret: cluster.secret.clone(),
        trust: trust.clone(),
        join_key: cluster.join_key,
        listen: vec![listen],
        bootstrap: cluster.bootstrap,
        mdns: config.mdns,
        heartbeat: config.heartbeat,
        liveness: LivenessConfig {
            suspect_after: config.suspect_after,
            dead_after: config.dead_after,
            ..LivenessConfig::default()
        },
    };
    let (membership, _task) = crate::membership::start(membership_config, shutdown.clone()).await.map_err(plane)?;
    Ok((membership, cluster.secret, trust))
}

async fn start_coordinator(
    config: &MeshConfig,
    settings: &NodeSettings,
    membership: &Membership,
    secret: ClusterSecret,
    trust: Arc<Trust>,
    shutdown: &CancellationToken,
) -> Result<Coordinator, NodeError> {
    let data_dir = config.data_dir();
    let listen = config.control_listen_addr(settings.http_port);
    let mut coordinator = CoordinatorConfig::new(settings.name.clone(), data_dir.clone(), listen, secret, trust);
    coordinator.seed = crate::seed::seed(&data_dir).map_err(files)?;
    coordinator.target_voters = config.voters;
    coordinator.replace_after = config.replace_voter_after;
    coordinator.placement = PlacementConfig {
        enabled: config.placement,
        hot_for: config.placement_hot_for,
        cool_for: config.placement_cool_for,
        ..PlacementConfig::default()
    };
    crate::coordinator::start(coordinator, membership.clone(), shutdown.clone()).await.map_err(plane)
}

/// A node whose membership runs and which may still wait for its
/// certificate: what the agent can report on (and serve its own backend
/// beside) from its first second.
pub struct Joining {
    config: MeshConfig,
    settings: NodeSettings,
    membership: Membership,
    secret: ClusterSecret,
    trust: Arc<Trust>,
    shutdown: CancellationToken,
    lock: std::fs::File,
}

impl Joining {
    /// This node's certificates, enrollment problem and revocation.
    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// Peers and gossip.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Waits for this node's certificate, then starts the coordinator and
    /// the data plane, which serves forwarded requests with `handler`.
    /// `None` when `cancel` fires first. A revoked node never gets further.
    pub async fn finish(
        self,
        handler: Arc<dyn RequestHandler>,
        cancel: &CancellationToken,
    ) -> Result<Option<Node>, NodeError> {
        let Joining { config, settings, membership, secret, trust, shutdown, lock } = self;
        tokio::select! {
            () = wait_until_member(&trust) => {}
            () = cancel.cancelled() => {
                tracing::info!("stopped before this node became a working member of its cluster");
                return Ok(None);
            }
        }
        let coordinator = start_coordinator(&config, &settings, &membership, secret, trust.clone(), &shutdown).await?;
        let dp_config = DataPlaneConfig {
            listen: config.data_listen_addr(settings.http_port),
            node_name: settings.name.clone(),
            connect_timeout: config.connect_timeout,
            head_timeout: settings.head_timeout,
            max_body_bytes: settings.max_body_bytes,
        };
        let dataplane = DataPlane::bind(dp_config, trust.clone(), handler, shutdown.clone()).map_err(plane)?;
        let listen_addrs = membership.view().listen_addrs.clone();
        let data_addr = advertised(dataplane.local_addr().map_err(plane)?, config.advertise, &listen_addrs);
        let control_addr = advertised(coordinator.local_addr(), config.advertise, &listen_addrs);
        tokio::spawn(follow_peers(membership.clone(), dataplane.clone(), shutdown));
        Ok(Some(Node { membership, coordinator, dataplane, trust, data_addr, control_addr, _lock: lock }))
    }
}

/// Returns once this node holds its certificate and is not revoked; a
/// revoked node waits forever (its caller's cancel ends the wait).
async fn wait_until_member(trust: &Trust) {
    if matches!(trust.problem(), Some(crate::pki::MemberProblem::Revoked(_))) {
        // Said once at start: the marker outlives restarts.
        tracing::error!("{}: this node stays out of the mesh", trust.problem().map(|p| p.detail()).unwrap_or_default());
        std::future::pending::<()>().await;
    }
    // The membership task asks for the certificate and logs the wait.
    trust.enrolled().await;
}

/// Takes the data directory for this process: a second agent on the same
/// directory would corrupt the Raft store.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, NodeError> {
    std::fs::create_dir_all(dir).map_err(|e| NodeError::Files(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| NodeError::Files(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::Config(format!(
            "another llmesh agent already uses the data directory {}: stop it first, or give this one its own --data-dir",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(NodeError::Files(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// Starts this node's membership (after taking its data directory); the
/// rest follows with [`Joining::finish`]. Returns within moments.
pub async fn begin(
    config: &MeshConfig,
    settings: NodeSettings,
    shutdown: CancellationToken,
) -> Result<Joining, NodeError> {
    let lock = lock_data_dir(&config.data_dir())?;
    let (membership, secret, trust) = start_membership(config, settings.http_port, &shutdown).await?;
    Ok(Joining { config: config.clone(), settings, membership, secret, trust, shutdown, lock })
}

/// Joins the mesh: [`begin`], then [`Joining::finish`]. `None` when
/// `cancel` fires before this node is a member. The planes run until
/// `shutdown`.
pub async fn start(
    config: &MeshConfig,
    settings: NodeSettings,
    handler: Arc<dyn RequestHandler>,
    cancel: &CancellationToken,
    shutdown: CancellationToken,
) -> Result<Option<Node>, NodeError> {
    begin(config, settings, shutdown).await?.finish(handler, cancel).await
}

/// The address peers should dial: `advertise` with the bound port when
/// set; else the bound one, or where the socket is bound to every
/// interface, the first non-loopback IPv4 that libp2p listens on
/// (loopback when there is none).
pub fn advertised(bound: SocketAddr, advertise: Option<IpAddr>, p2p: &[Multiaddr]) -> SocketAddr {
    if let Some(ip) = advertise {
        return SocketAddr::new(ip, bound.port());
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    SocketAddr::new(routable_ip(p2p).unwrap_or(IpAddr::from([127, 0, 0, 1])), bound.port())
}

/// The first non-loopback IPv4 among libp2p addresses.
fn routable_ip(p2p: &[Multiaddr]) -> Option<IpAddr> {
    p2p.iter()
        .flat_map(|a| a.iter())
        .filter_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            _ => None,
        })
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// libp2p addresses other boxes can dial first: with `advertise`, only
/// those on that IP (or the listen address rewritten to it); else
/// non-loopback before loopback.
pub fn dialable(p2p: &[Multiaddr], advertise: Option<IpAddr>) -> Vec<Multiaddr> {
    let ip_of = |a: &Multiaddr| {
        a.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        })
    };
    if let Some(ip) = advertise {
        let on_it: Vec<Multiaddr> = p2p.iter().filter(|a| ip_of(a) == Some(ip)).cloned().collect();
        if !on_it.is_empty() {
            return on_it;
        }
        let rewritten = p2p.first().map(|a| {
            a.iter()
                .map(|p| match (p, ip) {
                    (Protocol::Ip4(_) | Protocol::Ip6(_), IpAddr::V4(v4)) => Protocol::Ip4(v4),
                    (Protocol::Ip4(_) | Protocol::Ip6(_), IpAddr::V6(v6)) => Protocol::Ip6(v6),
                    (other, _) => other,
                })
                .collect()
        });
        return rewritten.into_iter().collect();
    }
    let mut sorted = p2p.to_vec();
    sorted.sort_by_key(|a| ip_of(a).is_none_or(|ip| ip.is_loopback()));
    sorted
}

/// Keeps the data plane's peer table in step with membership. Connections
/// to peers open on demand: at rest a node keeps none, whatever the size
/// of the mesh.
async fn follow_peers(membership: Membership, dataplane: Arc<DataPlane>, shutdown: CancellationToken) {
    let mut view = membership.watch();
    loop {
        dataplane.update_peers(&view.borrow_and_update());
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address_prefers_a_routable_ipv4() {
        let bound: SocketAddr = "0.0.0.0:9".parse().expect("addr");
        let lan: Multiaddr = "/ip4/10.0.0.5/tcp/1".parse().expect("multiaddr");
        let lo: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("multiaddr");
        assert_eq!(advertised(bound, None, &[lo.clone(), lan.clone()]).to_string(), "10.0.0.5:9");
        assert_eq!(advertised(bound, None, std::slice::from_ref(&lo)).to_string(), "127.0.0.1:9");
        let fixed: SocketAddr = "192.168.1.2:9".parse().expect("addr");
        assert_eq!(advertised(fixed, None, &[]), fixed);
        let public: IpAddr = "203.0.113.7".parse().expect("ip");
        assert_eq!(advertised(bound, Some(public), std::slice::from_ref(&lan)).to_string(), "203.0.113.7:9");
        assert_eq!(dialable(&[lo.clone(), lan.clone()], None), [lan.clone(), lo.clone()]);
        assert_eq!(dialable(&[lo, lan], Some(public))[0].to_string(), "/ip4/203.0.113.7/tcp/1");
    }
}
