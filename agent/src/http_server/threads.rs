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

use crate::api::Api;
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
    /// Fires once its connections have drained.
    drained: oneshot::Receiver<()>,
    /// Sent (or dropped) to end its runtime.
    release: oneshot::Sender<()>,
    /// Fires once its runtime is gone.
    ended: oneshot::Receiver<()>,
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
        app: Api,
        drain: Duration,
    ) -> std::io::Result<ConnectionThreads> {
        let mut lanes = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (handoffs, incoming) = mpsc::unbounded_channel();
            let (drained_tx, drained) = oneshot::channel();
            let (release, released) = oneshot::channel::<()>();
            let (ended_tx, ended) = oneshot::channel();
            let open = Arc::new(AtomicUsize::new(0));
            let lane = LaneRun { incoming, open: open.clone(), builder: builder.clone(), app: app.clone(), drain };
            std::thread::Builder::new().name(format!("llmesh-http-{index}")).spawn(move || {
                runtime.block_on(async move {
                    lane.run().await;
                    let _ = drained_tx.send(());
                    // Tasks the connections started (a backend connection
                    // another thread's request may be reading, a cloud
                    // call) keep running until the agent has finished
                    // its forwarded requests: see `Lingering`.
                    let _ = released.await;
                });
                drop(runtime);
                let _ = ended_tx.send(());
            })?;
            lanes.push(Lane { handoffs, open, drained, release, ended });
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

    /// Stops handing over and waits for every thread's connections to
    /// drain; the threads themselves run on until the returned
    /// [`Lingering`] ends.
    pub(super) async fn finish(self) -> Lingering {
        let mut lingering = Lingering { release: Vec::new(), ended: Vec::new() };
        let mut drained = Vec::with_capacity(self.lanes.len());
        for lane in self.lanes {
            drop(lane.handoffs);
            drained.push(lane.drained);
            lingering.release.push(lane.release);
            lingering.ended.push(lane.ended);
        }
        for done in drained {
            // An error: the thread panicked; nothing is left to wait for.
            let _ = done.await;
        }
        lingering
    }
}

/// Connection threads whose connections have drained but whose runtimes
/// still run: tasks started there (backend and cloud connections that the
/// pools share between threads) may still serve the agent's last
/// forwarded requests. [`Lingering::end`] (or dropping it) ends them.
#[derive(Default)]
pub struct Lingering {
    release: Vec<oneshot::Sender<()>>,
    ended: Vec<oneshot::Receiver<()>>,
}

impl Lingering {
    /// Ends the threads' runtimes and waits (briefly) for them to go.
    pub async fn end(self) {
        let Lingering { release, ended } = self;
        drop(release);
        for done in ended {
            if tokio::time::timeout(Duration::from_secs(2), done).await.is_err() {
                tracing::warn!("a connection thread did not end within 2 s");
            }
        }
    }
}

/// While a thread has connections, a timer of its runtime is always due
/// within this time. Tokio wakes its own I/O driver (a write to an eventfd,
/// and one more turn of the event loop) whenever a timer is set to expire
/// before every other one, even on the thread that is running and cannot
/// be asleep (tokio-rs/tokio#5207); a request sets such timers (the
/// backend's first-byte watch, hyper's header-read timeout), which cost a
/// system call for most requests. With this timer ahead of them, none of
/// them is the earliest. Shorter than the shortest of those timers (the
/// stall probe, 1 s by default).
const PACE: Duration = Duration::from_millis(250);

/// What a connection thread runs.
struct LaneRun {
    incoming: mpsc::UnboundedReceiver<Handoff>,
    open: Arc<AtomicUsize>,
    builder: Arc<ConnectionBuilder>,
    app: Api,
    drain: Duration,
}

impl LaneRun {
    async fn run(mut self) {
        let graceful = GracefulShutdown::new();
        let mut pace = tokio::time::interval(PACE);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let handoff = tokio::select! {
                handoff = self.incoming.recv() => handoff,
                // Disabled once the thread has no connections: an idle
                // agent is not woken four times a second.
                _ = pace.tick(), if self.open.load(Ordering::Relaxed) > 0 => continue,
            };
            let Some(handoff) = handoff else { break };
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
