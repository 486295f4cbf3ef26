//! The mesh's settings, one section (`[mesh]`) of the agent's config: this
//! crate owns them and their defaults; [`crate::node::start`] turns them into
//! the settings of each plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// An address that is neither a multiaddr nor `IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(String);

/// Membership in the mesh: identity, cluster secret, discovery, liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Whether this node joins a mesh at all (off: a standalone gateway).
    pub enabled: bool,
    /// Where the node key and cluster secret live. Default:
    /// `$XDG_DATA_HOME/llmesh`, else `~/.local/share/llmesh`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// libp2p listen address (multiaddr). Default: all interfaces, on the
    /// HTTP port + 1 (an OS-chosen port when HTTP's is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Data-plane (QUIC) UDP address. Default: all interfaces, on the HTTP
    /// port + 2 (an OS-chosen port when HTTP's is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_listen: Option<SocketAddr>,
    /// Peers to contact first: multiaddrs or `IP:PORT` of their libp2p port.
    pub bootstrap: Vec<String>,
    /// The IP other boxes reach this one at, shown in its API, data and
    /// control addresses. Default: the bound address, or where that is
    /// every interface, the first non-loopback IPv4 libp2p listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<std::net::IpAddr>,
    /// Join token from `llmesh init` (holds the cluster secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    /// File holding the join token (keeps it off the command line and out
    /// of `ps`); read at start when `join` is not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_file: Option<PathBuf>,
    /// Discover peers on the LAN by mDNS.
    pub mdns: bool,
    /// How often this node publishes its state.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Silence after which a peer is suspect.
    #[serde(with = "humantime_serde")]
    pub suspect_after: Duration,
    /// Silence after which a peer is dead and out of routing.
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    /// Time allowed for a QUIC handshake with a peer.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Nodes a request may be tried on before the client gets an error.
    pub max_attempts: usize,
    /// Requests that may wait at this entry node while every node that
    /// could serve them is busy; more get 429.
    pub queue_capacity: usize,
    /// Longest a request waits in that queue before it gets 504.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// A request whose expected wait exceeds this is refused at once with
    /// 503 (later: sent to the cloud where policy allows).
    #[serde(with = "humantime_serde")]
    pub max_expected_wait: Duration,
    /// Control-plane (gRPC: Raft and Admin) TCP address. Default: all
    /// interfaces, on the HTTP port + 3 (an OS-chosen port when HTTP's is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_listen: Option<SocketAddr>,
    /// Raft voters the leader keeps (1, 3 or 5); other nodes are learners.
    pub voters: usize,
    /// How long a Raft member may be gone before the leader replaces it.
    #[serde(with = "humantime_serde")]
    pub replace_voter_after: Duration,
    /// Let the leader keep busy models loaded on more nodes.
    pub placement: bool,
    /// How long a model's loaded copies must all be busy before the
    /// leader preloads it on one more node.
    #[serde(with = "humantime_serde")]
    pub placement_hot_for: Duration,
    /// How long a model must stay quiet before it gives extra nodes back.
    #[serde(with = "humantime_serde")]
    pub placement_cool_for: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: true,
            data_dir: None,
            listen: None,
            data_listen: None,
            bootstrap: Vec::new(),
            advertise: None,
            join: None,
            join_file: None,
            mdns: true,
            heartbeat: Duration::from_secs(1),
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_attempts: 3,
            queue_capacity: 1024,
            queue_timeout: Duration::from_secs(60),
            max_expected_wait: Duration::from_secs(300),
            control_listen: None,
            voters: 3,
            replace_voter_after: Duration::from_secs(30),
            placement: true,
            placement_hot_for: Duration::from_secs(3),
            placement_cool_for: Duration::from_secs(300),
        }
    }
}

impl MeshConfig {
    /// The data directory, resolved.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local").join("share")));
        base.unwrap_or_else(|| PathBuf::from(".")).join("llmesh")
    }

    /// The libp2p listen address for an HTTP API on `http_port`.
    pub fn listen_addr(&self, http_port: u16) -> Result<Multiaddr, AddrError> {
        match &self.listen {
            Some(text) => parse_peer_addr(text),
            None => {
                let port = if http_port == 0 { 0 } else { http_port.saturating_add(1) };
                parse_peer_addr(&format!("/ip4/0.0.0.0/tcp/{port}"))
            }
        }
    }

    /// The control-plane (gRPC) TCP address for an HTTP API on `http_port`.
    pub fn control_listen_addr(&self, http_port: u16) -> SocketAddr {
        self.control_listen.unwrap_or_else(|| {
            let port = if http_port == 0 { 0 } else { http_port.saturating_add(3) };
            SocketAddr::from(([0, 0, 0, 0], port))
        })
    }

    /// The data-plane UDP address for an HTTP API on `http_port`.
    pub fn data_listen_addr(&self, http_port: u16) -> SocketAddr {
        self.data_listen.unwrap_or_else(|| {
            let port = if http_port == 0 { 0 } else { http_port.saturating_add(2) };
            SocketAddr::from(([0, 0, 0, 0], port))
        })
    }

    /// The bootstrap addresses, parsed.
    pub fn bootstrap_addrs(&self) -> Result<Vec<Multiaddr>, AddrError> {
        self.bootstrap.iter().map(|a| parse_peer_addr(a)).collect()
    }
}

/// A peer address: a multiaddr, or `IP:PORT` meaning TCP.
pub fn parse_peer_addr(text: &str) -> Result<Multiaddr, AddrError> {
    let text = text.trim();
    if text.starts_with('/') {
        return text.parse().map_err(|e| AddrError(format!("'{text}' is not a multiaddr: {e}")));
    }
    let addr: SocketAddr =
        text.parse().map_err(|_| AddrError(format!("'{text}' is neither a multiaddr nor IP:PORT")))?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => format!("/ip4/{ip}"),
        std::net::IpAddr::V6(ip) => format!("/ip6/{ip}"),
    };
    format!("{ip}/tcp/{}", addr.port()).parse().map_err(|e| AddrError(format!("'{text}': {e}")))
}
