//! Everything between llmesh nodes.
//!
//! `mesh` decides *where* a request runs and carries it there ([`route`]);
//! the agent decides *what* a request is and runs it on a backend. The
//! seams between the two are [`handler::RequestHandler`] (this node's
//! backend), [`route::LocalBackend`] (its figures for the scheduler) and
//! [`route::Fallback`] (the cloud), so this crate never depends on the agent.
//!
//! [`node::start`] does the whole start-up: the cluster's files
//! ([`secret`], [`seed`], [`pki`], [`identity`]), membership
//! ([`membership`]: a libp2p private network, gossip and a sans-IO view of
//! the peers in [`peers`]), the Raft [`coordinator`] and the QUIC
//! [`dataplane`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cadence;
pub mod config;
pub mod coordinator;
pub mod dataplane;
mod enroll;
pub mod error;
pub mod handler;
pub mod identity;
mod inbound;
pub mod membership;
pub mod node;
pub mod peers;
pub mod pki;
mod pulse;
pub mod route;
pub mod secret;
pub mod seed;
mod statesync;
mod store;

pub use config::MeshConfig;
pub use coordinator::{ClusterState, Coordinator, CoordinatorConfig};
pub use dataplane::{DataPlane, DataPlaneConfig, Forwarded};
pub use error::ServeError;
pub use handler::{BodyStream, InferenceRequest, InferenceResponse, RequestHandler, RequestMeta, StreamError};
pub use libp2p::{Multiaddr, PeerId, multiaddr};
pub use llmesh_proto::{ApiKind, NodeState};
pub use membership::{Membership, MembershipConfig, MeshView, PeerSnapshot};
pub use peers::{Change, Liveness, LivenessConfig};
pub use secret::{ClusterSecret, JoinToken};
