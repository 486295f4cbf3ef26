//! Running the agent and the standalone sim: bind, serve, drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router};
use crate::backend;
use crate::config::Config;
use crate::inventory::InventoryHandle;
use crate::local::LocalNode;
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
    /// The server failed while running.
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
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
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), RunError> {
    // Small SSE/NDJSON chunks must leave at once, not wait for Nagle.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
    });
    let server =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        result = server => result.map_err(RunError::Serve),
        () = deadline => {
            tracing::warn!(?drain, "drain timeout reached; closing remaining connections");
            Ok(())
        }
    }
}

/// Runs the agent until `shutdown` fires. `on_ready` receives the bound
/// HTTP address once requests can be accepted.
pub async fn run_agent(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), RunError> {
    let backend = backend::build(&config.backend, &config.sim)
        .map_err(|e| RunError::Backend(e.to_string()))?;
    let inventory = InventoryHandle::new(backend.clone());
    let first = inventory.refresh().await;
    if first.healthy {
        tracing::info!(kind = config.backend.kind.as_str(), url = %config.backend.url, models = first.inventory.models.len(), "backend ready");
    }
    let poller = tokio::spawn(
        inventory
            .clone()
            .poll(config.backend.inventory_interval, shutdown.clone()),
    );
    let local = Arc::new(LocalNode::new(
        backend,
        inventory,
        config.backend.response_timeout,
    ));
    let state = Arc::new(AppState {
        node_name: config.node.name.clone(),
        local,
        idle_timeout: config.backend.idle_timeout,
        max_response_bytes: config.api.max_response_bytes,
        max_body_bytes: config.api.max_body_bytes,
    });
    let listener = bind(config.api.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node = %config.node.name, "llmesh agent listening");
    on_ready(addr);
    let result = serve_until(
        listener,
        router(state),
        shutdown.clone(),
        config.api.drain_timeout,
    )
    .await;
    shutdown.cancel();
    if let Err(err) = poller.await {
        tracing::warn!(error = %err, "inventory poller ended abnormally");
    }
    tracing::info!("llmesh agent stopped");
    result
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
    serve_until(
        listener,
        crate::sim::router(engine),
        shutdown,
        Duration::from_secs(5),
    )
    .await
}
