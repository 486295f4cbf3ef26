//! Acting on the leader's model placement: when the replicated state says
//! a model should stay loaded here and the backend does not hold it, load
//! it ahead of traffic. Gossip then reports it loaded and the scheduler
//! starts sending that model's requests here without a cold-load cost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmesh_mesh::Coordinator;
use tokio_util::sync::CancellationToken;

use crate::local::LocalNode;

/// How long a preloaded model stays loaded without traffic (Ollama's
/// keep_alive); placement renews it while the model stays placed here.
const KEEP_ALIVE: Duration = Duration::from_secs(30 * 60);
/// Least time between two preload attempts of one model.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Follows the placement for `node_id` until `shutdown`.
pub async fn follow(coordinator: Coordinator, local: Arc<LocalNode>, node_id: String, shutdown: CancellationToken) {
    let mut state = coordinator.watch_state();
    let mut attempted: HashMap<String, Instant> = HashMap::new();
    loop {
        let wanted: Vec<String> = state
            .borrow_and_update()
            .placement
            .iter()
            .filter(|(_, nodes)| nodes.contains(&node_id))
            .map(|(model, _)| model.clone())
            .collect();
        for model in wanted {
            let snapshot = local.inventory().current();
            let Some(entry) = snapshot.inventory.resolve(&model) else { continue };
            if entry.loaded.is_some() || attempted.get(&model).is_some_and(|t| t.elapsed() < RETRY_AFTER) {
                continue;
            }
            attempted.insert(model.clone(), Instant::now());
            let (local, model) = (local.clone(), model.clone());
            tokio::spawn(async move {
                tracing::info!(%model, "preloading: the leader placed this model here");
                match local.preload(&model, KEEP_ALIVE).await {
                    Ok(()) => {
                        local.inventory().refresh().await;
                        tracing::info!(%model, "preloaded");
                    }
                    Err(err) => tracing::warn!(%model, error = %err, "preload failed"),
                }
            });
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
            // The backend may unload a model on its own; look again.
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
