//! The HTTP listener: hyper with limits that `axum::serve` does not set.
//! A client must finish its request head within [`HEADER_READ_TIMEOUT`]
//! (slowloris), the head may not exceed [`MAX_HEAD_BYTES`] or
//! [`MAX_HEADERS`], and at most `max_connections` connections are open at
//! once (the rest wait in the kernel's backlog). Shutdown stops accepting
//! and lets open requests finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::api::Api;
use axum::extract::connect_info::ConnectInfo;

/// Whether the client of a connection runs on this machine (loopback, or
/// one of this box's own addresses), put into every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct OnThisMachine(pub bool);
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

mod threads;
use threads::ConnectionThreads;
pub use threads::Lingering;

/// Time a client has to send its whole request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request: hyper's own limit, left unset on
/// the builder on purpose. Set explicitly, even to the same number, hyper
/// builds and fills two arrays of that many entries for every request it
/// parses (about 2k instructions); unset, it parses into uninitialized
/// arrays on the stack. `tests/malformed.rs` checks the limit holds.
pub const MAX_HEADERS: usize = 100;

/// Serves `app` on `listener` until `shutdown`, then waits for open
/// connections to finish for at most `drain`. With `threads` above zero,
/// each accepted connection lives on one of that many connection threads
/// (see [`ConnectionThreads`]), which run on until the returned
/// [`Lingering`] ends; with zero, on the calling runtime.
pub async fn serve(
    listener: TcpListener,
    app: Api,
    limits: ServeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<Lingering> {
    let builder = Arc::new(connection_builder());
    let threads = match limits.threads {
        0 => None,
        n => Some(ConnectionThreads::start(n, builder.clone(), app.clone(), limits.drain)?),
    };
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // Wait for a free slot before accepting: excess clients queue in the
        // backlog instead of costing memory here.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %err, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let accepted = Accepted::new(stream, remote, permit);
        match &threads {
            Some(threads) => threads.hand_over(accepted),
            None => {
                tokio::spawn(accepted.serve(&builder, app.clone(), &graceful));
            }
        }
    }
    drop(listener);
    let lingering = match threads {
        Some(threads) => threads.finish().await,
        None => Lingering::default(),
    };
    if tokio::time::timeout(limits.drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain = ?limits.drain, "drain timeout reached; closing remaining connections");
    }
    Ok(lingering)
}

/// How [`serve`] bounds its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Most connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long a shutdown waits for open connections.
    pub drain: Duration,
    /// Connection threads (0: connections run on the calling runtime).
    pub threads: usize,
}

type ConnectionBuilder = auto::Builder<TokioExecutor>;

fn connection_builder() -> ConnectionBuilder {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(20)));
    builder
}

/// A client connection just accepted, with its slot under
/// `max_connections`.
struct Accepted {
    stream: TcpStream,
    remote: SocketAddr,
    here: OnThisMachine,
    permit: OwnedSemaphorePermit,
}

impl Accepted {
    fn new(stream: TcpStream, remote: SocketAddr, permit: OwnedSemaphorePermit) -> Accepted {
        // Small SSE/NDJSON chunks must leave at once, not wait for Nagle.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        // A client that dialled one of this box's own addresses (its LAN
        // address, say) is on this machine: both ends share the IP.
        let here = OnThisMachine(remote.ip().is_loopback() || stream.local_addr().is_ok_and(|l| l.ip() == remote.ip()));
        Accepted { stream, remote, here, permit }
    }

    /// The connection's future: serves its requests until it closes, or
    /// until `graceful` shuts down and its open requests finish.
    fn serve(
        self,
        builder: &ConnectionBuilder,
        app: Api,
        graceful: &GracefulShutdown,
    ) -> impl Future<Output = ()> + Send + 'static {
        let Accepted { stream, remote, here, permit } = self;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(remote));
            request.extensions_mut().insert(here);
            let response = app.call(request.map(axum::body::Body::new));
            async move { Ok::<_, std::convert::Infallible>(response.await) }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        async move {
            let _permit = permit;
            if let Err(err) = connection.await {
                tracing::debug!(%remote, error = %err, "HTTP connection ended with an error");
            }
        }
    }
}
