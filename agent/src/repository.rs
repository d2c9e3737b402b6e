//! The agent's view of the bundle repository: the TUF client workflow over
//! HTTP, starting from the pinned `root.json`, with every download bounded
//! in size (endless data) and time (slow retrieval). Trust is decided by
//! `posfleet-bundle` only; this module fetches bytes and keeps what was
//! trusted on disk so rollback protection survives restarts.
//!
//! When the origin cannot be reached (no connection, no answer in time, a
//! gateway error), the same workflow runs against the store's peers, which
//! serve the metadata they verified and saved (`<data_dir>/tuf/`): every
//! file is verified exactly as the origin's would be, so a peer can at most
//! withhold metadata, never make the till trust something. An origin that
//! answers with metadata that fails verification is not bypassed: its
//! error stands (a peer can only have what the origin served before).

use chrono::Utc;
use posfleet_bundle::client::{Limits, TrustedMetadata, VerifiedDelta, VerifiedTarget};
use posfleet_p2p::{P2p, PeerId};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fetch::{Download, Fetcher, Origin};

use crate::files;

/// Why the repository could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot read the pinned root {path}: {source}")]
    PinnedRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Refused(#[from] posfleet_bundle::Error),
    #[error("{url}: {message}")]
    Fetch { url: String, message: String },
    #[error("{url}: no answer within {seconds}s (slow retrieval)")]
    Timeout { url: String, seconds: u64 },
    #[error("{url}: more than {limit} bytes (endless data)")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: {rate} bytes/s is under the minimum of {minimum} bytes/s (slow retrieval)")]
    TooSlow {
        url: String,
        rate: u64,
        minimum: u64,
    },
    /// No connection, no answer in time, or a gateway error: the store's
    /// peers are asked instead.
    #[error("{url}: unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("store peer {peer}: {message}")]
    Peer { peer: String, message: String },
    /// Metadata from a store peer that the TUF client refused.
    #[error("from store peer {peer}: {source}")]
    FromPeer {
        peer: String,
        source: Box<RepoError>,
    },
    #[error(
        "the origin is unreachable ({origin}), and no store peer has metadata that verifies: {peers}"
    )]
    NoPeerMetadata {
        origin: Box<RepoError>,
        peers: String,
    },
    #[error(transparent)]
    Files(#[from] crate::error::Error),
}

impl RepoError {
    /// The origin did not answer at all: worth asking the store's peers.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            RepoError::Unreachable { .. } | RepoError::Timeout { .. }
        )
    }
}

/// Time limits for downloads.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A whole metadata file.
    pub metadata: Duration,
    /// No byte of a bundle for this long ends the download.
    pub stall: Duration,
    /// After `stall`, a bundle download slower than this on average ends.
    pub min_bytes_per_second: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            metadata: Duration::from_secs(30),
            stall: Duration::from_secs(30),
            min_bytes_per_second: 1024,
        }
    }
}

pub struct RepositoryClient {
    origin: Origin,
    trusted: TrustedMetadata,
    state_dir: PathBuf,
    /// The store's peers, asked when the origin is unreachable.
    peers: Option<P2p>,
}

/// One metadata file the TUF workflow asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Root(u64),
    Timestamp,
    Snapshot(u64),
    Targets(u64),
}

impl Wanted {
    /// Its path in the origin's repository (consistent snapshots).
    fn origin_path(self) -> String {
        match self {
            Wanted::Root(version) => format!("{version}.root.json"),
            Wanted::Timestamp => "timestamp.json".into(),
            Wanted::Snapshot(version) => format!("{version}.snapshot.json"),
            Wanted::Targets(version) => format!("{version}.targets.json"),
        }
    }

    /// The name it is saved under once verified, which is also the name
    /// store peers serve it by (the version they trust now).
    fn saved_name(self) -> String {
        match self {
            Wanted::Root(version) => format!("{version}.root.json"),
            Wanted::Timestamp => "timestamp.json".into(),
            Wanted::Snapshot(_) => "snapshot.json".into(),
            Wanted::Targets(_) => "targets.json".into(),
        }
    }
}

/// Where one run of the workflow gets its files.
enum Source<'a> {
    Origin(&'a Origin),
    Peer {
        p2p: &'a P2p,
        peer: PeerId,
        /// Its `timestamp.json`, asked for already.
        timestamp: Vec<u8>,
    },
}

impl Source<'_> {
    async fn get(&self, wanted: Wanted, limit: u64) -> Result<Option<Vec<u8>>, RepoError> {
        match self {
            Source::Origin(origin) => origin.get_whole(&wanted.origin_path(), limit).await,
            Source::Peer { timestamp, .. } if wanted == Wanted::Timestamp => {
                Ok(Some(timestamp.clone()))
            }
            Source::Peer { p2p, peer, .. } => p2p
                .metadata_from_peer(*peer, &wanted.saved_name(), limit)
                .await
                .map_err(|e| RepoError::Peer {
                    peer: peer.to_string(),
                    message: e.to_string(),
                }),
        }
    }

    /// `wanted`, which must exist, or a clear error.
    async fn get_required(&self, wanted: Wanted, limit: u64) -> Result<Vec<u8>, RepoError> {
        self.get(wanted, limit).await?.ok_or_else(|| match self {
            Source::Origin(origin) => RepoError::Fetch {
                url: origin.url(&wanted.origin_path()),
                message: "not found".into(),
            },
            Source::Peer { peer, .. } => RepoError::Peer {
                peer: peer.to_string(),
                message: format!("has no {}", wanted.saved_name()),
            },
        })
    }
}

/// Metadata verified by one run of the workflow, not yet committed.
struct Update {
    trusted: TrustedMetadata,
    /// Files to save, by name, in the order they were verified.
    files: Vec<(String, Vec<u8>)>,
}

/// The version a timestamp claims, before any check: only to decide which
/// peer to try first.
fn claimed_version(timestamp: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(timestamp)
        .ok()
        .and_then(|v| v["signed"]["version"].as_u64())
        .unwrap_or(0)
}

impl RepositoryClient {
    /// Starts from the newest root trusted before (kept in
    /// `<data_dir>/tuf/`), else from the pinned root; reloads the timestamp,
    /// snapshot and targets trusted before, even expired: they keep the
    /// versions an attacker may not roll back below.
    pub fn open(
        pinned_root: &Path,
        data_dir: &Path,
        base_url: &str,
        limits: Limits,
        timeouts: Timeouts,
    ) -> Result<RepositoryClient, RepoError> {
        let state_dir = data_dir.join("tuf");
        std::fs::create_dir_all(&state_dir).map_err(|source| crate::error::Error::DataDir {
            path: state_dir.clone(),
            source,
        })?;
        let pinned = std::fs::read(pinned_root).map_err(|source| RepoError::PinnedRoot {
            path: pinned_root.to_path_buf(),
            source,
        })?;
        let mut trusted = TrustedMetadata::from_pinned_root(&pinned, limits)?;
        // Roots saved after rotations are re-checked along the chain.
        let mut version = trusted.root().version + 1;
        while let Some(bytes) =
            files::read_optional(&state_dir.join(format!("{version}.root.json")))?
        {
            trusted.update_root(&bytes)?;
            version += 1;
        }
        // Expired or not: what was trusted is the rollback baseline, and
        // `target` refuses to use it once expired.
        if let Some(bytes) = files::read_optional(&state_dir.join("timestamp.json"))?
            && trusted.restore_timestamp(&bytes).is_ok()
            && let Some(bytes) = files::read_optional(&state_dir.join("snapshot.json"))?
            && trusted.restore_snapshot(&bytes).is_ok()
            && let Some(bytes) = files::read_optional(&state_dir.join("targets.json"))?
        {
            let _ = trusted.restore_targets(&bytes);
        }
        Ok(RepositoryClient {
            origin: Origin::new(base_url, timeouts)?,
            trusted,
            state_dir,
            peers: None,
        })
    }

    /// Reaches the repository over TLS with `tls` from now on.
    pub fn use_tls(&mut self, tls: posfleet_pki::rustls::ClientConfig) -> Result<(), RepoError> {
        self.origin.use_tls(tls)
    }

    /// Serves the metadata this client verified to the store's peers, and
    /// asks them for theirs when the origin is unreachable.
    pub async fn share_with_store(&mut self, p2p: P2p) {
        p2p.serve_metadata(&self.state_dir).await;
        self.peers = Some(p2p);
    }

    pub fn trusted(&self) -> &TrustedMetadata {
        &self.trusted
    }

    /// The origin (this repository's HTTP server) as a bundle fetcher.
    pub fn origin(&self) -> Origin {
        self.origin.clone()
    }

    /// The TUF client workflow: newer roots one by one, then timestamp,
    /// snapshot and targets, each verified before the next is fetched; from
    /// the origin, or from the store's peers when it is unreachable. What
    /// verified is saved (and trusted) only once the whole set did.
    pub async fn refresh(&mut self) -> Result<(), RepoError> {
        let update = match self.fetch_update(&Source::Origin(&self.origin)).await {
            Ok(update) => update,
            Err(error) if error.is_unreachable() => match self.peers.clone() {
                Some(p2p) => self.update_from_peers(&p2p, error).await?,
                None => return Err(error),
            },
            Err(error) => return Err(error),
        };
        for (name, bytes) in &update.files {
            files::write_private(&self.state_dir.join(name), bytes)?;
        }
        self.trusted = update.trusted;
        Ok(())
    }

    /// One run of the workflow against `source`, on a copy of what is
    /// trusted now.
    async fn fetch_update(&self, source: &Source<'_>) -> Result<Update, RepoError> {
        let mut trusted = self.trusted.clone();
        let mut files = Vec::new();
        let limits = *trusted.limits();
        loop {
            let wanted = Wanted::Root(trusted.next_root_version());
            let Some(bytes) = source.get(wanted, limits.max_root_size).await? else {
                break;
            };
            trusted.update_root(&bytes)?;
            files.push((wanted.saved_name(), bytes));
        }
        let now = Utc::now();
        trusted.finish_root_updates(now)?;
        let timestamp = source
            .get_required(Wanted::Timestamp, limits.max_timestamp_size)
            .await?;
        if !trusted.update_timestamp(&timestamp, now)? && trusted.targets().is_ok() {
            return Ok(Update { trusted, files }); // nothing new
        }
        files.push((Wanted::Timestamp.saved_name(), timestamp));
        let (version, size) = trusted.snapshot_to_fetch()?;
        let wanted = Wanted::Snapshot(version);
        let bytes = source.get_required(wanted, size).await?;
        trusted.update_snapshot(&bytes, now)?;
        files.push((wanted.saved_name(), bytes));
        let (version, size) = trusted.targets_to_fetch()?;
        let wanted = Wanted::Targets(version);
        let bytes = source.get_required(wanted, size).await?;
        trusted.update_targets(&bytes, now)?;
        files.push((wanted.saved_name(), bytes));
        Ok(Update { trusted, files })
    }

    /// The workflow against each connected store peer in turn, the one
    /// whose timestamp claims the newest version first, until one's
    /// metadata verifies. A peer whose metadata does not verify is not
    /// banned: it may just be older than what this till trusts.
    async fn update_from_peers(&self, p2p: &P2p, origin: RepoError) -> Result<Update, RepoError> {
        let peers = p2p.connected_members().await;
        let limit = self.trusted.limits().max_timestamp_size;
        let mut asks = tokio::task::JoinSet::new();
        for peer in peers {
            let p2p = p2p.clone();
            asks.spawn(async move {
                let answer = p2p
                    .metadata_from_peer(peer, &Wanted::Timestamp.saved_name(), limit)
                    .await;
                (peer, answer)
            });
        }
        let mut failures = Vec::new();
        let mut candidates = Vec::new();
        while let Some(joined) = asks.join_next().await {
            let Ok((peer, answer)) = joined else {
                continue; // a panicked ask is a bug elsewhere; the others count
            };
            match answer {
                Ok(Some(timestamp)) => {
                    candidates.push((claimed_version(&timestamp), peer, timestamp))
                }
                Ok(None) => failures.push(format!("{peer} has no timestamp.json")),
                Err(error) => failures.push(error.to_string()),
            }
        }
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, peer, timestamp) in candidates {
            let source = Source::Peer {
                p2p,
                peer,
                timestamp,
            };
            match self.fetch_update(&source).await {
                Ok(update) => {
                    tracing::info!(peer_id = %peer, "Repository metadata from a store peer, verified (the origin is unreachable).");
                    return Ok(update);
                }
                Err(error) => {
                    let error = match error {
                        error @ RepoError::Peer { .. } => error,
                        error => RepoError::FromPeer {
                            peer: peer.to_string(),
                            source: Box::new(error),
                        },
                    };
                    tracing::warn!(peer_id = %peer, %error, "Repository metadata from a store peer rejected.");
                    failures.push(error.to_string());
                }
            }
        }
        if failures.is_empty() {
            failures.push("no store peer connected".into());
        }
        Err(RepoError::NoPeerMetadata {
            origin: Box::new(origin),
            peers: failures.join("; "),
        })
    }

    /// A bundle the trusted metadata lists, for this hardware model, while
    /// that metadata is current: expired metadata (the repository could
    /// not be refreshed in time) starts nothing.
    pub fn target(&self, name: &str, hardware_model: &str) -> Result<VerifiedTarget, RepoError> {
        Ok(self.trusted.bundle(name, hardware_model, Utc::now())?)
    }

    /// The smallest delta the trusted metadata lists that rebuilds `result`
    /// from the bundle whose SHA-256 is `have`, for this hardware model,
    /// while that metadata is current; `None` when there is none.
    pub fn delta(
        &self,
        result: &VerifiedTarget,
        have: &[u8; 32],
        hardware_model: &str,
    ) -> Result<Option<VerifiedDelta>, RepoError> {
        Ok(self
            .trusted
            .delta_to(result, have, hardware_model, Utc::now())?)
    }

    /// Downloads a bundle from the origin into `dest` (see [`Origin`]).
    pub async fn download(&self, target: &VerifiedTarget, dest: &Path) -> Result<(), RepoError> {
        let list = self.origin.chunk_list(target).await?;
        let download = Download {
            target,
            list: &list,
            dest,
            progress: &|_| {},
        };
        self.origin.fetch(download).await?;
        Ok(())
    }
}

/// TUF's consistent-snapshot path of a target: the hash before the file name.
pub fn consistent_target_path(name: &str, sha256: &str) -> String {
    match name.rsplit_once('/') {
        Some((dir, file)) => format!("{dir}/{sha256}.{file}"),
        None => format!("{sha256}.{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_paths_put_the_hash_before_the_file_name() {
        assert_eq!(
            consistent_target_path("pos-app/1.1.0", "ab"),
            "pos-app/ab.1.1.0"
        );
        assert_eq!(consistent_target_path("catalog", "ab"), "ab.catalog");
    }
}
