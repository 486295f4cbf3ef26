//! Running the agent and the standalone sim: bind, serve, drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use std::sync::atomic::{AtomicBool, Ordering};

use llmesh_mesh::coordinator::placement::PlacementConfig;
use llmesh_mesh::pki::Trust;
use llmesh_mesh::{
    ClusterSecret, Coordinator, CoordinatorConfig, DataPlane, DataPlaneConfig, JoinToken, LivenessConfig, Membership,
    MembershipConfig, Multiaddr, RequestHandler,
};

use crate::api::{AppState, router};
use crate::backend;
use crate::config::{BackendKind, Config};
use crate::dispatch::{Dispatcher, QueueLimits};
use crate::gpu::GpuProbe;
use crate::inventory::InventoryHandle;
use crate::load::LoadTracker;
use crate::local::LocalNode;
use crate::node_state::NodeStateBuilder;
use crate::sim::{SimConfig, SimEngine};

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}{tip}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
        /// A hint for the usual cause.
        tip: &'static str,
    },
    /// The backend could not be set up.
    #[error("backend setup failed: {0}")]
    Backend(String),
    /// The mesh could not be joined.
    #[error("mesh: {0}")]
    Mesh(String),
    /// The server failed while running.
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
}

/// What a started agent tells its caller.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Bound HTTP address.
    pub http: SocketAddr,
    /// This node's id in the mesh (empty without one).
    pub node_id: String,
    /// libp2p addresses peers can bootstrap from.
    pub p2p: Vec<Multiaddr>,
}

/// Loads or creates the identity, secret and certificates, starts
/// membership, and waits until this node holds its cluster certificate.
async fn start_mesh(
    config: &Config,
    http_port: u16,
    shutdown: &CancellationToken,
) -> Result<(Membership, ClusterSecret, Arc<Trust>), RunError> {
    let mesh = &config.mesh;
    let data_dir = mesh.data_dir();
    let mut bootstrap = mesh.bootstrap_addrs().map_err(|e| RunError::Mesh(e.to_string()))?;
    let mut expected_ca = None;
    let mut join_key = None;
    let secret = match &mesh.join {
        Some(token) => {
            let token = JoinToken::decode(token).map_err(|e| RunError::Mesh(e.to_string()))?;
            token.secret.store(&data_dir).map_err(|e| RunError::Mesh(e.to_string()))?;
            bootstrap.extend(token.bootstrap);
            expected_ca = Some(token.ca);
            join_key = Some(token.join);
            token.secret
        }
        None => {
            let (secret, created) =
                ClusterSecret::load_or_create(&data_dir).map_err(|e| RunError::Mesh(e.to_string()))?;
            if created {
                crate::cluster::make_seed(&data_dir).map_err(|e| RunError::Mesh(e.to_string()))?;
                tracing::info!(
                    dir = %data_dir.display(),
                    "created a new cluster; run `llmesh init --data-dir {}` to print its join token",
                    data_dir.display()
                );
            }
            if crate::cluster::is_seed(&data_dir) {
                // Data directories from before the cluster CA get one now.
                llmesh_mesh::pki::create_ca(&data_dir).map_err(|e| RunError::Mesh(e.to_string()))?;
            }
            secret
        }
    };
    let (keypair, created) =
        llmesh_mesh::identity::load_or_create(&data_dir).map_err(|e| RunError::Mesh(e.to_string()))?;
    if created {
        tracing::info!(node_id = %keypair.public().to_peer_id(), "created a node identity");
    }
    let trust = Trust::load(&data_dir, keypair.clone(), expected_ca).map_err(|e| RunError::Mesh(e.to_string()))?;
    let listen = mesh.listen_addr(http_port).map_err(|e| RunError::Mesh(e.to_string()))?;
    tracing::info!(cluster = %secret.fingerprint(), %listen, "joining the mesh");
    let membership_config = MembershipConfig {
        keypair,
        secret: secret.clone(),
        trust: trust.clone(),
        join_key,
        listen: vec![listen],
        bootstrap,
        mdns: mesh.mdns,
        heartbeat: mesh.heartbeat,
        liveness: LivenessConfig {
            suspect_after: mesh.suspect_after,
            dead_after: mesh.dead_after,
            ..LivenessConfig::default()
        },
    };
    let (membership, _task) = llmesh_mesh::membership::start(membership_config, shutdown.clone())
        .await
        .map_err(|e| RunError::Mesh(e.to_string()))?;
    Ok((membership, secret, trust))
}

/// Starts the Raft coordinator and its gRPC server.
async fn start_coordinator(
    config: &Config,
    http_port: u16,
    membership: &Membership,
    secret: ClusterSecret,
    trust: Arc<Trust>,
    shutdown: &CancellationToken,
) -> Result<Coordinator, RunError> {
    let mesh = &config.mesh;
    let data_dir = mesh.data_dir();
    let mut coordinator = CoordinatorConfig::new(
        config.node.name.clone(),
        data_dir.clone(),
        mesh.control_listen_addr(http_port),
        secret,
        trust,
    );
    coordinator.seed = crate::cluster::seed(&data_dir).map_err(|e| RunError::Mesh(e.to_string()))?;
    coordinator.target_voters = mesh.voters;
    coordinator.replace_after = mesh.replace_voter_after;
    coordinator.placement = PlacementConfig {
        enabled: mesh.placement,
        hot_for: mesh.placement_hot_for,
        cool_for: mesh.placement_cool_for,
        ..PlacementConfig::default()
    };
    llmesh_mesh::coordinator::start(coordinator, membership.clone(), shutdown.clone())
        .await
        .map_err(|e| RunError::Mesh(e.to_string()))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr).await.map_err(|source| {
        let tip = if source.kind() == std::io::ErrorKind::AddrInUse {
            " (is another llmesh or service running there? pick another with --listen or --port-base)"
        } else {
            ""
        };
        RunError::Bind { addr, source, tip }
    })
}

/// Serves `app` on `listener` until `shutdown`, then lets in-flight
/// requests finish for at most `drain`.
async fn serve_until(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), RunError> {
    crate::http_server::serve(listener, app, max_connections, shutdown, drain).await.map_err(RunError::Serve)
}

/// Runs the agent until `shutdown` fires. `on_ready` learns the bound
/// addresses once requests can be accepted.
pub async fn run_agent(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), RunError> {
    // Membership, the data plane and the inventory outlive the HTTP server:
    // they stop only after the drain, so peers hear that this node drains
    // and its in-flight forwarded requests can finish.
    let stop_mesh = CancellationToken::new();
    // Installed before any request so that no count is lost; histogram
    // samples are folded in regularly even when nobody scrapes.
    if let Some(handle) = crate::metrics::handle() {
        let stop = stop_mesh.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                }
            }
        });
    }
    let backend = backend::build(&config.backend, &config.sim).map_err(|e| RunError::Backend(e.to_string()))?;
    let inventory = InventoryHandle::new(backend.clone());
    let first = inventory.refresh().await;
    if first.healthy {
        tracing::info!(kind = config.backend.kind.as_str(), url = %config.backend.url, models = first.inventory.models.len(), "backend ready");
    }
    let poller = tokio::spawn(inventory.clone().poll(config.backend.inventory_interval, stop_mesh.clone()));
    let load = Arc::new(LoadTracker::default());
    let local = Arc::new(LocalNode::new(backend, inventory.clone(), load.clone(), config.backend.response_timeout));
    let cloud = crate::cloud::Cloud::from_config(&config.cloud).map_err(|e| RunError::Backend(e.to_string()))?;
    if let Some(cloud) = &cloud {
        let providers: Vec<String> = config.cloud.providers.iter().map(|p| p.name.clone()).collect();
        tracing::info!(?providers, models = cloud.models().len(), "cloud fallback configured");
    }
    let listener = bind(config.api.listen).await?;
    let addr = listener.local_addr()?;
    let configured_port = config.api.listen.port();
    let (mesh, coordinator) = if config.mesh.enabled {
        // The other planes sit next to the *configured* HTTP port; when that
        // is 0 (OS-chosen) they get OS-chosen ports too, never the bound
        // port + N, which may belong to someone else.
        let (membership, secret, trust) = start_mesh(&config, configured_port, &stop_mesh).await?;
        if !trust.is_enrolled() {
            // The data and control planes need the certificate; the
            // membership task asks for it and logs the wait.
            tokio::select! {
                () = trust.enrolled() => {}
                () = shutdown.cancelled() => {
                    stop_mesh.cancel();
                    tracing::info!("stopped before this node got its cluster certificate");
                    return Ok(());
                }
            }
        }
        let coordinator =
            start_coordinator(&config, configured_port, &membership, secret, trust.clone(), &stop_mesh).await?;
        (Some((membership, trust)), Some(coordinator))
    } else {
        (None, None)
    };
    let (mesh, trust) = match mesh {
        Some((membership, trust)) => (Some(membership), Some(trust)),
        None => (None, None),
    };
    let dataplane = match &trust {
        Some(trust) => {
            let dp_config = DataPlaneConfig {
                listen: config.mesh.data_listen_addr(configured_port),
                node_name: config.node.name.clone(),
                connect_timeout: config.mesh.connect_timeout,
                head_timeout: config.backend.response_timeout,
                max_body_bytes: config.api.max_body_bytes,
            };
            let handler: Arc<dyn RequestHandler> = local.clone();
            Some(
                DataPlane::bind(dp_config, trust.clone(), handler, stop_mesh.clone())
                    .map_err(|e| RunError::Mesh(e.to_string()))?,
            )
        }
        None => None,
    };
    let data_addr = match (&dataplane, &mesh) {
        (Some(dp), Some(m)) => advertised(dp.local_addr()?, &m.view().listen_addrs).to_string(),
        _ => String::new(),
    };
    let node = Arc::new(NodeStateBuilder {
        node_id: mesh.as_ref().map(|m| m.local_id().to_string()).unwrap_or_default(),
        name: config.node.name.clone(),
        api_addr: format!("http://{addr}"),
        backend_kind: config.backend.kind,
        parallel_slots: if config.backend.kind == BackendKind::Sim {
            config.sim.slots
        } else {
            config.backend.parallel_slots
        },
        inventory,
        load,
        gpu: GpuProbe::new(),
        data_addr,
        control_addr: match (&coordinator, &mesh) {
            (Some(c), Some(m)) => advertised(c.local_addr(), &m.view().listen_addrs).to_string(),
            _ => String::new(),
        },
        draining: AtomicBool::new(false),
    });
    if let (Some(membership), Some(dp)) = (&mesh, &dataplane) {
        membership.set_local_state(node.build());
        tokio::spawn(node.clone().publish(membership.clone(), config.mesh.heartbeat, stop_mesh.clone()));
        tokio::spawn(follow_peers(membership.clone(), dp.clone(), stop_mesh.clone()));
    }
    let limits = QueueLimits {
        capacity: config.mesh.queue_capacity,
        timeout: config.mesh.queue_timeout,
        max_expected_wait: config.mesh.max_expected_wait,
    };
    // A node that joins others (or rejoins its cluster) has peers it has
    // not heard from yet; a lone first node does not.
    let expects_peers = !config.mesh.bootstrap.is_empty()
        || config.mesh.join.is_some()
        || coordinator.as_ref().is_some_and(|c| c.state().members.len() > 1);
    let warmup = if expects_peers { config.mesh.dead_after } else { Duration::ZERO };
    let dispatcher = Arc::new(
        Dispatcher::new(
            local.clone(),
            config.node.name.clone(),
            node.parallel_slots,
            mesh.clone(),
            dataplane.clone(),
            config.mesh.max_attempts,
            limits,
        )
        .with_coordinator(coordinator.clone())
        .with_cloud(cloud.clone())
        .with_mesh_warmup(warmup),
    );
    dispatcher.spawn_waker(stop_mesh.clone());
    let usage = Arc::new(crate::limits::UsageBatcher::default());
    if let Some(coordinator) = &coordinator {
        tokio::spawn(usage.clone().run(coordinator.clone(), stop_mesh.clone()));
    }
    if let (Some(coordinator), Some(membership)) = (&coordinator, &mesh) {
        tokio::spawn(crate::placement::follow(
            coordinator.clone(),
            local.clone(),
            membership.local_id().to_string(),
            stop_mesh.clone(),
        ));
    }
    let state = Arc::new(AppState {
        node_name: config.node.name.clone(),
        local,
        dispatcher,
        node: node.clone(),
        mesh: mesh.clone(),
        coordinator: coordinator.clone(),
        cloud: cloud.clone(),
        anonymous: config.api.anonymous,
        usage: usage.clone(),
        dataplane: dataplane.clone(),
        errors: Default::default(),
        idle_timeout: config.backend.idle_timeout,
        max_response_bytes: config.api.max_response_bytes,
        max_body_bytes: config.api.max_body_bytes,
        body_read_timeout: config.api.body_read_timeout,
    });
    let ready = Ready {
        http: addr,
        node_id: node.node_id.clone(),
        p2p: mesh.as_ref().map(|m| m.view().listen_addrs.clone()).unwrap_or_default(),
    };
    tracing::info!(%addr, node = %config.node.name, node_id = %ready.node_id, data = %node.data_addr, "llmesh agent listening");
    on_ready(&ready);

    let drain = {
        let shutdown = shutdown.clone();
        let node = node.clone();
        let mesh = mesh.clone();
        let dataplane = dataplane.clone();
        async move {
            shutdown.cancelled().await;
            // Announce at once so peers route around this node, and refuse
            // new forwarded work (it fails over to other nodes).
            node.draining.store(true, Ordering::SeqCst);
            if let Some(membership) = &mesh {
                membership.set_local_state(node.build());
            }
            if let Some(dp) = &dataplane {
                dp.start_drain();
            }
            tracing::info!("draining: finishing in-flight requests");
        }
    };
    tokio::spawn(drain);
    let result =
        serve_until(listener, router(state), config.api.max_connections, shutdown.clone(), config.api.drain_timeout)
            .await;
    shutdown.cancel();
    if let Some(dp) = &dataplane {
        if !dp.drained(config.api.drain_timeout).await {
            tracing::warn!(timeout = ?config.api.drain_timeout, "forwarded requests still running at the drain timeout");
        }
        dp.close().await;
    }
    stop_mesh.cancel();
    if let Err(err) = poller.await {
        tracing::warn!(error = %err, "inventory poller ended abnormally");
    }
    tracing::info!("llmesh agent stopped");
    result
}

/// The data-plane address peers should dial: the bound one, or where the
/// socket is bound to every interface, the first non-loopback IPv4 that
/// libp2p listens on (loopback when there is none).
fn advertised(bound: SocketAddr, p2p: &[Multiaddr]) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ips: Vec<std::net::IpAddr> = p2p
        .iter()
        .flat_map(|a| a.iter())
        .filter_map(|p| match p {
            llmesh_mesh::multiaddr::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
            _ => None,
        })
        .collect();
    let ip = ips
        .iter()
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .copied()
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

/// Runs the simulated backend as its own HTTP server until `shutdown`.
pub async fn run_sim(
    listen: SocketAddr,
    config: SimConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), RunError> {
    let engine = Arc::new(SimEngine::new(config).map_err(RunError::Backend)?);
    let listener = bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, models = engine.models().len(), "simulated backend listening");
    on_ready(addr);
    serve_until(listener, crate::sim::router(engine), 16 * 1024, shutdown, Duration::from_secs(5)).await
}
