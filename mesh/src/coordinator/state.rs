//! The replicated cluster state and how each [`Command`] changes it.
//!
//! Plain data and functions: every node applies the same committed log in
//! the same order and must end in the same state, so nothing here reads a
//! clock, a random number generator or the network.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use llmesh_proto::{ApiKey, ClusterSnapshot, Command, KeyLimits, KeyUsage, Member, Placement, Route, command};
use prost::Message as _;

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// It names a key, route or node that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with the current state (a duplicate key, a route loop).
    #[error("{0}")]
    Invalid(String),
}

/// Everything the Raft log replicates. Read it through
/// [`super::Coordinator::state`]; change it only by proposing commands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// SHA-256 of the admin credential made by `llmesh init`.
    pub admin_token_sha256: Vec<u8>,
    /// Client API keys by id.
    pub keys: BTreeMap<String, ApiKey>,
    /// Model aliases: alias → model.
    pub routes: BTreeMap<String, String>,
    /// Node ids that get no new work.
    pub drained: BTreeSet<String>,
    /// Node ids removed by an operator: not re-added to the Raft group.
    pub removed: BTreeSet<String>,
    /// Node ids revoked by an operator: shut out of every plane for good.
    pub revoked: BTreeSet<String>,
    /// The join key new nodes must prove (empty: derived from the secret).
    pub join_key: Vec<u8>,
    /// The CA key sealed with the cluster secret (empty: not shared yet).
    pub sealed_ca_key: Vec<u8>,
    /// Bootstrap addresses join tokens carry.
    pub bootstrap: Vec<String>,
    /// The names revoked nodes had, by node id.
    pub revoked_names: BTreeMap<String, String>,
    /// Model → node ids it should stay loaded on.
    pub placement: BTreeMap<String, BTreeSet<String>>,
    /// Raft members by Raft id.
    pub members: BTreeMap<u64, Member>,
    /// Raft ids of the voters.
    pub voters: BTreeSet<u64>,
    /// Raft ids of the learners.
    pub learners: BTreeSet<u64>,
    /// Each key's use in its current budget period (the usage ledger).
    pub usage: BTreeMap<String, KeyUsage>,
    /// The last log index applied to this state.
    pub applied_index: u64,
    /// Ids of the last proposals applied, oldest first (see
    /// [`RECENT_PROPOSALS`]); part of the replicated state, so every node
    /// skips the same duplicates.
    pub recent_proposals: std::collections::VecDeque<u64>,
    key_by_hash: HashMap<Vec<u8>, String>,
}

/// Proposal ids remembered for de-duplication: far more than the writes
/// in flight across one leader change.
pub const RECENT_PROPOSALS: usize = 1024;

/// SHA-256 of a bearer secret, as stored in [`ApiKey::secret_sha256`].
pub fn secret_hash(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref().to_vec()
}

/// Compares two byte strings in time that depends only on their length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ClusterState {
    /// The state a new cluster starts with.
    pub fn new(admin_token_sha256: Vec<u8>) -> ClusterState {
        ClusterState { admin_token_sha256, ..ClusterState::default() }
    }

    /// Applies one committed command. Errors leave the state unchanged and
    /// are the same on every node.
    pub fn apply(&mut self, command: &Command) -> Result<String, ApplyError> {
        let Some(kind) = &command.kind else {
            return Err(ApplyError::Invalid(
                "an empty command, or one from a newer llmesh this node does not know".into(),
            ));
        };
        match kind {
            command::Kind::CreateKey(key) => self.create_key(key),
            command::Kind::RevokeKey(revoke) => {
                let key = self.key_mut(&revoke.id)?;
                key.revoked = true;
                Ok(format!("revoked key {}", revoke.id))
            }
            command::Kind::SetKeyLimits(update) => {
                let key = self.key_mut(&update.id)?;
                key.limits = Some(update.limits.clone().unwrap_or_default());
                Ok(format!("set limits of key {}", update.id))
            }
            command::Kind::SetRoute(route) => self.set_route(route),
            command::Kind::RemoveRoute(alias) => match self.routes.remove(alias) {
                Some(_) => Ok(format!("removed route {alias}")),
                None => Err(ApplyError::NotFound(format!("no route named {alias}"))),
            },
            command::Kind::SetDrained(drain) => {
                if drain.drained {
                    self.drained.insert(drain.node_id.clone());
                    Ok(format!("drained {}", drain.node_id))
                } else {
                    self.drained.remove(&drain.node_id);
                    Ok(format!("undrained {}", drain.node_id))
                }
            }
            command::Kind::SetJoinKey(key) => {
                if key.len() != 32 {
                    return Err(ApplyError::Invalid("a join key is 32 bytes".into()));
                }
                self.join_key = key.clone();
                Ok("rotated the join key: earlier join tokens no longer admit new nodes".into())
            }
            command::Kind::SetCaKey(sealed) => {
                if sealed.is_empty() {
                    return Err(ApplyError::Invalid("an empty CA key".into()));
                }
                self.sealed_ca_key = sealed.clone();
                Ok("shared the cluster CA key with the voters: any of them admits new nodes".into())
            }
            command::Kind::SetBootstrap(list) => {
                self.bootstrap = list.addrs.clone();
                Ok(format!("join tokens now carry {} bootstrap address(es)", list.addrs.len()))
            }
            command::Kind::RevokeNode(node_id) => {
                if let Some(member) = self.members.values().find(|m| &m.node_id == node_id) {
                    self.revoked_names.insert(node_id.clone(), member.name.clone());
                }
                self.revoked.insert(node_id.clone());
                self.take_out(node_id);
                Ok(format!("revoked {node_id}"))
            }
            command::Kind::RemoveNode(node_id) => {
                self.take_out(node_id);
                Ok(format!("removed {node_id}"))
            }
            command::Kind::RecordUsage(record) => Ok(self.record_usage(record)),
            command::Kind::SetPlacement(set) => {
                self.placement = set
                    .placement
                    .iter()
                    .filter(|p| !p.node_ids.is_empty())
                    .map(|p| (p.model.clone(), p.node_ids.iter().cloned().collect()))
                    .collect();
                Ok(format!("placement for {} models", self.placement.len()))
            }
        }
    }

    fn create_key(&mut self, key: &ApiKey) -> Result<String, ApplyError> {
        if key.id.is_empty() || key.secret_sha256.len() != 32 {
            return Err(ApplyError::Invalid("a key needs an id and a 32-byte secret hash".into()));
        }
        if self.keys.contains_key(&key.id) || self.key_by_hash.contains_key(&key.secret_sha256) {
            return Err(ApplyError::Invalid(format!("key {} already exists", key.id)));
        }
        self.key_by_hash.insert(key.secret_sha256.clone(), key.id.clone());
        self.keys.insert(key.id.clone(), key.clone());
        Ok(format!("created key {}", key.id))
    }

    fn set_route(&mut self, route: &Route) -> Result<String, ApplyError> {
        if route.alias.is_empty() || route.model.is_empty() {
            return Err(ApplyError::Invalid("a route needs an alias and a model".into()));
        }
        if route.alias == route.model || self.routes.contains_key(&route.model) {
            return Err(ApplyError::Invalid(format!(
                "route {} → {} would chain or loop: routes point at real models",
                route.alias, route.model
            )));
        }
        self.routes.insert(route.alias.clone(), route.model.clone());
        Ok(format!("route {} → {}", route.alias, route.model))
    }

    fn record_usage(&mut self, record: &llmesh_proto::RecordUsage) -> String {
        let mut counted = 0;
        for delta in &record.usage {
            let Some(key) = self.keys.get(&delta.key_id) else { continue };
            let period = match key.limits.as_ref().map(|l| l.budget_period.as_str()) {
                Some("day") => record.day.clone(),
                Some("month") => record.month.clone(),
                _ => String::new(),
            };
            let usage = self
                .usage
                .entry(delta.key_id.clone())
                .or_insert_with(|| KeyUsage { key_id: delta.key_id.clone(), ..KeyUsage::default() });
            // A newer period starts from zero; a batch from an older one still counts where it belongs.
            if usage.period < period {
                usage.period = period.clone();
                usage.tokens = 0;
                usage.requests = 0;
            }
            if usage.period == period {
                usage.tokens += delta.tokens;
                usage.requests += delta.requests;
                counted += 1;
            }
        }
        format!("usage of {counted} keys")
    }

    fn key_mut(&mut self, id: &str) -> Result<&mut ApiKey, ApplyError> {
        self.keys.get_mut(id).ok_or_else(|| ApplyError::NotFound(format!("no key with id {id}")))
    }

    /// Records the Raft configuration after a membership change; `added`
    /// names the node a change added.
    pub fn set_configuration(&mut self, voters: &[u64], learners: &[u64], added: Option<Member>) {
        self.voters = voters.iter().copied().collect();
        self.learners = learners.iter().copied().collect();
        if let Some(member) = added {
            self.members.insert(member.raft_id, member);
        }
        let keep: BTreeSet<u64> = self.voters.union(&self.learners).copied().collect();
        self.members.retain(|id, _| keep.contains(id));
    }

    /// The key a bearer secret belongs to, revoked or not.
    pub fn key_for_secret(&self, secret: &str) -> Option<&ApiKey> {
        self.key_by_hash.get(&secret_hash(secret)).and_then(|id| self.keys.get(id))
    }

    /// Whether clients must present an API key: once the first key exists.
    pub fn auth_required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The model an alias routes to.
    pub fn route(&self, model: &str) -> Option<&str> {
        self.routes.get(model).map(String::as_str)
    }

    /// A member by node name, node id, or a unique suffix of its id. An
    /// exact name or id wins over suffixes: a node named `a` must not be
    /// ambiguous because some other node's id happens to end in `a`.
    pub fn find_member(&self, reference: &str) -> Result<&Member, ApplyError> {
        let exact: Vec<&Member> =
            self.members.values().filter(|m| m.name == reference || m.node_id == reference).collect();
        let matches = if exact.is_empty() {
            self.members.values().filter(|m| m.node_id.ends_with(reference)).collect()
        } else {
            exact
        };
        match matches.as_slice() {
            [one] => Ok(one),
            [] => Err(ApplyError::NotFound(format!("no member named {reference}"))),
            _ => Err(ApplyError::Invalid(format!("{reference} matches {} nodes; use the node id", matches.len()))),
        }
    }

    /// Tokens `key_id` has used in `period` (0 when its ledger holds
    /// another period).
    pub fn tokens_used(&self, key_id: &str, period: &str) -> u64 {
        self.usage.get(key_id).filter(|u| u.period == period).map_or(0, |u| u.tokens)
    }

    /// Whether the operator drained or removed this node.
    pub fn is_out_of_service(&self, node_id: &str) -> bool {
        self.drained.contains(node_id) || self.removed.contains(node_id) || self.revoked.contains(node_id)
    }

    /// Removes `node_id` for good: no drain to lift, no model placed on it.
    fn take_out(&mut self, node_id: &str) {
        self.removed.insert(node_id.to_string());
        self.drained.remove(node_id);
        for nodes in self.placement.values_mut() {
            nodes.remove(node_id);
        }
    }

    /// The snapshot payload.
    pub fn to_snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            admin_token_sha256: self.admin_token_sha256.clone(),
            keys: self.keys.values().cloned().collect(),
            routes: self
                .routes
                .iter()
                .map(|(alias, model)| Route { alias: alias.clone(), model: model.clone() })
                .collect(),
            drained: self.drained.iter().cloned().collect(),
            removed: self.removed.iter().cloned().collect(),
            revoked: self.revoked.iter().cloned().collect(),
            join_key: self.join_key.clone(),
            sealed_ca_key: self.sealed_ca_key.clone(),
            bootstrap: self.bootstrap.clone(),
            revoked_names: self.revoked_names.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            placement: self
                .placement
                .iter()
                .map(|(model, nodes)| Placement { model: model.clone(), node_ids: nodes.iter().cloned().collect() })
                .collect(),
            members: self.members.values().cloned().collect(),
            usage: self.usage.values().cloned().collect(),
            recent_proposals: self.recent_proposals.iter().copied().collect(),
        }
    }

    /// Notes that the proposal `id` is being applied; `false` when it was
    /// applied before (a re-proposal whose first copy also committed).
    pub fn first_application(&mut self, id: u64) -> bool {
        if self.recent_proposals.contains(&id) {
            return false;
        }
        if self.recent_proposals.len() == RECENT_PROPOSALS {
            self.recent_proposals.pop_front();
        }
        self.recent_proposals.push_back(id);
        true
    }

    /// Encodes the snapshot payload.
    pub fn encode(&self) -> Vec<u8> {
        self.to_snapshot().encode_to_vec()
    }

    /// Rebuilds the state from a snapshot taken at `index` with the given
    /// Raft configuration.
    pub fn from_snapshot(
        bytes: &[u8],
        index: u64,
        voters: &[u64],
        learners: &[u64],
    ) -> Result<ClusterState, prost::DecodeError> {
        let snapshot = ClusterSnapshot::decode(bytes)?;
        let mut state = ClusterState {
            admin_token_sha256: snapshot.admin_token_sha256,
            routes: snapshot.routes.into_iter().map(|r| (r.alias, r.model)).collect(),
            drained: snapshot.drained.into_iter().collect(),
            removed: snapshot.removed.into_iter().collect(),
            revoked: snapshot.revoked.into_iter().collect(),
            join_key: snapshot.join_key,
            sealed_ca_key: snapshot.sealed_ca_key,
            bootstrap: snapshot.bootstrap,
            revoked_names: snapshot.revoked_names.into_iter().collect(),
            placement: snapshot.placement.into_iter().map(|p| (p.model, p.node_ids.into_iter().collect())).collect(),
            members: snapshot.members.into_iter().map(|m| (m.raft_id, m)).collect(),
            usage: snapshot.usage.into_iter().map(|u| (u.key_id.clone(), u)).collect(),
            recent_proposals: snapshot.recent_proposals.into_iter().collect(),
            applied_index: index,
            ..ClusterState::default()
        };
        for key in snapshot.keys {
            state.key_by_hash.insert(key.secret_sha256.clone(), key.id.clone());
            state.keys.insert(key.id.clone(), key);
        }
        state.voters = voters.iter().copied().collect();
        state.learners = learners.iter().copied().collect();
        Ok(state)
    }
}

/// Limits that let everything through.
pub fn unlimited() -> KeyLimits {
    KeyLimits::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_proto::{KeyLimitsUpdate, RevokeKey, SetDrained, SetPlacement};
    use proptest::prelude::*;

    fn key(id: &str, secret: &str) -> Command {
        Command {
            kind: Some(command::Kind::CreateKey(ApiKey {
                id: id.into(),
                name: format!("{id}-name"),
                secret_sha256: secret_hash(secret),
                created_at_ms: 1,
                revoked: false,
                limits: Some(unlimited()),
            })),
        }
    }

    #[test]
    fn a_proposal_applies_once_and_the_memory_survives_a_snapshot() {
        let mut state = ClusterState::default();
        assert!(state.first_application(7));
        assert!(!state.first_application(7), "the re-proposed copy is skipped");
        let restored = ClusterState::from_snapshot(&state.encode(), 1, &[1], &[]).expect("decodes");
        let mut restored = restored;
        assert!(!restored.first_application(7), "a node restored from the snapshot skips it too");
        for id in 100..100 + RECENT_PROPOSALS as u64 {
            assert!(restored.first_application(id));
        }
        assert!(restored.first_application(7), "bounded: the oldest ids are forgotten");
    }

    #[test]
    fn keys_are_found_by_secret_and_revocation_sticks() {
        let mut state = ClusterState::new(vec![1; 32]);
        assert!(!state.auth_required());
        state.apply(&key("k1", "secret-1")).expect("created");
        assert!(state.auth_required());
        assert_eq!(state.key_for_secret("secret-1").map(|k| k.id.as_str()), Some("k1"));
        assert!(state.key_for_secret("secret-2").is_none());
        assert!(state.apply(&key("k1", "other")).is_err(), "duplicate id");
        assert!(state.apply(&key("k2", "secret-1")).is_err(), "duplicate secret");
        let revoke = Command { kind: Some(command::Kind::RevokeKey(RevokeKey { id: "k1".into() })) };
        state.apply(&revoke).expect("revoked");
        assert!(state.key_for_secret("secret-1").is_some_and(|k| k.revoked));
        let missing = Command { kind: Some(command::Kind::RevokeKey(RevokeKey { id: "nope".into() })) };
        assert!(matches!(state.apply(&missing), Err(ApplyError::NotFound(_))));
    }

    #[test]
    fn the_usage_ledger_counts_per_period_and_resets() {
        let mut state = ClusterState::default();
        let mut create = key("k1", "s");
        if let Some(command::Kind::CreateKey(k)) = &mut create.kind {
            k.limits = Some(KeyLimits { token_budget: 100, budget_period: "day".into(), ..KeyLimits::default() });
        }
        state.apply(&create).expect("created");
        let record = |day: &str, tokens| Command {
            kind: Some(command::Kind::RecordUsage(llmesh_proto::RecordUsage {
                day: day.into(),
                month: day[..7].into(),
                usage: vec![
                    llmesh_proto::KeyUsageDelta { key_id: "k1".into(), tokens, requests: 1 },
                    llmesh_proto::KeyUsageDelta { key_id: "unknown".into(), tokens, requests: 1 },
                ],
            })),
        };
        state.apply(&record("2026-11-24", 30)).expect("applies");
        state.apply(&record("2026-11-24", 40)).expect("applies");
        assert_eq!(state.tokens_used("k1", "2026-11-24"), 70);
        state.apply(&record("2026-11-25", 5)).expect("applies");
        assert_eq!(state.tokens_used("k1", "2026-11-25"), 5, "a new day starts from zero");
        state.apply(&record("2026-11-24", 50)).expect("applies");
        assert_eq!(state.tokens_used("k1", "2026-11-25"), 5, "a late batch of yesterday does not count today");
        assert!(!state.usage.contains_key("unknown"));
    }

    #[test]
    fn routes_refuse_chains_and_loops() {
        let mut state = ClusterState::default();
        let route = |a: &str, m: &str| Command {
            kind: Some(command::Kind::SetRoute(Route { alias: a.into(), model: m.into() })),
        };
        state.apply(&route("fast", "qwen2.5:7b")).expect("set");
        assert_eq!(state.route("fast"), Some("qwen2.5:7b"));
        assert!(state.apply(&route("faster", "fast")).is_err());
        assert!(state.apply(&route("x", "x")).is_err());
        let remove = Command { kind: Some(command::Kind::RemoveRoute("fast".into())) };
        state.apply(&remove).expect("removed");
        assert_eq!(state.route("fast"), None);
        assert!(state.apply(&remove).is_err());
    }

    #[test]
    fn members_follow_the_configuration() {
        let mut state = ClusterState::default();
        let member = |id: u64, name: &str| Member { raft_id: id, node_id: format!("node-{id}"), name: name.into() };
        state.set_configuration(&[1], &[], Some(member(1, "a")));
        state.set_configuration(&[1], &[2], Some(member(2, "b")));
        assert_eq!(state.find_member("b").map(|m| m.raft_id), Ok(2));
        assert_eq!(state.find_member("node-1").map(|m| m.raft_id), Ok(1));
        state.set_configuration(&[1], &[], None);
        assert!(state.find_member("b").is_err());
    }

    #[test]
    fn an_exact_name_wins_over_another_nodes_id_suffix() {
        let mut state = ClusterState::default();
        let member =
            |id: u64, node_id: &str, name: &str| Member { raft_id: id, node_id: node_id.into(), name: name.into() };
        state.set_configuration(&[1], &[], Some(member(1, "12D3KooWxa", "a")));
        state.set_configuration(&[1, 2], &[], Some(member(2, "12D3KooWya", "b")));
        assert_eq!(state.find_member("a").map(|m| m.raft_id), Ok(1));
        assert_eq!(state.find_member("Wya").map(|m| m.raft_id), Ok(2));
        assert!(matches!(state.find_member("xb"), Err(ApplyError::NotFound(_))));
        // Without a name match, a suffix that two ids share stays ambiguous.
        let mut two = ClusterState::default();
        two.set_configuration(&[1], &[], Some(member(1, "12D3KooWxa", "n1")));
        two.set_configuration(&[1, 2], &[], Some(member(2, "12D3KooWya", "n2")));
        assert!(matches!(two.find_member("a"), Err(ApplyError::Invalid(_))));
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let name = prop::sample::select(vec!["a", "b", "c", "d"]);
        prop_oneof![
            (name.clone(), name.clone()).prop_map(|(id, s)| key(id, s)),
            name.clone().prop_map(|id| Command { kind: Some(command::Kind::RevokeKey(RevokeKey { id: id.into() })) }),
            (name.clone(), 0u64..100).prop_map(|(id, rpm)| Command {
                kind: Some(command::Kind::SetKeyLimits(KeyLimitsUpdate {
                    id: id.into(),
                    limits: Some(KeyLimits { requests_per_minute: rpm, ..KeyLimits::default() }),
                })),
            }),
            (name.clone(), name.clone()).prop_map(|(a, m)| Command {
                kind: Some(command::Kind::SetRoute(Route { alias: a.into(), model: m.into() })),
            }),
            name.clone().prop_map(|a| Command { kind: Some(command::Kind::RemoveRoute(a.into())) }),
            (name.clone(), any::<bool>()).prop_map(|(n, d)| Command {
                kind: Some(command::Kind::SetDrained(SetDrained { node_id: n.into(), drained: d })),
            }),
            name.clone().prop_map(|n| Command { kind: Some(command::Kind::RemoveNode(n.into())) }),
            name.clone().prop_map(|n| Command { kind: Some(command::Kind::RevokeNode(n.into())) }),
            any::<[u8; 32]>().prop_map(|k| Command { kind: Some(command::Kind::SetJoinKey(k.to_vec())) }),
            (name.clone(), 0u64..1000, prop::sample::select(vec!["2026-11-24", "2026-11-25"])).prop_map(
                |(k, t, day)| Command {
                    kind: Some(command::Kind::RecordUsage(llmesh_proto::RecordUsage {
                        day: day.into(),
                        month: day[..7].into(),
                        usage: vec![llmesh_proto::KeyUsageDelta { key_id: k.into(), tokens: t, requests: 1 }],
                    })),
                }
            ),
            (name.clone(), name).prop_map(|(m, n)| Command {
                kind: Some(command::Kind::SetPlacement(SetPlacement {
                    placement: vec![Placement { model: m.into(), node_ids: vec![n.into()] }],
                })),
            }),
        ]
    }

    proptest! {
        /// Two nodes applying the same log end in the same state, and a
        /// snapshot taken at any point restores to exactly that state.
        #[test]
        fn apply_is_deterministic_and_snapshots_round_trip(log in prop::collection::vec(arb_command(), 0..40)) {
            let mut a = ClusterState::new(vec![7; 32]);
            let mut b = ClusterState::new(vec![7; 32]);
            for (i, command) in log.iter().enumerate() {
                let ra = a.apply(command);
                let rb = b.apply(command);
                prop_assert_eq!(ra, rb);
                a.applied_index = i as u64 + 1;
                b.applied_index = i as u64 + 1;
            }
            prop_assert_eq!(&a, &b);
            let restored = ClusterState::from_snapshot(&a.encode(), a.applied_index, &[], &[]).expect("decodes");
            prop_assert_eq!(restored, a);
        }
    }
}
