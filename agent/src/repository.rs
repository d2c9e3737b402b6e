//! The agent's view of the bundle repository: the TUF client workflow over
//! HTTP, starting from the pinned `root.json`, with every download bounded
//! in size (endless data) and time (slow retrieval). Trust is decided by
//! `posfleet-bundle` only; this module fetches bytes and keeps what was
//! trusted on disk so rollback protection survives restarts.

use chrono::Utc;
use posfleet_bundle::client::{Limits, TrustedMetadata, VerifiedTarget};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fetch::{Fetcher, Origin};

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
    /// No connection, no answer in time, or a gateway error.
    #[error("{url}: unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error(transparent)]
    Files(#[from] crate::error::Error),
}

impl RepoError {
    /// The origin did not answer at all (as opposed to answering with
    /// something refused).
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
}

const ROLES: [&str; 3] = ["timestamp", "snapshot", "targets"];

impl RepositoryClient {
    /// Starts from the newest root trusted before (kept in
    /// `<data_dir>/tuf/`), else from the pinned root; reloads the timestamp,
    /// snapshot and targets trusted before, when still valid.
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
        let now = Utc::now();
        if let Some(bytes) = files::read_optional(&state_dir.join("timestamp.json"))?
            && trusted.update_timestamp(&bytes, now).is_ok()
            && let Some(bytes) = files::read_optional(&state_dir.join("snapshot.json"))?
            && trusted.update_snapshot(&bytes, now).is_ok()
            && let Some(bytes) = files::read_optional(&state_dir.join("targets.json"))?
        {
            let _ = trusted.update_targets(&bytes, now);
        }
        Ok(RepositoryClient {
            origin: Origin::new(base_url, timeouts)?,
            trusted,
            state_dir,
        })
    }

    pub fn trusted(&self) -> &TrustedMetadata {
        &self.trusted
    }

    fn url(&self, path: &str) -> String {
        self.origin.url(path)
    }

    async fn fetch(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, RepoError> {
        self.origin.get_whole(path, limit).await
    }

    /// The origin (this repository's HTTP server) as a bundle fetcher.
    pub fn origin(&self) -> Origin {
        self.origin.clone()
    }

    fn save(&self, name: &str, bytes: &[u8]) -> Result<(), RepoError> {
        Ok(files::write_private(&self.state_dir.join(name), bytes)?)
    }

    /// The TUF client workflow: newer roots one by one, then timestamp,
    /// snapshot and targets, each verified before the next is fetched.
    pub async fn refresh(&mut self) -> Result<(), RepoError> {
        let limits = *self.trusted.limits();
        loop {
            let version = self.trusted.next_root_version();
            let Some(bytes) = self
                .fetch(&format!("{version}.root.json"), limits.max_root_size)
                .await?
            else {
                break;
            };
            self.trusted.update_root(&bytes)?;
            self.save(&format!("{version}.root.json"), &bytes)?;
        }
        let now = Utc::now();
        self.trusted.finish_root_updates(now)?;
        let timestamp = self
            .fetch("timestamp.json", limits.max_timestamp_size)
            .await?
            .ok_or_else(|| RepoError::Fetch {
                url: self.url("timestamp.json"),
                message: "not found".into(),
            })?;
        if !self.trusted.update_timestamp(&timestamp, now)? && self.trusted.targets().is_ok() {
            return Ok(()); // nothing new
        }
        self.save("timestamp.json", &timestamp)?;
        for role in &ROLES[1..] {
            let (version, size) = if *role == "snapshot" {
                self.trusted.snapshot_to_fetch()?
            } else {
                self.trusted.targets_to_fetch()?
            };
            let path = format!("{version}.{role}.json");
            let bytes = self
                .fetch(&path, size)
                .await?
                .ok_or_else(|| RepoError::Fetch {
                    url: self.url(&path),
                    message: "not found".into(),
                })?;
            if *role == "snapshot" {
                self.trusted.update_snapshot(&bytes, now)?;
            } else {
                self.trusted.update_targets(&bytes, now)?;
            }
            self.save(&format!("{role}.json"), &bytes)?;
        }
        Ok(())
    }

    /// A bundle the trusted metadata lists, for this hardware model.
    pub fn target(&self, name: &str, hardware_model: &str) -> Result<VerifiedTarget, RepoError> {
        Ok(self.trusted.bundle(name, hardware_model)?)
    }

    /// Downloads a bundle from the origin into `dest` (see [`Origin`]).
    pub async fn download(&self, target: &VerifiedTarget, dest: &Path) -> Result<(), RepoError> {
        let list = self.origin.chunk_list(target).await?;
        self.origin.fetch(target, &list, dest, &|_| {}).await?;
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
