//! Serving the mesh's own libp2p stream protocols (pulses, state
//! snapshots, certificate fetches): one accept loop that bounds how many
//! streams are served at once and stops on shutdown.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use libp2p::PeerId;
use libp2p::swarm::Stream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What happens to a stream that arrives while `max` are being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// It waits for a turn (a short request-response: it will come).
    Wait,
    /// It is dropped (a long-lived stream: a turn may never come).
    Refuse,
}

/// Serves each stream from `incoming` with `handle` (given a child of
/// `shutdown` to stop on), at most `max` at once, until `shutdown` fires
/// or the protocol is unregistered. `what` names the protocol in logs.
pub(crate) fn serve_bounded<F, Fut>(
    mut incoming: libp2p_stream::IncomingStreams,
    max: usize,
    overflow: Overflow,
    what: &'static str,
    shutdown: CancellationToken,
    handle: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(PeerId, Stream, CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            let (peer, stream) = tokio::select! {
                () = shutdown.cancelled() => break,
                next = incoming.next() => match next {
                    Some(next) => next,
                    None => break,
                },
            };
            let held = match overflow {
                Overflow::Refuse => match slots.clone().try_acquire_owned() {
                    Ok(slot) => Some(slot),
                    Err(_) => {
                        tracing::debug!(%peer, what, "too many streams: refusing one");
                        continue;
                    }
                },
                Overflow::Wait => None,
            };
            let (slots, work) = (slots.clone(), handle(peer, stream, shutdown.child_token()));
            tokio::spawn(async move {
                let _slot = match held {
                    Some(slot) => slot,
                    None => match slots.acquire_owned().await {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                };
                work.await;
            });
        }
    })
}
