//! Connection threads: each client connection lives on one thread that runs
//! a single-threaded runtime, as nginx's workers do.
//!
//! On the multi-threaded runtime every socket event could wake a task on
//! another worker thread, and a parked worker is woken to steal it: three
//! futex calls per small request (`strace -c`), about 70 µs of the agent's
//! 170 µs of CPU per request. On its own thread a connection's task, its
//! socket and (through the backend pool's per-thread shards) its backend
//! connections share one reactor: a request moves from the client's socket
//! to the backend's and back without a thread switch. Mesh work (gossip,
//! Raft, QUIC) stays on the main runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::{Accepted, ConnectionBuilder, OnThisMachine};

/// A connection on its way to its thread: the socket leaves the accepting
/// runtime's reactor and joins the thread's.
struct Handoff {
    stream: std::net::TcpStream,
    remote: SocketAddr,
    here: OnThisMachine,
    permit: OwnedSemaphorePermit,
}

/// One connection thread, as the accept loop sees it.
struct Lane {
    handoffs: mpsc::UnboundedSender<Handoff>,
    /// Connections open on it, to send the next one to the least busy.
    open: Arc<AtomicUsize>,
    finished: oneshot::Receiver<()>,
}

/// The connection threads of one listener.
pub(super) struct ConnectionThreads {
    lanes: Vec<Lane>,
}

impl ConnectionThreads {
    /// Starts `count` threads serving `app`; at shutdown each waits up to
    /// `drain` for its open connections.
    pub(super) fn start(
        count: usize,
        builder: Arc<ConnectionBuilder>,
        app: Router,
        drain: Duration,
    ) -> std::io::Result<ConnectionThreads> {
        let mut lanes = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (handoffs, incoming) = mpsc::unbounded_channel();
            let (done, finished) = oneshot::channel();
            let open = Arc::new(AtomicUsize::new(0));
            let lane = LaneRun { incoming, open: open.clone(), builder: builder.clone(), app: app.clone(), drain };
            std::thread::Builder::new().name(format!("llmesh-http-{index}")).spawn(move || {
                runtime.block_on(lane.run());
                // Tasks the connections left behind end with the runtime.
                drop(runtime);
                let _ = done.send(());
            })?;
            lanes.push(Lane { handoffs, open, finished });
        }
        Ok(ConnectionThreads { lanes })
    }

    /// Moves a just-accepted connection to the thread with the fewest open
    /// connections.
    pub(super) fn hand_over(&self, accepted: Accepted) {
        let Some(lane) = self.lanes.iter().min_by_key(|lane| lane.open.load(Ordering::Relaxed)) else {
            return;
        };
        let Accepted { stream, remote, here, permit } = accepted;
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(%remote, error = %err, "cannot hand a connection to its thread");
                return;
            }
        };
        lane.open.fetch_add(1, Ordering::Relaxed);
        if lane.handoffs.send(Handoff { stream, remote, here, permit }).is_err() {
            lane.open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(%remote, "a connection thread has stopped; connection dropped");
        }
    }

    /// Stops handing over and waits for every thread to drain and end.
    pub(super) async fn finish(self) {
        let mut finished = Vec::with_capacity(self.lanes.len());
        for lane in self.lanes {
            drop(lane.handoffs);
            finished.push(lane.finished);
        }
        for done in finished {
            // An error: the thread panicked; nothing is left to wait for.
            let _ = done.await;
        }
    }
}

/// What a connection thread runs.
struct LaneRun {
    incoming: mpsc::UnboundedReceiver<Handoff>,
    open: Arc<AtomicUsize>,
    builder: Arc<ConnectionBuilder>,
    app: Router,
    drain: Duration,
}

impl LaneRun {
    async fn run(mut self) {
        let graceful = GracefulShutdown::new();
        while let Some(handoff) = self.incoming.recv().await {
            let Handoff { stream, remote, here, permit } = handoff;
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(err) => {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(%remote, error = %err, "cannot serve a connection on its thread");
                    continue;
                }
            };
            let connection =
                Accepted { stream, remote, here, permit }.serve(&self.builder, self.app.clone(), &graceful);
            let open = self.open.clone();
            tokio::spawn(async move {
                connection.await;
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
        if tokio::time::timeout(self.drain, graceful.shutdown()).await.is_err() {
            tracing::warn!(drain = ?self.drain, "drain timeout reached; closing remaining connections");
        }
    }
}
