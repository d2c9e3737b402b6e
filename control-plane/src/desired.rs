//! The desired state heartbeats are answered with, cached per store: a
//! store's tills share one read of the database every few seconds instead
//! of one read per heartbeat.
//!
//! A change made through this replica (`AssignBundle`, `SetMaintenanceWindow`)
//! invalidates the store's entry at once; on PostgreSQL every other replica
//! drops it too when told (`crate::changes`). A change that lands while a
//! replica is reading the store, or whose notice is lost, shows within
//! `DESIRED_CACHE_TTL`.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::storage::{Storage, StoreDesiredState};

/// How long a store's desired state is served from memory.
pub const DESIRED_CACHE_TTL: Duration = Duration::from_secs(5);
/// Stores whose desired state is kept in memory.
const DESIRED_CACHE_CAPACITY: u64 = 200_000;

/// Why a store's desired state could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DesiredError {
    #[error("store {0} does not exist")]
    UnknownStore(String),
    #[error(transparent)]
    Storage(#[from] Error),
}

/// Cheap to clone: clones share the cache.
#[derive(Clone)]
pub(crate) struct DesiredCache {
    storage: Storage,
    cache: moka::future::Cache<String, Arc<StoreDesiredState>>,
}

impl DesiredCache {
    pub fn new(storage: Storage) -> DesiredCache {
        DesiredCache {
            storage,
            cache: moka::future::Cache::builder()
                .max_capacity(DESIRED_CACHE_CAPACITY)
                .time_to_live(DESIRED_CACHE_TTL)
                .build(),
        }
    }

    /// The store's desired state, read from the database when it is not in
    /// memory (concurrent misses for one store share one read).
    pub async fn get(&self, store_id: &str) -> Result<Arc<StoreDesiredState>, Arc<DesiredError>> {
        let storage = self.storage.clone();
        let id = store_id.to_string();
        self.cache
            .try_get_with(store_id.to_string(), async move {
                match storage.store_desired_state(&id).await {
                    Ok(Some(state)) => Ok(Arc::new(state)),
                    Ok(None) => Err(DesiredError::UnknownStore(id)),
                    Err(e) => Err(DesiredError::Storage(e)),
                }
            })
            .await
    }

    /// Forgets a store's entry after its desired state changed, here and
    /// (on PostgreSQL) on every other replica.
    pub async fn invalidate(&self, store_id: &str) {
        self.forget(store_id).await;
        crate::changes::announce(
            &self.storage,
            crate::changes::Change::Desired {
                store_id: store_id.to_string(),
            },
        )
        .await;
    }

    /// Forgets a store's entry on this replica only.
    pub async fn forget(&self, store_id: &str) {
        self.cache.invalidate(store_id).await;
    }

    /// Forgets every store's entry on this replica.
    pub fn forget_all(&self) {
        self.cache.invalidate_all();
    }
}
