//! The agent composed: backend, local node, cloud client, the mesh (when
//! enabled), the router, and the HTTP API, each built from its own config
//! section; then serve until shutdown and drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use llmesh_mesh::node::{Node, NodeSettings};
use llmesh_mesh::route::{Fallback, MeshLinks, RouteConfig, Router};
// The HTTP router (axum's) is `router()`; the mesh's request router is `Router`.
use llmesh_mesh::{MeshConfig, Multiaddr};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::backend;
use crate::config::Config;
use crate::gpu::GpuProbe;
use crate::inventory::InventoryHandle;
use crate::load::LoadTracker;
use crate::local::LocalNode;
use crate::node_state::NodeStateBuilder;

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
    Mesh(#[from] llmesh_mesh::node::NodeError),
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
    /// libp2p addresses peers can bootstrap from, the dialable first.
    pub p2p: Vec<Multiaddr>,
    /// The HTTP address other boxes use (see `mesh.advertise`).
    pub advertised: Option<SocketAddr>,
}

/// Binds `addr`, with a tip when it is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr).await.map_err(|source| {
        let tip = if source.kind() == std::io::ErrorKind::AddrInUse {
            " (is another llmesh or service running there? pick another with --listen or --port-base)"
        } else {
            ""
        };
        RunError::Bind { addr, source, tip }
    })
}

/// How routing behaves, from the `[mesh]` section.
fn route_config(mesh: &MeshConfig) -> RouteConfig {
    RouteConfig {
        max_attempts: mesh.max_attempts.max(1),
        queue_capacity: mesh.queue_capacity,
        queue_timeout: mesh.queue_timeout,
        max_expected_wait: mesh.max_expected_wait,
        scheduler: Default::default(),
    }
}

/// Folds histogram samples in regularly even when nobody scrapes.
fn spawn_metrics_upkeep(stop: CancellationToken) {
    let Some(handle) = crate::metrics::handle() else { return };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            }
        }
    });
}

/// The node's own parts: backend, inventory, load and the local handler.
struct LocalParts {
    local: Arc<LocalNode>,
    inventory: InventoryHandle,
    load: Arc<LoadTracker>,
    poller: tokio::task::JoinHandle<()>,
}

async fn start_local(config: &Config, stop: &CancellationToken) -> Result<LocalParts, RunError> {
    let backend = backend::build(&config.backend).map_err(|e| RunError::Backend(e.to_string()))?;
    let inventory = InventoryHandle::new(backend.clone());
    let first = inventory.refresh().await;
    if first.healthy {
        tracing::info!(kind = config.backend.kind.as_str(), url = %config.backend.url, models = first.inventory.models.len(), "backend ready");
    }
    let poller = tokio::spawn(inventory.clone().poll(config.backend.inventory_interval, stop.clone()));
    let load = Arc::new(LoadTracker::default());
    let stall = crate::stall::StallConfig {
        probe_after: config.backend.stall_probe_after,
        probe_timeout: config.backend.stall_probe_timeout,
    };
    let local = Arc::new(LocalNode::new(
        backend,
        inventory.clone(),
        load.clone(),
        config.backend.response_timeout,
        config.backend.slots(),
        stall,
    ));
    Ok(LocalParts { local, inventory, load, poller })
}

fn start_cloud(config: &Config) -> Result<Option<Arc<crate::cloud::Cloud>>, RunError> {
    let cloud = crate::cloud::Cloud::from_config(&config.cloud).map_err(|e| RunError::Backend(e.to_string()))?;
    if let Some(cloud) = &cloud {
        let providers: Vec<String> = config.cloud.providers.iter().map(|p| p.name.clone()).collect();
        tracing::info!(?providers, models = cloud.models().len(), "cloud fallback configured");
    }
    Ok(cloud)
}

/// Starts this node's membership (fast: no wait for a certificate).
async fn begin_mesh(
    config: &Config,
    router: &Router,
    stop_mesh: &CancellationToken,
) -> Result<llmesh_mesh::node::Joining, RunError> {
    let settings = NodeSettings {
        name: config.node.name.clone(),
        http_port: config.api.listen.port(),
        head_timeout: config.backend.response_timeout,
        max_body_bytes: config.api.max_body_bytes,
    };
    let joining = llmesh_mesh::node::begin(&config.mesh, settings, stop_mesh.clone()).await?;
    // Until it is a member, a request for a model only peers serve waits
    // (within its deadline) rather than being told no node serves it.
    router.expect_mesh();
    Ok(joining)
}

/// Waits until this node is a member of its cluster, then lets the router
/// and the API use the mesh and starts the tasks that keep this node and
/// the mesh in step. Ends early on `shutdown`.
async fn finish_join(
    joining: llmesh_mesh::node::Joining,
    config: Config,
    app: Arc<AppState>,
    stop_mesh: CancellationToken,
    shutdown: CancellationToken,
) {
    let handler = Arc::new(crate::telemetry::TracedForwarded(app.router.forwarded_handler()));
    let node = match joining.finish(handler, &shutdown).await {
        Ok(Some(node)) => node,
        Ok(None) => return,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the mesh planes; this node serves only its own backend");
            return;
        }
    };
    // A node that joins others (or rejoins its cluster) has peers it has
    // not heard from yet; a lone first node does not. The mesh's dead-after
    // is the right wait: by then every live peer has been heard from.
    let expects_peers =
        !config.mesh.bootstrap.is_empty() || config.mesh.join.is_some() || node.coordinator.state().members.len() > 1;
    let warmup = if expects_peers { config.mesh.dead_after } else { Duration::ZERO };
    let links = MeshLinks {
        membership: node.membership.clone(),
        dataplane: node.dataplane.clone(),
        coordinator: node.coordinator.clone(),
    };
    let _ = app.node.data_addr.set(node.data_addr.to_string());
    let _ = app.node.control_addr.set(node.control_addr.to_string());
    app.router.join(links, warmup);
    app.router.spawn_nudger(stop_mesh.clone());
    follow_mesh(&config, &node, &app.node, &app.usage, &app.local, &stop_mesh);
    tracing::info!(data = %node.data_addr, control = %node.control_addr, "this node is a member of its cluster");
    if app.mesh_node.set(node).is_err() {
        tracing::warn!("joined the mesh twice; keeping the first");
    }
}

/// Runs the agent until `shutdown` fires. `on_ready` learns the bound
/// addresses once requests can be accepted: at once, even while this node
/// still waits for its cluster certificate (`/readyz` says so).
pub async fn run_agent(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), RunError> {
    // Membership, the data plane and the inventory outlive the HTTP server:
    // they stop only after the drain, so peers hear that this node drains
    // and its in-flight forwarded requests can finish.
    let stop_mesh = CancellationToken::new();
    spawn_metrics_upkeep(stop_mesh.clone());
    let parts = start_local(&config, &stop_mesh).await?;
    let cloud = start_cloud(&config)?;
    let listener = bind(config.api.listen).await?;
    let addr = listener.local_addr()?;
    let fallback = cloud.clone().map(|c| c as Arc<dyn Fallback>);
    let route =
        Arc::new(Router::new(parts.local.clone(), config.node.name.clone(), fallback, route_config(&config.mesh)));
    let joining = if config.mesh.enabled { Some(begin_mesh(&config, &route, &stop_mesh).await?) } else { None };
    let state = app_state(&config, addr, &parts, route, cloud, joining.as_ref());
    let advertised = state.node.api_addr.strip_prefix("http://").and_then(|a| a.parse().ok());
    let ready = Ready {
        http: addr,
        advertised,
        node_id: state.node.node_id.clone(),
        p2p: joining
            .as_ref()
            .map(|j| llmesh_mesh::node::dialable(&j.membership().view().listen_addrs, config.mesh.advertise))
            .unwrap_or_default(),
    };
    tracing::info!(%addr, node = %config.node.name, node_id = %ready.node_id, "llmesh agent listening");
    on_ready(&ready);
    if let Some(joining) = joining {
        tokio::spawn(finish_join(joining, config.clone(), state.clone(), stop_mesh.clone(), shutdown.clone()));
    }
    tokio::spawn(announce_drain(shutdown.clone(), state.clone()));
    if crate::service_manager::listening() {
        tokio::spawn(crate::service_manager::report(state.clone(), shutdown.clone()));
    }
    let limits = crate::http_server::ServeLimits {
        max_connections: config.api.max_connections,
        drain: config.api.drain_timeout,
        threads: config.api.connection_threads(),
    };
    let served =
        crate::http_server::serve(listener, crate::api::Api::new(state.clone()), limits, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(node) = state.mesh_node.get() {
        finish_forwarded(node, config.api.drain_timeout).await;
    }
    stop_mesh.cancel();
    if let Err(err) = parts.poller.await {
        tracing::warn!(error = %err, "inventory poller ended abnormally");
    }
    let result = match served {
        Ok(lingering) => {
            lingering.end().await;
            Ok(())
        }
        Err(err) => Err(RunError::Serve(err)),
    };
    tracing::info!("llmesh agent stopped");
    result
}

/// The API's shared state; the mesh planes are added when this node
/// becomes a member.
fn app_state(
    config: &Config,
    addr: SocketAddr,
    parts: &LocalParts,
    router: Arc<Router>,
    cloud: Option<Arc<crate::cloud::Cloud>>,
    joining: Option<&llmesh_mesh::node::Joining>,
) -> Arc<AppState> {
    Arc::new(AppState {
        node_name: config.node.name.clone(),
        local: parts.local.clone(),
        router,
        node: node_state(config, addr, parts, joining),
        mesh_node: std::sync::OnceLock::new(),
        trust: joining.map(|j| j.trust().clone()),
        cloud,
        anonymous: config.api.anonymous,
        usage: Arc::new(crate::limits::UsageBatcher::default()),
        errors: Default::default(),
        idle_timeout: config.backend.idle_timeout,
        max_response_bytes: config.api.max_response_bytes,
        max_body_bytes: config.api.max_body_bytes,
        body_read_timeout: config.api.body_read_timeout,
        resume_streams: config.api.resume_streams,
        public_status: config.api.public_status,
    })
}

/// Lets requests peers forwarded here finish, then closes the data plane.
async fn finish_forwarded(node: &Node, limit: Duration) {
    if !node.dataplane.drained(limit).await {
        tracing::warn!(timeout = ?limit, "forwarded requests still running at the drain timeout");
    }
    node.dataplane.close().await;
}

/// What this node gossips about itself.
fn node_state(
    config: &Config,
    addr: SocketAddr,
    parts: &LocalParts,
    joining: Option<&llmesh_mesh::node::Joining>,
) -> Arc<NodeStateBuilder> {
    let p2p = joining.map(|j| j.membership().view().listen_addrs.clone()).unwrap_or_default();
    Arc::new(NodeStateBuilder {
        node_id: joining.map(|j| j.membership().local_id().to_string()).unwrap_or_default(),
        name: config.node.name.clone(),
        api_addr: format!("http://{}", llmesh_mesh::node::advertised(addr, config.mesh.advertise, &p2p)),
        backend_kind: config.backend.kind,
        parallel_slots: config.backend.slots(),
        inventory: parts.inventory.clone(),
        load: parts.load.clone(),
        recent_prefixes: parts.local.recent_prefixes().clone(),
        gpu: GpuProbe::new(),
        data_addr: Default::default(),
        control_addr: Default::default(),
        draining: Default::default(),
        entry: Default::default(),
    })
}

/// The tasks that keep this node and the mesh in step: its gossip, its
/// usage in the ledger, and the leader's placement on its backend.
fn follow_mesh(
    config: &Config,
    node: &Node,
    state: &Arc<NodeStateBuilder>,
    usage: &Arc<crate::limits::UsageBatcher>,
    local: &Arc<LocalNode>,
    stop: &CancellationToken,
) {
    node.membership.set_local_state(state.build());
    tokio::spawn(state.clone().publish(node.membership.clone(), config.mesh.heartbeat, stop.clone()));
    tokio::spawn(usage.clone().run(node.coordinator.clone(), stop.clone()));
    let local_id = node.membership.local_id().to_string();
    tokio::spawn(crate::preload::follow(node.coordinator.clone(), local.clone(), local_id, stop.clone()));
}

/// On shutdown, announce at once that this node drains, so peers route
/// around it, and refuse new forwarded work (it fails over to other nodes).
async fn announce_drain(shutdown: CancellationToken, app: Arc<AppState>) {
    shutdown.cancelled().await;
    app.node.draining.store(true, Ordering::SeqCst);
    if let Some(node) = app.mesh_node.get() {
        node.membership.set_local_state(app.node.build());
        node.dataplane.start_drain();
    }
    tracing::info!("draining: finishing in-flight requests");
}
