//! Everything between llmesh nodes.
//!
//! `mesh` decides *where* a request runs and carries it there; the agent
//! decides *what* a request is and runs it on a backend. The seam between the
//! two is [`handler::RequestHandler`]: the data-plane server hands every
//! accepted request to it, so this crate never depends on the agent.
//!
//! Membership ([`membership`]) is a libp2p private network keyed by the
//! cluster secret ([`secret`]); each node keeps a stable identity
//! ([`identity`]) and a sans-IO view of its peers ([`peers`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod coordinator;
pub mod dataplane;
pub mod error;
pub mod handler;
pub mod identity;
pub mod membership;
pub mod peers;
pub mod pki;
pub mod scheduler;
pub mod secret;
mod store;

pub use coordinator::{ClusterState, Coordinator, CoordinatorConfig};
pub use dataplane::{DataPlane, DataPlaneConfig, Forwarded};
pub use error::ServeError;
pub use handler::{BodyStream, InferenceRequest, InferenceResponse, RequestHandler};
pub use libp2p::{Multiaddr, PeerId, multiaddr};
pub use llmesh_proto::{ApiKind, NodeState};
pub use membership::{Membership, MembershipConfig, MeshView, PeerSnapshot};
pub use peers::{Change, Liveness, LivenessConfig};
pub use secret::{ClusterSecret, JoinToken};
