//! Where a request runs: this node's backend or a peer over the data plane.
//!
//! The sans-IO [`Scheduler`] ranks the candidates by estimated start time
//! (with KV-cache affinity and power of two choices); this module builds the
//! candidates from gossip and its own counters, holds requests in a fair
//! queue while every candidate is busy, and fails over to the next candidate
//! while nothing has been sent to the client yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use llmesh_mesh::scheduler::{Candidate, FairQueue, QueueError, Scheduler, SchedulerConfig};
use llmesh_mesh::{
    ApiKind, Coordinator, DataPlane, InferenceRequest, InferenceResponse, Liveness, Membership, RequestHandler,
    ServeError,
};
use tokio::sync::oneshot;

use crate::cloud::{Cloud, CloudPolicy, Trigger};
use crate::local::LocalNode;
use crate::sim::text::fnv1a;

/// How many nodes a request may be tried on before the client gets an error.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;
/// The id of this node in the scheduler when it has no mesh identity.
const LOCAL: &str = "local";
/// How often a queued request looks again even if no slot-free signal came
/// (slots also free on other entry nodes, seen only through gossip).
const QUEUE_RECHECK: Duration = Duration::from_millis(200);

/// A response and where it came from.
pub struct Dispatched {
    /// The response, body still streaming.
    pub response: InferenceResponse,
    /// Name of the node that served it.
    pub node: String,
    /// `local` or `peer:<name>`.
    pub route: String,
}

/// Limits of the entry node's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Requests that may wait.
    pub capacity: usize,
    /// Longest wait.
    pub timeout: Duration,
    /// Refuse at once when the expected wait is longer.
    pub max_expected_wait: Duration,
}

/// Chooses a node for each request and carries it there.
pub struct Dispatcher {
    local: Arc<LocalNode>,
    local_id: String,
    local_slots: u32,
    node_name: String,
    mesh: Option<Membership>,
    dataplane: Option<Arc<DataPlane>>,
    coordinator: Option<Coordinator>,
    cloud: Option<Arc<Cloud>>,
    max_attempts: usize,
    limits: QueueLimits,
    scheduler: Mutex<Scheduler>,
    queue: Mutex<FairQueue<oneshot::Sender<()>>>,
    /// Serialises choosing a node with taking its slot.
    admission: Mutex<()>,
    /// Requests this node has dispatched to each node and not seen finish.
    outstanding: Arc<Mutex<HashMap<String, u32>>>,
    /// Wakes a queued request when a dispatched one finishes.
    freed: Arc<tokio::sync::Notify>,
    /// Until then, a model nobody is known to serve may still be announced
    /// by peers this node has not heard from yet.
    listening_until: Instant,
}

/// Whether `name` (as a client wrote it) names `model`, with Ollama's
/// implicit `:latest`.
fn same_model(model: &str, name: &str) -> bool {
    model == name || model.strip_suffix(":latest") == Some(name) || name.strip_suffix(":latest") == Some(model)
}

/// A key for the conversation a request continues: the model and every
/// message up to and including the first user message (or the system
/// prompt and the start of a completion prompt). Later turns of the same
/// conversation share it, so they can go where its KV cache is.
pub fn prefix_key(api: ApiKind, model: &str, body: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut seed = fnv1a(0, model.as_bytes());
    match api {
        ApiKind::OpenaiChat | ApiKind::OllamaChat => {
            let messages = value.get("messages")?.as_array()?;
            let end = messages.iter().position(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"))?;
            for message in &messages[..=end] {
                seed = fnv1a(seed, message.to_string().as_bytes());
            }
            Some(seed)
        }
        ApiKind::OpenaiCompletions | ApiKind::OllamaGenerate => {
            if let Some(system) = value.get("system").and_then(|s| s.as_str()) {
                seed = fnv1a(seed, system.as_bytes());
            }
            let prompt = value.get("prompt")?.as_str()?;
            let head: String = prompt.chars().take(512).collect();
            Some(fnv1a(seed, head.as_bytes()))
        }
        _ => None,
    }
}

/// The output length a request asks for, when it says.
fn output_tokens(body: &[u8]) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let n = value
        .get("max_completion_tokens")
        .or_else(|| value.get("max_tokens"))
        .or_else(|| value.pointer("/options/num_predict"))?
        .as_u64()?;
    u32::try_from(n).ok()
}

enum Target {
    Local,
    Peer { id: String, name: String },
}

impl Dispatcher {
    /// A dispatcher over this node and, when there is a mesh, its peers.
    /// `local_slots` is the local backend's parallel slots (0 when unknown).
    pub fn new(
        local: Arc<LocalNode>,
        node_name: String,
        local_slots: u32,
        mesh: Option<Membership>,
        dataplane: Option<Arc<DataPlane>>,
        max_attempts: usize,
        limits: QueueLimits,
    ) -> Dispatcher {
        let local_id = mesh.as_ref().map_or_else(|| LOCAL.to_string(), |m| m.local_id().to_string());
        let seed = fnv1a(0, local_id.as_bytes());
        Dispatcher {
            local,
            local_id,
            local_slots,
            node_name,
            mesh,
            dataplane,
            coordinator: None,
            cloud: None,
            max_attempts: max_attempts.max(1),
            limits,
            scheduler: Mutex::new(Scheduler::new(SchedulerConfig::default(), seed)),
            queue: Mutex::new(FairQueue::new(limits.capacity)),
            admission: Mutex::new(()),
            outstanding: Arc::new(Mutex::new(HashMap::new())),
            freed: Arc::new(tokio::sync::Notify::new()),
            listening_until: Instant::now(),
        }
    }

    /// For `period` after start, a model that no known node serves gets
    /// 503 (retry) rather than 404: a node that just (re)started has not
    /// heard every peer's gossip yet. The mesh's dead-after is the right
    /// period: by then every live peer has been heard from.
    pub fn with_mesh_warmup(mut self, period: Duration) -> Dispatcher {
        if self.mesh.is_some() {
            self.listening_until = Instant::now() + period;
        }
        self
    }

    /// Skips nodes the replicated state drains or removes.
    pub fn with_coordinator(mut self, coordinator: Option<Coordinator>) -> Dispatcher {
        self.coordinator = coordinator;
        self
    }

    /// Lets requests overflow and fail over to these cloud providers.
    pub fn with_cloud(mut self, cloud: Option<Arc<Cloud>>) -> Dispatcher {
        self.cloud = cloud;
        self
    }

    /// Requests waiting in this node's queue.
    pub fn queued(&self) -> usize {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn candidates(&self, model: &str) -> (Vec<Candidate>, HashMap<String, Target>) {
        let mut candidates = Vec::new();
        let mut targets = HashMap::new();
        let outstanding = self.outstanding.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let cluster = self.coordinator.as_ref().map(|c| c.state());
        let out_of_service = |id: &str| cluster.as_ref().is_some_and(|c| c.is_out_of_service(id));
        let snapshot = self.local.inventory().current();
        if snapshot.healthy
            && !out_of_service(&self.local_id)
            && let Some(entry) = snapshot.inventory.resolve(model)
        {
            let stats = self.local.load().snapshot().into_iter().find(|m| same_model(&m.model, model));
            candidates.push(Candidate {
                id: self.local_id.clone(),
                is_local: true,
                liveness: Liveness::Alive,
                draining: false,
                slots: self.local_slots,
                in_flight: self.local.load().in_flight(),
                dispatched: outstanding.get(&self.local_id).copied().unwrap_or(0),
                loaded: entry.loaded.is_some(),
                ttft_ms: stats.as_ref().map(|s| s.ttft_ewma_ms).filter(|t| *t > 0.0),
                decode_tps: stats.as_ref().map(|s| s.decode_tokens_per_s_ewma).filter(|t| *t > 0.0),
                rtt_ms: 0.0,
                holds_prefix: false,
            });
            targets.insert(self.local_id.clone(), Target::Local);
        }
        let (Some(mesh), Some(_)) = (&self.mesh, &self.dataplane) else { return (candidates, targets) };
        for peer in mesh.view().peers.iter() {
            let state = &peer.state;
            if peer.liveness == Liveness::Dead
                || state.draining
                || !state.backend_healthy
                || state.data_addr.is_empty()
                || out_of_service(&state.node_id)
            {
                continue;
            }
            let Some(info) = state.models.iter().find(|m| same_model(&m.name, model)) else { continue };
            let stats = state.model_load.iter().find(|m| same_model(&m.model, model));
            candidates.push(Candidate {
                id: state.node_id.clone(),
                is_local: false,
                liveness: peer.liveness,
                draining: false,
                slots: state.parallel_slots,
                in_flight: state.in_flight,
                dispatched: outstanding.get(&state.node_id).copied().unwrap_or(0),
                loaded: info.loaded,
                ttft_ms: stats.map(|s| s.ttft_ewma_ms).filter(|t| *t > 0.0),
                decode_tps: stats.map(|s| s.decode_tokens_per_s_ewma).filter(|t| *t > 0.0),
                // Loopback or LAN: a fraction of a millisecond.
                rtt_ms: 0.5,
                holds_prefix: false,
            });
            targets.insert(state.node_id.clone(), Target::Peer { id: state.node_id.clone(), name: state.name.clone() });
        }
        (candidates, targets)
    }

    /// Waits for a slot in the fair queue: until woken by a finished
    /// request, or until the next recheck. `ticket` keeps this request's
    /// place across rechecks.
    async fn wait_for_slot(
        &self,
        tenant: &str,
        ticket: &mut Option<oneshot::Receiver<()>>,
        deadline: Instant,
    ) -> Result<(), ServeError> {
        let mut rx = match ticket.take() {
            Some(rx) => rx,
            None => {
                let (tx, rx) = oneshot::channel();
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                // Requests that gave up (client gone) free their places.
                queue.retain(|waiter| !waiter.is_closed());
                queue.push(tenant, tx, deadline).map_err(|QueueError::Full| {
                    ServeError::Overloaded(format!(
                        "every node that serves this model is busy and {} requests already wait here; retry shortly",
                        self.limits.capacity
                    ))
                })?;
                rx
            }
        };
        let wait = deadline.saturating_duration_since(Instant::now()).min(QUEUE_RECHECK);
        match tokio::time::timeout(wait, &mut rx).await {
            // Woken: the place is used up; a new one is taken if still busy.
            Ok(_) => {}
            Err(_) => *ticket = Some(rx),
        }
        Ok(())
    }

    /// Hands freed slots to the requests waiting longest.
    fn wake_waiters(&self) {
        let mut expired = Vec::new();
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(waiter) = queue.pop(Instant::now(), &mut expired) {
            // A waiter that gave up has dropped its receiver; try the next.
            if waiter.send(()).is_ok() {
                break;
            }
        }
    }

    /// Sends `req` to the cloud when `trigger` and its policy allow it:
    /// `None` when they do not (or no provider maps the model).
    async fn try_cloud(
        &self,
        req: &InferenceRequest,
        tenant: &str,
        policy: &CloudPolicy,
        trigger: Trigger,
    ) -> Option<Result<Dispatched, ServeError>> {
        let cloud = self.cloud.as_ref().filter(|c| c.maps(&req.model))?;
        if !policy.allows(trigger) {
            return None;
        }
        tracing::info!(id = %req.request_id, model = %req.model, ?trigger, "sending to the cloud");
        Some(cloud.serve(req, tenant).await.map(|(response, provider)| Dispatched {
            response,
            node: self.node_name.clone(),
            route: format!("cloud:{provider}"),
        }))
    }

    /// Why the cloud was not used, when a provider could have served `model`.
    fn cloud_refusal(&self, model: &str, policy: &CloudPolicy) -> Option<String> {
        self.cloud.as_ref().filter(|c| c.maps(model)).map(|_| policy.refusal())
    }

    /// Runs `req` on the best node: waits while every node is busy (in turn
    /// with other `tenant`s' requests), and fails over before the first byte;
    /// the cloud takes it where `policy` allows (see [`Trigger`]).
    pub async fn dispatch(
        &self,
        req: InferenceRequest,
        tenant: &str,
        policy: &CloudPolicy,
    ) -> Result<Dispatched, ServeError> {
        if policy.prefer {
            match self.try_cloud(&req, tenant, policy, Trigger::Prefer).await {
                Some(Ok(dispatched)) => return Ok(dispatched),
                Some(Err(err)) => {
                    tracing::warn!(id = %req.request_id, error = %err, "preferred cloud failed; serving in the mesh")
                }
                None => {}
            }
        }
        let mut cloud_failed = false;
        let prefix = prefix_key(req.api, &req.model, &req.body);
        let tokens = output_tokens(&req.body);
        let queue_deadline = req.deadline.unwrap_or_else(|| Instant::now() + self.limits.timeout);
        let mut ticket = None;
        // Counted in gossip while it waits: the leader's placement sees demand
        // that no node's in-flight figure shows yet.
        let mut waiting = None;
        let choice = loop {
            let (choice, targets, reserved) = {
                // Looking at the counts and taking a slot happen under one
                // lock: concurrent requests must not all see the last free
                // slot and all take it.
                let _admission = self.admission.lock().unwrap_or_else(PoisonError::into_inner);
                let (candidates, targets) = self.candidates(&req.model);
                let choice =
                    self.scheduler.lock().unwrap_or_else(PoisonError::into_inner).choose(&candidates, prefix, tokens);
                let reserved = choice
                    .as_ref()
                    .filter(|c| !c.saturated)
                    .and_then(|c| c.order.first())
                    .map(|id| Outstanding::new(self.outstanding.clone(), self.freed.clone(), id));
                (choice, targets, reserved)
            };
            let Some(choice) = choice else {
                if self.coordinator.as_ref().is_some_and(|c| c.state().is_out_of_service(&self.local_id))
                    && self.local.inventory().current().inventory.resolve(&req.model).is_some()
                {
                    return Err(ServeError::Saturated(format!(
                        "every node that serves '{}' is drained by an operator (`llmesh node undrain`)",
                        req.model
                    )));
                }
                if let Some(result) = self.try_cloud(&req, tenant, policy, Trigger::Absent).await {
                    return result;
                }
                if let Some(refusal) = self.cloud_refusal(&req.model, policy) {
                    return Err(ServeError::CloudNotAllowed(format!(
                        "no node of the mesh serves '{}' and only a cloud provider does, but {refusal}",
                        req.model
                    )));
                }
                if let Some(why) = self.why_unavailable(&req.model) {
                    return Err(ServeError::BackendUnavailable(why));
                }
                // Nobody has it: let the local node say why (unknown model,
                // or its backend is down and cannot be asked).
                let response = self.local.serve(req).await?;
                return Ok(Dispatched { response, node: self.node_name.clone(), route: "local".into() });
            };
            if !choice.saturated {
                crate::metrics::scheduled(choice.reason.as_str());
                break (choice, targets, reserved);
            }
            let overflow_after = self.cloud.as_ref().map_or(Duration::MAX, |c| c.overflow_after());
            if !cloud_failed && choice.estimate >= overflow_after {
                match self.try_cloud(&req, tenant, policy, Trigger::Overflow).await {
                    Some(Ok(dispatched)) => return Ok(dispatched),
                    // The cloud failed too: keep waiting for the mesh.
                    Some(Err(err)) => {
                        tracing::warn!(id = %req.request_id, error = %err, "cloud overflow failed; waiting in the mesh queue");
                        cloud_failed = true;
                    }
                    None => {}
                }
            }
            if choice.estimate > self.limits.max_expected_wait {
                let refusal = self.cloud_refusal(&req.model, policy).map(|r| format!("; {r}")).unwrap_or_default();
                return Err(ServeError::Saturated(format!(
                    "every node that serves '{}' is busy; the expected wait of {:.0} s exceeds mesh.max_expected_wait ({:.0} s){refusal}",
                    req.model,
                    choice.estimate.as_secs_f64(),
                    self.limits.max_expected_wait.as_secs_f64()
                )));
            }
            if Instant::now() >= queue_deadline {
                return Err(ServeError::Timeout("no slot freed before the queue timeout".into()));
            }
            waiting.get_or_insert_with(|| (self.local.load().enqueue(&req.model), Instant::now()));
            self.wait_for_slot(tenant, &mut ticket, queue_deadline).await?;
        };
        if let Some((_, since)) = waiting.take() {
            crate::metrics::queue_wait(since.elapsed());
        }
        let (choice, targets, mut reserved) = choice;
        // Leaving the queue (if still in it) frees the place for others.
        drop(ticket);
        let mut last_error = None;
        for id in choice.order.iter().take(self.max_attempts) {
            let Some(target) = targets.get(id) else { continue };
            let guard = match reserved.take().filter(|g| g.node == *id) {
                Some(guard) => guard,
                None => Outstanding::new(self.outstanding.clone(), self.freed.clone(), id),
            };
            let result = match target {
                Target::Local => self.local.serve(req.clone()).await.map(|response| Dispatched {
                    response,
                    node: self.node_name.clone(),
                    route: "local".into(),
                }),
                Target::Peer { id, name } => self.forward(id, name, &req).await,
            };
            match result {
                Ok(mut dispatched) => {
                    let body = std::mem::replace(&mut dispatched.response.body, Box::pin(futures::stream::empty()));
                    dispatched.response.body = Box::pin(body.map(move |chunk| {
                        let _held = &guard;
                        chunk
                    }));
                    return Ok(dispatched);
                }
                Err(err) => {
                    drop(guard);
                    // A peer that lost the model since its last gossip is a
                    // target failure too; a bad request is not.
                    let peer_lost_model =
                        matches!(err, ServeError::ModelNotFound(_)) && matches!(target, Target::Peer { .. });
                    if !(err.is_retryable() || peer_lost_model) {
                        return Err(err);
                    }
                    let name = match target {
                        Target::Local => "local",
                        Target::Peer { name, .. } => {
                            crate::metrics::forward_error(name);
                            name.as_str()
                        }
                    };
                    tracing::warn!(id = %req.request_id, target = %name, error = %err, "attempt failed before the first byte; trying the next node");
                    last_error = Some(err);
                }
            }
        }
        let last_error = last_error.unwrap_or_else(|| ServeError::Internal("no attempt was made".into()));
        if let Some(result) = self.try_cloud(&req, tenant, policy, Trigger::Failover).await {
            return result;
        }
        Err(match self.cloud_refusal(&req.model, policy) {
            Some(refusal) => ServeError::from_code(last_error.code(), format!("{}; {refusal}", last_error.message())),
            None => last_error,
        })
    }

    /// Why a model no node can take now is not simply unknown: peers that
    /// serve it are dead, draining or without a backend, or this node has
    /// only just joined. `None` when the mesh knows nothing of the model
    /// (or this node's own backend has it: it then says what is wrong).
    fn why_unavailable(&self, model: &str) -> Option<String> {
        let mesh = self.mesh.as_ref()?;
        if self.local.inventory().current().inventory.resolve(model).is_some() {
            return None;
        }
        let view = mesh.view();
        let holders: Vec<String> = view
            .peers
            .iter()
            .filter(|p| p.state.models.iter().any(|m| same_model(&m.name, model)))
            .map(|p| {
                let why = if p.liveness == Liveness::Dead {
                    "unreachable"
                } else if p.state.draining {
                    "shutting down"
                } else if !p.state.backend_healthy {
                    "backend down"
                } else {
                    "out of service"
                };
                format!("{} ({why})", p.state.name)
            })
            .collect();
        if !holders.is_empty() {
            return Some(format!("no node can serve '{model}' now: {} serve it; retry shortly", holders.join(", ")));
        }
        let left = self.listening_until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| {
            format!(
                "this node has just joined the mesh and has not yet heard which nodes serve '{model}'; retry in {:.0} s",
                left.as_secs_f64().ceil()
            )
        })
    }

    async fn forward(&self, id: &str, name: &str, req: &InferenceRequest) -> Result<Dispatched, ServeError> {
        let Some(dataplane) = &self.dataplane else {
            return Err(ServeError::Internal("no data plane".into()));
        };
        tracing::debug!(id = %req.request_id, peer = %name, "forwarding a request");
        let forwarded = dataplane.forward(id, req).await?;
        Ok(Dispatched { response: forwarded.response, route: format!("peer:{}", forwarded.node), node: forwarded.node })
    }

    /// Starts the task that hands freed slots to queued requests.
    pub fn spawn_waker(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = this.freed.notified() => this.wake_waiters(),
                }
            }
        });
    }
}

/// Counts a dispatched request until its response ends, then signals that a
/// slot freed.
struct Outstanding {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    freed: Arc<tokio::sync::Notify>,
    node: String,
}

impl Outstanding {
    fn new(counts: Arc<Mutex<HashMap<String, u32>>>, freed: Arc<tokio::sync::Notify>, node: &str) -> Outstanding {
        *counts.lock().unwrap_or_else(PoisonError::into_inner).entry(node.to_string()).or_default() += 1;
        Outstanding { counts, freed, node: node.to_string() }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.node) {
            *n = n.saturating_sub(1);
        }
        self.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_tag_is_implicit_both_ways() {
        assert!(same_model("llama3:latest", "llama3"));
        assert!(same_model("llama3", "llama3:latest"));
        assert!(!same_model("qwen2.5:7b", "qwen2.5"));
    }

    #[test]
    fn turns_of_one_conversation_share_a_prefix_key() {
        let first = br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}]}"#;
        let later = br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":"more"}]}"#;
        let other = br#"{"messages":[{"role":"user","content":"different"}]}"#;
        let key = |b: &[u8]| prefix_key(ApiKind::OpenaiChat, "m", b);
        assert!(key(first).is_some());
        assert_eq!(key(first), key(later));
        assert_ne!(key(first), key(other));
        assert_ne!(key(first), prefix_key(ApiKind::OpenaiChat, "other-model", first));
        assert_eq!(prefix_key(ApiKind::OpenaiEmbeddings, "m", first), None);
        assert_eq!(output_tokens(br#"{"max_tokens":7}"#), Some(7));
        assert_eq!(output_tokens(br#"{"options":{"num_predict":9}}"#), Some(9));
    }
}
