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
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use llmesh_proto::CertRequest;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use crate::inbound::{Overflow, serve_bounded};

/// The state sync protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/states/1");
/// The certificate fetch protocol: a [`CertRequest`], answered with the
/// named nodes' states, each with its certificate.
pub const CERTS_PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/certs/1");
/// The most nodes one certificate fetch may name.
const MAX_CERTS_ASKED: usize = 256;
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

    /// The state held of `node_id`, alive or not.
    pub fn get(&self, node_id: &str) -> Option<Bytes> {
        self.0.lock().ok().and_then(|shelf| shelf.get(node_id).map(|e| e.0.clone()))
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
    /// Whether it answers a pull (else a certificate fetch). A pull's
    /// answer always holds the server's own state, so an empty one is a
    /// stream the server dropped: libp2p-stream drops inbound streams
    /// while its one-slot accept queue is full, as when a hundred nodes
    /// pull from one at once.
    pub snapshot: bool,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_FRAME).new_codec()
}

/// Answers pulls with what `shelf` holds until `shutdown`.
pub fn serve(
    incoming: libp2p_stream::IncomingStreams,
    shelf: Shelf,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    serve_bounded(incoming, MAX_SERVING, Overflow::Wait, "state snapshot", shutdown, move |peer, stream, stop| {
        let states = shelf.alive();
        async move {
            let mut frames = Framed::new(stream.compat(), codec());
            answer(peer, "state snapshot", stop, send_all(&mut frames, states)).await;
        }
    })
}

/// Answers certificate fetches (a [`CertRequest`]) with the states
/// `shelf` holds of the nodes asked for, each with its certificate,
/// until `shutdown`.
pub fn serve_certs(
    incoming: libp2p_stream::IncomingStreams,
    shelf: Shelf,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    serve_bounded(incoming, MAX_SERVING, Overflow::Wait, "certificate fetch", shutdown, move |peer, stream, stop| {
        let shelf = shelf.clone();
        async move {
            let mut frames = Framed::new(stream.compat(), codec());
            let work = async {
                let asked = frames.next().await.ok_or_else(|| std::io::Error::other("no request"))??;
                let asked = CertRequest::decode(asked.freeze()).map_err(std::io::Error::other)?;
                let ids = asked.node_ids.iter().take(MAX_CERTS_ASKED);
                send_all(&mut frames, ids.filter_map(|id| shelf.get(id)).collect()).await
            };
            answer(peer, "certificate fetch", stop, work).await;
        }
    })
}

/// Runs one answer to `peer` (`what`, for the logs) within
/// [`PULL_TIMEOUT`], unless `stop` fires first.
async fn answer(
    peer: PeerId,
    what: &'static str,
    stop: CancellationToken,
    work: impl Future<Output = std::io::Result<()>>,
) {
    tokio::select! {
        () = stop.cancelled() => {}
        sent = tokio::time::timeout(PULL_TIMEOUT, work) => match sent {
            Ok(Ok(())) => tracing::debug!(%peer, what, "answered"),
            Ok(Err(err)) => tracing::debug!(%peer, what, error = %err, "answering failed"),
            Err(_) => tracing::debug!(%peer, what, "answering timed out"),
        },
    }
}

async fn send_all<S>(frames: &mut Framed<S, LengthDelimitedCodec>, states: Vec<Bytes>) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for state in states {
        frames.feed(state).await?;
    }
    SinkExt::<Bytes>::close(frames).await
}

async fn read_all<S>(frames: &mut Framed<S, LengthDelimitedCodec>) -> Result<Vec<Bytes>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut states = Vec::new();
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if states.len() >= MAX_STATES {
            return Err(format!("more than {MAX_STATES} states"));
        }
        states.push(frame.freeze());
    }
    Ok(states)
}

/// Pulls `peer`'s snapshot (dialling it if need be) and hands it to
/// `done`; gives up quietly after [`PULL_TIMEOUT`], on error, or when
/// `stop` fires.
pub fn pull(
    control: libp2p_stream::Control,
    peer: PeerId,
    done: mpsc::UnboundedSender<Pulled>,
    stop: CancellationToken,
) {
    ask(control, peer, PROTOCOL, None, done, stop);
}

/// Asks `peer` for the states, with certificates, of `node_ids` and
/// hands them to `done` as a [`Pulled`]; quiet on failure, like [`pull`].
pub fn fetch_certs(
    control: libp2p_stream::Control,
    peer: PeerId,
    node_ids: Vec<String>,
    done: mpsc::UnboundedSender<Pulled>,
    stop: CancellationToken,
) {
    let request = Bytes::from(CertRequest { node_ids }.encode_to_vec());
    ask(control, peer, CERTS_PROTOCOL, Some(request), done, stop);
}

fn ask(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    protocol: StreamProtocol,
    request: Option<Bytes>,
    done: mpsc::UnboundedSender<Pulled>,
    stop: CancellationToken,
) {
    let snapshot = request.is_none();
    tokio::spawn(async move {
        let read = async {
            let stream = control.open_stream(peer, protocol.clone()).await.map_err(|e| e.to_string())?;
            let mut frames = Framed::new(stream.compat(), codec());
            if let Some(request) = request {
                frames.send(request).await.map_err(|e| e.to_string())?;
            }
            read_all(&mut frames).await
        };
        tokio::select! {
            () = stop.cancelled() => {}
            read = tokio::time::timeout(PULL_TIMEOUT, read) => match read {
                Ok(Ok(states)) => {
                    let _ = done.send(Pulled { peer, states, snapshot });
                }
                Ok(Err(err)) => tracing::debug!(%peer, %protocol, error = %err, "asking for states failed"),
                Err(_) => tracing::debug!(%peer, %protocol, "asking for states timed out"),
            },
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, Swarm, noise, tcp, yamux};

    fn swarm() -> Swarm<libp2p_stream::Behaviour> {
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .expect("transport")
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build()
    }

    /// Drives `swarm` on its own task until `stop`; returns its address.
    async fn drive(mut swarm: Swarm<libp2p_stream::Behaviour>, stop: CancellationToken) -> Multiaddr {
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr")).expect("listens");
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = swarm.select_next_some() => {}
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_certificate_fetch_answers_with_the_states_asked_for_and_a_pull_with_the_live_ones() {
        let stop = CancellationToken::new();
        let (server, client) = (swarm(), swarm());
        let (server_id, shelf) = (*server.local_peer_id(), Shelf::default());
        shelf.put("a", Bytes::from_static(b"state of a"));
        shelf.put("b", Bytes::from_static(b"state of b"));
        shelf.set_alive("b", false);
        let mut control = server.behaviour().new_control();
        serve_certs(control.accept(CERTS_PROTOCOL).expect("accepts"), shelf.clone(), stop.child_token());
        serve(control.accept(PROTOCOL).expect("accepts"), shelf, stop.child_token());
        let server_addr = drive(server, stop.child_token()).await;
        let client_control = client.behaviour().new_control();
        let mut client = client;
        client.dial(server_addr.with(libp2p::multiaddr::Protocol::P2p(server_id))).expect("dials");
        drive(client, stop.child_token()).await;

        let (done, mut answers) = mpsc::unbounded_channel();
        let ask = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let wait = Duration::from_secs(10);
        // A dead node's state is still served to a fetch: its certificate
        // is what was asked for. Unknown ids are left out.
        fetch_certs(client_control.clone(), server_id, ask(&["b", "nobody"]), done.clone(), stop.child_token());
        let got = tokio::time::timeout(wait, answers.recv()).await.expect("answers in time").expect("answer");
        assert_eq!(got.peer, server_id);
        assert_eq!(got.states, vec![Bytes::from_static(b"state of b")]);
        assert!(!got.snapshot, "a fetch's answer is not a snapshot");
        // A pull serves only the live.
        pull(client_control, server_id, done, stop.child_token());
        let got = tokio::time::timeout(wait, answers.recv()).await.expect("answers in time").expect("answer");
        assert_eq!(got.states, vec![Bytes::from_static(b"state of a")]);
        assert!(got.snapshot, "a pull's answer is a snapshot");
        stop.cancel();
    }

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
