//! Replicas telling each other of changes their caches hold, so one made
//! through any replica shows on every replica within a second instead of
//! a cache's lifetime.
//!
//! A replica that changes something a cache holds invalidates its own entry
//! and sends a [`Change`] on the PostgreSQL channel [`CHANNEL`] after the
//! change committed ([`crate::storage::Storage::notify`]); every replica
//! listens ([`spawn_listener`]) and drops the same entry. A notification
//! lost with a broken listening connection costs at most a cache's
//! lifetime: on reconnecting, the listener drops every entry, since it
//! cannot know what it missed. On SQLite one process serves, and nothing is
//! sent.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::desired::DesiredCache;
use crate::storage::Storage;
use crate::tls::DeviceGate;

/// The channel replicas `LISTEN` on.
pub const CHANNEL: &str = "posfleet_changes";
/// Wait before listening again after the connection failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A store's desired state (assignments, window, revocations, rollouts).
    Desired { store_id: String },
    /// A device was revoked: its connections are cut.
    Revoked { device_id: String },
    /// A device's credential or certificate record changed.
    Credential { device_id: String },
}

impl Change {
    /// As sent: `kind:id`, split at the first `:` (so an id may hold one).
    pub fn encode(&self) -> String {
        match self {
            Change::Desired { store_id } => format!("desired:{store_id}"),
            Change::Revoked { device_id } => format!("revoked:{device_id}"),
            Change::Credential { device_id } => format!("credential:{device_id}"),
        }
    }

    /// `None` for a payload this version does not know (a newer replica's).
    pub fn decode(payload: &str) -> Option<Change> {
        let (kind, id) = payload.split_once(':')?;
        let id = id.to_string();
        match kind {
            "desired" => Some(Change::Desired { store_id: id }),
            "revoked" => Some(Change::Revoked { device_id: id }),
            "credential" => Some(Change::Credential { device_id: id }),
            _ => None,
        }
    }
}

/// Sends `change` to the other replicas (after it committed).
pub(crate) async fn announce(storage: &Storage, change: Change) {
    storage.notify(CHANNEL, &change.encode()).await;
}

/// The caches a replica keeps that others' changes make stale.
#[derive(Clone)]
pub(crate) struct Caches {
    pub desired: DesiredCache,
    pub gate: Arc<DeviceGate>,
    pub credentials: crate::agent_api::CredentialCache,
}

impl Caches {
    async fn apply(&self, change: Change) {
        match change {
            Change::Desired { store_id } => self.desired.forget(&store_id).await,
            Change::Revoked { device_id } => {
                self.gate.revoke(&device_id);
                self.credentials.forget(&device_id).await;
            }
            Change::Credential { device_id } => self.credentials.forget(&device_id).await,
        }
    }

    fn forget_everything(&self) {
        self.desired.forget_all();
        self.credentials.forget_all();
    }
}

/// Listens for other replicas' changes until `stop` (PostgreSQL only;
/// `None` on SQLite).
pub(crate) fn spawn_listener(
    storage: &Storage,
    caches: Caches,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let url = storage.postgres_url()?.to_string();
    Some(tokio::spawn(async move {
        loop {
            let listened = tokio::select! {
                result = listen(&url, &caches) => result,
                _ = stop.wait_for(|s| *s) => return,
            };
            if let Err(error) = listened {
                tracing::warn!(%error, "Not listening for other replicas' changes; retrying.");
            }
            // Whatever was sent meanwhile is lost.
            caches.forget_everything();
            tokio::select! {
                _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }))
}

/// Applies changes as they come, until the connection fails.
async fn listen(url: &str, caches: &Caches) -> Result<(), sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    // Changes made before this point were missed.
    caches.forget_everything();
    loop {
        // `None`: the connection was lost (and is made again by the next
        // call); notifications sent meanwhile are lost.
        match listener.try_recv().await? {
            Some(notification) => match Change::decode(notification.payload()) {
                Some(change) => caches.apply(change).await,
                None => tracing::debug!(
                    payload = notification.payload(),
                    "A change this version does not know."
                ),
            },
            None => caches.forget_everything(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_their_encoding() {
        for change in [
            Change::Desired {
                store_id: "store-1".into(),
            },
            Change::Revoked {
                device_id: "dev-a:b".into(),
            },
            Change::Credential {
                device_id: "dev-2".into(),
            },
        ] {
            assert_eq!(Change::decode(&change.encode()), Some(change));
        }
        assert_eq!(Change::decode("quota:store-1"), None);
        assert_eq!(Change::decode("no separator"), None);
    }
}
