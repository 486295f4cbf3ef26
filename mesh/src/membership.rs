//! Membership over libp2p: a private network keyed by the cluster secret
//! (pnet over TCP, then noise and yamux), identify, mDNS on the LAN,
//! bootstrap peers and the addresses members gossip beyond them (see
//! `membership/syncing.rs`), and gossipsub topics on which
//! every node publishes its [`NodeState`] on change (see
//! [`crate::cadence`]) and a [`llmesh_proto::Suspicion`] when a peer it watches falls
//! silent. Liveness comes from pulse streams to a few ring neighbours
//! ([`crate::pulse`]); nodes from before pulses are sent a small [`Beat`]
//! every heartbeat, as they expect.
//!
//! Gossip carries [`SignedNodeState`]: states signed by their node's key
//! with its CA-issued certificate (see [`crate::pki`]); anything else is
//! dropped. A node without a certificate asks for one on the
//! `/llmesh/enroll/1` protocol; revoked nodes are blocked at the connection.
//!
//! One task owns the swarm; the rest of the node talks to it through a
//! cloneable [`Membership`] handle: it sets the local state and reads the
//! peers view.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::allow_block_list::{self, BlockedPeers};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, gossipsub, identify, identity, mdns, noise, tcp, yamux,
};
use llmesh_proto::{Beat, NodeState, SignedNodeState};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cadence::{Cadence, Publish, Readers};
use crate::peers::{Change, Liveness, LivenessConfig, PeerTable};
use crate::pki::{PkiError, Trust};
use crate::secret::ClusterSecret;

mod certs;
mod syncing;
mod watching;

/// Gossipsub topic carrying [`SignedNodeState`].
const STATE_TOPIC: &str = "llmesh/state/2";
/// Gossipsub topic carrying [`Beat`]s. Nodes before beats do not subscribe,
/// so they never receive one.
const BEAT_TOPIC: &str = "llmesh/beat/1";
/// Gossipsub topic carrying [`llmesh_proto::Suspicion`]s.
const SUSPICION_TOPIC: &str = "llmesh/suspicion/1";
/// How often a node that reported a peer silent says it again while the
/// peer stays dead here: a node cut off when it first went out learns it.
const SUSPICION_REPEAT: Duration = Duration::from_secs(30);
/// Protocol on which a node without a certificate asks for one.
const ENROLL_PROTOCOL: &str = "/llmesh/enroll/1";
/// Tells a node, before its connections close for good, that the cluster
/// revoked it: it cannot learn it otherwise, since every plane shuts it out.
const NOTICE_PROTOCOL: &str = "/llmesh/notice/1";
/// How often the wait for a certificate is reported.
/// Largest gossip message accepted; a NodeState is a few KiB.
const MAX_GOSSIP_BYTES: usize = 256 * 1024;
/// How often unreachable bootstrap peers are dialled again.
const REDIAL_INTERVAL: Duration = Duration::from_secs(5);
/// The least time between two views handed to readers.
const VIEW_EVERY: Duration = Duration::from_millis(100);
/// How long a connection nothing uses stays open. Gossip's mesh links and
/// pulse streams keep theirs; the rest (an enrollment, a state pull) need
/// not stay, or every node ends connected to every other.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);
/// Connections a node keeps at least, to members picked at random: with
/// the ring's (see [`crate::pulse`]) they are what gossip's mesh is
/// made of. Kademlia did this before, but its walks connected each node
/// to most of a 100-node mesh.
const LINKS: usize = 6;
/// Below this many connections, bootstrap peers are dialled again.
const MIN_CONNECTED: usize = 3;
/// Peers taken for dead dialled per redial round (a healed partition
/// shows itself by a dial that works).
const DEAD_DIALS: usize = 2;

/// A failure to start membership.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The transport or a behaviour could not be built.
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    /// The listen address could not be bound.
    #[error("cannot listen for peers on {addr}: {reason}")]
    Listen {
        /// Address asked for.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// How this node takes part in the mesh.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// The node's identity key (its node id is the derived peer id).
    pub keypair: identity::Keypair,
    /// The cluster secret (pnet key).
    pub secret: ClusterSecret,
    /// Certificates: signs what this node gossips, checks what it hears.
    pub trust: Arc<Trust>,
    /// The join key from the token, to prove when asking for a certificate.
    pub join_key: Option<[u8; 32]>,
    /// Addresses to listen on for peers.
    pub listen: Vec<Multiaddr>,
    /// Peers to contact first.
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN by mDNS.
    pub mdns: bool,
    /// How often the local state is published.
    pub heartbeat: Duration,
    /// When silent peers become suspect and dead.
    pub liveness: LivenessConfig,
}

/// One peer in the view handed to readers.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSnapshot {
    /// What it last said about itself.
    pub state: NodeState,
    /// Whether it is alive.
    pub liveness: Liveness,
    /// Time since it was last heard.
    pub last_seen_ago: Duration,
}

/// The mesh as this node sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshView {
    /// This node's id.
    pub local_id: String,
    /// Where this node listens for peers (with its `/p2p/` id).
    pub listen_addrs: Vec<Multiaddr>,
    /// Peers with an open connection now.
    pub connected: usize,
    /// Every known peer, in node-id order.
    pub peers: Vec<PeerSnapshot>,
}

/// Handle to the membership task.
#[derive(Clone)]
pub struct Membership {
    local_id: PeerId,
    local_state: watch::Sender<Option<NodeState>>,
    view: watch::Receiver<Arc<MeshView>>,
    suspects: mpsc::UnboundedSender<String>,
}

impl Membership {
    /// This node's id.
    pub fn local_id(&self) -> PeerId {
        self.local_id
    }

    /// Replaces the state this node publishes (sequence number and
    /// timestamp are set by the membership task).
    pub fn set_local_state(&self, state: NodeState) {
        self.local_state.send_replace(Some(state));
    }

    /// What this node last published about itself.
    pub fn local_state(&self) -> Option<NodeState> {
        self.local_state.borrow().clone()
    }

    /// The current view.
    pub fn view(&self) -> Arc<MeshView> {
        self.view.borrow().clone()
    }

    /// A receiver that wakes whenever the view changes.
    pub fn watch(&self) -> watch::Receiver<Arc<MeshView>> {
        self.view.clone()
    }

    /// Marks a peer suspect now: its data-plane connection broke, which
    /// says more than a missed heartbeat. Gossip from it clears the mark.
    pub fn suspect(&self, node_id: &str) {
        // The event loop gone means membership is shutting down.
        let _ = self.suspects.send(node_id.to_string());
    }
}

/// A request for a certificate for the key the requester's noise handshake
/// proved, with its proof of the join key (an HMAC of its own node id).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct EnrollRequest {
    proof: Vec<u8>,
}

/// The CA and a certificate for the requester, or why not.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum EnrollResponse {
    Issued { ca: Vec<u8>, cert: Vec<u8> },
    Refused(String),
}

/// What one node tells another outside gossip.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Notice {
    /// The cluster revoked the receiver (at this RFC 3339 time).
    Revoked { at: String },
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocked: allow_block_list::Behaviour<BlockedPeers>,
    gossipsub: gossipsub::Behaviour,
    enroll: request_response::json::Behaviour<EnrollRequest, EnrollResponse>,
    notice: request_response::json::Behaviour<Notice, ()>,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    pulse: libp2p_stream::Behaviour,
}

/// Gossipsub's settings for the membership topics.
fn gossip_config() -> Result<gossipsub::Config, gossipsub::ConfigBuilderError> {
    gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .validation_mode(gossipsub::ValidationMode::Strict)
        // Small clusters: keep a mesh even with one or two peers.
        .mesh_n_low(1)
        .mesh_n(4)
        .mesh_n_high(8)
        .mesh_outbound_min(0)
        // Lazy gossip (IHAVE) repairs holes in the mesh; beats repeat
        // every second and full states at least every few (see
        // `cadence`), so two peers per heartbeat with the ids of the
        // last two heartbeats are plenty. The default's quarter of all
        // other peers grows with the mesh: at 100 nodes, 24 IHAVEs a
        // second of up to 300 ids each.
        .gossip_lazy(2)
        .gossip_factor(0.0)
        .history_gossip(2)
        // Ids are announced to peers every heartbeat (IHAVE): 8
        // bytes instead of the default ~70 (peer id and counter as
        // text). The same on every node, so IWANT finds them.
        .message_id_fn(compact_message_id)
        .build()
}

fn build_swarm(config: &MembershipConfig) -> Result<Swarm<Behaviour>, MeshError> {
    let psk = PreSharedKey::new(config.secret.bytes());
    let mdns_enabled = config.mdns;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let noise = noise::Config::new(key)?;
            // pnet first: without the cluster secret the handshake fails
            // before a single libp2p byte is exchanged.
            Ok(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))))
        })
        .map_err(|e| MeshError::Build(e.to_string()))?
        .with_behaviour(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let peer_id = key.public().to_peer_id();
            let gossip_config = gossip_config()?;
            let gossipsub = gossipsub::Behaviour::<gossipsub::IdentityTransform>::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let identify = identify::Behaviour::new(identify::Config::new("/llmesh/id/1.0.0".into(), key.public()));
            let mdns = if mdns_enabled {
                // Query every few seconds rather than the default five minutes, so a
                // node that missed the first answers still finds its LAN soon.
                let config = mdns::Config { query_interval: Duration::from_secs(5), ..mdns::Config::default() };
                Some(mdns::tokio::Behaviour::new(config, peer_id)?)
            } else {
                None
            };
            let enroll = request_response::json::Behaviour::new(
                [(StreamProtocol::new(ENROLL_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            );
            let notice = request_response::json::Behaviour::new(
                [(StreamProtocol::new(NOTICE_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(2)),
            );
            Ok(Behaviour {
                blocked: allow_block_list::Behaviour::default(),
                gossipsub,
                enroll,
                notice,
                identify,
                mdns: Toggle::from(mdns),
                pulse: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| MeshError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION))
        .build();
    Ok(swarm)
}

/// A message's id: FNV-1a of its author and sequence number (unique per
/// author, as the default's text is).
fn compact_message_id(message: &gossipsub::Message) -> gossipsub::MessageId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let source = message.source.map(|p| p.to_bytes()).unwrap_or_default();
    let seqno = message.sequence_number.unwrap_or_default().to_be_bytes();
    for byte in source.iter().chain(&seqno) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    gossipsub::MessageId::new(&hash.to_be_bytes())
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The peer id at the end of an address, if it names one.
fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

/// Listens on every address; returns the bound ones (with this node's
/// `/p2p/` id), so callers learn the real ports.
/// Whether every address of a dial was refused outright (nothing listens
/// there), as opposed to timing out or failing a handshake.
fn refused(error: &libp2p::swarm::DialError) -> bool {
    let libp2p::swarm::DialError::Transport(attempts) = error else { return false };
    fn refused_io(err: &std::io::Error) -> bool {
        // The transport's layers (pnet, upgrades) wrap the socket's error
        // in `Either`s, whose `source()` skips the wrapped error itself, so
        // the socket's error kind is only visible in the debug form.
        err.kind() == std::io::ErrorKind::ConnectionRefused || format!("{err:?}").contains("ConnectionRefused")
    }
    !attempts.is_empty()
        && attempts.iter().all(|(_, e)| matches!(e, libp2p::TransportError::Other(io) if refused_io(io)))
}

async fn listen_all(swarm: &mut Swarm<Behaviour>, listen: &[Multiaddr]) -> Result<Vec<Multiaddr>, MeshError> {
    let mut listen_addrs = Vec::new();
    for addr in listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen { addr: addr.clone(), reason: e.to_string() })?;
        let bound = bind_one(swarm, id, addr).await?;
        listen_addrs.extend(bound);
    }
    Ok(listen_addrs)
}

/// How long a listener on every interface may take to report a routable
/// address after its loopback one.
const ROUTABLE_WAIT: Duration = Duration::from_millis(300);

/// Waits for one listener to bind (or fail). A listener on every
/// interface reports loopback first and the box's own addresses just
/// after; those are what the data and control planes advertise, so wait
/// (briefly) for one of them too.
async fn bind_one(
    swarm: &mut Swarm<Behaviour>,
    id: libp2p::core::transport::ListenerId,
    addr: &Multiaddr,
) -> Result<Vec<Multiaddr>, MeshError> {
    let mut bound: Vec<Multiaddr> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    let routable = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            Protocol::Ip4(ip) => !ip.is_loopback(),
            Protocol::Ip6(ip) => !ip.is_loopback(),
            _ => false,
        })
    };
    loop {
        let event = match deadline {
            None => swarm.select_next_some().await,
            Some(at) => match tokio::time::timeout_at(at, swarm.select_next_some()).await {
                Ok(event) => event,
                Err(_) => return Ok(bound),
            },
        };
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } if listener_id == id => {
                let any_interface = addr.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_unspecified(),
                    Protocol::Ip6(ip) => ip.is_unspecified(),
                    _ => false,
                });
                let done = !any_interface || routable(&address);
                bound.push(address.with(Protocol::P2p(*swarm.local_peer_id())));
                if done {
                    return Ok(bound);
                }
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + ROUTABLE_WAIT);
            }
            SwarmEvent::ListenerClosed { listener_id, reason, .. } if listener_id == id => {
                let reason = reason.err().map_or_else(|| "closed".to_string(), |e| e.to_string());
                return Err(MeshError::Listen { addr: addr.clone(), reason });
            }
            SwarmEvent::ListenerError { listener_id, error } if listener_id == id => {
                return Err(MeshError::Listen { addr: addr.clone(), reason: error.to_string() });
            }
            _ => {}
        }
    }
}

/// Starts membership; returns once every listen address is bound.
pub async fn start(
    config: MembershipConfig,
    shutdown: CancellationToken,
) -> Result<(Membership, tokio::task::JoinHandle<()>), MeshError> {
    let mut swarm = build_swarm(&config)?;
    let topic = gossipsub::IdentTopic::new(STATE_TOPIC);
    let beat_topic = gossipsub::IdentTopic::new(BEAT_TOPIC);
    let suspicion_topic = gossipsub::IdentTopic::new(SUSPICION_TOPIC);
    for t in [&topic, &beat_topic, &suspicion_topic] {
        swarm.behaviour_mut().gossipsub.subscribe(t).map_err(|e| MeshError::Build(e.to_string()))?;
    }
    let listen_addrs = listen_all(&mut swarm, &config.listen).await?;
    let local_id = *swarm.local_peer_id();
    let (local_state, local_rx) = watch::channel(None);
    let initial =
        MeshView { local_id: local_id.to_string(), listen_addrs: listen_addrs.clone(), ..MeshView::default() };
    let (view_tx, view) = watch::channel(Arc::new(initial));
    let (suspects, suspects_rx) = mpsc::unbounded_channel();
    let (control, pulse_news) = serve_pulses(&swarm, config.heartbeat, &shutdown)?;
    let (heard_tx, heard) = mpsc::unbounded_channel();
    let shelf = serve_states(&swarm, &shutdown)?;
    let (pulled_tx, pulled) = mpsc::unbounded_channel();
    let mut cadence = Cadence::default();
    // Peers hear a starting node's state only once its gossip mesh forms.
    cadence.peer_joined();
    let event_loop = EventLoop {
        swarm,
        topic,
        beat_topic,
        suspicion_topic,
        control,
        heard_tx,
        heard,
        watching: HashMap::new(),
        next_watch: 0,
        watch_stop: shutdown.child_token(),
        pulse_news,
        mismatched: HashMap::new(),
        shelf,
        pulled_tx,
        pulled,
        sync: syncing::Sync::default(),
        certs: certs::Certs::default(),
        last_tick: Instant::now(),
        view_at: None,
        view_due: false,
        dead_dials: 0,
        announced: HashMap::new(),
        refuted_at: None,
        table: PeerTable::new(config.liveness),
        bootstrap: config.bootstrap.clone(),
        dialled: HashMap::new(),
        lan_peers: HashMap::new(),
        listen_addrs,
        local_rx,
        cadence,
        seq: 0,
        view: view_tx,
        suspects: suspects_rx,
        heartbeat: config.heartbeat,
        revoked: config.trust.watch_revoked(),
        trust: config.trust.clone(),
        enrollment: crate::enroll::Enrollment::new(Instant::now()),
        notified: std::collections::HashSet::new(),
        mdns: config.mdns,
        join_key: config.join_key,
    };
    let task = tokio::spawn(event_loop.run(shutdown));
    Ok((Membership { local_id, local_state, view, suspects }, task))
}

/// Starts answering watchers; returns the control that opens this node's
/// own watches and the sender of what its pulses carry.
fn serve_pulses(
    swarm: &Swarm<Behaviour>,
    period: Duration,
    shutdown: &CancellationToken,
) -> Result<(libp2p_stream::Control, watch::Sender<llmesh_proto::Pulse>), MeshError> {
    let mut control = swarm.behaviour().pulse.new_control();
    let incoming = control.accept(crate::pulse::PROTOCOL).map_err(|e| MeshError::Build(e.to_string()))?;
    let (pulse_news, pulse_news_rx) = watch::channel(llmesh_proto::Pulse::default());
    crate::pulse::serve(incoming, pulse_news_rx, period, shutdown.child_token());
    Ok((control, pulse_news))
}

/// Starts answering state pulls and certificate fetches; returns the
/// shelf both are served from.
fn serve_states(swarm: &Swarm<Behaviour>, shutdown: &CancellationToken) -> Result<crate::statesync::Shelf, MeshError> {
    let mut control = swarm.behaviour().pulse.new_control();
    let build = |e: libp2p_stream::AlreadyRegistered| MeshError::Build(e.to_string());
    let pulls = control.accept(crate::statesync::PROTOCOL).map_err(build)?;
    let fetches = control.accept(crate::statesync::CERTS_PROTOCOL).map_err(build)?;
    let shelf = crate::statesync::Shelf::default();
    crate::statesync::serve(pulls, shelf.clone(), shutdown.child_token());
    crate::statesync::serve_certs(fetches, shelf.clone(), shutdown.child_token());
    Ok(shelf)
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    beat_topic: gossipsub::IdentTopic,
    suspicion_topic: gossipsub::IdentTopic,
    /// Opens pulse streams to the peers this node watches.
    control: libp2p_stream::Control,
    heard_tx: mpsc::UnboundedSender<crate::pulse::Heard>,
    /// What the watches heard.
    heard: mpsc::UnboundedReceiver<crate::pulse::Heard>,
    /// The peers watched now: which watch, and how to stop it.
    watching: HashMap<PeerId, (u64, CancellationToken)>,
    next_watch: u64,
    /// Stops every watch at shutdown.
    watch_stop: CancellationToken,
    /// What the pulses to watchers carry.
    pulse_news: watch::Sender<llmesh_proto::Pulse>,
    /// Pulses in a row from each watched peer whose news differed from
    /// this node's view (see [`crate::pulse::view_digest`]).
    mismatched: HashMap<PeerId, u32>,
    /// The signed states this node serves to pullers.
    shelf: crate::statesync::Shelf,
    pulled_tx: mpsc::UnboundedSender<crate::statesync::Pulled>,
    /// Snapshots pulled from peers.
    pulled: mpsc::UnboundedReceiver<crate::statesync::Pulled>,
    sync: syncing::Sync,
    /// States waiting for their author's certificate.
    certs: certs::Certs,
    /// When the view was last handed to readers.
    view_at: Option<Instant>,
    /// Changes wait for the next view.
    view_due: bool,
    /// Turns taken dialling dead peers.
    dead_dials: usize,
    /// When the last heartbeat ran: a late one means this process was
    /// starved, not that its peers fell silent.
    last_tick: Instant,
    /// Peers this node reported silent, and when it last said so.
    announced: HashMap<String, Instant>,
    /// When this node last refuted a suspicion about itself.
    refuted_at: Option<Instant>,
    table: PeerTable,
    bootstrap: Vec<Multiaddr>,
    /// Which peer answered at each bootstrap address.
    dialled: HashMap<Multiaddr, PeerId>,
    /// Peers mDNS found on the LAN, with their addresses.
    lan_peers: HashMap<PeerId, Vec<Multiaddr>>,
    listen_addrs: Vec<Multiaddr>,
    local_rx: watch::Receiver<Option<NodeState>>,
    /// When to send the full state and when a beat.
    cadence: Cadence,
    seq: u64,
    view: watch::Sender<Arc<MeshView>>,
    /// Peers the data plane lost a connection to.
    suspects: mpsc::UnboundedReceiver<String>,
    heartbeat: Duration,
    trust: Arc<Trust>,
    revoked: watch::Receiver<Arc<BTreeSet<String>>>,
    /// Where the wait for this node's certificate stands.
    enrollment: crate::enroll::Enrollment,
    /// Revoked peers told so, waiting to be blocked.
    notified: std::collections::HashSet<PeerId>,
    mdns: bool,
    join_key: Option<[u8; 32]>,
}

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        self.block_revoked();
        loop {
            tokio::select! {
                // Pulses first: on a starved machine a heartbeat that runs
                // before the pulses queued behind it misjudges silence.
                biased;
                () = shutdown.cancelled() => break,
                Some(heard) = self.heard.recv() => self.on_heard(heard),
                event = self.swarm.select_next_some() => self.on_event(event),
                Some(pulled) = self.pulled.recv() => self.on_pulled(pulled),
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(self.view_at.unwrap_or_else(Instant::now)) + VIEW_EVERY),
                    if self.view_due => self.publish_view(Instant::now()),
                changed = self.local_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.publish(false);
                }
                changed = self.revoked.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.block_revoked();
                }
                _ = heartbeat.tick() => {
                    self.enroll();
                    self.publish(true);
                    let now = Instant::now();
                    self.sync_on_heartbeat(now);
                    self.certs_on_heartbeat(now);
                    self.digest_view();
                    // Time this loop could not run is nobody's silence.
                    let lag = now.saturating_duration_since(self.last_tick).saturating_sub(self.heartbeat * 3 / 2);
                    self.last_tick = now;
                    if !lag.is_zero() {
                        tracing::debug!(?lag, "heartbeat late: not counting the lag as peers' silence");
                        self.table.excuse(lag, now);
                    }
                    let tick = self.table.tick(now);
                    self.report(tick.changes);
                    self.announce_silent(tick.fell_silent, now);
                    self.rewatch(now);
                    self.refresh_view();
                }
                Some(node) = self.suspects.recv() => {
                    let changes = self.table.suspect(&node, Instant::now());
                    self.report(changes);
                    self.refresh_view();
                }
                _ = redial.tick() => self.dial_bootstrap(),
            }
        }
        self.watch_stop.cancel();
        tracing::debug!("membership stopped");
    }

    /// On a heartbeat, the full state or a beat; on a change, the full
    /// state if the change is one of substance (see [`crate::cadence`]).
    fn publish(&mut self, heartbeat: bool) {
        let Some(mut state) = self.local_rx.borrow_and_update().clone() else { return };
        // Not enrolled yet: nobody would accept an unsigned state.
        if !self.trust.is_enrolled() {
            return;
        }
        state.node_id = self.swarm.local_peer_id().to_string();
        state.beats = true;
        state.pulses = true;
        state.pulls_states = true;
        state.fetches_certs = true;
        state.p2p_addrs = self
            .listen_addrs
            .iter()
            .map(strip_p2p)
            .filter(|a| !a.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())))
            .map(|a| a.to_string())
            .collect();
        let now = Instant::now();
        let readers = if self.table.has_peers_without_beats() {
            Readers::FullOnly
        } else if self.table.has_peers_without_pulses() {
            Readers::Beats
        } else {
            Readers::Pulses
        };
        let what = if heartbeat {
            self.cadence.on_heartbeat(&state, readers, now)
        } else {
            self.cadence.on_change(&state, now)
        };
        let mut with_cert = false;
        let (topic, data) = match what {
            Publish::Nothing => return,
            Publish::Beat => (self.beat_topic.clone(), Bytes::from(Beat { state_seq: self.seq }.encode_to_vec())),
            Publish::Full => {
                self.seq += 1;
                state.seq = self.seq;
                state.timestamp_ms = unix_ms();
                let Some(mut signed) = self.trust.sign_state(&state, true) else { return };
                let seq = self.seq;
                self.pulse_news.send_modify(|news| news.state_seq = seq);
                // Pullers and fetchers get the certificate; gossip
                // carries it only until the mesh has it.
                self.shelve(&state.node_id, Bytes::from(signed.encode_to_vec()));
                with_cert = self.publish_with_cert();
                tracing::debug!(seq, heartbeat, with_cert, "publishing this node's full state");
                if !with_cert {
                    signed.cert.clear();
                }
                (self.topic.clone(), Bytes::from(signed.encode_to_vec()))
            }
        };
        let full = what == Publish::Full;
        match self.swarm.behaviour_mut().gossipsub.publish(topic, data) {
            // Only a state (and a certificate) that went out to someone
            // counts.
            Ok(_) => {
                if full {
                    self.cadence.delivered();
                }
                if with_cert {
                    self.sent_cert();
                }
            }
            // Expected while alone; anything else is worth a look.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::Duplicate) => {}
            Err(other) => tracing::debug!(error = %other, "cannot publish node state"),
        }
    }

    /// Blocks revoked nodes at the connection level (closing what is open)
    /// and drops them from the view.
    fn block_revoked(&mut self) {
        let revoked = self.revoked.borrow_and_update().clone();
        let me = *self.swarm.local_peer_id();
        for id in revoked.iter() {
            let Ok(peer) = id.parse::<PeerId>() else { continue };
            if peer == me {
                continue;
            }
            let changes = self.table.forget(id);
            self.report(changes);
            if self.swarm.behaviour().blocked.blocked_peers().contains(&peer) {
                continue;
            }
            if self.swarm.is_connected(&peer) && !self.notified.contains(&peer) {
                // Tell it first; it is blocked once the notice is answered
                // or times out (on_notice).
                let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                self.swarm.behaviour_mut().notice.send_request(&peer, Notice::Revoked { at });
                self.notified.insert(peer);
                continue;
            }
            if self.swarm.behaviour_mut().blocked.block_peer(peer) {
                tracing::info!(node = %id, "blocked a revoked node");
            }
        }
        self.refresh_view();
    }

    /// Without a certificate, asks every connected peer for one (any voter
    /// may hold the CA key), and says plainly why when no one can be asked.
    fn enroll(&mut self) {
        if self.trust.is_enrolled() {
            return;
        }
        let now = Instant::now();
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let tried: Vec<String> = self.bootstrap.iter().map(ToString::to_string).collect();
        if let Some(problem) = self.enrollment.no_peers(peers.len(), &tried, self.mdns, now) {
            if self.enrollment.should_report(&problem, now) {
                tracing::warn!("cannot enroll: {}", problem.detail());
            }
            self.trust.set_problem(Some(problem));
            return;
        }
        let Some(join_key) = self.join_key else {
            let problem = crate::pki::MemberProblem::TokenRefused(
                "this node has no certificate and no join token: start it with --join-file FILE (or LLMESH_MESH__JOIN)"
                    .into(),
            );
            if self.enrollment.should_report(&problem, now) {
                tracing::warn!("{}", problem.detail());
            }
            self.trust.set_problem(Some(problem));
            return;
        };
        let round = self.enrollment.round(&peers, now);
        if round.is_empty() {
            return;
        }
        tracing::debug!(peers = round.len(), "asking every connected peer for a cluster certificate");
        let proof = Trust::join_proof(&join_key, &self.trust.node_id());
        for peer in round {
            self.swarm.behaviour_mut().enroll.send_request(&peer, EnrollRequest { proof: proof.clone() });
        }
    }

    fn enroll_refused(&mut self, peer: &PeerId, reason: Option<&str>) {
        let now = Instant::now();
        if let Some(problem) = self.enrollment.refused(peer, reason, now) {
            if self.enrollment.should_report(&problem, now) {
                tracing::warn!("{}", problem.detail());
            }
            self.trust.set_problem(Some(problem));
        } else if self.trust.problem().is_some_and(|p| p.code() == "no_peers") {
            self.trust.set_problem(None);
        }
    }

    fn on_notice(&mut self, event: request_response::Event<Notice, ()>) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { channel, request: Notice::Revoked { at }, .. },
                ..
            } => {
                // Only a holder of the cluster secret can reach this node
                // at all (pnet); that bar is the same one gossip sets.
                tracing::info!(from = %peer, "a peer says the cluster revoked this node");
                self.trust.revoke_self(&at);
                let _ = self.swarm.behaviour_mut().notice.send_response(channel, ());
            }
            request_response::Event::Message { peer, message: request_response::Message::Response { .. }, .. }
            | request_response::Event::OutboundFailure { peer, .. } => {
                let newly = self.swarm.behaviour_mut().blocked.block_peer(peer);
                tracing::info!(node = %peer, newly, "told a revoked node and blocked it");
            }
            _ => {}
        }
    }

    fn on_enroll(&mut self, event: request_response::Event<EnrollRequest, EnrollResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { channel, request, .. },
                ..
            } => {
                let response = match self.trust.issue(&peer, &request.proof) {
                    Ok((ca, cert)) => {
                        tracing::info!(node = %peer, "issued a cluster certificate");
                        EnrollResponse::Issued { ca, cert }
                    }
                    Err(PkiError::NotIssuer) => EnrollResponse::Refused(PkiError::NotIssuer.to_string()),
                    Err(err) => {
                        tracing::warn!(node = %peer, error = %err, "refused a certificate");
                        EnrollResponse::Refused(err.to_string())
                    }
                };
                // Fails only when the requester went away.
                let _ = self.swarm.behaviour_mut().enroll.send_response(channel, response);
            }
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { response, .. },
                ..
            } => match response {
                EnrollResponse::Issued { .. } if self.trust.is_enrolled() => {}
                EnrollResponse::Issued { ca, cert } => match self.trust.accept_enrollment(&ca, &cert) {
                    Ok(()) => {
                        tracing::info!(issuer = %peer, "enrolled: this node has its cluster certificate");
                        self.trust.set_problem(None);
                        self.publish(false);
                    }
                    Err(err) => {
                        tracing::warn!(issuer = %peer, error = %err, "rejected the certificate offered");
                        self.enroll_refused(&peer, None);
                    }
                },
                EnrollResponse::Refused(reason) => {
                    tracing::debug!(%peer, %reason, "no certificate from this peer");
                    self.enroll_refused(&peer, Some(&reason));
                }
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "enrollment request failed");
                self.enroll_refused(&peer, None);
            }
            _ => {}
        }
    }

    fn report(&mut self, changes: Vec<Change>) {
        self.sync_on_changes(&changes, Instant::now());
        for change in changes {
            match &change {
                Change::Joined(id) => tracing::info!(node = %id, "peer joined"),
                Change::Liveness(id, liveness) => {
                    tracing::info!(node = %id, liveness = liveness.as_str(), "peer liveness changed")
                }
                Change::Forgotten(id) => tracing::info!(node = %id, "peer forgotten"),
            }
        }
    }

    /// Publishes the view now, or at most [`VIEW_EVERY`] after the last
    /// time: each reader does work for the whole table on every view, and
    /// a mesh of 100 starting at once changes hundreds of times a second.
    fn refresh_view(&mut self) {
        let now = Instant::now();
        if self.view_at.is_some_and(|at| now.saturating_duration_since(at) < VIEW_EVERY) {
            self.view_due = true;
            return;
        }
        self.publish_view(now);
    }

    fn publish_view(&mut self, now: Instant) {
        self.view_at = Some(now);
        self.view_due = false;
        let view = MeshView {
            local_id: self.swarm.local_peer_id().to_string(),
            listen_addrs: self.listen_addrs.clone(),
            connected: self.swarm.connected_peers().count(),
            peers: self
                .table
                .entries()
                .map(|e| PeerSnapshot {
                    state: e.state.clone(),
                    liveness: e.liveness,
                    last_seen_ago: now.saturating_duration_since(e.last_seen),
                })
                .collect(),
        };
        self.view.send_if_modified(|current| {
            if **current == view {
                return false;
            }
            *current = Arc::new(view);
            true
        });
    }

    fn dial_lan_peer(&mut self, peer: PeerId) {
        let Some(addrs) = self.lan_peers.get(&peer) else { return };
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs.clone())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(err) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %err, "cannot dial mDNS peer");
        }
    }

    /// Dials bootstrap peers and LAN peers found by mDNS that are not
    /// connected: mDNS reports a peer once, so a first dial that failed
    /// (both sides dialling at once, a peer still starting) is retried here.
    fn dial_bootstrap(&mut self) {
        let lan: Vec<PeerId> = self.lan_peers.keys().filter(|p| !self.swarm.is_connected(p)).copied().collect();
        for peer in lan {
            self.dial_lan_peer(peer);
        }
        self.dial_dead();
        self.dial_links();
        // In the mesh, the bootstrap peers are peers like any other: dialling
        // them forever made each a hub every node stays connected to.
        if self.swarm.connected_peers().count() >= MIN_CONNECTED {
            return;
        }
        for addr in self.bootstrap.clone() {
            let known = peer_of(&addr).or_else(|| self.dialled.get(&addr).copied());
            if known.is_some_and(|peer| self.swarm.is_connected(&peer)) {
                continue;
            }
            if let Err(err) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %err, "cannot dial bootstrap peer");
            }
        }
    }

    /// Tops this node's connections up to [`LINKS`] with members alive
    /// picked at random, at the addresses their states give.
    fn dial_links(&mut self) {
        use rand::seq::SliceRandom;
        let connected = self.swarm.connected_peers().count();
        if connected >= LINKS {
            return;
        }
        let mut candidates = self.dialable(Liveness::Alive);
        candidates.shuffle(&mut rand::thread_rng());
        for (peer, addrs) in candidates.into_iter().take(LINKS - connected) {
            let opts =
                DialOpts::peer_id(peer).addresses(addrs).condition(PeerCondition::DisconnectedAndNotDialing).build();
            if let Err(err) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %err, "cannot dial a member");
            }
        }
    }

    /// Peers in `liveness` this node is not connected to, with the libp2p
    /// addresses their last state gave (those without any are left out).
    fn dialable(&self, liveness: Liveness) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.table
            .entries()
            .filter(|e| e.liveness == liveness)
            .filter_map(|e| {
                let peer = e.state.node_id.parse::<PeerId>().ok()?;
                let addrs = e.state.p2p_addrs.iter().filter_map(|a| a.parse().ok()).collect::<Vec<_>>();
                (!addrs.is_empty() && !self.swarm.is_connected(&peer)).then_some((peer, addrs))
            })
            .collect()
    }

    /// A peer in `liveness` this node is connected to, if any.
    pub(super) fn connected_in(&self, liveness: Liveness) -> Option<PeerId> {
        self.table
            .entries()
            .filter(|e| e.liveness == liveness)
            .filter_map(|e| e.state.node_id.parse::<PeerId>().ok())
            .find(|p| self.swarm.is_connected(p))
    }

    /// Dials a few peers taken for dead, in turn, at the addresses their
    /// last state gave: one that answers is across a healed partition.
    fn dial_dead(&mut self) {
        // Dead yet connected: this node missed the news that revived it.
        if let Some(peer) = self.connected_in(Liveness::Dead) {
            self.pull_soon(peer, Instant::now());
        }
        let mut dead = self.dialable(Liveness::Dead);
        if dead.is_empty() {
            return;
        }
        self.dead_dials = self.dead_dials.wrapping_add(1);
        let turn = self.dead_dials % dead.len();
        dead.rotate_left(turn);
        for (peer, addrs) in dead.into_iter().take(DEAD_DIALS) {
            let opts =
                DialOpts::peer_id(peer).addresses(addrs).condition(PeerCondition::DisconnectedAndNotDialing).build();
            if let Err(err) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %err, "cannot dial a peer taken for dead");
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                propagation_source,
                ..
            })) => {
                if message.topic == self.beat_topic.hash() {
                    self.on_beat(message.source, &message.data);
                } else if message.topic == self.suspicion_topic.hash() {
                    self.on_suspicion(message.source, &message.data);
                } else {
                    self.take_state(message.source, propagation_source, Bytes::from(message.data), None);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Enroll(event)) => self.on_enroll(event),
            SwarmEvent::Behaviour(BehaviourEvent::Notice(event)) => self.on_notice(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                for addr in info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    let addrs = self.lan_peers.entry(peer).or_default();
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                    self.dial_lan_peer(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                for (peer, addr) in gone {
                    if let Some(addrs) = self.lan_peers.get_mut(&peer) {
                        addrs.retain(|a| *a != addr);
                        if addrs.is_empty() {
                            self.lan_peers.remove(&peer);
                        }
                    }
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => self.on_connected(peer_id, &endpoint),
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => self.on_disconnected(peer_id),
            SwarmEvent::NewListenAddr { address, .. } => {
                let address = address.with(Protocol::P2p(*self.swarm.local_peer_id()));
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                    self.refresh_view();
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => self.on_dial_failed(peer_id, &error),
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                // Outsiders without the cluster secret end here.
                tracing::debug!(from = %send_back_addr, error = %error, "refused an incoming connection");
            }
            _ => {}
        }
    }

    /// The last connection to a peer closed. A watched peer's connection
    /// stays open for its pulse stream: its closing is news for the whole
    /// mesh. Any other connection may just have gone idle: no news.
    fn on_disconnected(&mut self, peer_id: PeerId) {
        let id = peer_id.to_string();
        let now = Instant::now();
        if self.table.watches(&id) {
            let changes = self.table.suspect(&id, now);
            if !changes.is_empty() {
                let timestamp = self.table.get(&id).map_or(0, |e| e.state.timestamp_ms);
                self.announce_silent(vec![(id, timestamp)], now);
            }
            self.report(changes);
        }
        self.refresh_view();
    }

    /// A dial failed. Nothing listening where a watched peer said it would
    /// is this node's own evidence, as good as a broken connection.
    fn on_dial_failed(&mut self, peer_id: Option<PeerId>, error: &libp2p::swarm::DialError) {
        tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
        if !self.trust.is_enrolled() {
            self.enrollment.last_dial_error = Some(error.to_string());
        }
        if let Some(peer) = peer_id.map(|p| p.to_string())
            && self.table.watches(&peer)
            && refused(error)
        {
            let changes = self.table.suspect(&peer, Instant::now());
            self.report(changes);
            self.refresh_view();
        }
    }

    fn on_connected(&mut self, peer_id: PeerId, endpoint: &libp2p::core::ConnectedPoint) {
        tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
        self.enrollment.peers_changed(Instant::now());
        // A new peer may issue: ask now, not at the next heartbeat.
        self.enroll();
        // A newcomer pulls what it lacks; a peer from across a partition
        // is sent and asked for news.
        self.sync_on_connected(peer_id, Instant::now());
        if endpoint.is_dialer() {
            let addr = endpoint.get_remote_address().clone();
            if let Some(bootstrap) = self.bootstrap.iter().find(|b| strip_p2p(b) == strip_p2p(&addr)) {
                self.dialled.insert(bootstrap.clone(), peer_id);
            }
        }
        self.refresh_view();
    }

    /// A state from gossip (`source` its author, `relay` the peer it came
    /// through) or from a pulled snapshot (`snapshot_of` this node's id,
    /// whose own state in it is skipped).
    fn take_state(&mut self, source: Option<PeerId>, relay: PeerId, data: Bytes, snapshot_of: Option<&str>) {
        // A state must carry a member's certificate (or be by a member
        // whose certificate this node holds) and signature and be about
        // its author, so no outsider is seen and no node can speak for
        // another.
        let opened = SignedNodeState::decode(data.as_ref())
            .map_err(|e| PkiError::BadState(format!("undecodable: {e}")))
            .and_then(|signed| match self.known_state(&signed, source) {
                Some(state) => Ok((state, signed)),
                None => self.trust.open_state(&signed, source).map(|state| (state, signed)),
            });
        let (state, signed) = match opened {
            Ok(opened) => opened,
            Err(PkiError::CertUnknown(author)) => {
                self.await_cert(author, relay, data, Instant::now());
                return;
            }
            Err(err) => {
                tracing::debug!(source = ?source, error = %err, "dropping node state");
                return;
            }
        };
        // What this node serves carries the certificate, however it came.
        let data = match signed.cert.is_empty() {
            false => data,
            true => match state.node_id.parse().ok().and_then(|author| self.trust.with_cert(signed, &author)) {
                Some(full) => Bytes::from(full.encode_to_vec()),
                None => return,
            },
        };
        if snapshot_of == Some(state.node_id.as_str()) {
            return;
        }
        let (id, seq, now) = (state.node_id.clone(), state.seq, Instant::now());
        let held = |table: &PeerTable| table.get(&id).map(|e| (e.state.seq, e.state.timestamp_ms));
        let before = held(&self.table);
        let mut changes = self.table.observe(state, now);
        if held(&self.table) != before {
            self.shelve(&id, data);
        } else if snapshot_of.is_some() && before.is_some_and(|(s, _)| s == seq) {
            // The peer takes it for alive on the same news: a beat.
            changes = self.table.vouch(&id, now);
        }
        self.report(changes);
        self.refresh_view();
    }

    /// `signed`, if it is the very state (same bytes, same signature)
    /// this node holds and serves for its author, checked when it came:
    /// a snapshot repeats most of what this node holds, and checking each
    /// signature again made every pull cost a hundred verifications at
    /// 100 nodes. Anything else (a newer state, a revoked author, one
    /// relayed under another author) goes through the full check.
    fn known_state(&self, signed: &SignedNodeState, source: Option<PeerId>) -> Option<NodeState> {
        let state = NodeState::decode(signed.state.as_slice()).ok()?;
        if source.is_some_and(|s| s.to_string() != state.node_id) || self.trust.is_revoked(&state.node_id) {
            return None;
        }
        if self.table.get(&state.node_id)?.state.seq != state.seq {
            return None;
        }
        let shelved = SignedNodeState::decode(self.shelf.get(&state.node_id)?.as_ref()).ok()?;
        (shelved.state == signed.state && shelved.signature == signed.signature).then_some(state)
    }

    /// A beat: alive. Gossipsub verified its author's signature; the table
    /// takes it only from nodes whose signed state it holds.
    fn on_beat(&mut self, source: Option<PeerId>, data: &[u8]) {
        let (Some(source), Ok(_)) = (source, Beat::decode(data)) else {
            tracing::debug!(source = ?source, "dropping a beat without an author or undecodable");
            return;
        };
        let changes = self.table.beat(&source.to_string(), Instant::now());
        if !changes.is_empty() {
            self.report(changes);
            self.refresh_view();
        }
    }
}

fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dial_refused_at_every_address_counts_as_refused() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/9".parse().expect("multiaddr");
        let io = |kind: std::io::ErrorKind| {
            // libp2p's TCP transport wraps the socket's error in another.
            let socket = std::io::Error::from(kind);
            libp2p::TransportError::Other(std::io::Error::other(libp2p::TransportError::Other(socket)))
        };
        let dial = |kinds: &[std::io::ErrorKind]| {
            libp2p::swarm::DialError::Transport(kinds.iter().map(|k| (addr.clone(), io(*k))).collect())
        };
        use std::io::ErrorKind::{ConnectionRefused, TimedOut};
        assert!(refused(&dial(&[ConnectionRefused])));
        assert!(refused(&dial(&[ConnectionRefused, ConnectionRefused])));
        assert!(!refused(&dial(&[ConnectionRefused, TimedOut])), "one address may still answer");
        assert!(!refused(&dial(&[])));
        assert!(!refused(&libp2p::swarm::DialError::Aborted));
    }
}
