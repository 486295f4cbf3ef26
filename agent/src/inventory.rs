//! The backend's model inventory, kept fresh by polling and refreshed on
//! demand when a request names a model not seen yet.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Inventory};

/// Shortest interval between two on-demand refreshes, so a flood of
/// requests for a missing model cannot flood the backend with polls.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// The inventory and the backend's health as last observed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Models as of the last successful poll.
    pub inventory: Inventory,
    /// Whether the last poll succeeded.
    pub healthy: bool,
    /// Whether any poll has succeeded yet.
    pub ever_healthy: bool,
    /// Why the last poll failed, if it did.
    pub last_error: Option<String>,
    /// When the last poll finished.
    pub polled_at: Option<Instant>,
    /// Whether the backend stalled (a request's probe went unanswered)
    /// and no poll has succeeded since.
    pub stalled: bool,
}

/// Shared access to the latest [`Snapshot`].
#[derive(Clone)]
pub struct InventoryHandle {
    backend: Arc<dyn Backend>,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl InventoryHandle {
    /// A handle with an empty snapshot; call [`Self::refresh`] or run
    /// [`Self::poll`] to fill it.
    pub fn new(backend: Arc<dyn Backend>) -> InventoryHandle {
        InventoryHandle {
            backend,
            snapshot: Arc::new(RwLock::new(Arc::new(Snapshot::default()))),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The latest snapshot (cheap: an `Arc` clone).
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Polls the backend now, unless another caller just did.
    pub async fn refresh(&self) -> Arc<Snapshot> {
        let _one_at_a_time = self.refreshing.lock().await;
        let previous = self.current();
        if previous.polled_at.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
            return previous;
        }
        self.poll_once(&previous).await
    }

    /// Marks the backend unhealthy now (it stalled); the next successful
    /// poll clears it.
    pub fn mark_unhealthy(&self, why: String) {
        let mut snapshot = self.snapshot.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = (**snapshot).clone();
        next.healthy = false;
        next.stalled = true;
        next.last_error = Some(why);
        *snapshot = Arc::new(next);
    }

    /// Polls the backend now whatever the last poll's age: after this node
    /// changed the models on disk (a pull, copy or delete finished).
    pub async fn refresh_now(&self) -> Arc<Snapshot> {
        let _one_at_a_time = self.refreshing.lock().await;
        let previous = self.current();
        self.poll_once(&previous).await
    }

    async fn poll_once(&self, previous: &Snapshot) -> Arc<Snapshot> {
        let next = match self.backend.inventory().await {
            Ok(inventory) => {
                if !previous.healthy {
                    tracing::info!(models = inventory.models.len(), "backend is reachable");
                }
                Snapshot {
                    inventory,
                    healthy: true,
                    ever_healthy: true,
                    last_error: None,
                    polled_at: Some(Instant::now()),
                    stalled: false,
                }
            }
            Err(err) => {
                // Log transitions only: a down backend must not spam the log.
                if previous.healthy || previous.polled_at.is_none() {
                    tracing::warn!(error = %err, "backend is not reachable");
                }
                Snapshot {
                    inventory: previous.inventory.clone(),
                    healthy: false,
                    ever_healthy: previous.ever_healthy,
                    last_error: Some(err.to_string()),
                    polled_at: Some(Instant::now()),
                    stalled: previous.stalled,
                }
            }
        };
        let next = Arc::new(next);
        *self.snapshot.write().unwrap_or_else(PoisonError::into_inner) = next.clone();
        next
    }

    /// Polls every `interval` until `shutdown` fires.
    pub async fn poll(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let _one_at_a_time = self.refreshing.lock().await;
                    let previous = self.current();
                    self.poll_once(&previous).await;
                }
            }
        }
    }
}
