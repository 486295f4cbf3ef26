//! Pulses: how a node knows its neighbours are alive without everyone
//! beating to everyone.
//!
//! The nodes that speak pulses sit on a ring in node-id order; each
//! watches the [`WATCHED`] nodes after it, so each is watched by the
//! [`WATCHED`] before it. A watcher opens one long-lived libp2p stream
//! (`/llmesh/pulse/1`) to each node it watches, and that node writes a
//! small [`Pulse`] on it every heartbeat (about 60 bytes on the wire with
//! noise, yamux and TCP). A watched node silent for `suspect_after` is
//! reported to the whole mesh with a [`llmesh_proto::Suspicion`] on
//! gossip, which the node refutes with a newer state if it is alive (see
//! [`crate::peers`]). The cost per node is a few pulses a second whatever
//! the mesh's size, where beats cost one message per peer.
//!
//! The stream tasks here do the I/O; the membership event loop decides
//! whom to watch and reads what they hear.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::swarm::Stream;
use libp2p::{PeerId, StreamProtocol};
use llmesh_proto::Pulse;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use crate::inbound::Overflow;

/// The pulse protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/llmesh/pulse/1");
/// How many nodes each node watches (and is watched by).
pub const WATCHED: usize = 3;
/// The most watchers one node pulses to at once: its ring neighbours and
/// peers probing it after a suspicion; anything past this is refused.
const MAX_WATCHERS: usize = 64;
/// The longest a stream may take to open (a dial included).
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest pulse frame read.
const MAX_FRAME: usize = 1024;

/// What a watch heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A pulse from the watched peer.
    Pulse {
        /// The peer.
        peer: PeerId,
        /// Which watch (see [`watch`]).
        watch: u64,
        /// The sequence number of its latest state.
        state_seq: u64,
        /// Its view's digest (see [`view_digest`]); 0 from older nodes.
        view_digest: u64,
        /// How many members its view holds; 0 from older nodes.
        members: u32,
    },
    /// The watch ended: the stream could not be opened or closed.
    Ended {
        /// The peer.
        peer: PeerId,
        /// Which watch.
        watch: u64,
    },
}

/// The nodes `me` watches: the `k` after it on the ring of `members`
/// (node ids; `me` itself is skipped if present).
pub fn watched_by(me: &str, members: impl IntoIterator<Item = String>, k: usize) -> BTreeSet<String> {
    let ring: BTreeSet<String> = members.into_iter().filter(|id| id != me).collect();
    let after = ring.range::<str, _>((std::ops::Bound::Excluded(me), std::ops::Bound::Unbounded));
    let before = ring.range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Excluded(me)));
    after.chain(before).take(k).cloned().collect()
}

/// A digest of a view: the members not known dead, `(node id, state
/// sequence number)` each, this node included, in any order. Two nodes
/// that agree on who is in the mesh and on each one's latest state have
/// the same digest; FNV-1a per member, combined by XOR.
pub fn view_digest<'a>(members: impl IntoIterator<Item = (&'a str, u64)>) -> u64 {
    members
        .into_iter()
        .map(|(id, seq)| {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for byte in id.as_bytes().iter().chain(&seq.to_be_bytes()) {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
            hash
        })
        .fold(0, |acc, h| acc ^ h)
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(2).max_frame_length(MAX_FRAME).new_codec()
}

/// Answers watchers: every stream opened to this node gets a pulse each
/// `period`, `news`' latest, until the watcher closes it or `shutdown`.
pub fn serve(
    incoming: libp2p_stream::IncomingStreams,
    news: watch::Receiver<Pulse>,
    period: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    crate::inbound::serve_bounded(
        incoming,
        MAX_WATCHERS,
        Overflow::Refuse,
        "pulse",
        shutdown,
        move |peer, stream, stop| {
            let news = news.clone();
            async move {
                pulse_to(stream, news, period, stop).await;
                tracing::debug!(%peer, "pulse stream to a watcher ended");
            }
        },
    )
}

/// Writes pulses on one stream until the watcher closes its side (or the
/// write fails or stalls).
async fn pulse_to(stream: Stream, news: watch::Receiver<Pulse>, period: Duration, stop: CancellationToken) {
    let (mut sink, mut from_watcher) = Framed::new(stream.compat(), codec()).split();
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            // The watcher never writes: anything here is its side closing.
            _ = from_watcher.next() => break,
            _ = every.tick() => {
                let pulse = news.borrow().encode_to_vec();
                match tokio::time::timeout(period * 3, sink.send(Bytes::from(pulse))).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
        }
    }
    let _ = sink.close().await;
}

/// Watches `peer`: opens a pulse stream to it (dialling it if need be) and
/// reports each pulse as [`Heard::Pulse`], then [`Heard::Ended`] once the
/// stream cannot be opened or closes. Stops quietly when `stop` fires.
pub fn watch(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    id: u64,
    heard: mpsc::UnboundedSender<Heard>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = read_pulses(&mut control, peer, id, &heard) => {
                let _ = heard.send(Heard::Ended { peer, watch: id });
            }
        }
    });
}

async fn read_pulses(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    id: u64,
    heard: &mpsc::UnboundedSender<Heard>,
) {
    let stream = match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PROTOCOL)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "cannot open a pulse stream");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "opening a pulse stream timed out");
            return;
        }
    };
    let mut frames = Framed::new(stream.compat(), codec());
    while let Some(Ok(frame)) = frames.next().await {
        let Ok(pulse) = Pulse::decode(frame.freeze()) else {
            tracing::debug!(%peer, "undecodable pulse");
            return;
        };
        let news = Heard::Pulse {
            peer,
            watch: id,
            state_seq: pulse.state_seq,
            view_digest: pulse.view_digest,
            members: pulse.members,
        };
        if heard.send(news).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_node_watches_the_next_ones_on_the_ring_wrapping_around() {
        let members = ids(&["a", "b", "c", "d", "e"]);
        assert_eq!(watched_by("a", members.clone(), 3), set(&["b", "c", "d"]));
        assert_eq!(watched_by("d", members.clone(), 3), set(&["e", "a", "b"]));
        assert_eq!(watched_by("e", members.clone(), 2), set(&["a", "b"]));
        // Not a member yet (its own id is not in the list): the same rule.
        assert_eq!(watched_by("bb", members, 2), set(&["c", "d"]));
    }

    #[test]
    fn every_node_is_watched_by_k_others_when_views_agree() {
        let members: Vec<String> = (0..20).map(|i| format!("node-{i:02}")).collect();
        let mut watchers = std::collections::BTreeMap::<String, usize>::new();
        for me in &members {
            let watched = watched_by(me, members.clone(), WATCHED);
            assert_eq!(watched.len(), WATCHED);
            assert!(!watched.contains(me));
            for w in watched {
                *watchers.entry(w).or_default() += 1;
            }
        }
        assert!(watchers.values().all(|n| *n == WATCHED), "{watchers:?}");
    }

    #[test]
    fn views_agree_whatever_the_order_and_differ_on_a_member_or_a_state() {
        let view = [("a", 1), ("b", 7), ("c", 3)];
        let digest = view_digest(view);
        assert_eq!(digest, view_digest([("c", 3), ("a", 1), ("b", 7)]));
        assert_ne!(digest, view_digest([("a", 1), ("b", 7)]), "a member missing");
        assert_ne!(digest, view_digest([("a", 1), ("b", 8), ("c", 3)]), "an older state");
        assert_ne!(digest, 0);
    }

    #[test]
    fn a_small_mesh_watches_everyone_else() {
        assert_eq!(watched_by("b", ids(&["a", "b", "c"]), 3), set(&["a", "c"]));
        assert!(watched_by("a", ids(&["a"]), 3).is_empty());
    }
}
