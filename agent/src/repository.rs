//! The agent's view of the bundle repository: the TUF client workflow over
//! HTTP, starting from the pinned `root.json`, with every download bounded
//! in size (endless data) and time (slow retrieval). Trust is decided by
//! `posfleet-bundle` only; this module fetches bytes and keeps what was
//! trusted on disk so rollback protection survives restarts.

use chrono::Utc;
use posfleet_bundle::chunks::ChunkList;
use posfleet_bundle::client::{Limits, TrustedMetadata, VerifiedTarget};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    #[error(transparent)]
    Files(#[from] crate::error::Error),
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
    http: reqwest::Client,
    base_url: String,
    trusted: TrustedMetadata,
    state_dir: PathBuf,
    timeouts: Timeouts,
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
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.metadata)
            .read_timeout(timeouts.stall)
            .build()
            .map_err(|e| RepoError::Fetch {
                url: base_url.into(),
                message: e.to_string(),
            })?;
        Ok(RepositoryClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            trusted,
            state_dir,
            timeouts,
        })
    }

    pub fn trusted(&self) -> &TrustedMetadata {
        &self.trusted
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base_url)
    }

    /// GETs `path` whole, refusing more than `limit` bytes or more than the
    /// metadata timeout. `Ok(None)` on 404.
    async fn fetch(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, RepoError> {
        let url = self.url(path);
        let seconds = self.timeouts.metadata.as_secs();
        let fetch = async {
            let fail = |e: reqwest::Error| RepoError::Fetch {
                url: url.clone(),
                message: e.to_string(),
            };
            let mut response = self.http.get(&url).send().await.map_err(fail)?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !response.status().is_success() {
                return Err(RepoError::Fetch {
                    url: url.clone(),
                    message: format!("HTTP {}", response.status()),
                });
            }
            if response.content_length().is_some_and(|n| n > limit) {
                return Err(RepoError::TooLarge {
                    url: url.clone(),
                    limit,
                });
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(fail)? {
                if (body.len() + chunk.len()) as u64 > limit {
                    return Err(RepoError::TooLarge {
                        url: url.clone(),
                        limit,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Some(body))
        };
        tokio::time::timeout(self.timeouts.metadata, fetch)
            .await
            .unwrap_or(Err(RepoError::Timeout {
                url: url.clone(),
                seconds,
            }))
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

    /// The target's chunk list, fetched from anywhere and checked against
    /// its signed digest.
    pub async fn chunk_list(&self, target: &VerifiedTarget) -> Result<ChunkList, RepoError> {
        let digest: [u8; 32] = hex::decode(&target.info.chunks_sha256)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(posfleet_bundle::Error::ChunkListMismatch)?;
        let count = target
            .length
            .div_ceil(u64::from(target.info.chunk_size.max(1)));
        let path = format!("chunks/{}", target.info.chunks_sha256);
        let bytes = self
            .fetch(&path, count.saturating_mul(32))
            .await?
            .ok_or_else(|| RepoError::Fetch {
                url: self.url(&path),
                message: "not found".into(),
            })?;
        Ok(ChunkList::decode(
            &bytes,
            target.info.chunk_size,
            target.length,
            &digest,
        )?)
    }

    /// Downloads a bundle into `dest`, checking every piece before it is
    /// written, resuming from the verified pieces already in `dest`.
    pub async fn download(&self, target: &VerifiedTarget, dest: &Path) -> Result<(), RepoError> {
        use std::io::Write;
        let list = self.chunk_list(target).await?;
        let size = u64::from(list.chunk_size);
        // Keep the whole verified pieces already on disk.
        let mut have = 0u64;
        if let Ok(existing) = std::fs::read(dest) {
            for (index, piece) in existing.chunks(size as usize).enumerate() {
                if list.verify_chunk(index, piece).is_err() {
                    break;
                }
                have += piece.len() as u64;
            }
        }
        let write = |source| crate::error::Error::Write {
            path: dest.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(dest)
            .map_err(write)?;
        file.set_len(have).map_err(write)?;
        if have == target.length {
            return Ok(());
        }
        let url = self.url(&format!(
            "targets/{}",
            consistent_target_path(&target.name, &target.sha256)
        ));
        let fail = |e: reqwest::Error| {
            if e.is_timeout() {
                RepoError::Timeout {
                    url: url.clone(),
                    seconds: self.timeouts.stall.as_secs(),
                }
            } else {
                RepoError::Fetch {
                    url: url.clone(),
                    message: e.to_string(),
                }
            }
        };
        let mut request = self.http.get(&url);
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut response = request.send().await.map_err(fail)?;
        match response.status() {
            reqwest::StatusCode::PARTIAL_CONTENT if have > 0 => {}
            reqwest::StatusCode::OK => {
                // Whole file (a server that ignores Range): start over.
                have = 0;
                file.set_len(0).map_err(write)?;
            }
            status => {
                return Err(RepoError::Fetch {
                    url: url.clone(),
                    message: format!("HTTP {status}"),
                });
            }
        }
        let started = Instant::now();
        let mut received = 0u64;
        let mut index = (have / size) as usize;
        let mut piece = Vec::with_capacity(size as usize);
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(have)).map_err(write)?;
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            received += chunk.len() as u64;
            if have + received > target.length {
                return Err(RepoError::TooLarge {
                    url: url.clone(),
                    limit: target.length,
                });
            }
            let elapsed = started.elapsed();
            if elapsed > self.timeouts.stall {
                let rate = (received as f64 / elapsed.as_secs_f64()) as u64;
                if rate < self.timeouts.min_bytes_per_second {
                    return Err(RepoError::TooSlow {
                        url: url.clone(),
                        rate,
                        minimum: self.timeouts.min_bytes_per_second,
                    });
                }
            }
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let want = list.chunk_len(index)? as usize - piece.len();
                let take = want.min(rest.len());
                piece.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if piece.len() as u64 == list.chunk_len(index)? {
                    // Verified before it is written.
                    list.verify_chunk(index, &piece)?;
                    file.write_all(&piece).map_err(write)?;
                    piece.clear();
                    index += 1;
                }
            }
        }
        file.sync_all().map_err(write)?;
        if have + received != target.length {
            return Err(posfleet_bundle::Error::LengthMismatch {
                what: target.name.clone(),
                expected: target.length,
                actual: have + received,
            }
            .into());
        }
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
