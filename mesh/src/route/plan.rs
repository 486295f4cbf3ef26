//! One request's journey as a sans-IO state machine.
//!
//! Given what the entry node knows at a decision point (the scheduler's
//! choice among the candidates the plan has not tried yet, a little
//! context, and `now`) the plan answers with one [`Step`]: run on a node
//! (or wait in its queue when every node is busy), wait in this node's
//! queue, send to the cloud, let the local node explain
//! that nobody serves the model, or fail. The router carries out the step
//! and reports back what happened ([`Plan::failed`], [`Plan::cloud_failed`]);
//! the next [`Plan::decide`] takes it into account. No sockets, no clock, no
//! sleeps: every rule below is unit-tested on a virtual clock.

use std::time::{Duration, Instant};

use super::fallback::{CloudPolicy, Trigger};
use super::router::LOCAL;
use super::scheduler::{Choice, Reason};
use crate::ServeError;

/// The request's facts that do not change during its journey.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The model, for messages.
    pub model: String,
    /// When waiting must stop (the client's deadline or the queue timeout).
    pub deadline: Instant,
    /// Nodes that may fail before the client gets an error.
    pub max_attempts: usize,
    /// A request whose expected wait is longer is refused at once.
    pub max_expected_wait: Duration,
    /// The cloud, when a provider maps the model.
    pub cloud: Option<CloudFacts>,
}

/// What the cloud offers this request.
#[derive(Debug, Clone)]
pub struct CloudFacts {
    /// What the request's key (or the default) allows.
    pub policy: CloudPolicy,
    /// Expected waits from which the request may overflow.
    pub overflow_after: Duration,
}

/// What the entry node knows besides the scheduler's choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Every node that serves the model (this one or peers) is drained or
    /// removed by an operator.
    pub drained_here: bool,
    /// Why the nodes that serve the model cannot take it now, or that this
    /// node has only just joined and has not heard from every peer.
    pub unavailable: Option<String>,
    /// Whether one of them is expected back soon (suspect or lately lost,
    /// starting, its backend down, or this node still listening), so the
    /// request may wait for it rather than fail.
    pub expected_back: bool,
}

/// How often a request that waits for a node to come back looks again
/// even when nothing changed in the view.
pub const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Run on `node` (this node or a peer); its slot is taken.
    Run {
        /// Node id.
        node: String,
        /// Why it won.
        reason: Reason,
    },
    /// Wait in this node's queue for one of its own slots (it is expected
    /// to free first) until granted one, woken to look again, or `until`.
    Wait {
        /// The request's deadline.
        until: Instant,
    },
    /// Every node is busy: queue the request at each of `nodes` (this node
    /// and peers) and run it at the first that gives it a slot, cancelling
    /// the others (late binding); report failures with [`Plan::failed`].
    Reserve {
        /// Node ids, the soonest first.
        nodes: Vec<String>,
    },
    /// No node can take it now but one is expected back: look again when
    /// the view changes, or at `until` at the latest.
    Await {
        /// When to look again at the latest.
        until: Instant,
    },
    /// Send to the cloud; report a failure with [`Plan::cloud_failed`].
    Cloud(Trigger),
    /// No node is known to serve the model: let the local node say why
    /// (unknown model, or its backend is down).
    Explain,
    /// Give up with this error.
    Fail(ServeError),
}

/// Nodes a request for a busy mesh is queued at.
pub const RESERVATIONS: usize = 2;

/// One request's journey.
#[derive(Debug)]
pub struct Plan {
    facts: Facts,
    tried: Vec<String>,
    last_error: Option<ServeError>,
    fatal: Option<ServeError>,
    prefer_pending: bool,
    overflow_failed: bool,
    failover_sent: bool,
}

impl Plan {
    /// A journey that has not started.
    pub fn new(facts: Facts) -> Plan {
        let prefer_pending = facts.cloud.as_ref().is_some_and(|c| c.policy.allows(Trigger::Prefer));
        Plan {
            facts,
            tried: Vec::new(),
            last_error: None,
            fatal: None,
            prefer_pending,
            overflow_failed: false,
            failover_sent: false,
        }
    }

    /// Leaves `node` out of this journey from the start.
    pub fn avoid(&mut self, node: &str) {
        self.tried.push(node.to_string());
    }

    /// Whether the scheduler must leave `node` out: it failed this request.
    pub fn excludes(&self, node: &str) -> bool {
        self.tried.iter().any(|t| t == node)
    }

    /// Nodes that failed this request, in order.
    pub fn tried(&self) -> &[String] {
        &self.tried
    }

    /// The request's facts.
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// The next step, given the scheduler's `choice` among the nodes this
    /// plan does not exclude.
    pub fn decide(&mut self, choice: Option<Choice>, context: &Context, now: Instant) -> Step {
        if let Some(err) = self.fatal.take() {
            return Step::Fail(err);
        }
        if std::mem::take(&mut self.prefer_pending) {
            return Step::Cloud(Trigger::Prefer);
        }
        let choice = choice.filter(|_| self.tried.len() < self.facts.max_attempts.max(1));
        match choice {
            None if !self.tried.is_empty() => self.exhausted(context, now),
            None => self.nobody(context, now),
            Some(choice) if !choice.saturated => match choice.order.into_iter().next() {
                Some(node) => Step::Run { node, reason: choice.reason },
                None => self.nobody(context, now),
            },
            Some(choice) => self.busy(&choice, now),
        }
    }

    /// The attempt on `node` failed before its first byte. A failure of the
    /// target (unreachable, timed out, overloaded, or a peer that lost the
    /// model since its last gossip) moves on to another node; a failure of
    /// the request itself ends the journey.
    pub fn failed(&mut self, node: &str, is_peer: bool, err: ServeError) {
        let lost_model = is_peer && matches!(err, ServeError::ModelNotFound(_));
        if err.is_retryable() || lost_model {
            self.tried.push(node.to_string());
            self.last_error = Some(err);
        } else {
            self.fatal = Some(err);
        }
    }

    /// The cloud failed for `trigger`. A preferred cloud falls back to the
    /// mesh, an overflow keeps waiting for the mesh; a cloud that was the
    /// last resort ends the journey with its error.
    pub fn cloud_failed(&mut self, trigger: Trigger, err: ServeError) {
        match trigger {
            Trigger::Prefer => {}
            Trigger::Overflow => self.overflow_failed = true,
            Trigger::Absent | Trigger::Failover => self.fatal = Some(err),
        }
    }

    fn allows(&self, trigger: Trigger) -> bool {
        self.facts.cloud.as_ref().is_some_and(|c| c.policy.allows(trigger))
    }

    /// Why the cloud was not used, when a provider could have served it.
    fn cloud_refusal(&self) -> Option<String> {
        self.facts.cloud.as_ref().map(|c| c.policy.refusal())
    }

    /// Every node that could serve it failed (or the attempts are used up).
    /// When a node that serves it is expected back (a peer whose
    /// connection just broke is suspect now), they are all tried again
    /// after a pause while the deadline allows; otherwise the journey ends.
    fn exhausted(&mut self, context: &Context, now: Instant) -> Step {
        if !self.failover_sent && self.allows(Trigger::Failover) {
            self.failover_sent = true;
            return Step::Cloud(Trigger::Failover);
        }
        let unreachable =
            matches!(self.last_error, Some(ServeError::BackendUnreachable(_) | ServeError::BackendUnavailable(_)));
        if unreachable && context.expected_back && now + LOOK_AGAIN * 2 < self.facts.deadline {
            self.tried.clear();
            return Step::Await { until: now + LOOK_AGAIN * 2 };
        }
        let last = self.last_error.take().unwrap_or_else(|| ServeError::Internal("no attempt was made".into()));
        Step::Fail(match self.cloud_refusal() {
            Some(refusal) => ServeError::from_code(last.code(), format!("{}; {refusal}", last.message())),
            None => last,
        })
    }

    /// No node can take the model now, and none was tried.
    fn nobody(&self, context: &Context, now: Instant) -> Step {
        let model = &self.facts.model;
        // Drained for all this node knows; but a node that has just
        // (re)started waits to hear from the peers first.
        if context.drained_here && !(context.expected_back && now + LOOK_AGAIN < self.facts.deadline) {
            return Step::Fail(ServeError::Drained(format!(
                "every node that serves '{model}' is drained by an operator; `llmesh node undrain NODE` puts one back (`llmesh status` lists them)"
            )));
        }
        if self.allows(Trigger::Absent) {
            return Step::Cloud(Trigger::Absent);
        }
        if let Some(why) = &context.unavailable {
            // Wait, don't refuse: a node that serves it is expected back.
            if context.expected_back && now + LOOK_AGAIN < self.facts.deadline {
                return Step::Await { until: self.facts.deadline };
            }
            let refusal = self.cloud_refusal().map(|r| format!("; {r}")).unwrap_or_default();
            return Step::Fail(ServeError::BackendUnavailable(format!("{why}{refusal}")));
        }
        if let Some(refusal) = self.cloud_refusal() {
            return Step::Fail(ServeError::CloudNotAllowed(format!(
                "no node of the mesh serves '{model}' and only a cloud provider does, but {refusal}"
            )));
        }
        Step::Explain
    }

    /// Every candidate is busy in every slot (or a free one would first
    /// have to load the model).
    fn busy(&self, choice: &Choice, now: Instant) -> Step {
        let overflow_after = self.facts.cloud.as_ref().map_or(Duration::MAX, |c| c.overflow_after);
        if !self.overflow_failed && choice.estimate >= overflow_after && self.allows(Trigger::Overflow) {
            return Step::Cloud(Trigger::Overflow);
        }
        if choice.estimate > self.facts.max_expected_wait {
            let refusal = self.cloud_refusal().map(|r| format!("; {r}")).unwrap_or_default();
            return Step::Fail(ServeError::Saturated(format!(
                "every node that serves '{}' is busy; the expected wait of {:.0} s exceeds mesh.max_expected_wait ({:.0} s){refusal}",
                self.facts.model,
                choice.estimate.as_secs_f64(),
                self.facts.max_expected_wait.as_secs_f64()
            )));
        }
        if now >= self.facts.deadline {
            return Step::Fail(ServeError::Timeout("no slot freed before the queue timeout".into()));
        }
        // The request waits where a slot will free: at the two nodes
        // expected to free one first, running at whichever does (late
        // binding: estimates of busy nodes are often off), or only at the
        // conversation's holder, whose cache is worth the wait.
        let places = if choice.reason == Reason::Affinity { 1 } else { RESERVATIONS };
        let nodes: Vec<String> = choice.order.iter().take(places).cloned().collect();
        match nodes.as_slice() {
            [] => Step::Wait { until: self.facts.deadline },
            [only] if only == LOCAL => Step::Wait { until: self.facts.deadline },
            [only] => Step::Run { node: only.clone(), reason: choice.reason },
            _ => Step::Reserve { nodes },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::fallback::CloudPolicyName;

    const SEC: Duration = Duration::from_secs(1);

    fn facts(now: Instant, cloud: Option<CloudPolicyName>) -> Facts {
        Facts {
            model: "m".into(),
            deadline: now + 10 * SEC,
            max_attempts: 3,
            max_expected_wait: 60 * SEC,
            cloud: cloud.map(|policy| CloudFacts {
                policy: CloudPolicy { policy, source: "test".into(), prefer: false },
                overflow_after: 5 * SEC,
            }),
        }
    }

    fn choice(order: &[&str], saturated: bool, estimate: Duration) -> Option<Choice> {
        Some(Choice {
            order: order.iter().map(|s| s.to_string()).collect(),
            estimate,
            saturated,
            reason: Reason::Soonest,
        })
    }

    fn run(node: &str) -> Step {
        Step::Run { node: node.into(), reason: Reason::Soonest }
    }

    #[test]
    fn a_free_node_runs_the_request() {
        let now = Instant::now();
        let mut plan = Plan::new(facts(now, None));
        assert_eq!(plan.decide(choice(&["a", "b"], false, Duration::ZERO), &Context::default(), now), run("a"));
    }

    #[test]
    fn failover_moves_on_and_never_returns_to_a_failed_node() {
        let now = Instant::now();
        let mut plan = Plan::new(facts(now, None));
        assert_eq!(plan.decide(choice(&["a", "b", "c"], false, Duration::ZERO), &Context::default(), now), run("a"));
        plan.failed("a", true, ServeError::BackendUnreachable("gone".into()));
        assert!(plan.excludes("a"));
        // The router asks the scheduler again without "a".
        assert_eq!(plan.decide(choice(&["b", "c"], false, Duration::ZERO), &Context::default(), now), run("b"));
        plan.failed("b", true, ServeError::ModelNotFound("m".into()));
        assert_eq!(plan.tried(), ["a", "b"]);
        assert_eq!(plan.decide(choice(&["c"], false, Duration::ZERO), &Context::default(), now), run("c"));
        plan.failed("c", false, ServeError::Timeout("slow".into()));
        // Attempts used up: the last error, as it was.
        let step = plan.decide(choice(&["d"], false, Duration::ZERO), &Context::default(), now);
        assert_eq!(step, Step::Fail(ServeError::Timeout("slow".into())));
    }

    #[test]
    fn a_bad_request_is_not_tried_elsewhere() {
        let now = Instant::now();
        let mut plan = Plan::new(facts(now, Some(CloudPolicyName::Allowed)));
        plan.failed("a", true, ServeError::BadRequest("no".into()));
        assert_eq!(
            plan.decide(choice(&["b"], false, Duration::ZERO), &Context::default(), now),
            Step::Fail(ServeError::BadRequest("no".into()))
        );
        // The local node not having the model is final too (only a peer
        // can have lost it since its gossip).
        let mut plan = Plan::new(facts(now, None));
        plan.failed("me", false, ServeError::ModelNotFound("m".into()));
        assert!(matches!(
            plan.decide(choice(&["b"], false, Duration::ZERO), &Context::default(), now),
            Step::Fail(ServeError::ModelNotFound(_))
        ));
    }

    #[test]
    fn a_saturated_mesh_waits_here_until_the_deadline_when_this_node_frees_first() {
        let now = Instant::now();
        let mut plan = Plan::new(facts(now, None));
        let busy = || choice(&[LOCAL], true, 2 * SEC);
        assert_eq!(plan.decide(busy(), &Context::default(), now), Step::Wait { until: now + 10 * SEC });
        assert_eq!(plan.decide(busy(), &Context::default(), now + 9 * SEC), Step::Wait { until: now + 10 * SEC });
        let late = plan.decide(busy(), &Context::default(), now + 10 * SEC);
        assert!(matches!(late, Step::Fail(ServeError::Timeout(_))), "{late:?}");
        // A slot freed before the deadline: it runs.
        assert_eq!(plan.decide(choice(&["a"], false, Duration::ZERO), &Context::default(), now + 11 * SEC), run("a"));
    }

    #[test]
    fn a_saturated_mesh_queues_the_request_where_slots_free_first_and_runs_it_at_the_first() {
        let now = Instant::now();
        let mut plan = Plan::new(facts(now, None));
        let with = |order: &[&str], reason| Some(Choice { reason, ..choice(order, true, 2 * SEC).expect("choice") });
        // Late binding: the two soonest places, this node's among them.
        let step = plan.decide(with(&["b", LOCAL, "c"], Reason::Queued), &Context::default(), now);
        assert_eq!(step, Step::Reserve { nodes: vec!["b".into(), LOCAL.into()] });
        // A conversation waits only at its holder, for its cache.
        let step = plan.decide(with(&["b", "c"], Reason::Affinity), &Context::default(), now);
        assert_eq!(step, Step::Run { node: "b".into(), reason: Reason::Affinity });
        let queued = with(&["b"], Reason::Queued);
        assert_eq!(
            plan.decide(queued.clone(), &Context::default(), now),
            Step::Run { node: "b".into(), reason: Reason::Queued }
        );
        // Its queue timed out: the next decision is without it.
        plan.failed("b", true, ServeError::Timeout("no slot freed on node b".into()));
        assert!(plan.excludes("b"));
        // Past the deadline nothing more is tried.
        let late = plan.decide(queued, &Context::default(), now + 10 * SEC);
        assert!(matches!(late, Step::Fail(ServeError::Timeout(_))), "{late:?}");
    }

    #[test]
    fn an_expected_wait_beyond_the_limit_is_refused_at_once() {
        let now = Instant::now();
        let mut plan = Plan::new(facts(now, Some(CloudPolicyName::Never)));
        let step = plan.decide(choice(&["a"], true, 61 * SEC), &Context::default(), now);
        let Step::Fail(ServeError::Saturated(message)) = step else { panic!("{step:?}") };
        assert!(
            message.contains("exceeds mesh.max_expected_wait") && message.contains("'never' from test"),
            "{message}"
        );
    }

    #[test]
    fn cloud_policy_decides_each_trigger() {
        let now = Instant::now();
        let ctx = Context::default();
        // Absent: any policy but never.
        for (policy, absent) in [(CloudPolicyName::Failover, true), (CloudPolicyName::Never, false)] {
            let step = Plan::new(facts(now, Some(policy))).decide(None, &ctx, now);
            if absent {
                assert_eq!(step, Step::Cloud(Trigger::Absent));
            } else {
                assert!(matches!(step, Step::Fail(ServeError::CloudNotAllowed(_))), "{step:?}");
            }
        }
        // Overflow: only overflow/allowed, only past overflow_after, and not
        // again after the cloud failed (the request keeps waiting instead).
        let busy = choice(&[LOCAL], true, 6 * SEC);
        let mut plan = Plan::new(facts(now, Some(CloudPolicyName::Overflow)));
        assert_eq!(plan.decide(busy.clone(), &ctx, now), Step::Cloud(Trigger::Overflow));
        plan.cloud_failed(Trigger::Overflow, ServeError::BackendUnreachable("down".into()));
        assert!(matches!(plan.decide(busy.clone(), &ctx, now), Step::Wait { .. }));
        let mut plan = Plan::new(facts(now, Some(CloudPolicyName::Failover)));
        assert!(matches!(plan.decide(busy.clone(), &ctx, now), Step::Wait { .. }));
        assert!(matches!(plan.decide(choice(&[LOCAL], true, 4 * SEC), &ctx, now), Step::Wait { .. }));
        // Failover: once every node failed, then the cloud's own error.
        plan.failed("a", true, ServeError::BackendUnreachable("gone".into()));
        assert_eq!(plan.decide(None, &ctx, now), Step::Cloud(Trigger::Failover));
        plan.cloud_failed(Trigger::Failover, ServeError::Timeout("cloud slow".into()));
        assert_eq!(plan.decide(None, &ctx, now), Step::Fail(ServeError::Timeout("cloud slow".into())));
        // Failover refused: the node's error says why the cloud was not used.
        let mut plan = Plan::new(facts(now, Some(CloudPolicyName::Overflow)));
        plan.failed("a", true, ServeError::BackendUnreachable("gone".into()));
        // Unreachable and expected back: tried again after a pause while
        // the deadline allows.
        let coming = Context { expected_back: true, ..ctx.clone() };
        assert!(matches!(plan.decide(None, &coming, now), Step::Await { .. }));
        assert!(plan.tried().is_empty());
        plan.failed("a", true, ServeError::BackendUnreachable("gone".into()));
        let deadline = plan.facts().deadline;
        assert!(matches!(plan.decide(None, &coming, deadline), Step::Fail(_)), "not past the deadline");
        plan.failed("a", true, ServeError::BackendUnreachable("gone".into()));
        let Step::Fail(err) = plan.decide(None, &ctx, now) else { panic!("not expected back: fails at once") };
        assert_eq!(err.code(), "backend_unreachable");
        assert!(err.message().contains("gone; the cloud is not allowed"), "{err}");
    }

    #[test]
    fn a_preferred_cloud_goes_first_and_falls_back_to_the_mesh() {
        let now = Instant::now();
        let mut f = facts(now, Some(CloudPolicyName::Allowed));
        if let Some(cloud) = &mut f.cloud {
            cloud.policy.prefer = true;
        }
        let mut plan = Plan::new(f);
        let free = || choice(&["a"], false, Duration::ZERO);
        assert_eq!(plan.decide(free(), &Context::default(), now), Step::Cloud(Trigger::Prefer));
        plan.cloud_failed(Trigger::Prefer, ServeError::BackendUnreachable("down".into()));
        assert_eq!(plan.decide(free(), &Context::default(), now), run("a"));
    }

    #[test]
    fn nobody_serving_explains_why() {
        let now = Instant::now();
        let mut plan = Plan::new(facts(now, None));
        assert_eq!(plan.decide(None, &Context::default(), now), Step::Explain);
        let drained = Context { drained_here: true, ..Context::default() };
        let Step::Fail(err) = plan.decide(None, &drained, now) else { panic!("fails") };
        assert!(err.message().contains("llmesh node undrain"));
        let down = Context { unavailable: Some("b (backend down) serve it".into()), ..Context::default() };
        assert_eq!(
            plan.decide(None, &down, now),
            Step::Fail(ServeError::BackendUnavailable("b (backend down) serve it".into()))
        );
        // Expected back: the request waits for it until its deadline.
        let coming = Context { expected_back: true, ..down.clone() };
        let deadline = plan.facts().deadline;
        assert_eq!(plan.decide(None, &coming, now), Step::Await { until: deadline });
        assert_eq!(
            plan.decide(None, &coming, deadline),
            Step::Fail(ServeError::BackendUnavailable("b (backend down) serve it".into())),
            "past the deadline it fails with the reason"
        );
    }
}
