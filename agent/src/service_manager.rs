//! Tells systemd how the agent is doing when it runs as a `Type=notify`
//! service: READY once this node serves (a member of its mesh, or at once
//! without one), a STATUS line that says what it waits for or how its
//! backend is, and STOPPING when it starts to drain. Without
//! `NOTIFY_SOCKET` (not under systemd) nothing runs.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::api::models::readiness;

/// How often the status is looked at: a node's readiness changes in
/// seconds (enrollment, a backend poll), and a message is sent only on change.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Whether a service manager listens.
pub fn listening() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The STATUS line for a readiness, and whether the node serves.
fn status(state: &AppState) -> (String, bool) {
    match readiness(state) {
        Ok(models) => (format!("serving; backend answers with {models} models"), true),
        Err(not) if not.still_serves() => (format!("serving through peers; backend down: {}", not.detail), true),
        Err(not) => (format!("not serving yet ({}): {}", not.reason, not.detail), false),
    }
}

fn tell(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "cannot reach the service manager's NOTIFY_SOCKET");
    }
}

/// Reports to the service manager until `shutdown`, then says STOPPING.
pub async fn report(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut told_ready = false;
    let mut last = String::new();
    let mut ticker = tokio::time::interval(LOOK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let (line, serves) = status(&state);
        if line != last {
            tell(&[NotifyState::Status(&line)]);
            last = line;
        }
        if serves && !told_ready {
            tracing::info!("told the service manager this node is ready");
            tell(&[NotifyState::Ready]);
            told_ready = true;
        }
    }
    tell(&[NotifyState::Stopping, NotifyState::Status("draining in-flight requests")]);
}
