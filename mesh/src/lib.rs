//! Everything between llmesh nodes.
//!
//! `mesh` decides *where* a request runs and carries it there; the agent
//! decides *what* a request is and runs it on a backend. The seam between the
//! two is [`handler::RequestHandler`]: the data-plane server hands every
//! accepted request to it, so this crate never depends on the agent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod handler;

pub use error::ServeError;
pub use handler::{BodyStream, InferenceRequest, InferenceResponse, RequestHandler};
pub use llmesh_proto::ApiKind;
