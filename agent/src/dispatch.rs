//! Where a request runs: this node's backend or a peer over the data plane,
//! with failover to the next candidate while nothing has been sent to the
//! client yet.
//!
//! Until the scheduler lands, candidates are ranked simply: live before
//! suspect, model loaded before on disk, fewest requests in flight (gossiped
//! plus what this node itself has sent there since), this node on a tie.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use llmesh_mesh::{DataPlane, InferenceRequest, InferenceResponse, Liveness, Membership, RequestHandler, ServeError};

use crate::local::LocalNode;

/// How many nodes a request may be tried on before the client gets an error.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;

/// A response and where it came from.
pub struct Dispatched {
    /// The response, body still streaming.
    pub response: InferenceResponse,
    /// Name of the node that served it.
    pub node: String,
    /// `local` or `peer:<name>`.
    pub route: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Local,
    Peer { id: String, name: String },
}

#[derive(Debug, Clone)]
struct Candidate {
    target: Target,
    rank: (u8, u8, u32, u8),
}

/// Chooses a node for each request and carries it there.
pub struct Dispatcher {
    local: Arc<LocalNode>,
    node_name: String,
    mesh: Option<Membership>,
    dataplane: Option<Arc<DataPlane>>,
    max_attempts: usize,
    /// Requests this node has sent to each peer and that are still open:
    /// corrects gossip, which is up to a heartbeat old.
    outstanding: Arc<Mutex<HashMap<String, u32>>>,
}

/// Whether `name` (as a client wrote it) names `model`, with Ollama's
/// implicit `:latest`.
fn same_model(model: &str, name: &str) -> bool {
    model == name || model.strip_suffix(":latest") == Some(name) || name.strip_suffix(":latest") == Some(model)
}

impl Dispatcher {
    /// A dispatcher over this node and, when there is a mesh, its peers.
    pub fn new(
        local: Arc<LocalNode>,
        node_name: String,
        mesh: Option<Membership>,
        dataplane: Option<Arc<DataPlane>>,
        max_attempts: usize,
    ) -> Dispatcher {
        Dispatcher {
            local,
            node_name,
            mesh,
            dataplane,
            max_attempts: max_attempts.max(1),
            outstanding: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn candidates(&self, model: &str) -> Vec<Candidate> {
        let mut out = Vec::new();
        let snapshot = self.local.inventory().current();
        if snapshot.healthy
            && let Some(entry) = snapshot.inventory.resolve(model)
        {
            let in_flight = self.local.load().in_flight();
            out.push(Candidate { target: Target::Local, rank: (0, u8::from(entry.loaded.is_none()), in_flight, 0) });
        }
        let (Some(mesh), Some(_)) = (&self.mesh, &self.dataplane) else { return out };
        let outstanding = self.outstanding.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for peer in mesh.view().peers.iter() {
            let state = &peer.state;
            if peer.liveness == Liveness::Dead || state.draining || !state.backend_healthy || state.data_addr.is_empty()
            {
                continue;
            }
            let Some(info) = state.models.iter().find(|m| same_model(&m.name, model)) else { continue };
            let in_flight = state.in_flight + outstanding.get(&state.node_id).copied().unwrap_or(0);
            out.push(Candidate {
                target: Target::Peer { id: state.node_id.clone(), name: state.name.clone() },
                rank: (u8::from(peer.liveness != Liveness::Alive), u8::from(!info.loaded), in_flight, 1),
            });
        }
        out.sort_by_key(|c| c.rank);
        out
    }

    /// Runs `req` on the best node, failing over before the first byte.
    pub async fn dispatch(&self, req: InferenceRequest) -> Result<Dispatched, ServeError> {
        let candidates = self.candidates(&req.model);
        if candidates.is_empty() {
            // Nobody has it: let the local node say why (unknown model, or
            // its backend is down and cannot be asked).
            let response = self.local.serve(req).await?;
            return Ok(Dispatched { response, node: self.node_name.clone(), route: "local".into() });
        }
        let mut last_error = None;
        for candidate in candidates.into_iter().take(self.max_attempts) {
            let result = match &candidate.target {
                Target::Local => self.local.serve(req.clone()).await.map(|response| Dispatched {
                    response,
                    node: self.node_name.clone(),
                    route: "local".into(),
                }),
                Target::Peer { id, name } => self.forward(id, name, &req).await,
            };
            match result {
                Ok(dispatched) => return Ok(dispatched),
                Err(err) => {
                    // A peer that lost the model since its last gossip is a
                    // target failure too; a bad request is not.
                    let peer_lost_model =
                        matches!(err, ServeError::ModelNotFound(_)) && candidate.target != Target::Local;
                    if !(err.is_retryable() || peer_lost_model) {
                        return Err(err);
                    }
                    let target = match &candidate.target {
                        Target::Local => "local".to_string(),
                        Target::Peer { name, .. } => name.clone(),
                    };
                    tracing::warn!(id = %req.request_id, %target, error = %err, "attempt failed before the first byte; trying the next node");
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ServeError::Internal("no attempt was made".into())))
    }

    async fn forward(&self, id: &str, name: &str, req: &InferenceRequest) -> Result<Dispatched, ServeError> {
        let Some(dataplane) = &self.dataplane else {
            return Err(ServeError::Internal("no data plane".into()));
        };
        tracing::debug!(id = %req.request_id, peer = %name, "forwarding a request");
        let guard = Outstanding::new(self.outstanding.clone(), id);
        let forwarded = dataplane.forward(id, req).await?;
        let mut response = forwarded.response;
        response.body = Box::pin(response.body.map(move |chunk| {
            let _held = &guard;
            chunk
        }));
        Ok(Dispatched { response, route: format!("peer:{}", forwarded.node), node: forwarded.node })
    }
}

/// Counts a request sent to a peer until its response ends.
struct Outstanding {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    peer: String,
}

impl Outstanding {
    fn new(counts: Arc<Mutex<HashMap<String, u32>>>, peer: &str) -> Outstanding {
        *counts.lock().unwrap_or_else(PoisonError::into_inner).entry(peer.to_string()).or_default() += 1;
        Outstanding { counts, peer: peer.to_string() }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_tag_is_implicit_both_ways() {
        assert!(same_model("llama3:latest", "llama3"));
        assert!(same_model("llama3", "llama3:latest"));
        assert!(same_model("qwen2.5:7b", "qwen2.5:7b"));
        assert!(!same_model("qwen2.5:7b", "qwen2.5"));
    }
}
