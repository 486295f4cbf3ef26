//! The simulated backend: an Ollama stand-in with configurable models,
//! slots, speeds, cold loads, a prefix cache and faults. It backs tests,
//! benchmarks and `llmesh demo` where no GPU is present; the agent talks to
//! it over HTTP exactly as it talks to a real Ollama, so nothing in the
//! product knows it exists.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod apis;
mod closing;
pub mod config;
pub mod engine;
mod manage;
pub mod server;
pub mod text;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{Faults, SimConfig, SimModel};
pub use engine::SimEngine;
pub use server::{OLLAMA_COMPAT_VERSION, router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A simulated Ollama bound to a socket, serving until its shutdown.
pub struct SimServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Ends when the server stopped.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts a simulated Ollama built from `config` on `listener`; it stops when
/// `shutdown` fires. Fails on a bad model spec.
pub fn spawn(listener: TcpListener, config: SimConfig, shutdown: CancellationToken) -> Result<SimServer, String> {
    let close_after_stream = config.close_after_stream;
    let engine = Arc::new(SimEngine::new(config)?);
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, models = engine.models().len(), close_after_stream, "simulated backend listening");
    let app = router(engine);
    let task = if close_after_stream {
        tokio::spawn(closing::serve(listener, app, shutdown))
    } else {
        // Small SSE/NDJSON chunks must leave at once: without TCP_NODELAY a
        // proxy in front (the agent, nginx) waits out delayed ACKs, 40 ms a
        // chunk.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
        });
        tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
        })
    };
    Ok(SimServer { addr, task })
}
