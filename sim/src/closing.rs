//! Serving like llama-server: every connection is closed once a streamed
//! response on it has ended, although the response announced nothing
//! (`Connection: close` is absent). A client that pools connections finds
//! the next request on that connection failing; the agent must not pass
//! that failure on.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Told when a streamed response on this connection has ended.
#[derive(Clone)]
struct StreamEnded(Arc<Notify>);

/// Serves `app` on `listener` until `shutdown`, closing each connection
/// after its first streamed response.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = app.layer(axum::middleware::from_fn(notify_at_stream_end));
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let ended = StreamEnded(Arc::new(Notify::new()));
        let service = TowerToHyperService::new(app.clone().layer(axum::Extension(ended.clone())));
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = ended.0.notified() => {}
                () = shutdown.cancelled() => {}
            }
            // Finish the response in flight, then close: no header says so.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
}

/// Wraps a streamed (SSE or NDJSON) response's body so that its end tells
/// the connection to close.
async fn notify_at_stream_end(request: Request, next: Next) -> Response {
    let ended = request.extensions().get::<StreamEnded>().cloned();
    let response = next.run(request).await;
    let streamed = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream") || t.starts_with("application/x-ndjson"));
    let Some(ended) = ended.filter(|_| streamed) else { return response };
    let (parts, body) = response.into_parts();
    let tail = futures::stream::once(async move {
        ended.0.notify_one();
        Ok::<_, axum::Error>(bytes::Bytes::new())
    });
    Response::from_parts(parts, Body::from_stream(body.into_data_stream().chain(tail)))
}
