//! State sync: how a node learns the whole mesh at once from one peer
//! instead of every peer re-sending its state to everyone.
//!
//! A node pulls a snapshot over a short libp2p stream
//! (`/llmesh/states/1`): the peer writes the signed states it holds of
//! the nodes it takes for alive (its own included), each exactly as its
//! author signed it, and closes. The puller checks each signature as if
//! it came over gossip, so a peer can withhold states but not forge
//! them. A node pulls when it starts, when it meets a peer it took for
//! dead or did not know (a partition healing), and after it refuted a
//! suspicion about itself (it may have missed news); see
//! `membership/syncing.rs` for when exactly.
//!
//! Before this, every node sent its full state to the whole mesh for a
//! few heartbeats each time any peer joined or connected: N joins of N
//! nodes through gossip to N readers, which kept a 100-node mesh busy
//! verifying states for minutes after it started.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

/// The state sync protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/states/1");
/// The longest a pull may take, the stream's opening (a dial) included.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest signed state read (a state with a certificate is a few
/// kilobytes).
const MAX_FRAME: usize = 256 * 1024;
/// The most states one snapshot may hold: a pull is bounded in memory
/// whatever the peer sends.
const MAX_STATES: usize = 10_000;
/// Snapshots served at once; more pullers wait their turn.
const MAX_SERVING: usize = 8;

/// The signed states this node serves, by node id, with whether it takes
/// the node for alive (only those are served). The membership loop keeps
/// it current.
#[derive(Debug, Clone, Default)]
pub struct Shelf(Arc<Mutex<HashMap<String, (Bytes, bool)>>>);

impl Shelf {
    /// Keeps `signed` as the latest state of `node_id`, alive.
    pub fn put(&self, node_id: &str, signed: Bytes) {
        if let Ok(mut shelf) = self.0.lock() {
            shelf.insert(node_id.to_string(), (signed, true));
        }
    }

    /// Marks a node alive or not; unknown nodes are ignored.
    pub fn set_alive(&self, node_id: &str, alive: bool) {
        if let Ok(mut shelf) = self.0.lock()
            && let Some(entry) = shelf.get_mut(node_id)
        {
            entry.1 = alive;
        }
    }

    /// Drops a node's state.
    pub fn remove(&self, node_id: &str) {
        if let Ok(mut shelf) = self.0.lock() {
            shelf.remove(node_id);
        }
    }

    /// The states of the nodes taken for alive.
    pub fn alive(&self) -> Vec<Bytes> {
        self.0.lock().map(|shelf| shelf.values().filter(|e| e.1).map(|e| e.0.clone()).collect()).unwrap_or_default()
    }
}

/// A snapshot pulled from a peer.
#[derive(Debug)]
pub struct Pulled {
    /// The peer it came from.
    pub peer: PeerId,
    /// Signed states (`SignedNodeState`, encoded), unchecked.
    pub states: Vec<Bytes>,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_FRAME).new_codec()
}

/// Answers pulls with what `shelf` holds until `shutdown`.
pub fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    shelf: Shelf,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(MAX_SERVING));
    tokio::spawn(async move {
        loop {
            let (peer, stream) = tokio::select! {
                () = shutdown.cancelled() => break,
                next = incoming.next() => match next {
                    Some(next) => next,
                    None => break,
                },
            };
            let (slots, states) = (slots.clone(), shelf.alive());
            let stop = shutdown.child_token();
            tokio::spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else { return };
                let mut frames = Framed::new(stream.compat(), codec());
                let send = async {
                    for state in states {
                        frames.feed(state).await?;
                    }
                    SinkExt::<Bytes>::close(&mut frames).await
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    sent = tokio::time::timeout(PULL_TIMEOUT, send) => match sent {
                        Ok(Ok(())) => tracing::debug!(%peer, "served a state snapshot"),
                        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "serving a state snapshot failed"),
                        Err(_) => tracing::debug!(%peer, "serving a state snapshot timed out"),
                    },
                }
            });
        }
    })
}

/// Pulls `peer`'s snapshot (dialling it if need be) and hands it to
/// `done`; gives up quietly after [`PULL_TIMEOUT`], on error, or when
/// `stop` fires.
pub fn pull(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    done: mpsc::UnboundedSender<Pulled>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let read = async {
            let stream = control.open_stream(peer, PROTOCOL).await.map_err(|e| e.to_string())?;
            let mut frames = Framed::new(stream.compat(), codec());
            let mut states = Vec::new();
            while let Some(frame) = frames.next().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if states.len() >= MAX_STATES {
                    return Err(format!("more than {MAX_STATES} states"));
                }
                states.push(frame.freeze());
            }
            Ok::<_, String>(states)
        };
        tokio::select! {
            () = stop.cancelled() => {}
            read = tokio::time::timeout(PULL_TIMEOUT, read) => match read {
                Ok(Ok(states)) => {
                    let _ = done.send(Pulled { peer, states });
                }
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "pulling a state snapshot failed"),
                Err(_) => tracing::debug!(%peer, "pulling a state snapshot timed out"),
            },
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shelf_serves_only_the_nodes_taken_for_alive() {
        let shelf = Shelf::default();
        shelf.put("a", Bytes::from_static(b"a1"));
        shelf.put("b", Bytes::from_static(b"b1"));
        shelf.put("a", Bytes::from_static(b"a2"));
        shelf.set_alive("b", false);
        shelf.set_alive("nobody", true);
        assert_eq!(shelf.alive(), vec![Bytes::from_static(b"a2")]);
        shelf.set_alive("b", true);
        shelf.remove("a");
        assert_eq!(shelf.alive(), vec![Bytes::from_static(b"b1")]);
    }
}
