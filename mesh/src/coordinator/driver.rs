//! The task that owns the raft-rs `RawNode`: ticks it, feeds it messages
//! and proposals, persists and applies its `Ready`s, and — while leader —
//! manages voters and model placement.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmesh_proto::{Command, Member};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, HardState, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::placement::Planner;
use super::state::ClusterState;
use super::storage::DiskStorage;
use super::transport::Transport;
use super::voters::{Plan, Seen, VoterChange};
use super::{Applied, CoordinatorConfig, CoordinatorError, Input, ProposeError, RaftStatus, raft_id};
use crate::membership::{Membership, MeshView};
use crate::peers::Liveness;

/// Proposal ids travel in the entry's context so the proposing node can
/// match the applied entry to its waiting caller.
type Pending = HashMap<u64, PendingWrite>;

/// A write waiting to be applied: kept whole so it can be proposed again
/// when the leader changes (a proposal forwarded to a leader that was cut
/// off is lost; re-proposing it to the new one commits it within the
/// election time instead of failing at the write timeout).
struct PendingWrite {
    reply: oneshot::Sender<Result<Applied, ProposeError>>,
    command: Vec<u8>,
    deadline_ms: u64,
}

/// A forwarded proposal this close to its caller's deadline is refused by
/// the leader: the caller is about to hear "not committed".
const DEADLINE_MARGIN_MS: u64 = 500;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Entry context: the proposal id, then the wall-clock time (Unix ms)
/// after which the proposer no longer waits for it.
fn proposal_context(id: u64, deadline_ms: u64) -> Vec<u8> {
    let mut context = id.to_be_bytes().to_vec();
    context.extend_from_slice(&deadline_ms.to_be_bytes());
    context
}

fn context_id(context: &[u8]) -> Option<u64> {
    context.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes)
}

fn context_deadline(context: &[u8]) -> Option<u64> {
    context.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes)
}

/// Whether a proposal forwarded by a follower is too late to append: a
/// message delayed by a partition (TCP retransmits it after healing) must
/// not commit a write whose caller was already told it failed.
fn expired(message: &Message, now_ms: u64) -> bool {
    message.get_msg_type() == raft::eraftpb::MessageType::MsgPropose
        && message
            .entries
            .iter()
            .any(|e| context_deadline(&e.context).is_some_and(|d| d < now_ms.saturating_add(DEADLINE_MARGIN_MS)))
}

pub(super) struct Driver {
    raw: RawNode<DiskStorage>,
    state: ClusterState,
    state_tx: watch::Sender<Arc<ClusterState>>,
    status_tx: watch::Sender<RaftStatus>,
    pending: Pending,
    transport: Transport,
    membership: Membership,
    directory: HashMap<u64, SocketAddr>,
    config: CoordinatorConfig,
    planner: Planner,
    /// The leader as of the last Ready (0: none known).
    last_leader: u64,
    /// Highest commit index seen in a leader's appends (see
    /// [`RaftStatus::leader_commit`]).
    leader_commit: u64,
    /// When this driver started: a member the leader has not heard from at
    /// all has been gone at most this long as far as it knows.
    started: Instant,
    /// When the last heartbeat went to each learner (see
    /// [`LEARNER_HEARTBEAT`]).
    learner_beats: HashMap<u64, Instant>,
    shutdown: CancellationToken,
}

/// How often the leader's heartbeats reach a learner. Voters need one
/// every two ticks to keep a leader; a learner never campaigns and learns
/// new entries from appends, so the heartbeat only tells it the commit
/// index and the leader that it is there. At 100 nodes the leader's
/// heartbeats to every learner five times a second were most of the
/// control plane's traffic at rest.
const LEARNER_HEARTBEAT: Duration = Duration::from_secs(3);

impl Driver {
    pub(super) fn open(
        config: &CoordinatorConfig,
        membership: Membership,
        inbox: mpsc::Sender<Input>,
        tag: &str,
        shutdown: CancellationToken,
    ) -> Result<Driver, CoordinatorError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| CoordinatorError::Config(format!("cannot create {}: {e}", config.data_dir.display())))?;
        let mut store = DiskStorage::open(&config.data_dir.join("raft.redb"))?;
        let id = raft_id(&config.node_id);
        if store.is_empty() {
            if let Some(admin_hash) = &config.seed {
                bootstrap(&mut store, id, config, admin_hash.clone())?;
                tracing::info!(raft_id = id, "started a new Raft group with this node as its first voter");
            } else {
                tracing::info!(raft_id = id, "waiting for the leader to add this node to the Raft group");
            }
        }
        let snapshot = store.latest_snapshot().clone();
        let meta = snapshot.get_metadata();
        let state = if snapshot.data.is_empty() {
            ClusterState::default()
        } else {
            let conf = meta.get_conf_state();
            ClusterState::from_snapshot(&snapshot.data, meta.index, &conf.voters, &conf.learners)?
        };
        let raft_config = raft::Config {
            id,
            election_tick: config.election_ticks,
            heartbeat_tick: (config.election_ticks / 5).max(1),
            applied: meta.index,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..raft::Config::default()
        };
        raft_config.validate()?;
        let raw = RawNode::new(&raft_config, store, &super::logger::logger())?;
        let (state_tx, _) = watch::channel(Arc::new(state.clone()));
        let (status_tx, _) = watch::channel(RaftStatus { id, ..RaftStatus::default() });
        Ok(Driver {
            raw,
            state,
            state_tx,
            status_tx,
            pending: HashMap::new(),
            transport: Transport::new(id, tag, inbox, config.trust.clone(), shutdown.clone()),
            membership,
            directory: HashMap::new(),
            planner: Planner::new(config.placement.clone()),
            started: Instant::now(),
            learner_beats: HashMap::new(),
            last_leader: 0,
            leader_commit: 0,
            config: config.clone(),
            shutdown,
        })
    }

    pub(super) fn state_receiver(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state_tx.subscribe()
    }

    pub(super) fn status_receiver(&self) -> watch::Receiver<RaftStatus> {
        self.status_tx.subscribe()
    }

    pub(super) async fn run(mut self, mut inbox: mpsc::Receiver<Input>) {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut view = self.membership.watch();
        self.refresh_directory(&view.borrow_and_update());
        let mut last_duties = Instant::now();
        let mut problem = self.config.trust.watch_problem();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                changed = problem.changed() => {
                    let revoked = matches!(*problem.borrow_and_update(), Some(crate::pki::MemberProblem::Revoked(_)));
                    if changed.is_err() || revoked {
                        // A revoked node takes no further part: no votes, no campaigns.
                        tracing::info!("this node left the Raft group: it was revoked");
                        break;
                    }
                }
                _ = ticker.tick() => {
                    self.raw.tick();
                },
                changed = view.changed() => {
                    if changed.is_err() { break; }
                    let snapshot = view.borrow_and_update().clone();
                    self.refresh_directory(&snapshot);
                }
                input = inbox.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    // Take whatever else is already queued before the next Ready.
                    for _ in 0..1024 {
                        match inbox.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(err) = self.on_ready() {
                tracing::error!(error = %err, "raft store failed; this node stops taking part in the Raft group");
                break;
            }
            self.follow_leader();
            if last_duties.elapsed() >= Duration::from_millis(250) {
                last_duties = Instant::now();
                self.pending.retain(|_, write| !write.reply.is_closed());
                if self.raw.raft.state == StateRole::Leader {
                    self.leader_duties();
                }
            }
        }
        for (_, write) in self.pending.drain() {
            let _ = write.reply.send(Err(ProposeError::Stopped));
        }
        tracing::debug!("raft driver stopped");
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft(message) => {
                if expired(&message, unix_ms()) {
                    tracing::info!(from = message.from, "dropped a forwarded proposal past its caller's deadline");
                    return;
                }
                if message.get_msg_type() == MessageType::MsgAppend {
                    self.leader_commit = self.leader_commit.max(message.commit);
                }
                if let Err(err) = self.raw.step(*message) {
                    tracing::debug!(error = %err, "raft message ignored");
                }
            }
            Input::Propose { command, reply } => {
                let id = rand::random::<u64>();
                let deadline_ms = unix_ms().saturating_add(self.config.write_timeout.as_millis() as u64);
                let command = command.encode_to_vec();
                match self.raw.propose(proposal_context(id, deadline_ms), command.clone()) {
                    Ok(()) => {
                        self.pending.insert(id, PendingWrite { reply, command, deadline_ms });
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "proposal refused");
                        let _ = reply.send(Err(ProposeError::NoLeader));
                    }
                }
            }
            Input::Unreachable(id) => self.raw.report_unreachable(id),
            Input::SnapshotSent { to, ok } => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.raw.report_snapshot(to, status);
            }
        }
    }

    /// Proposes the waiting writes again when a new leader is known: those
    /// forwarded to the old one may never have reached it.
    fn follow_leader(&mut self) {
        let leader = self.raw.raft.leader_id;
        if leader == self.last_leader {
            return;
        }
        self.last_leader = leader;
        if leader == raft::INVALID_ID || self.pending.is_empty() {
            return;
        }
        let now = unix_ms();
        let mut again = 0;
        for (id, write) in &self.pending {
            if write.deadline_ms > now
                && self.raw.propose(proposal_context(*id, write.deadline_ms), write.command.clone()).is_ok()
            {
                again += 1;
            }
        }
        tracing::info!(leader, writes = again, "a new leader: proposed the waiting writes again");
    }

    fn refresh_directory(&mut self, view: &MeshView) {
        self.directory = view
            .peers
            .iter()
            .filter_map(|p| {
                let addr = p.state.control_addr.parse::<SocketAddr>().ok()?;
                Some((raft_id(&p.state.node_id), addr))
            })
            .collect();
    }

    fn send_all(&mut self, messages: Vec<Message>) {
        let now = Instant::now();
        for message in messages {
            let to = message.to;
            if message.get_msg_type() == MessageType::MsgHeartbeat && self.state.learners.contains(&to) {
                let recent = self.learner_beats.get(&to).is_some_and(|at| now.duration_since(*at) < LEARNER_HEARTBEAT);
                if recent {
                    continue;
                }
                self.learner_beats.insert(to, now);
            }
            let sent = match self.directory.get(&to) {
                Some(addr) => self.transport.send(message, *addr),
                None => false,
            };
            if !sent {
                self.raw.report_unreachable(to);
            }
        }
    }

    /// Applies the entries this node's own log already holds as committed
    /// (a restart), so the state it serves from its first request is the
    /// one it had, not the last compacted snapshot.
    pub(super) fn catch_up_locally(&mut self) -> Result<(), CoordinatorError> {
        let before = self.state.applied_index;
        self.on_ready()?;
        if self.state.applied_index > before {
            tracing::info!(
                from = before,
                to = self.state.applied_index,
                "replayed committed entries from the local log"
            );
        }
        Ok(())
    }

    fn on_ready(&mut self) -> Result<(), CoordinatorError> {
        if !self.raw.has_ready() {
            self.publish_status();
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // A leader may send before persisting (Raft thesis §10.2.1).
        self.send_all(ready.take_messages());
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        self.raw.mut_store().persist(snapshot.as_ref(), ready.entries(), ready.hs())?;
        if let Some(snapshot) = &snapshot {
            self.restore(snapshot)?;
        }
        self.apply(ready.take_committed_entries())?;
        self.send_all(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send_all(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_compact()?;
        self.publish_status();
        Ok(())
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), CoordinatorError> {
        let meta = snapshot.get_metadata();
        let conf = meta.get_conf_state();
        self.state = ClusterState::from_snapshot(&snapshot.data, meta.index, &conf.voters, &conf.learners)?;
        tracing::info!(index = meta.index, "installed a snapshot from the leader");
        self.state_tx.send_replace(Arc::new(self.state.clone()));
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), CoordinatorError> {
        if entries.is_empty() {
            return Ok(());
        }
        for entry in entries {
            let outcome = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => None,
                EntryType::EntryNormal
                    if context_id(&entry.context).is_some_and(|id| !self.state.first_application(id)) =>
                {
                    // A re-proposed write whose first copy committed too.
                    None
                }
                EntryType::EntryNormal => Some(match Command::decode(&entry.data[..]) {
                    Ok(command) => self.state.apply(&command).map_err(ProposeError::from),
                    Err(err) => {
                        tracing::error!(index = entry.index, error = %err, "undecodable command in the log; skipped");
                        Err(ProposeError::Rejected(super::state::ApplyError::Invalid("undecodable command".into())))
                    }
                }),
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| CoordinatorError::Config(format!("undecodable membership change: {e}")))?;
                    let conf = self.raw.apply_conf_change(&change)?;
                    self.raw.mut_store().set_conf_state(conf.clone())?;
                    let added = match change.get_change_type() {
                        ConfChangeType::RemoveNode => None,
                        _ => Member::decode(&change.context[..]).ok().filter(|m| m.raft_id == change.node_id),
                    };
                    self.state.set_configuration(&conf.voters, &conf.learners, added);
                    tracing::info!(voters = ?conf.voters, learners = ?conf.learners, "raft configuration changed");
                    Some(Ok(String::from("configuration changed")))
                }
                EntryType::EntryConfChangeV2 => {
                    let change = raft::eraftpb::ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| CoordinatorError::Config(format!("undecodable membership change: {e}")))?;
                    let conf = self.raw.apply_conf_change(&change)?;
                    self.raw.mut_store().set_conf_state(conf.clone())?;
                    self.state.set_configuration(&conf.voters, &conf.learners, None);
                    Some(Ok(String::from("configuration changed")))
                }
            };
            self.state.applied_index = entry.index;
            if let (Some(outcome), Some(id)) = (outcome, context_id(&entry.context))
                && let Some(write) = self.pending.remove(&id)
            {
                let _ = write.reply.send(outcome.map(|message| Applied { index: entry.index, message }));
            }
        }
        let (index, data) = (self.state.applied_index, self.state.encode());
        self.raw.mut_store().set_applied(index, data);
        self.state_tx.send_replace(Arc::new(self.state.clone()));
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), CoordinatorError> {
        if self.raw.mut_store().log_len() as u64 <= self.config.snapshot_every {
            return Ok(());
        }
        let applied = self.state.applied_index;
        let data = self.state.encode();
        self.raw.mut_store().compact(applied, data)?;
        tracing::debug!(index = applied, "compacted the raft log into a snapshot");
        Ok(())
    }

    fn publish_status(&self) {
        let raft = &self.raw.raft;
        let role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
            StateRole::Follower if self.state.learners.contains(&raft.id) => "learner",
            StateRole::Follower if !self.state.voters.contains(&raft.id) => "joining",
            StateRole::Follower => "follower",
        };
        let status = RaftStatus {
            id: raft.id,
            role,
            leader: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.state.applied_index,
            leader_commit: self.leader_commit,
            leader_addr: (raft.leader_id != raft.id).then(|| self.directory.get(&raft.leader_id).copied()).flatten(),
        };
        self.status_tx.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }

    fn leader_duties(&mut self) {
        let view = self.membership.view();
        self.manage_voters(&view);
        let local = self.membership.local_state();
        let nodes: Vec<&llmesh_proto::NodeState> = view
            .peers
            .iter()
            .filter(|p| p.liveness == Liveness::Alive)
            .map(|p| &p.state)
            .chain(local.as_ref())
            .collect();
        if let Some(command) = self.planner.plan(&self.state, &nodes, Instant::now()) {
            let context = proposal_context(rand::random(), u64::MAX);
            if let Err(err) = self.raw.propose(context, command.encode_to_vec()) {
                tracing::debug!(error = %err, "placement proposal dropped");
            }
        }
    }

    fn manage_voters(&mut self, view: &MeshView) {
        let raft = &self.raw.raft;
        if raft.pending_conf_index > raft.raft_log.applied {
            return;
        }
        let leader = raft.id;
        let mut seen: Vec<Seen> = view
            .peers
            .iter()
            .filter(|p| !p.state.control_addr.is_empty())
            .map(|p| Seen {
                raft_id: raft_id(&p.state.node_id),
                node_id: p.state.node_id.clone(),
                name: p.state.name.clone(),
                gone_for: (p.liveness != Liveness::Alive || p.state.draining).then_some(p.last_seen_ago),
            })
            .collect();
        seen.push(Seen {
            raft_id: leader,
            node_id: self.config.node_id.clone(),
            name: self.config.name.clone(),
            gone_for: None,
        });
        let unheard_for = self.started.elapsed();
        for id in self.state.voters.iter().chain(self.state.learners.iter()) {
            if seen.iter().all(|s| s.raft_id != *id) {
                let (node_id, name) =
                    self.state.members.get(id).map(|m| (m.node_id.clone(), m.name.clone())).unwrap_or_default();
                seen.push(Seen { raft_id: *id, node_id, name, gone_for: Some(unheard_for) });
            }
        }
        let removed: BTreeSet<u64> = self.state.removed.iter().map(|n| raft_id(n)).collect();
        let plan = Plan {
            leader,
            voters: &self.state.voters,
            learners: &self.state.learners,
            seen: &seen,
            removed: &removed,
            target: self.config.target_voters,
            promote_after: self.config.replace_after / 3,
            replace_after: self.config.replace_after,
        };
        let Some(change) = plan.next() else { return };
        let mut cc = ConfChange::default();
        match change {
            VoterChange::AddLearner(id) => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = id;
                if let Some(s) = seen.iter().find(|s| s.raft_id == id) {
                    let member = Member { raft_id: id, node_id: s.node_id.clone(), name: s.name.clone() };
                    cc.context = member.encode_to_vec().into();
                }
            }
            VoterChange::Promote(id) => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
                if let Some(member) = self.state.members.get(&id) {
                    cc.context = member.encode_to_vec().into();
                }
            }
            VoterChange::Remove(id) => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
            }
        }
        tracing::info!(?change, "changing the raft configuration");
        if let Err(err) = self.raw.propose_conf_change(Vec::new(), cc) {
            tracing::debug!(error = %err, "configuration change not proposed");
        }
    }
}

/// Writes the first snapshot of a new group: this node as its only voter,
/// the admin credential's hash, this node as a member.
fn bootstrap(
    store: &mut DiskStorage,
    id: u64,
    config: &CoordinatorConfig,
    admin_hash: Vec<u8>,
) -> Result<(), CoordinatorError> {
    let mut state = ClusterState::new(admin_hash);
    state.set_configuration(
        &[id],
        &[],
        Some(Member { raft_id: id, node_id: config.node_id.clone(), name: config.name.clone() }),
    );
    let mut snapshot = Snapshot { data: state.encode().into(), ..Snapshot::default() };
    let meta = snapshot.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.mut_conf_state().voters = vec![id];
    let hard = HardState { term: 1, commit: 1, ..HardState::default() };
    store.persist(Some(&snapshot), &[], Some(&hard))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(deadline_ms: u64) -> Message {
        let mut message = Message::default();
        message.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
        message.entries.push(Entry { context: proposal_context(7, deadline_ms).into(), ..Entry::default() });
        message
    }

    #[test]
    fn late_forwarded_proposals_are_refused() {
        assert_eq!(context_id(&proposal_context(7, 9)), Some(7));
        assert!(!expired(&proposal(10_000), 1_000));
        assert!(expired(&proposal(1_200), 1_000), "inside the margin");
        assert!(expired(&proposal(500), 1_000));
        let mut heartbeat = proposal(0);
        heartbeat.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
        assert!(!expired(&heartbeat, 1_000));
    }
}
