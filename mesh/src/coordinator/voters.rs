//! Which membership change the leader makes next: add every live node as a
//! learner, promote learners while voters are missing, replace voters that
//! have been gone too long. Plain data in, at most one change out (Raft
//! applies one configuration change at a time).

use std::collections::BTreeSet;
use std::time::Duration;

/// A node the leader can see through gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Raft id (derived from the node id).
    pub raft_id: u64,
    /// libp2p node id.
    pub node_id: String,
    /// Display name.
    pub name: String,
    /// How long since it was last heard; `None` when it is alive now.
    pub gone_for: Option<Duration>,
}

/// The next change to the Raft configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoterChange {
    /// Add a node as a non-voting learner.
    AddLearner(u64),
    /// Make a learner a voter.
    Promote(u64),
    /// Take a node out of the group.
    Remove(u64),
}

/// Inputs of one planning round.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// This node (the leader): never removed.
    pub leader: u64,
    /// Current voters.
    pub voters: &'a BTreeSet<u64>,
    /// Current learners.
    pub learners: &'a BTreeSet<u64>,
    /// Every node seen through gossip (the leader itself included).
    pub seen: &'a [Seen],
    /// Raft ids an operator removed.
    pub removed: &'a BTreeSet<u64>,
    /// How many voters to keep (1, 3 or 5).
    pub target: usize,
    /// How long a voter may be gone before a learner is promoted in its
    /// place. Shorter than `replace_after`, longer than a restart: a voter
    /// the leader has not heard from for a moment (its own restart, the
    /// whole mesh restarting) is still counted, so the group does not grow
    /// a spare voter every time the fleet restarts.
    pub promote_after: Duration,
    /// How long a member may be gone before it is replaced.
    pub replace_after: Duration,
}

impl Plan<'_> {
    fn alive(&self, id: u64) -> bool {
        id == self.leader || self.seen.iter().any(|s| s.raft_id == id && s.gone_for.is_none())
    }

    fn gone_for_at_least(&self, id: u64, limit: Duration) -> bool {
        if id == self.leader {
            return false;
        }
        match self.seen.iter().find(|s| s.raft_id == id) {
            Some(seen) => seen.gone_for.is_some_and(|d| d >= limit),
            // Forgotten by membership altogether: long gone.
            None => true,
        }
    }

    fn gone_too_long(&self, id: u64) -> bool {
        self.gone_for_at_least(id, self.replace_after)
    }

    /// The one change to make now, if any.
    pub fn next(&self) -> Option<VoterChange> {
        let members = || self.voters.iter().chain(self.learners.iter()).copied();
        if let Some(id) = members().find(|id| self.removed.contains(id) && *id != self.leader) {
            return Some(VoterChange::Remove(id));
        }
        if let Some(seen) = self.seen.iter().find(|s| {
            s.gone_for.is_none()
                && !self.removed.contains(&s.raft_id)
                && !self.voters.contains(&s.raft_id)
                && !self.learners.contains(&s.raft_id)
        }) {
            return Some(VoterChange::AddLearner(seen.raft_id));
        }
        let counted = self.voters.iter().filter(|id| !self.gone_for_at_least(**id, self.promote_after)).count();
        if counted < self.target
            && let Some(id) = self.learners.iter().find(|id| self.alive(**id))
        {
            return Some(VoterChange::Promote(*id));
        }
        // Promote a replacement before removing a dead voter, so the quorum
        // never shrinks below what the live voters can reach.
        if let Some(id) = self.voters.iter().find(|id| self.gone_too_long(**id)) {
            return Some(VoterChange::Remove(*id));
        }
        self.learners.iter().find(|id| self.gone_too_long(**id)).map(|id| VoterChange::Remove(*id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHORT: Duration = Duration::from_secs(5);
    const LONG: Duration = Duration::from_secs(10);

    fn seen(id: u64, gone: Option<u64>) -> Seen {
        Seen { raft_id: id, node_id: format!("n{id}"), name: format!("n{id}"), gone_for: gone.map(Duration::from_secs) }
    }

    fn plan<'a>(
        voters: &'a BTreeSet<u64>,
        learners: &'a BTreeSet<u64>,
        seen: &'a [Seen],
        removed: &'a BTreeSet<u64>,
        target: usize,
    ) -> Plan<'a> {
        Plan { leader: 1, voters, learners, seen, removed, target, promote_after: SHORT, replace_after: LONG }
    }

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn new_nodes_join_as_learners_then_fill_the_voter_target() {
        let none = set(&[]);
        let all = [seen(1, None), seen(2, None), seen(3, None), seen(4, None)];
        let (v, l) = (set(&[1]), set(&[]));
        assert_eq!(plan(&v, &l, &all, &none, 3).next(), Some(VoterChange::AddLearner(2)));
        let (v, l) = (set(&[1]), set(&[2, 3, 4]));
        assert_eq!(plan(&v, &l, &all, &none, 3).next(), Some(VoterChange::Promote(2)));
        let (v, l) = (set(&[1, 2, 3]), set(&[4]));
        assert_eq!(plan(&v, &l, &all, &none, 3).next(), None, "the fourth node stays a learner");
    }

    #[test]
    fn a_dead_voter_is_replaced_by_a_learner_first_then_removed() {
        let none = set(&[]);
        let view = [seen(1, None), seen(2, Some(30)), seen(3, None), seen(4, None)];
        let (v, l) = (set(&[1, 2, 3]), set(&[4]));
        assert_eq!(plan(&v, &l, &view, &none, 3).next(), Some(VoterChange::Promote(4)));
        let (v, l) = (set(&[1, 2, 3, 4]), set(&[]));
        assert_eq!(plan(&v, &l, &view, &none, 3).next(), Some(VoterChange::Remove(2)));
        // Briefly gone is not gone.
        let blip = [seen(1, None), seen(2, Some(2)), seen(3, None)];
        let (v, l) = (set(&[1, 2, 3]), set(&[]));
        assert_eq!(plan(&v, &l, &blip, &none, 3).next(), None);
    }

    #[test]
    fn a_voter_missing_for_a_moment_is_not_replaced_even_with_a_learner_at_hand() {
        // The whole fleet restarted: the new leader has not heard from one
        // voter yet, and a learner is alive. Promoting it would leave four
        // voters after every restart.
        let none = set(&[]);
        let (v, l) = (set(&[1, 2, 3]), set(&[4]));
        let blip = [seen(1, None), seen(2, Some(2)), seen(3, None), seen(4, None)];
        assert_eq!(plan(&v, &l, &blip, &none, 3).next(), None);
        let gone = [seen(1, None), seen(2, Some(6)), seen(3, None), seen(4, None)];
        assert_eq!(plan(&v, &l, &gone, &none, 3).next(), Some(VoterChange::Promote(4)));
    }

    #[test]
    fn removed_nodes_leave_and_are_not_added_again() {
        let removed = set(&[3]);
        let view = [seen(1, None), seen(2, None), seen(3, None)];
        let (v, l) = (set(&[1, 2]), set(&[3]));
        assert_eq!(plan(&v, &l, &view, &removed, 3).next(), Some(VoterChange::Remove(3)));
        let (v, l) = (set(&[1, 2]), set(&[]));
        assert_eq!(plan(&v, &l, &view, &removed, 3).next(), None);
    }

    proptest! {
        /// The leader never removes itself, never promotes a dead node, and
        /// never adds a node that is not alive.
        #[test]
        fn changes_are_safe(
            voters in prop::collection::btree_set(1u64..8, 1..6),
            learners in prop::collection::btree_set(1u64..8, 0..4),
            gone in prop::collection::vec(prop::option::of(0u64..30), 8),
            target in prop::sample::select(vec![1usize, 3, 5]),
        ) {
            let learners: BTreeSet<u64> = learners.difference(&voters).copied().collect();
            let mut voters = voters;
            voters.insert(1);
            let view: Vec<Seen> = (1..8).map(|id| seen(id, if id == 1 { None } else { gone[id as usize] })).collect();
            let none = set(&[]);
            let p = plan(&voters, &learners, &view, &none, target);
            match p.next() {
                Some(VoterChange::Remove(id)) => prop_assert_ne!(id, 1),
                Some(VoterChange::Promote(id)) => {
                    prop_assert!(p.alive(id));
                    prop_assert!(learners.contains(&id));
                }
                Some(VoterChange::AddLearner(id)) => prop_assert!(p.alive(id)),
                None => {}
            }
        }
    }
}
