//! Where a request runs. The decisions are sans-IO and tested on a virtual
//! clock; [`router`] is the thin async shell that carries them out.
//!
//! - [`candidates`]: the nodes that could serve a model, from gossip, the
//!   replicated state and this node's own counts.
//! - [`scheduler`]: ranks candidates by estimated start time, with
//!   KV-cache affinity and power of two choices.
//! - [`plan`]: one request's journey: run, wait, fail over, cloud, fail.
//! - [`admission`]: the entry node's scheduler, fair [`queue`] and
//!   outstanding counts, under one lock.
//! - [`prefix`]: conversation keys and the ones this node served lately.
//! - [`fallback`]: cloud policy and the seam to the agent's cloud client.
//!
//! The cluster harness (`harness`, tests only) drives several nodes'
//! admission states against simulated backends and gossip on one clock.

pub mod admission;
pub mod candidates;
pub mod fallback;
#[cfg(test)]
mod harness;
pub mod metrics;
pub mod plan;
pub mod prefix;
pub mod queue;
pub mod router;
pub mod scheduler;

pub use candidates::LocalCapacity;
pub use fallback::{CloudPolicy, CloudPolicyName, Fallback, Trigger};
pub use router::{LocalBackend, MeshLinks, Route, RouteConfig, Routed, Router};
