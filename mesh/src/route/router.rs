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
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::admission::Admission;
use super::candidates::{self, LocalCapacity, Sources};
use super::fallback::{CloudPolicy, Fallback, Trigger};
use super::plan::{CloudFacts, Context, Facts, Plan, Step};
use super::scheduler::SchedulerConfig;
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

type Waiter = oneshot::Sender<()>;
type SharedAdmission = Arc<Mutex<Admission<Waiter>>>;

fn lock(admission: &Mutex<Admission<Waiter>>) -> MutexGuard<'_, Admission<Waiter>> {
    admission.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Frees a node's slot when dropped (the response ended or the attempt
/// failed) and wakes the next waiting request.
struct Slot {
    admission: SharedAdmission,
    node: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut admission = lock(&self.admission);
        let mut next = admission.release(&self.node, Instant::now());
        // A waiter that gave up has dropped its receiver; wake the next.
        while let Some(waiter) = next {
            if waiter.send(()).is_ok() {
                break;
            }
            next = admission.next_waiter(Instant::now());
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

/// Wakes the next waiting request.
fn wake_next(admission: &Mutex<Admission<Waiter>>) {
    let mut admission = lock(admission);
    while let Some(waiter) = admission.next_waiter(Instant::now()) {
        if waiter.send(()).is_ok() {
            return;
        }
    }
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
    fallback: Option<Arc<dyn Fallback>>,
    config: RouteConfig,
    admission: SharedAdmission,
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
        Router { local, node_name, mesh: std::sync::OnceLock::new(), fallback, config, admission }
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

    fn links(&self) -> Option<&MeshLinks> {
        self.mesh.get().map(|j| &j.links)
    }

    /// Requests waiting in this node's queue.
    pub fn queued(&self) -> usize {
        lock(&self.admission).queued()
    }

    /// The handler the data plane serves forwarded requests with: this
    /// node's backend, counted in the same admission state as local work,
    /// so requests waiting here are woken when a forwarded one finishes.
    pub fn forwarded_handler(&self) -> Arc<dyn RequestHandler> {
        Arc::new(CountedLocal { local: self.local.clone(), admission: self.admission.clone() })
    }

    /// Wakes one waiting request whenever the mesh view changes (a peer's
    /// gossip may show a freed slot) until `shutdown`.
    pub fn spawn_nudger(&self, shutdown: CancellationToken) {
        let Some(mesh) = self.links() else { return };
        let mut view = mesh.membership.watch();
        let admission = self.admission.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = view.changed() => match changed {
                        Ok(()) => wake_next(&admission),
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
        let mut plan = Plan::new(self.facts(&req, policy));
        let mut waiting = Waiting::default();
        loop {
            let step = self.step(&mut plan, &req);
            match step {
                Step::Run { node, reason } => {
                    crate::route::metrics::scheduled(reason.as_str());
                    waiting.finish(&self.admission);
                    match self.attempt(&node, &req).await {
                        Ok(routed) => return Ok(routed),
                        Err(err) => {
                            tracing::warn!(id = %req.request_id, target = %node, error = %err, "attempt failed before the first byte");
                            plan.failed(&node, node != LOCAL, err);
                        }
                    }
                }
                Step::Wait { until } => self.wait(&mut waiting, &req, until).await?,
                Step::Cloud(trigger) => match self.cloud(&req, trigger).await {
                    Ok(routed) => return Ok(routed),
                    Err(err) => {
                        tracing::warn!(id = %req.request_id, ?trigger, error = %err, "the cloud failed");
                        plan.cloud_failed(trigger, err);
                    }
                },
                Step::Explain => {
                    let response = self.local.serve(req).await?;
                    return Ok(Routed { response, node: self.node_name.clone(), route: Route::Local });
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
    fn step(&self, plan: &mut Plan, req: &InferenceRequest) -> Step {
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
        let sources =
            Sources { node_id, local, peers, cluster: cluster.as_deref(), outstanding: &outstanding, rtt: &rtt };
        let candidates = candidates::build(&meta.model, meta.prefix, &sources);
        // The context matters only when nobody can take the request.
        let context = if candidates.iter().all(|c| plan.excludes(&c.id)) {
            self.context(&meta.model, peers, cluster.as_deref())
        } else {
            Context::default()
        };
        admission.step(plan, candidates, &context, meta.prefix, meta.output_tokens, Instant::now())
    }

    fn context(&self, model: &str, peers: &[crate::PeerSnapshot], cluster: Option<&crate::ClusterState>) -> Context {
        let has_model = self.local.has_model(model);
        let Some(joined) = self.mesh.get() else { return Context::default() };
        let drained_here = has_model && cluster.is_some_and(|c| c.is_out_of_service(&joined.node_id));
        if has_model {
            return Context { drained_here, unavailable: None };
        }
        let left = joined.listening_until.saturating_duration_since(Instant::now());
        let unavailable = candidates::why_unavailable(model, peers, cluster).or_else(|| {
            (!left.is_zero()).then(|| {
                format!(
                    "this node has just joined the mesh and has not yet heard which nodes serve '{model}'; retry in {:.0} s",
                    left.as_secs_f64().ceil()
                )
            })
        });
        Context { drained_here, unavailable }
    }

    /// Runs `req` on `node`, whose slot the step took.
    async fn attempt(&self, node: &str, req: &InferenceRequest) -> Result<Routed, ServeError> {
        let slot = Slot { admission: self.admission.clone(), node: node.to_string() };
        let routed = if node == LOCAL {
            let response = self.local.serve(req.clone()).await?;
            Routed { response, node: self.node_name.clone(), route: Route::Local }
        } else {
            self.forward(node, req).await?
        };
        Ok(Routed { response: hold_until_end(routed.response, slot), ..routed })
    }

    async fn forward(&self, node: &str, req: &InferenceRequest) -> Result<Routed, ServeError> {
        let Some(mesh) = self.links() else { return Err(ServeError::Internal("no data plane".into())) };
        tracing::debug!(id = %req.request_id, peer = %node, "forwarding a request");
        match mesh.dataplane.forward(node, req).await {
            Ok(forwarded) => Ok(Routed {
                response: forwarded.response,
                route: Route::Peer(forwarded.node.clone()),
                node: forwarded.node,
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
        Ok(Routed { response, node: self.node_name.clone(), route: Route::Cloud(provider) })
    }

    /// Waits in the fair queue until a slot may have freed or `until`.
    async fn wait(&self, waiting: &mut Waiting, req: &InferenceRequest, until: Instant) -> Result<(), ServeError> {
        let since = *waiting.since.get_or_insert_with(Instant::now);
        waiting.mark.get_or_insert_with(|| self.local.waiting(&req.meta.model));
        let ticket = match &mut waiting.ticket {
            Some(ticket) => ticket,
            None => {
                let (tx, rx) = oneshot::channel();
                self.enqueue(&req.meta.tenant, tx, until)?;
                waiting.ticket.insert(rx)
            }
        };
        let woken = tokio::time::timeout_at(until.into(), ticket).instrument(tracing::debug_span!("queued")).await;
        if woken.is_ok() {
            // The place in the queue is used up; a new one is taken if the
            // request must wait again.
            waiting.ticket = None;
            waiting.woken = true;
        }
        tracing::trace!(waited_ms = since.elapsed().as_millis() as u64, "queue wait step");
        Ok(())
    }

    fn enqueue(&self, tenant: &str, waiter: Waiter, until: Instant) -> Result<(), ServeError> {
        let mut admission = lock(&self.admission);
        if admission.queued() >= self.config.queue_capacity {
            // Requests that gave up leave dead places behind; drop them first.
            admission.retain_waiters(|w| !w.is_closed());
        }
        admission.enqueue(tenant, waiter, until).map_err(|_| {
            ServeError::Overloaded(format!(
                "the mesh queue is full ({} requests wait here); retry shortly",
                self.config.queue_capacity
            ))
        })
    }
}

/// A request's time in the queue.
#[derive(Default)]
struct Waiting {
    since: Option<Instant>,
    ticket: Option<oneshot::Receiver<()>>,
    mark: Option<Box<dyn Send + Sync>>,
    woken: bool,
}

impl Waiting {
    /// The request leaves the queue to run: record the wait, and pass the
    /// wake-up on when it came from the queue (more slots may be free).
    fn finish(&mut self, admission: &Mutex<Admission<Waiter>>) {
        if let Some(since) = self.since.take() {
            crate::route::metrics::queue_wait(since.elapsed());
        }
        self.ticket = None;
        self.mark = None;
        if std::mem::take(&mut self.woken) {
            wake_next(admission);
        }
    }
}

/// This node's backend serving a forwarded request, counted as running here.
struct CountedLocal {
    local: Arc<dyn LocalBackend>,
    admission: SharedAdmission,
}

#[async_trait::async_trait]
impl RequestHandler for CountedLocal {
    async fn serve(&self, req: InferenceRequest) -> Result<InferenceResponse, ServeError> {
        lock(&self.admission).take(LOCAL);
        let slot = Slot { admission: self.admission.clone(), node: LOCAL.to_string() };
        let response = self.local.serve(req).await?;
        Ok(hold_until_end(response, slot))
    }
}
