//! Mutual TLS for the gRPC control plane (Raft, Admin, Limits): a TLS
//! acceptor in front of tonic's server, a connector for its channels, and
//! an interceptor that re-checks the caller's certificate on every call, so
//! a node revoked while connected is refused at its next message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::{PkiError, Trust, tls};

/// ALPN of the control plane (gRPC runs over HTTP/2).
pub const ALPN: &[u8] = b"h2";
/// How long a caller may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; callers beyond wait in the TCP backlog.
const MAX_HANDSHAKES: usize = 64;

/// Accepts TCP connections on `listener`, completes mutual TLS with members
/// only, and yields the streams for tonic's `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    trust: &Arc<Trust>,
    shutdown: CancellationToken,
) -> Result<tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>>, PkiError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(trust, ALPN)?));
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, from) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %err, "control plane cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = stream.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    // Outsiders, revoked nodes and other clusters end here.
                    Ok(Err(err)) => tracing::debug!(%from, error = %err, "refused a control-plane connection"),
                    Err(_) => tracing::debug!(%from, "control-plane handshake timed out"),
                }
            });
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Refuses calls whose TLS certificate is not a current member's; applied
/// to every control-plane service.
#[derive(Clone)]
pub struct MembersOnly(pub Arc<Trust>);

impl tonic::service::Interceptor for MembersOnly {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| tonic::Status::unauthenticated("no client certificate: members only"))?;
        tls::peer_node_id(&self.0, &certs).map_err(|e| tonic::Status::permission_denied(e.to_string()))?;
        Ok(request)
    }
}

/// How a channel behaves.
#[derive(Debug, Clone, Copy)]
pub struct ChannelOptions {
    /// Time allowed to connect and complete TLS.
    pub connect_timeout: Duration,
    /// Time allowed per call.
    pub timeout: Duration,
}

/// A lazily connecting gRPC channel to a member's control port, over
/// mutual TLS.
pub fn channel(addr: SocketAddr, trust: &Arc<Trust>, options: ChannelOptions) -> Result<Channel, PkiError> {
    let connector = TlsConnector::from(Arc::new(tls::client_config(trust, None, ALPN)?));
    let connect_timeout = options.connect_timeout;
    let connect = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let handshake = async {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                connector.connect(name, tcp).await
            };
            let tls = tokio::time::timeout(connect_timeout, handshake)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "control-plane connect timed out"))??;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| PkiError::Invalid(format!("control address {addr}: {e}")))?
        .timeout(options.timeout)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(endpoint.connect_with_connector_lazy(connect))
}
