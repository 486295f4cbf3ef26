//! A node's mesh start-up, in one place: cluster secret and CA (created for
//! a new cluster, or taken from a join token), node identity, membership,
//! the wait for this node's certificate, the Raft coordinator, the data
//! plane, and the glue that keeps the data plane's peer table in step with
//! membership. The agent calls [`start`] with its `[mesh]` config and gets
//! back a running [`Node`].

use std::net::SocketAddr;
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

/// Joins the mesh: membership, then (once this node holds its cluster
/// certificate) the coordinator and the data plane, which serves forwarded
/// requests with `handler`. `None` when `cancel` fires before the
/// certificate arrives. The planes run until `shutdown`.
pub async fn start(
    config: &MeshConfig,
    settings: NodeSettings,
    handler: Arc<dyn RequestHandler>,
    cancel: &CancellationToken,
    shutdown: CancellationToken,
) -> Result<Option<Node>, NodeError> {
    let (membership, secret, trust) = start_membership(config, settings.http_port, &shutdown).await?;
    if !trust.is_enrolled() {
        // The data and control planes need the certificate; the membership
        // task asks for it and logs the wait.
        tokio::select! {
            () = trust.enrolled() => {}
            () = cancel.cancelled() => {
                tracing::info!("stopped before this node got its cluster certificate");
                return Ok(None);
            }
        }
    }
    let coordinator = start_coordinator(config, &settings, &membership, secret, trust.clone(), &shutdown).await?;
    let dp_config = DataPlaneConfig {
        listen: config.data_listen_addr(settings.http_port),
        node_name: settings.name.clone(),
        connect_timeout: config.connect_timeout,
        head_timeout: settings.head_timeout,
        max_body_bytes: settings.max_body_bytes,
    };
    let dataplane = DataPlane::bind(dp_config, trust.clone(), handler, shutdown.clone()).map_err(plane)?;
    let listen_addrs = membership.view().listen_addrs.clone();
    let data_addr = advertised(dataplane.local_addr().map_err(plane)?, &listen_addrs);
    let control_addr = advertised(coordinator.local_addr(), &listen_addrs);
    tokio::spawn(follow_peers(membership.clone(), dataplane.clone(), shutdown));
    Ok(Some(Node { membership, coordinator, dataplane, trust, data_addr, control_addr }))
}

/// The address peers should dial: the bound one, or where the socket is
/// bound to every interface, the first non-loopback IPv4 that libp2p
/// listens on (loopback when there is none).
fn advertised(bound: SocketAddr, p2p: &[Multiaddr]) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = p2p
        .iter()
        .flat_map(|a| a.iter())
        .filter_map(|p| match p {
            Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
            _ => None,
        })
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, bound.port())
}

/// Keeps the data plane's peer table in step with membership.
async fn follow_peers(membership: Membership, dataplane: Arc<DataPlane>, shutdown: CancellationToken) {
    let mut view = membership.watch();
    let mut warmed = std::collections::HashSet::new();
    loop {
        dataplane.update_peers(&view.borrow_and_update());
        // Connect to new peers ahead of traffic: the hot path then opens a
        // stream on a warm connection.
        for peer in dataplane.known_peers() {
            if warmed.insert(peer.clone()) {
                let dataplane = dataplane.clone();
                tokio::spawn(async move { dataplane.warm(&peer).await });
            }
        }
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
        assert_eq!(advertised(bound, &[lo.clone(), lan]).to_string(), "10.0.0.5:9");
        assert_eq!(advertised(bound, &[lo]).to_string(), "127.0.0.1:9");
        let fixed: SocketAddr = "192.168.1.2:9".parse().expect("addr");
        assert_eq!(advertised(fixed, &[]), fixed);
    }
}
