//! The repository's metadata files as `/repo/` serves them, from memory:
//! anyone may ask for them, so a request must not cost a database read.
//!
//! The newest file of each role is read at most once per `LATEST_TTL` (and
//! again at once after this replica stores a new one); a versioned file is
//! immutable, so once read it stays until memory for others is needed. A
//! version above the newest known is answered "not found" from memory.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::storage::Storage;

/// How long the newest file of a role is served before it is read again,
/// so a file stored through another replica shows within it.
pub const LATEST_TTL: Duration = Duration::from_secs(1);
/// Bytes of versioned metadata kept in memory.
const VERSIONED_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

type Latest = Option<(i64, Arc<String>)>;

#[derive(Clone)]
pub struct MetadataCache {
    storage: Storage,
    latest: moka::future::Cache<&'static str, Arc<Latest>>,
    versioned: moka::future::Cache<(&'static str, i64), Arc<Option<Arc<String>>>>,
}

impl MetadataCache {
    pub fn new(storage: Storage) -> MetadataCache {
        MetadataCache {
            storage,
            latest: moka::future::Cache::builder()
                .time_to_live(LATEST_TTL)
                .build(),
            versioned: moka::future::Cache::builder()
                .max_capacity(VERSIONED_CAPACITY_BYTES)
                .weigher(|_, body: &Arc<Option<Arc<String>>>| {
                    body.as_ref()
                        .as_ref()
                        .map_or(1, |b| u32::try_from(b.len()).unwrap_or(u32::MAX))
                })
                .build(),
        }
    }

    /// The newest file of `role` and its version (concurrent misses share
    /// one read).
    async fn latest_entry(&self, role: &'static str) -> Result<Arc<Latest>, Arc<Error>> {
        let storage = self.storage.clone();
        self.latest
            .try_get_with(role, async move {
                let latest = storage.latest_metadata(role).await?;
                Ok::<_, Error>(Arc::new(latest.map(|(v, body)| (v, Arc::new(body)))))
            })
            .await
    }

    /// The newest file of `role`, if any.
    pub async fn latest(&self, role: &'static str) -> Result<Option<Arc<String>>, Arc<Error>> {
        Ok(self
            .latest_entry(role)
            .await?
            .as_ref()
            .as_ref()
            .map(|(_, body)| body.clone()))
    }

    /// `<version>.<role>.json`, if it exists.
    pub async fn version(
        &self,
        role: &'static str,
        version: i64,
    ) -> Result<Option<Arc<String>>, Arc<Error>> {
        if let Some(found) = self.versioned.get(&(role, version)).await {
            return Ok(found.as_ref().clone());
        }
        match self.latest_entry(role).await?.as_ref() {
            None => return Ok(None),
            Some((newest, body)) if *newest == version => return Ok(Some(body.clone())),
            Some((newest, _)) if *newest < version => return Ok(None),
            Some(_) => {}
        }
        // Below the newest: it exists or never will (versions only grow).
        let storage = self.storage.clone();
        let found = self
            .versioned
            .try_get_with((role, version), async move {
                let body = storage.metadata(role, version).await?;
                Ok::<_, Error>(Arc::new(body.map(Arc::new)))
            })
            .await?;
        Ok(found.as_ref().clone())
    }

    /// Forgets the newest files after this replica stored new ones.
    pub fn stored(&self) {
        self.latest.invalidate_all();
    }
}
