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

use crate::api::{AppState, router};
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
    /// libp2p addresses peers can bootstrap from.
    pub p2p: Vec<Multiaddr>,
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

/// Joins the mesh and lets the router use it; `None` (with the mesh's
/// tasks stopped) when stopped before this node got its certificate.
async fn join_mesh(
    config: &Config,
    router: &Router,
    shutdown: &CancellationToken,
    stop_mesh: &CancellationToken,
) -> Result<Option<Node>, RunError> {
    let settings = NodeSettings {
        name: config.node.name.clone(),
        http_port: config.api.listen.port(),
        head_timeout: config.backend.response_timeout,
        max_body_bytes: config.api.max_body_bytes,
    };
    let handler = router.forwarded_handler();
    let Some(node) = llmesh_mesh::node::start(&config.mesh, settings, handler, shutdown, stop_mesh.clone()).await?
    else {
        stop_mesh.cancel();
        return Ok(None);
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
    router.join(links, warmup);
    router.spawn_nudger(stop_mesh.clone());
    Ok(Some(node))
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
    spawn_metrics_upkeep(stop_mesh.clone());
    let parts = start_local(&config, &stop_mesh).await?;
    let cloud = start_cloud(&config)?;
    let listener = bind(config.api.listen).await?;
    let addr = listener.local_addr()?;
    let fallback = cloud.clone().map(|c| c as Arc<dyn Fallback>);
    let route =
        Arc::new(Router::new(parts.local.clone(), config.node.name.clone(), fallback, route_config(&config.mesh)));
    let node = if config.mesh.enabled {
        // None: stopped before this node got its certificate.
        let Some(node) = join_mesh(&config, &route, &shutdown, &stop_mesh).await? else { return Ok(()) };
        Some(node)
    } else {
        None
    };
    let state_builder = node_state(&config, addr, &parts, node.as_ref());
    let usage = Arc::new(crate::limits::UsageBatcher::default());
    if let Some(node) = &node {
        follow_mesh(&config, node, &state_builder, &usage, &parts.local, &stop_mesh);
    }
    let state = Arc::new(AppState {
        node_name: config.node.name.clone(),
        local: parts.local.clone(),
        router: route,
        node: state_builder.clone(),
        mesh: node.as_ref().map(|n| n.membership.clone()),
        coordinator: node.as_ref().map(|n| n.coordinator.clone()),
        cloud,
        anonymous: config.api.anonymous,
        usage,
        dataplane: node.as_ref().map(|n| n.dataplane.clone()),
        errors: Default::default(),
        idle_timeout: config.backend.idle_timeout,
        max_response_bytes: config.api.max_response_bytes,
        max_body_bytes: config.api.max_body_bytes,
        body_read_timeout: config.api.body_read_timeout,
        resume_streams: config.api.resume_streams,
    });
    let ready = Ready {
        http: addr,
        node_id: state_builder.node_id.clone(),
        p2p: node.as_ref().map(Node::p2p_addrs).unwrap_or_default(),
    };
    tracing::info!(%addr, node = %config.node.name, node_id = %ready.node_id, data = %state_builder.data_addr, "llmesh agent listening");
    on_ready(&ready);
    tokio::spawn(announce_drain(
        shutdown.clone(),
        state_builder,
        node.as_ref().map(|n| (n.membership.clone(), n.dataplane.clone())),
    ));
    let result = crate::http_server::serve(
        listener,
        router(state),
        config.api.max_connections,
        shutdown.clone(),
        config.api.drain_timeout,
    )
    .await
    .map_err(RunError::Serve);
    shutdown.cancel();
    if let Some(node) = &node {
        finish_forwarded(node, config.api.drain_timeout).await;
    }
    stop_mesh.cancel();
    if let Err(err) = parts.poller.await {
        tracing::warn!(error = %err, "inventory poller ended abnormally");
    }
    tracing::info!("llmesh agent stopped");
    result
}

/// Lets requests peers forwarded here finish, then closes the data plane.
async fn finish_forwarded(node: &Node, limit: Duration) {
    if !node.dataplane.drained(limit).await {
        tracing::warn!(timeout = ?limit, "forwarded requests still running at the drain timeout");
    }
    node.dataplane.close().await;
}

/// What this node gossips about itself.
fn node_state(config: &Config, addr: SocketAddr, parts: &LocalParts, node: Option<&Node>) -> Arc<NodeStateBuilder> {
    Arc::new(NodeStateBuilder {
        node_id: node.map(|n| n.membership.local_id().to_string()).unwrap_or_default(),
        name: config.node.name.clone(),
        api_addr: format!("http://{addr}"),
        backend_kind: config.backend.kind,
        parallel_slots: config.backend.slots(),
        inventory: parts.inventory.clone(),
        load: parts.load.clone(),
        recent_prefixes: parts.local.recent_prefixes().clone(),
        gpu: GpuProbe::new(),
        data_addr: node.map(|n| n.data_addr.to_string()).unwrap_or_default(),
        control_addr: node.map(|n| n.control_addr.to_string()).unwrap_or_default(),
        draining: Default::default(),
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
async fn announce_drain(
    shutdown: CancellationToken,
    state: Arc<NodeStateBuilder>,
    mesh: Option<(llmesh_mesh::Membership, Arc<llmesh_mesh::DataPlane>)>,
) {
    shutdown.cancelled().await;
    state.draining.store(true, Ordering::SeqCst);
    if let Some((membership, dataplane)) = &mesh {
        membership.set_local_state(state.build());
        dataplane.start_drain();
    }
    tracing::info!("draining: finishing in-flight requests");
}
