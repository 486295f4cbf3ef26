//! Keeps this node in step with the replicated state: the revoked set and
//! join key in its [`Trust`], the current join key and bootstrap addresses
//! in its data directory (so `llmesh init` there prints a token that
//! works), the CA key opened where this node is a voter, and this node's
//! own revocation.
//!
//! Why the CA key travels sealed through the state: a new box must be able
//! to enroll while any quorum is up, not only while the box where `llmesh
//! init` ran is. The key is sealed with the cluster secret, which every
//! member (and every holder of a join token) has anyway; a join token
//! already admits any machine, so the sealed copy adds no power an
//! attacker with a token lacks. Only voters open it: they are the nodes
//! the cluster keeps, and the ones a joining box is most likely to reach.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use llmesh_proto::{BootstrapAddrs, Command, command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ClusterState, Coordinator, RaftStatus};
use crate::ClusterSecret;
use crate::pki::Trust;

/// What [`follow`] needs besides the state.
pub(super) struct Follower {
    pub trust: Arc<Trust>,
    pub secret: ClusterSecret,
    pub data_dir: PathBuf,
    pub raft_id: u64,
    pub node_id: String,
    /// Bootstrap addresses `llmesh init --bootstrap` stored here, for the
    /// cluster state while it has none.
    pub stored_bootstrap: Vec<String>,
    written_join_key: Option<[u8; 32]>,
    written_bootstrap: Option<Vec<String>>,
}

impl Follower {
    pub(super) fn new(trust: Arc<Trust>, secret: ClusterSecret, data_dir: PathBuf, raft_id: u64) -> Follower {
        let stored_bootstrap = crate::seed::bootstrap_addrs(&data_dir);
        Follower {
            node_id: trust.node_id().to_string(),
            trust,
            secret,
            data_dir,
            raft_id,
            stored_bootstrap,
            written_join_key: None,
            written_bootstrap: None,
        }
    }

    /// Applies one version of the state to this node.
    pub(super) fn feed(&mut self, state: &ClusterState) {
        self.trust.set_revoked(state.revoked.clone());
        if state.revoked.contains(&self.node_id) {
            self.trust.revoke_self(&humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
        }
        let join_key =
            <[u8; 32]>::try_from(state.join_key.as_slice()).unwrap_or_else(|_| self.secret.initial_join_key());
        self.trust.set_join_key(join_key);
        if self.written_join_key != Some(join_key) && !state.members.is_empty() {
            match crate::seed::store_join_key(&self.data_dir, &join_key) {
                Ok(()) => self.written_join_key = Some(join_key),
                Err(err) => tracing::warn!(error = %err, "cannot record the current join key"),
            }
        }
        if !state.bootstrap.is_empty() && self.written_bootstrap.as_ref() != Some(&state.bootstrap) {
            match crate::seed::store_bootstrap_addrs(&self.data_dir, &state.bootstrap) {
                Ok(()) => self.written_bootstrap = Some(state.bootstrap.clone()),
                Err(err) => tracing::warn!(error = %err, "cannot record the bootstrap addresses"),
            }
        }
        self.open_ca_key(state);
    }

    fn open_ca_key(&self, state: &ClusterState) {
        if state.sealed_ca_key.is_empty() || self.trust.can_issue() || !state.voters.contains(&self.raft_id) {
            return;
        }
        let Some(pem) = self.secret.open(&state.sealed_ca_key) else {
            tracing::warn!("the CA key in the cluster state does not open with this node's cluster secret");
            return;
        };
        match self.trust.install_ca_key(&String::from_utf8_lossy(&pem)) {
            Ok(true) => tracing::info!("this voter now holds the cluster CA key: it admits new nodes"),
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "cannot take the CA key from the cluster state"),
        }
    }
}

/// Runs [`Follower::feed`] on every state change, and, while this node
/// leads and holds the CA key, shares it (sealed) and the bootstrap
/// addresses it knows when the state lacks them. Ends at `shutdown`.
pub(super) async fn follow(
    mut follower: Follower,
    coordinator: Coordinator,
    mut status: watch::Receiver<RaftStatus>,
    shutdown: CancellationToken,
) {
    let mut updates = coordinator.state.clone();
    follower.feed(&updates.borrow_and_update());
    let mut shared_at = None::<tokio::time::Instant>;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = updates.changed() => {
                if changed.is_err() { return }
                let current = updates.borrow_and_update().clone();
                follower.feed(&current);
            }
            changed = status.changed() => if changed.is_err() { return },
        }
        let leading = {
            let s = status.borrow_and_update();
            s.leader == s.id && s.id != 0
        };
        // One proposal at a time, and not more than every few seconds.
        let due = shared_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        if leading
            && due
            && let Some(command) = missing_share(&follower, &coordinator.state())
        {
            shared_at = Some(tokio::time::Instant::now());
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                if let Err(err) = coordinator.propose(command).await {
                    tracing::debug!(error = %err, "cannot share the CA key or bootstrap addresses yet");
                }
            });
        }
    }
}

/// What the leader should add to the state, if anything.
fn missing_share(follower: &Follower, state: &ClusterState) -> Option<Command> {
    if state.sealed_ca_key.is_empty()
        && let Some(pem) = follower.trust.ca_key_pem()
    {
        let sealed = follower.secret.seal(pem.as_bytes());
        return Some(Command { kind: Some(command::Kind::SetCaKey(sealed)) });
    }
    if state.bootstrap.is_empty() && !follower.stored_bootstrap.is_empty() {
        let addrs = follower.stored_bootstrap.clone();
        return Some(Command { kind: Some(command::Kind::SetBootstrap(BootstrapAddrs { addrs })) });
    }
    None
}
