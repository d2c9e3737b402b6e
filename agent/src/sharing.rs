//! The agent's side of sharing bundles inside its store: the store's
//! membership list (from the control plane, kept on disk so a store keeps
//! sharing while the control plane is unreachable) and a [`Fetcher`] that
//! gets pieces from the store's tills and, once per store, the origin.
//! The protocol itself lives in `posfleet-p2p`.

use posfleet_bundle::chunks::ChunkList;
use posfleet_bundle::client::VerifiedTarget;
use posfleet_p2p::{Member, Multiaddr, P2p, PeerId};
use posfleet_proto::v1;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

use crate::error::Error;
use crate::fetch::{Download, Fetcher, Origin, Received};
use crate::files;
use crate::repository::RepoError;

/// The membership list as last received, in the data dir.
const PEERS_FILE: &str = "store_peers.json";

/// One till of the store, as the control plane listed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorePeer {
    pub device_id: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    pub addrs: Vec<String>,
}

/// The store's membership list and the control plane's digest of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorePeers {
    /// Hex; echoed to the control plane, which resends the list when it
    /// differs.
    pub digest: String,
    pub peers: Vec<StorePeer>,
}

impl StorePeers {
    pub fn from_proto(list: v1::StorePeers) -> StorePeers {
        StorePeers {
            digest: hex::encode(&list.digest),
            peers: list
                .peers
                .into_iter()
                .map(|p| StorePeer {
                    device_id: p.device_id,
                    public_key: hex::encode(&p.public_key),
                    addrs: p.addrs,
                })
                .collect(),
        }
    }

    /// The list saved by an earlier run; empty if there is none or it is
    /// unreadable (the next heartbeat brings it again).
    pub fn load(data_dir: &Path) -> StorePeers {
        let path = data_dir.join(PEERS_FILE);
        match files::read_optional(&path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "Store peer list unreadable; waiting for the next one.");
                StorePeers::default()
            }),
            Ok(None) => StorePeers::default(),
            Err(error) => {
                tracing::warn!(%error, "Cannot read the store peer list.");
                StorePeers::default()
            }
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(self).expect("plain data serializes");
        files::write_private(&data_dir.join(PEERS_FILE), &bytes)
    }

    /// The members as libp2p sees them, without this till (`own`) and
    /// without entries whose key or addresses do not parse.
    pub fn members(&self, own: PeerId) -> Vec<Member> {
        self.peers
            .iter()
            .filter_map(|p| {
                let key: [u8; 32] = hex::decode(&p.public_key).ok()?.try_into().ok()?;
                let peer_id = posfleet_p2p::peer_id_from_ed25519_public(key).ok()?;
                (peer_id != own).then(|| Member {
                    peer_id,
                    addrs: p
                        .addrs
                        .iter()
                        .filter_map(|a| a.parse::<Multiaddr>().ok())
                        .collect(),
                })
            })
            .collect()
    }
}

/// Fetches through the store: pieces from the other tills, and from the
/// origin only what the store lacks, by the one till chosen for it.
///
/// A fetched bundle stays shared with the store while this process runs,
/// until a later version of the same bundle is fetched: one version per
/// bundle name is held open, so replaced files do not pile up on disk.
pub struct StoreFetcher {
    origin: Origin,
    p2p: P2p,
    /// The digest shared per bundle name.
    shared: std::sync::Mutex<std::collections::HashMap<String, [u8; 32]>>,
}

impl StoreFetcher {
    pub fn new(origin: Origin, p2p: P2p) -> StoreFetcher {
        StoreFetcher {
            origin,
            p2p,
            shared: Default::default(),
        }
    }

    /// Records `digest` as the shared version of the bundle behind
    /// `target` and stops sharing the one before it.
    async fn replace_shared(&self, target: &str, digest: [u8; 32]) {
        let name = target.split('/').next().unwrap_or(target).to_string();
        let previous = {
            let mut shared = self.shared.lock().expect("no panics while held");
            shared.insert(name, digest)
        };
        if let Some(previous) = previous.filter(|p| *p != digest) {
            self.p2p.unshare(previous).await;
        }
    }
}

#[async_trait::async_trait]
impl Fetcher for StoreFetcher {
    /// From the origin, or when it cannot be reached, from a peer (checked
    /// against the same signed digest).
    async fn chunk_list(&self, target: &VerifiedTarget) -> Result<ChunkList, RepoError> {
        match self.origin.chunk_list(target).await {
            Ok(list) => Ok(list),
            Err(error) => {
                match self
                    .p2p
                    .chunk_list_from_peers(
                        *target.chunks_sha256(),
                        target.chunk_size(),
                        target.length(),
                    )
                    .await
                {
                    Some(list) => {
                        tracing::info!(target = %target.name(), "Chunk list from a store peer (the origin is unreachable).");
                        Ok(list)
                    }
                    None => Err(error),
                }
            }
        }
    }

    async fn fetch(&self, download: Download<'_>) -> Result<Received, RepoError> {
        let Download { target, list, .. } = download;
        let digest = *target.sha256();
        self.replace_shared(target.name(), digest).await;
        let bundle = posfleet_p2p::Bundle {
            digest,
            chunks: list.clone(),
        };
        let origin = Arc::new(OriginPieces {
            origin: self.origin.clone(),
            target: target.clone(),
            list: list.clone(),
        });
        let stats = self
            .p2p
            .fetch(bundle, download.dest, origin, download.progress)
            .await
            .map_err(|e| RepoError::Fetch {
                url: format!("store peers and origin for {}", target.name()),
                message: e.to_string(),
            })?;
        Ok(Received {
            from_origin: stats.origin_bytes,
            from_peers: stats.peer_bytes,
        })
    }
}

/// The origin as the P2P side asks it: a run of pieces.
struct OriginPieces {
    origin: Origin,
    target: VerifiedTarget,
    list: ChunkList,
}

#[async_trait::async_trait]
impl posfleet_p2p::OriginSource for OriginPieces {
    async fn fetch_pieces(
        &self,
        first: usize,
        last: usize,
        piece: &mut (dyn FnMut(usize, Vec<u8>) -> posfleet_p2p::Result<()> + Send),
    ) -> posfleet_p2p::Result<()> {
        let mut handed = |index: usize, bytes: Vec<u8>| -> Result<(), RepoError> {
            piece(index, bytes).map_err(|e| RepoError::Fetch {
                url: "store".into(),
                message: e.to_string(),
            })
        };
        self.origin
            .stream_pieces(&self.target, &self.list, first, last, &mut handed)
            .await
            .map_err(posfleet_p2p::Error::origin)
    }
}
