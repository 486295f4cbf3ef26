//! The router: carries out each request's [`Plan`] on this node, a peer or
//! the cloud. It is the thin async shell around the sans-IO parts: it builds
//! the candidates from gossip, the replicated state and its own counts,
//! asks [`Admission`] for the next step, and does it.
//!
//! The admission state sits behind one mutex, for a stated reason: choosing
//! a node and taking its slot must be one atomic act (else concurrent
//! requests all see the last free slot and all take it), the critical
//! section is a few microseconds with no `.await` inside, and a task owning
//! it would add a channel round trip to every request's hot path.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::admission::Admission;
use super::candidates::{self, LocalCapacity, Sources};
use super::fallback::{CloudPolicy, Fallback, Trigger};
use super::plan::{CloudFacts, Context, Facts, Plan, Step};
use super::queue::Lane;
use super::scheduler::SchedulerConfig;
use crate::dataplane::Pending;
use crate::{Coordinator, DataPlane, InferenceRequest, InferenceResponse, Membership, RequestHandler, ServeError};

/// Where a request ran, as the `x-llmesh-route` header says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// On this node's backend.
    Local,
    /// On the named peer, over the data plane.
    Peer(String),
    /// At the named cloud provider.
    Cloud(String),
}

impl Route {
    /// `local`, `peer` or `cloud` (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Peer(_) => "peer",
            Route::Cloud(_) => "cloud",
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Local => f.write_str("local"),
            Route::Peer(name) => write!(f, "peer:{name}"),
            Route::Cloud(provider) => write!(f, "cloud:{provider}"),
        }
    }
}

/// A response and where it came from.
#[derive(Debug)]
pub struct Routed {
    /// The response, body still streaming.
    pub response: InferenceResponse,
    /// Name of the node that served it (this node's for the cloud).
    pub node: String,
    /// Id of that node as the scheduler knows it ([`LOCAL`] for this node,
    /// empty for the cloud): what [`Router::route_avoiding`] takes.
    pub node_id: String,
    /// How it was served.
    pub route: Route,
}

/// This node's own backend, as the router needs it.
pub trait LocalBackend: RequestHandler {
    /// The backend's figures for `model`; `None` when it is down or does
    /// not have the model.
    fn capacity(&self, model: &str, prefix: Option<u64>) -> Option<LocalCapacity>;

    /// Whether the backend has `model`, healthy or not.
    fn has_model(&self, model: &str) -> bool;

    /// Marks a request for `model` as waiting in the entry queue until the
    /// returned guard drops (gossiped, so the leader's placement sees
    /// demand that no node's in-flight figure shows yet).
    fn waiting(&self, model: &str) -> Box<dyn Send + Sync>;
}

/// How requests are routed; part of the `[mesh]` config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteConfig {
    /// Nodes a request may be tried on before the client gets an error.
    pub max_attempts: usize,
    /// Requests that may wait at this entry node.
    pub queue_capacity: usize,
    /// Longest wait in that queue when the client sets no deadline.
    pub queue_timeout: Duration,
    /// Expected waits beyond this are refused at once.
    pub max_expected_wait: Duration,
    /// Estimates of nodes the scheduler has no figures for.
    pub scheduler: SchedulerConfig,
}

/// The mesh around this node, absent on a standalone gateway.
#[derive(Clone)]
pub struct MeshLinks {
    /// Peers and their gossip.
    pub membership: Membership,
    /// Forwarding to peers.
    pub dataplane: Arc<DataPlane>,
    /// The replicated state (drains, removals, revocations).
    pub coordinator: Coordinator,
}

/// What a request waiting for one of this node's slots leaves in the
/// queue: the slot is handed over through it.
type Waiter = oneshot::Sender<()>;
type SharedAdmission = Arc<Mutex<Admission<Waiter>>>;

fn lock(admission: &Mutex<Admission<Waiter>>) -> MutexGuard<'_, Admission<Waiter>> {
    admission.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Gives back a slot on `node`: one of this node's own passes to the next
/// waiting request that still wants it.
fn give_back(admission: &Mutex<Admission<Waiter>>, node: &str) {
    let mut admission = lock(admission);
    while let Some(waiter) = admission.release(node, Instant::now()) {
        if waiter.send(()).is_ok() {
            return;
        }
        // It gave up waiting; the slot goes on to the next.
    }
}

/// Holds a slot on a node until dropped (the response ended or the
/// attempt failed). A peer's slot freeing lets this node's waiters look
/// again: the peer may now be the better place.
struct Slot {
    admission: SharedAdmission,
    recheck: Arc<Notify>,
    node: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        give_back(&self.admission, &self.node);
        if self.node != LOCAL {
            self.recheck.notify_waiters();
        }
    }
}

/// A request's place in this node's queue. Dropped without the slot it was
/// granted being used (the request gave up at that instant), it passes
/// the slot on, so no slot is ever lost.
struct Ticket {
    admission: SharedAdmission,
    granted: oneshot::Receiver<()>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        use oneshot::error::TryRecvError;
        match self.granted.try_recv() {
            Ok(()) => give_back(&self.admission, LOCAL),
            // Its place was used (or dropped at its deadline) already.
            Err(TryRecvError::Closed) => {}
            Err(TryRecvError::Empty) => {
                self.granted.close();
                if self.granted.try_recv().is_ok() {
                    give_back(&self.admission, LOCAL);
                } else {
                    // Still in the queue: take the place out, so the queue's
                    // length (gossiped, and in every estimate) stays true.
                    lock(&self.admission).retain_waiters(|w| !w.is_closed());
                }
            }
        }
    }
}

/// Keeps `guard` alive until the body ends or is dropped.
fn hold_until_end<G: Send + 'static>(mut response: InferenceResponse, guard: G) -> InferenceResponse {
    let body = std::mem::replace(&mut response.body, Box::pin(futures::stream::empty()));
    response.body = Box::pin(body.map(move |chunk| {
        let _held = &guard;
        chunk
    }));
    response
}

/// The id of this node's own backend among the candidates. Never a peer's
/// id (those are libp2p peer ids), and known before the mesh starts, so the
/// data plane can count forwarded work from its first request.
pub const LOCAL: &str = "local";

/// The mesh as the router uses it, set once it has started.
struct Joined {
    links: MeshLinks,
    /// This node's id in the cluster.
    node_id: String,
    /// Until then a model nobody is known to serve may still be announced
    /// by peers this node has not heard from yet.
    listening_until: Instant,
}

/// Chooses where each request runs and carries it there.
pub struct Router {
    local: Arc<dyn LocalBackend>,
    node_name: String,
    mesh: std::sync::OnceLock<Joined>,
    /// Set while this node waits to become a member of its mesh.
    expecting_mesh: std::sync::atomic::AtomicBool,
    fallback: Option<Arc<dyn Fallback>>,
    config: RouteConfig,
    admission: SharedAdmission,
    /// Tells requests waiting here that the mesh changed (a peer's slot
    /// freed, gossip arrived), so they may run elsewhere sooner.
    recheck: Arc<Notify>,
    decisions: super::metrics::Decisions,
}

impl Router {
    /// A router over this node's backend; [`Router::join`] adds the mesh.
    pub fn new(
        local: Arc<dyn LocalBackend>,
        node_name: String,
        fallback: Option<Arc<dyn Fallback>>,
        config: RouteConfig,
    ) -> Router {
        let seed = super::prefix::PrefixKey::new(&node_name).finish();
        let admission = Arc::new(Mutex::new(Admission::new(config.scheduler, seed, config.queue_capacity)));
        let recheck = Arc::new(Notify::new());
        Router {
            local,
            node_name,
            mesh: std::sync::OnceLock::new(),
            expecting_mesh: std::sync::atomic::AtomicBool::new(false),
            fallback,
            config,
            admission,
            recheck,
            decisions: super::metrics::Decisions::new(),
        }
    }

    /// Routes over the mesh from now on. For `warmup` a model that no known
    /// node serves gets 503 (retry) rather than 404: a node that just
    /// (re)started has not heard every peer's gossip yet.
    pub fn join(&self, links: MeshLinks, warmup: Duration) {
        let node_id = links.membership.local_id().to_string();
        let joined = Joined { links, node_id, listening_until: Instant::now() + warmup };
        if self.mesh.set(joined).is_err() {
            tracing::warn!("the router joined the mesh twice; keeping the first");
        }
    }

    /// This node will join a mesh ([`Router::join`]) but is not a member
    /// yet: a model only peers may serve waits for it within the request's
    /// deadline instead of being refused.
    pub fn expect_mesh(&self) {
        self.expecting_mesh.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn links(&self) -> Option<&MeshLinks> {
        self.mesh.get().map(|j| &j.links)
    }

    /// Requests waiting in this node's queue.
    pub fn queued(&self) -> usize {
        lock(&self.admission).queued()
    }

    /// The handler the data plane serves forwarded requests with: this
    /// node's backend behind the same slots and the same fair queue as the
    /// requests that enter here.
    pub fn forwarded_handler(&self) -> Arc<dyn RequestHandler> {
        Arc::new(ForwardedLocal {
            local: self.local.clone(),
            admission: self.admission.clone(),
            recheck: self.recheck.clone(),
            node_name: self.node_name.clone(),
            queue_timeout: self.config.queue_timeout,
            queue_capacity: self.config.queue_capacity,
        })
    }

    /// Lets the requests waiting here look again whenever the mesh view
    /// changes (a peer's gossip may show a freed slot) until `shutdown`.
    pub fn spawn_nudger(&self, shutdown: CancellationToken) {
        let Some(mesh) = self.links() else { return };
        let mut view = mesh.membership.watch();
        let recheck = self.recheck.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = view.changed() => match changed {
                        Ok(()) => recheck.notify_waiters(),
                        Err(_) => return,
                    },
                }
            }
        });
    }

    /// Runs `req` where its plan says: the best node now, after a wait in
    /// the fair queue, on the next node when one fails before its first
    /// byte, or in the cloud where `policy` allows.
    pub async fn route(&self, req: InferenceRequest, policy: CloudPolicy) -> Result<Routed, ServeError> {
        self.route_avoiding(req, policy, None).await
    }

    /// [`Self::route`], never on the node `avoid` (a [`Routed::node_id`]):
    /// the rest of a stream that node broke goes elsewhere.
    pub async fn route_avoiding(
        &self,
        req: InferenceRequest,
        policy: CloudPolicy,
        avoid: Option<&str>,
    ) -> Result<Routed, ServeError> {
        // The scheduling decision, waits and attempts included; each
        // attempt's node and why it was chosen are recorded on it.
        let span = tracing::debug_span!(
            "schedule",
            request_id = %req.request_id,
            model = %req.meta.model,
            node = tracing::field::Empty,
            reason = tracing::field::Empty,
            attempts = 0u32,
        );
        self.schedule(req, policy, avoid).instrument(span).await
    }

    async fn schedule(
        &self,
        mut req: InferenceRequest,
        policy: CloudPolicy,
        avoid: Option<&str>,
    ) -> Result<Routed, ServeError> {
        let mut attempts = 0u32;
        let mut plan = Plan::new(self.facts(&req, policy));
        if let Some(node) = avoid {
            plan.avoid(node);
        }
        // A peer may keep it waiting for a slot as long as it could wait here.
        req.queue_until = Some(plan.facts().deadline);
        let mut waiting = Waiting::default();
        loop {
            let step = match waiting.granted.take() {
                // A freed slot here was handed to this request: it is taken.
                Some(()) => Step::Run { node: LOCAL.to_string(), reason: super::scheduler::Reason::Queued },
                None => self.step(&mut plan, &req, &mut waiting),
            };
            match step {
                Step::Run { node, reason } => {
                    self.decisions.count(reason);
                    attempts += 1;
                    let span = tracing::Span::current();
                    span.record("node", node.as_str()).record("reason", reason.as_str()).record("attempts", attempts);
                    waiting.finish();
                    match self.attempt(&node, &req).await {
                        Ok(routed) => return Ok(routed),
                        Err(err) => {
                            tracing::warn!(id = %req.request_id, target = %node, error = %err, "attempt failed before the first byte");
                            plan.failed(&node, node != LOCAL, err);
                        }
                    }
                }
                Step::Wait { until } => self.wait(&mut waiting, &req, until).await?,
                Step::Await { until } => {
                    // Nothing can take it now; a node is expected back.
                    waiting.finish();
                    let look = until.min(Instant::now() + super::plan::LOOK_AGAIN);
                    tokio::select! {
                        () = self.recheck.notified() => {}
                        () = tokio::time::sleep_until(look.into()) => {}
                    }
                }
                Step::Reserve { nodes } => {
                    if let Some(routed) = self.race(&mut plan, &req, &mut waiting, &nodes).await {
                        return Ok(routed);
                    }
                }
                Step::Cloud(trigger) => match self.cloud(&req, trigger).await {
                    Ok(routed) => return Ok(routed),
                    Err(err) => {
                        tracing::warn!(id = %req.request_id, ?trigger, error = %err, "the cloud failed");
                        plan.cloud_failed(trigger, err);
                    }
                },
                Step::Explain => {
                    let model = req.meta.model.clone();
                    let response = match self.local.serve(req).await {
                        // In a mesh, the whole mesh lacks it, not only this node.
                        Err(ServeError::ModelNotFound(_)) if self.mesh.get().is_some() => {
                            return Err(ServeError::NotServed(format!(
                                "no node of the mesh serves model '{model}' (`llmesh models pull {model}` fetches it onto a node)"
                            )));
                        }
                        other => other?,
                    };
                    return Ok(Routed {
                        response,
                        node: self.node_name.clone(),
                        node_id: LOCAL.into(),
                        route: Route::Local,
                    });
                }
                Step::Fail(err) => return Err(err),
            }
        }
    }

    fn facts(&self, req: &InferenceRequest, policy: CloudPolicy) -> Facts {
        let cloud = self.fallback.as_ref().filter(|f| f.maps(&req.meta.model));
        Facts {
            model: req.meta.model.clone(),
            deadline: req.deadline.unwrap_or_else(|| Instant::now() + self.config.queue_timeout),
            max_attempts: self.config.max_attempts,
            max_expected_wait: self.config.max_expected_wait,
            cloud: cloud.map(|f| CloudFacts { policy, overflow_after: f.overflow_after() }),
        }
    }

    /// One decision: the candidates as this node sees them now, then the
    /// admission state's step (which takes the chosen node's slot).
    fn step(&self, plan: &mut Plan, req: &InferenceRequest, waiting: &mut Waiting) -> Step {
        let meta = &req.meta;
        let links = self.links();
        let view = links.map(|m| m.membership.view());
        let cluster = links.map(|m| m.coordinator.state());
        let peers = view.as_ref().map_or(&[][..], |v| &v.peers[..]);
        let local = self.local.capacity(&meta.model, meta.prefix);
        let rtt = |id: &str| links.and_then(|m| m.dataplane.peer_rtt(id));
        let node_id = self.mesh.get().map_or("", |j| j.node_id.as_str());
        let mut admission = lock(&self.admission);
        let outstanding = |id: &str| admission.outstanding(id);
        let sources = Sources {
            node_id,
            local,
            peers,
            cluster: cluster.as_deref(),
            outstanding: &outstanding,
            local_queued: admission.queued() as u32,
            rtt: &rtt,
        };
        let candidates = candidates::build(&meta.model, meta.prefix, &sources);
        // The context matters only when nobody can take the request.
        let context = if candidates.iter().all(|c| plan.excludes(&c.id)) {
            self.context(&meta.model, peers, cluster.as_deref())
        } else {
            Context::default()
        };
        let step = admission.step(plan, candidates, &context, meta.turn(), meta.output_tokens, Instant::now());
        let queue_here = match &step {
            Step::Wait { until } => Some(*until),
            Step::Reserve { nodes } if nodes.iter().any(|n| n == LOCAL) => Some(plan.facts().deadline),
            _ => None,
        };
        if let Some(until) = queue_here
            && waiting.ticket.is_none()
        {
            // Queued under the same lock: a slot freed in between would
            // otherwise find the queue empty and not be handed over.
            let lane = Lane::new(&meta.tenant, LOCAL);
            match self.enqueue(&mut admission, &lane, until) {
                Ok(ticket) => waiting.ticket = Some(ticket),
                Err(err) => return Step::Fail(err),
            }
        }
        step
    }

    /// Queues a request in `lane` for one of this node's slots.
    fn enqueue(&self, admission: &mut Admission<Waiter>, lane: &Lane, until: Instant) -> Result<Ticket, ServeError> {
        enqueue(admission, &self.admission, lane, until, self.config.queue_capacity, &self.node_name)
    }

    fn context(&self, model: &str, peers: &[crate::PeerSnapshot], cluster: Option<&crate::ClusterState>) -> Context {
        let has_model = self.local.has_model(model);
        let Some(joined) = self.mesh.get() else {
            if has_model || !self.expecting_mesh.load(std::sync::atomic::Ordering::Relaxed) {
                return Context::default();
            }
            return Context {
                drained_here: false,
                unavailable: Some(format!(
                    "this node is still joining its mesh (waiting for its cluster certificate) and cannot yet reach the nodes that may serve '{model}'; retry shortly"
                )),
                expected_back: true,
            };
        };
        let drained_here = has_model && cluster.is_some_and(|c| c.is_out_of_service(&joined.node_id));
        if has_model && !drained_here {
            // Its own backend cannot take it (down, or stalled): say so.
            let unavailable = self
                .local
                .capacity(model, None)
                .is_none()
                .then(|| format!("this node's backend, which serves '{model}', is down or not answering"));
            return Context { drained_here: false, unavailable, expected_back: false };
        }
        // Not served here, or drained here: it rests on the peers.
        let left = joined.listening_until.saturating_duration_since(Instant::now());
        let unavailable = candidates::why_unavailable(model, peers, cluster).or_else(|| {
            (!left.is_zero()).then(|| {
                format!(
                    "this node has just joined the mesh and has not yet heard which nodes serve '{model}'; retry in {:.0} s",
                    left.as_secs_f64().ceil()
                )
            })
        });
        let expected_back = !left.is_zero() || candidates::expected_back(model, peers, cluster);
        let peers_hold = peers.iter().any(|p| p.state.models.iter().any(|m| candidates::same_model(&m.name, model)));
        // Every node that serves it is out by an operator's hand (this one
        // included, when it serves it).
        let all_drained = if peers_hold {
            unavailable.is_some() && candidates::only_drained_hold(model, peers, cluster)
        } else {
            drained_here
        };
        Context { drained_here: all_drained, unavailable, expected_back }
    }

    /// Runs `req` on `node`, whose slot the step took.
    async fn attempt(&self, node: &str, req: &InferenceRequest) -> Result<Routed, ServeError> {
        let slot = Slot { admission: self.admission.clone(), recheck: self.recheck.clone(), node: node.to_string() };
        let routed = if node == LOCAL {
            let response = self.local.serve(req.clone()).await?;
            Routed { response, node: self.node_name.clone(), node_id: LOCAL.into(), route: Route::Local }
        } else {
            self.forward(node, req).await?
        };
        Ok(Routed { response: hold_until_end(routed.response, slot), ..routed })
    }

    async fn forward(&self, node: &str, req: &InferenceRequest) -> Result<Routed, ServeError> {
        let Some(mesh) = self.links() else { return Err(ServeError::Internal("no data plane".into())) };
        tracing::debug!(id = %req.request_id, peer = %node, "forwarding a request");
        // The hop, to the peer's response head.
        let span = tracing::debug_span!("forward", request_id = %req.request_id, peer = %node);
        match mesh.dataplane.forward(node, req).instrument(span).await {
            Ok(forwarded) => Ok(Routed {
                response: forwarded.response,
                route: Route::Peer(forwarded.node.clone()),
                node: forwarded.node,
                node_id: node.to_string(),
            }),
            Err(err) => {
                crate::route::metrics::forward_error(node);
                if matches!(err, ServeError::BackendUnreachable(_)) {
                    // A broken connection says more than a missed heartbeat:
                    // other requests stop choosing the peer at once.
                    mesh.membership.suspect(node);
                }
                Err(err)
            }
        }
    }

    async fn cloud(&self, req: &InferenceRequest, trigger: Trigger) -> Result<Routed, ServeError> {
        let Some(fallback) = &self.fallback else { return Err(ServeError::Internal("no cloud provider".into())) };
        tracing::info!(id = %req.request_id, model = %req.meta.model, ?trigger, "sending to the cloud");
        let (response, provider) = fallback.serve(req).await?;
        Ok(Routed { response, node: self.node_name.clone(), node_id: String::new(), route: Route::Cloud(provider) })
    }

    /// Queues `req` at each of `nodes` (this node's place is the queue
    /// ticket [`Router::step`] took) and runs it at the first that gives it
    /// a slot; the other places are cancelled: dropped, a peer's pending
    /// request leaves that peer's queue, and this node's ticket passes on a
    /// slot granted meanwhile. `None`: every place failed or the deadline
    /// passed, and the plan decides again.
    async fn race(
        &self,
        plan: &mut Plan,
        req: &InferenceRequest,
        waiting: &mut Waiting,
        nodes: &[String],
    ) -> Option<Routed> {
        let until = plan.facts().deadline;
        waiting.since.get_or_insert_with(Instant::now);
        waiting.mark.get_or_insert_with(|| self.local.waiting(&req.meta.model));
        let mut places: FuturesUnordered<_> =
            nodes.iter().filter(|n| *n != LOCAL).map(|node| self.place(node.clone(), req)).collect();
        loop {
            let recheck = self.recheck.notified();
            let event = tokio::select! {
                () = recheck => Race::Look,
                granted = async {
                    match &mut waiting.ticket {
                        Some(ticket) => (&mut ticket.granted).await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => Race::Here(granted),
                Some((node, slot, result)) = places.next() => Race::There(node, slot, result),
                () = tokio::time::sleep_until(until.into()) => return None,
            };
            match event {
                Race::Look => {
                    // A slot may have freed elsewhere (gossip, or a request
                    // this node sent finished): take it rather than wait.
                    match self.step(plan, req, waiting) {
                        Step::Run { node, reason } => {
                            drop(places);
                            return self.run_now(plan, req, waiting, &node, reason).await;
                        }
                        // Still busy everywhere: keep the places held.
                        Step::Reserve { nodes } => self.unreserve(&nodes),
                        _ => {}
                    }
                }
                Race::Here(false) => waiting.ticket = None,
                Race::Here(true) => {
                    waiting.ticket = None;
                    drop(places);
                    return self.run_now(plan, req, waiting, LOCAL, super::scheduler::Reason::Queued).await;
                }
                Race::There(node, slot, Ok(pending)) => {
                    drop(places);
                    self.decisions.count(super::scheduler::Reason::Queued);
                    waiting.finish();
                    return match pending.response().await {
                        Ok(forwarded) => Some(Routed {
                            response: hold_until_end(forwarded.response, slot),
                            route: Route::Peer(forwarded.node.clone()),
                            node: forwarded.node,
                            node_id: node.clone(),
                        }),
                        Err(err) => {
                            plan.failed(&node, true, err);
                            None
                        }
                    };
                }
                Race::There(node, _slot, Err(err)) => {
                    tracing::warn!(id = %req.request_id, target = %node, error = %err, "a place in a peer's queue failed");
                    plan.failed(&node, true, err);
                }
            }
            if places.is_empty() && waiting.ticket.is_none() {
                return None;
            }
        }
    }

    /// Runs `req` on `node`, whose slot it holds, leaving the race.
    async fn run_now(
        &self,
        plan: &mut Plan,
        req: &InferenceRequest,
        waiting: &mut Waiting,
        node: &str,
        reason: super::scheduler::Reason,
    ) -> Option<Routed> {
        self.decisions.count(reason);
        waiting.finish();
        match self.attempt(node, req).await {
            Ok(routed) => Some(routed),
            Err(err) => {
                plan.failed(node, node != LOCAL, err);
                None
            }
        }
    }

    /// Gives back the peer places a look took and did not use.
    fn unreserve(&self, nodes: &[String]) {
        let mut admission = lock(&self.admission);
        for node in nodes.iter().filter(|n| *n != LOCAL) {
            let _ = admission.release(node, Instant::now());
        }
    }

    /// Sends `req` to wait in `node`'s queue; resolves once it has a slot
    /// there. Its slot guard counts it as sent there meanwhile.
    fn place<'a>(
        &'a self,
        node: String,
        req: &'a InferenceRequest,
    ) -> impl std::future::Future<Output = (String, Slot, Result<Box<Pending>, ServeError>)> + 'a {
        let slot = Slot { admission: self.admission.clone(), recheck: self.recheck.clone(), node: node.clone() };
        // A place in a peer's queue is a hop too, to the slot it gives.
        let span = tracing::debug_span!("forward", request_id = %req.request_id, peer = %node, reserved = true);
        async move {
            let result = async {
                let Some(mesh) = self.links() else { return Err(ServeError::Internal("no data plane".into())) };
                let sent = mesh.dataplane.send(&node, req, true).await;
                if let Err(ServeError::BackendUnreachable(_)) = &sent {
                    mesh.membership.suspect(&node);
                }
                let mut pending = sent?;
                pending.started().await?;
                Ok(Box::new(pending))
            }
            .instrument(span)
            .await;
            (node, slot, result)
        }
    }

    /// Waits in this node's queue until a slot here is handed over (then
    /// `waiting.granted` is set), the mesh changed, or `until`. The place
    /// in the queue is kept across the looks that find nothing better.
    async fn wait(&self, waiting: &mut Waiting, req: &InferenceRequest, until: Instant) -> Result<(), ServeError> {
        waiting.since.get_or_insert_with(Instant::now);
        waiting.mark.get_or_insert_with(|| self.local.waiting(&req.meta.model));
        let Some(ticket) = &mut waiting.ticket else {
            return Err(ServeError::Internal("a request waits without a place in the queue".into()));
        };
        let recheck = self.recheck.notified();
        tokio::select! {
            granted = &mut ticket.granted => {
                if granted.is_ok() {
                    waiting.granted = Some(());
                }
                // Handed over or dropped at its deadline: either way the
                // place is used up.
                waiting.ticket = None;
            }
            () = recheck => {}
            () = tokio::time::sleep_until(until.into()) => {}
        }
        Ok(())
    }
}

/// Queues a request in `lane` for one of this node's slots; `locked` is
/// `shared`, locked.
fn enqueue(
    locked: &mut Admission<Waiter>,
    shared: &SharedAdmission,
    lane: &Lane,
    until: Instant,
    capacity: usize,
    node: &str,
) -> Result<Ticket, ServeError> {
    let (tx, rx) = oneshot::channel();
    if locked.queued() >= capacity {
        // Requests that gave up leave dead places behind; drop them first.
        locked.retain_waiters(|w| !w.is_closed());
    }
    locked.enqueue(lane, tx, until).map_err(|_| {
        ServeError::Overloaded(format!(
            "the queue on node {node} is full ({capacity} requests wait there); retry shortly"
        ))
    })?;
    Ok(Ticket { admission: shared.clone(), granted: rx })
}

/// What ended one wait of a race between places.
enum Race {
    /// The mesh changed: look again.
    Look,
    /// This node's place: granted a slot, or dropped at its deadline.
    Here(bool),
    /// A peer's place: it has a slot, or failed.
    There(String, Slot, Result<Box<Pending>, ServeError>),
}

/// A request's time in this node's queue.
#[derive(Default)]
struct Waiting {
    since: Option<Instant>,
    ticket: Option<Ticket>,
    mark: Option<Box<dyn Send + Sync>>,
    /// A slot here was handed to it.
    granted: Option<()>,
}

impl Waiting {
    /// The request leaves the queue to run; a place it still holds (it
    /// runs elsewhere) is given up (see [`Ticket`]'s drop).
    fn finish(&mut self) {
        if let Some(since) = self.since.take() {
            crate::route::metrics::queue_wait(since.elapsed());
        }
        self.ticket = None;
        self.mark = None;
    }
}

/// This node's backend serving requests peers forwarded: they take a free
/// slot or wait for one in the same fair queue as requests entering here,
/// in their entry node's lane.
struct ForwardedLocal {
    local: Arc<dyn LocalBackend>,
    admission: SharedAdmission,
    recheck: Arc<Notify>,
    node_name: String,
    queue_timeout: Duration,
    queue_capacity: usize,
}

impl ForwardedLocal {
    /// Waits for a slot here; `Ok` once this request holds one.
    async fn acquire(&self, req: &InferenceRequest) -> Result<(), ServeError> {
        let Some(capacity) = self.local.capacity(&req.meta.model, req.meta.prefix) else {
            // The backend is down or lacks the model: it says so at once,
            // and the entry node fails over; nothing to wait for.
            lock(&self.admission).take(LOCAL);
            return Ok(());
        };
        let (slots, in_flight) = (capacity.slots, capacity.in_flight);
        let until = req.deadline.unwrap_or_else(|| Instant::now() + self.queue_timeout);
        let mut ticket = {
            // Checked and queued under one lock, so a slot freed in between
            // is handed to this request rather than lost to the count.
            let mut admission = lock(&self.admission);
            if admission.admit_forwarded(slots, in_flight) {
                return Ok(());
            }
            let entry = req.forwarded_by.as_deref().unwrap_or("unknown");
            let lane = Lane::new(&req.meta.tenant, entry);
            enqueue(&mut admission, &self.admission, &lane, until, self.queue_capacity, &self.node_name)?
        };
        let _mark = self.local.waiting(&req.meta.model);
        let since = Instant::now();
        tokio::select! {
            granted = &mut ticket.granted => {
                crate::route::metrics::queue_wait(since.elapsed());
                match granted {
                    Ok(()) => Ok(()),
                    Err(_) => Err(self.timed_out(since)),
                }
            }
            () = tokio::time::sleep_until(until.into()) => Err(self.timed_out(since)),
        }
    }

    fn timed_out(&self, since: Instant) -> ServeError {
        ServeError::Timeout(format!(
            "no slot freed on node {} within {:.1} s of waiting",
            self.node_name,
            since.elapsed().as_secs_f64()
        ))
    }
}

#[async_trait::async_trait]
impl RequestHandler for ForwardedLocal {
    async fn serve(&self, req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
        if req.api.is_management() {
            // Pulls and deletes use no inference slot.
            return self.local.serve(req).await;
        }
        self.acquire(&req).await?;
        let slot = Slot { admission: self.admission.clone(), recheck: self.recheck.clone(), node: LOCAL.to_string() };
        if let Some(started) = &req.on_slot {
            // The entry node cancels the request's places at other nodes.
            started.notify_one();
        }
        let response = self.local.serve(req).await?;
        Ok(hold_until_end(response, slot))
    }
}
