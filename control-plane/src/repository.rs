//! The bundle repository the control plane serves: a TUF repository whose
//! root and targets metadata are signed by ops, and whose snapshot and
//! timestamp the control plane signs with its online keys. Every file ever
//! served is kept; the newest of each role is current.

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use posfleet_bundle::chunks::CHUNK_SIZE;
use posfleet_bundle::client::{Limits, TrustedMetadata};
use posfleet_bundle::tuf::{
    self, Key, ROOT, Root, SNAPSHOT, Snapshot, TARGETS, TIMESTAMP, Targets,
};
use posfleet_bundle::{Error as BundleError, repo};
use std::path::Path;
use std::sync::Arc;

use crate::blobs::{BlobError, BlobStore, Committed};
use crate::metadata_cache::MetadataCache;
use crate::storage::{BundleRecord, MetadataRecord, Storage};

/// How long a timestamp is valid; it is re-signed when half of that is left.
pub const TIMESTAMP_LIFETIME: Duration = Duration::days(1);
/// How long a snapshot is valid; it is re-signed when half of that is left.
pub const SNAPSHOT_LIFETIME: Duration = Duration::days(7);

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("the repository is not initialized: run `posfleet keys init`")]
    NotInitialized,
    #[error("the repository is already initialized")]
    AlreadyInitialized,
    /// Signed metadata that does not verify, with the verifier's reason.
    #[error("{0}")]
    Refused(String),
    #[error("the repository changed meanwhile; fetch it and sign again")]
    Conflict,
    /// The bundle's bytes could not be put in the object store; nothing
    /// was published.
    #[error("{0}; nothing was published: publish again once it answers")]
    BlobStoreUnavailable(String),
    /// The object store refused (credentials, permissions, bucket).
    #[error("{0}; nothing was published: the control plane's blob store settings need fixing")]
    BlobStoreRefused(String),
    #[error(transparent)]
    Internal(#[from] crate::error::Error),
}

impl From<BundleError> for RepoError {
    fn from(e: BundleError) -> Self {
        RepoError::Refused(e.to_string())
    }
}

impl From<RepoError> for tonic::Status {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotInitialized => tonic::Status::failed_precondition(e.to_string()),
            RepoError::AlreadyInitialized => tonic::Status::already_exists(e.to_string()),
            RepoError::Refused(m) => tonic::Status::invalid_argument(m),
            RepoError::Conflict => tonic::Status::aborted(e.to_string()),
            RepoError::BlobStoreUnavailable(_) => tonic::Status::unavailable(e.to_string()),
            RepoError::BlobStoreRefused(_) => tonic::Status::failed_precondition(e.to_string()),
            RepoError::Internal(e) => e.into(),
        }
    }
}

impl From<BlobError> for RepoError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Unavailable { .. } => {
                tracing::error!(error = %e, "Cannot store a bundle in the object store.");
                RepoError::BlobStoreUnavailable(e.to_string())
            }
            BlobError::Refused { .. } => {
                tracing::error!(error = %e, "The object store refused a bundle.");
                RepoError::BlobStoreRefused(e.to_string())
            }
            BlobError::Disk { source, .. } => {
                RepoError::Internal(crate::error::Error::Blob(source))
            }
        }
    }
}

fn expires_ms(expires: &str) -> Result<i64, RepoError> {
    DateTime::parse_from_rfc3339(expires)
        .map(|t| t.timestamp_millis())
        .map_err(|e| RepoError::Refused(format!("expires `{expires}`: {e}")))
}

/// Loads the hex Ed25519 seed at `path`, or generates one and writes it
/// there. The new key goes to `<path>.tmp` (mode 0600), is synced, renamed
/// into place and the directory synced: a crash or power cut at any moment
/// leaves either no key file (the next start generates one; nothing was
/// signed with the lost key) or a whole one, never a torn file that would
/// stop every later start.
pub(crate) fn load_or_create_key(path: &Path) -> std::io::Result<SigningKey> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let seed: [u8; 32] = hex::decode(String::from_utf8_lossy(&bytes).trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    std::io::Error::other(format!("{} is not a hex Ed25519 seed", path.display()))
                })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = repo::generate_key();
            posfleet_runtime::files::write_private(
                path,
                format!("{}\n", hex::encode(key.to_bytes())).as_bytes(),
            )?;
            tracing::info!(path = %path.display(), "Generated an online repository key.");
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// The repository: its metadata in the database (served from memory), its
/// blobs, and the online keys it signs snapshots and timestamps with.
pub struct Repository {
    storage: Storage,
    /// What `/repo/` serves, from memory.
    metadata: MetadataCache,
    blobs: Arc<BlobStore>,
    snapshot_key: SigningKey,
    timestamp_key: SigningKey,
    /// Held by this replica's task signing online metadata (with the
    /// database's lock for other replicas, see [`Repository::signed_alone`]).
    signing: tokio::sync::Mutex<()>,
}

/// A finished upload: the temporary file and what it holds.
pub struct Upload {
    pub target: String,
    pub temp: std::path::PathBuf,
}

impl Repository {
    /// A repository signing with `keys` (see [`crate::online_keys`]).
    pub fn open(
        storage: Storage,
        blobs: Arc<BlobStore>,
        keys: crate::online_keys::OnlineKeys,
    ) -> Repository {
        Repository {
            snapshot_key: keys.snapshot,
            timestamp_key: keys.timestamp,
            metadata: MetadataCache::new(storage.clone()),
            storage,
            blobs,
            signing: tokio::sync::Mutex::new(()),
        }
    }

    /// Runs `sign_and_store` while no other task of this replica, nor (on
    /// PostgreSQL) any other replica, signs online metadata: the snapshot
    /// and timestamp versions it reads are still the latest when it stores
    /// the next ones, so replicas never race for a version number.
    async fn signed_alone<T, F>(&self, sign_and_store: impl FnOnce() -> F) -> Result<T, RepoError>
    where
        F: std::future::Future<Output = Result<T, RepoError>>,
    {
        let _this_replica = self.signing.lock().await;
        let every_replica = self.storage.lock_online_signing().await?;
        let result = sign_and_store().await;
        every_replica.release().await;
        result
    }

    /// Refuses to serve with online keys other than the ones an initialized
    /// repository's root names: everything signed would be refused by the
    /// tills.
    pub async fn check_online_keys(&self) -> Result<(), RepoError> {
        let Some((_, root)) = self.latest(ROOT).await? else {
            return Ok(());
        };
        let root: Root = tuf::parse_envelope(ROOT, root.as_bytes(), u64::MAX)?.decode(ROOT)?;
        self.check_online_roles(&root).map_err(|_| {
            RepoError::Refused(
                "the repository's root names other online keys than this control plane holds: \
                 replicas must share them (the same repository_key_encryption_key_path on \
                 every replica, or the same repository-keys files)"
                    .into(),
            )
        })
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The metadata files `/repo/` serves.
    pub fn metadata_cache(&self) -> &MetadataCache {
        &self.metadata
    }

    /// Public halves of the online keys, hex.
    pub fn online_public_keys(&self) -> (String, String) {
        (
            hex::encode(self.snapshot_key.verifying_key().as_bytes()),
            hex::encode(self.timestamp_key.verifying_key().as_bytes()),
        )
    }

    async fn latest(&self, role: &str) -> Result<Option<(i64, String)>, RepoError> {
        Ok(self.storage.latest_metadata(role).await?)
    }

    /// The latest root and targets files (empty before init).
    pub async fn current(&self) -> Result<(String, String), RepoError> {
        let root = self.latest(ROOT).await?.map(|(_, b)| b).unwrap_or_default();
        let targets = self
            .latest(TARGETS)
            .await?
            .map(|(_, b)| b)
            .unwrap_or_default();
        Ok((root, targets))
    }

    /// The root must give the snapshot and timestamp roles to this control
    /// plane's online keys, or nothing it signs would be trusted.
    fn check_online_roles(&self, root: &Root) -> Result<(), RepoError> {
        for (role, key) in [
            (SNAPSHOT, &self.snapshot_key),
            (TIMESTAMP, &self.timestamp_key),
        ] {
            let id = Key::ed25519(&key.verifying_key()).id();
            let ok = root
                .roles
                .get(role)
                .is_some_and(|r| r.threshold == 1 && r.keyids == [id.clone()]);
            if !ok {
                return Err(RepoError::Refused(format!(
                    "the root must give the {role} role to the control plane's online key {id} alone (see `posfleet keys init`)"
                )));
            }
        }
        Ok(())
    }

    async fn trusted_root(&self) -> Result<(TrustedMetadata, String), RepoError> {
        let (_, root) = self.latest(ROOT).await?.ok_or(RepoError::NotInitialized)?;
        let trusted = TrustedMetadata::from_pinned_root(root.as_bytes(), Limits::default())?;
        Ok((trusted, root))
    }

    /// Verifies targets metadata against `root`.
    fn verify_targets(root: &Root, bytes: &[u8], now: DateTime<Utc>) -> Result<Targets, RepoError> {
        let envelope = tuf::parse_envelope(TARGETS, bytes, Limits::default().max_targets_size)?;
        let targets: Targets = envelope.decode(TARGETS)?;
        envelope.verify(TARGETS, root)?;
        tuf::check_expiry(TARGETS, &targets.expires, now)?;
        Ok(targets)
    }

    /// Signs the snapshot and timestamp naming `targets` (file `targets_bytes`).
    async fn sign_online(
        &self,
        targets_version: u64,
        targets_bytes: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Vec<MetadataRecord>, RepoError> {
        let snapshot_version = self
            .latest(SNAPSHOT)
            .await?
            .map(|(v, _)| v as u64)
            .unwrap_or(0)
            + 1;
        let timestamp_version = self
            .latest(TIMESTAMP)
            .await?
            .map(|(v, _)| v as u64)
            .unwrap_or(0)
            + 1;
        let snapshot = repo::snapshot(
            snapshot_version,
            now + SNAPSHOT_LIFETIME,
            targets_version,
            targets_bytes,
        );
        let snapshot_bytes = tuf::sign(&snapshot, &[&self.snapshot_key]);
        let timestamp = repo::timestamp(
            timestamp_version,
            now + TIMESTAMP_LIFETIME,
            snapshot_version,
            &snapshot_bytes,
        );
        let timestamp_bytes = tuf::sign(&timestamp, &[&self.timestamp_key]);
        Ok(vec![
            record(
                SNAPSHOT,
                snapshot_version,
                &snapshot_bytes,
                &snapshot.expires,
            )?,
            record(
                TIMESTAMP,
                timestamp_version,
                &timestamp_bytes,
                &timestamp.expires,
            )?,
        ])
    }

    pub async fn init(
        &self,
        root_bytes: &[u8],
        targets_bytes: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), RepoError> {
        if self.latest(ROOT).await?.is_some() {
            return Err(RepoError::AlreadyInitialized);
        }
        let trusted = TrustedMetadata::from_pinned_root(root_bytes, Limits::default())?;
        let root = trusted.root().clone();
        if root.version != 1 {
            return Err(RepoError::Refused(format!(
                "the first root must be version 1, not {}",
                root.version
            )));
        }
        if !root.consistent_snapshot {
            return Err(RepoError::Refused(
                "the root must use consistent snapshots".into(),
            ));
        }
        tuf::check_expiry(ROOT, &root.expires, now)?;
        self.check_online_roles(&root)?;
        let targets = Self::verify_targets(&root, targets_bytes, now)?;
        if targets.version != 1 || !targets.targets.is_empty() {
            return Err(RepoError::Refused(
                "the first targets metadata must be version 1 and empty".into(),
            ));
        }
        let mut files = vec![
            record(ROOT, 1, root_bytes, &root.expires)?,
            record(TARGETS, 1, targets_bytes, &targets.expires)?,
        ];
        let stored = self
            .signed_alone(|| async {
                files.extend(self.sign_online(1, targets_bytes, now).await?);
                Ok(self
                    .storage
                    .insert_metadata(&files, None, now.timestamp_millis())
                    .await?)
            })
            .await?;
        if !stored {
            return Err(RepoError::AlreadyInitialized);
        }
        self.metadata.stored();
        tracing::info!(
            root_keys = root.roles[ROOT].keyids.len(),
            "Bundle repository initialized."
        );
        Ok(())
    }

    /// Installs root N+1, signed by thresholds of root N and of itself.
    pub async fn update_root(&self, bytes: &[u8], now: DateTime<Utc>) -> Result<u64, RepoError> {
        let (mut trusted, _) = self.trusted_root().await?;
        trusted.update_root(bytes)?;
        let root = trusted.root().clone();
        tuf::check_expiry(ROOT, &root.expires, now)?;
        self.check_online_roles(&root)?;
        let files = [record(ROOT, root.version, bytes, &root.expires)?];
        if !self
            .storage
            .insert_metadata(&files, None, now.timestamp_millis())
            .await?
        {
            return Err(RepoError::Conflict);
        }
        self.metadata.stored();
        tracing::info!(version = root.version, "Root rotated.");
        Ok(root.version)
    }

    /// Publishes new targets metadata and, with `upload`, the bundle it adds.
    /// Targets already published can be neither changed nor removed.
    pub async fn publish(
        &self,
        targets_bytes: &[u8],
        upload: Option<Upload>,
        now: DateTime<Utc>,
    ) -> Result<Option<BundleRecord>, RepoError> {
        let mut stored = Vec::new();
        let published = self
            .publish_inner(targets_bytes, upload.as_ref(), now, &mut stored)
            .await;
        if published.is_err() {
            self.discard_unpublished(&stored).await;
        }
        published
    }

    /// Removes the blobs a failed publish stored, unless a published bundle
    /// names them (one published meanwhile with the same bytes).
    async fn discard_unpublished(&self, stored: &[String]) {
        if stored.is_empty() {
            return;
        }
        let named: std::collections::HashSet<String> = match self.storage.list_bundles(None).await {
            Ok(bundles) => bundles
                .into_iter()
                .flat_map(|b| [b.sha256, b.chunks_sha256])
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "Cannot list the bundles; the blobs of a failed publish stay.");
                return;
            }
        };
        for sha256 in stored.iter().filter(|s| !named.contains(*s)) {
            if let Err(error) = self.blobs.discard(sha256).await {
                tracing::warn!(%error, %sha256, "Cannot remove a blob of a failed publish; nothing names it.");
            }
        }
    }

    async fn publish_inner(
        &self,
        targets_bytes: &[u8],
        upload: Option<&Upload>,
        now: DateTime<Utc>,
        stored: &mut Vec<String>,
    ) -> Result<Option<BundleRecord>, RepoError> {
        let (trusted, _) = self.trusted_root().await?;
        let root = trusted.root();
        let (_, previous) = self
            .latest(TARGETS)
            .await?
            .ok_or(RepoError::NotInitialized)?;
        let previous: Targets =
            tuf::parse_envelope(TARGETS, previous.as_bytes(), u64::MAX)?.decode(TARGETS)?;
        let new = Self::verify_targets(root, targets_bytes, now)?;
        let expected = previous
            .version
            .checked_add(1)
            .ok_or_else(|| RepoError::Refused("the targets version cannot grow any more".into()))?;
        if new.version != expected {
            return Err(RepoError::Refused(format!(
                "targets version {} must be {expected} (one more than the current)",
                new.version
            )));
        }
        for (name, file) in &previous.targets {
            if new.targets.get(name) != Some(file) {
                return Err(RepoError::Refused(format!(
                    "publishing cannot change or remove target {name}"
                )));
            }
        }
        let added: Vec<&String> = new
            .targets
            .keys()
            .filter(|n| !previous.targets.contains_key(*n))
            .collect();
        let expected: Vec<&String> = upload.map(|u| &u.target).into_iter().collect();
        if added != expected {
            return Err(RepoError::Refused(format!(
                "the new targets metadata adds {added:?}, but the upload carries {expected:?}"
            )));
        }
        let mut bundle = None;
        if let Some(upload) = upload {
            bundle = Some(self.store_upload(upload, &new, now, stored).await?);
        }
        let mut files = vec![record(TARGETS, new.version, targets_bytes, &new.expires)?];
        let stored = self
            .signed_alone(|| async {
                files.extend(self.sign_online(new.version, targets_bytes, now).await?);
                Ok(self
                    .storage
                    .insert_metadata(&files, bundle.as_ref(), now.timestamp_millis())
                    .await?)
            })
            .await?;
        // Only another publish of the same targets version gets here: the
        // caller's targets metadata is stale.
        if !stored {
            return Err(RepoError::Conflict);
        }
        self.metadata.stored();
        if let Some(b) = &bundle {
            tracing::info!(target = %b.target, length = b.length, targets_version = new.version, "Bundle published.");
        }
        Ok(bundle)
    }

    /// Checks the uploaded bytes against their signed target entry, then
    /// stores them and their chunk list, adding to `stored` the blobs that
    /// were not there before.
    async fn store_upload(
        &self,
        upload: &Upload,
        targets: &Targets,
        now: DateTime<Utc>,
        stored: &mut Vec<String>,
    ) -> Result<BundleRecord, RepoError> {
        let name = &upload.target;
        let file = &targets.targets[name];
        let info = file.bundle_info(name)?;
        let delta_from = match &info.delta {
            Some(delta) => Some(Self::check_delta(name, &info, delta, targets)?),
            None => None,
        };
        // A delta's name and version are the bundle's it rebuilds.
        let bundle_target = info
            .delta
            .as_ref()
            .map_or(name.as_str(), |d| d.result.as_str());
        let (bundle_name, version) = bundle_target
            .split_once('/')
            .ok_or_else(|| RepoError::Refused(format!("target {name} is not <name>/<version>")))?;
        if version != info.version || semver::Version::parse(version).is_err() {
            return Err(RepoError::Refused(format!(
                "target {name} must end in its semver version {}",
                info.version
            )));
        }
        if info.chunk_size != CHUNK_SIZE {
            return Err(RepoError::Refused(format!(
                "chunk_size must be {CHUNK_SIZE}"
            )));
        }
        // posfleet-bundle reads the bytes and decides whether they are the
        // signed bundle (length, SHA-256, chunk list digest).
        let (entry, target, temp) = (file.clone(), name.clone(), upload.temp.clone());
        let digest = tokio::task::spawn_blocking(move || entry.verify_file(&target, &temp))
            .await
            .map_err(|e| RepoError::Internal(crate::error::Error::Blob(std::io::Error::other(e))))?
            .map_err(|e| match e {
                BundleError::Read { source, .. } => {
                    RepoError::Internal(crate::error::Error::Blob(source))
                }
                e => RepoError::Refused(format!("the uploaded bytes are refused: {e}")),
            })?;
        let sha256 = hex::encode(digest.sha256);
        let chunks_sha256 = hex::encode(digest.chunks.digest());
        let io = |e: std::io::Error| RepoError::Internal(crate::error::Error::Blob(e));
        let list_temp = self.blobs.temp_path();
        tokio::fs::write(&list_temp, digest.chunks.encode())
            .await
            .map_err(io)?;
        for (temp, hash) in [(&list_temp, &chunks_sha256), (&upload.temp, &sha256)] {
            let committed = self.blobs.commit(temp, hash).await;
            if committed.is_err() {
                let _ = tokio::fs::remove_file(&list_temp).await;
            }
            if committed? == Committed::New {
                stored.push(hash.clone());
            }
        }
        Ok(BundleRecord {
            target: name.clone(),
            name: bundle_name.into(),
            version: version.into(),
            kind: serde_json::to_value(info.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            hardware: info.hardware,
            length: digest.length as i64,
            sha256,
            chunks_sha256,
            targets_version: targets.version as i64,
            published_at_ms: now.timestamp_millis(),
            delta_from: delta_from.unwrap_or_default(),
        })
    }

    /// Checks a delta target `name` against the targets metadata it is
    /// published in: named `<name>/<version>/from-<base>.delta` after the
    /// bundle it rebuilds and the one it applies to, both published with
    /// the SHA-256 the delta names, the base older, and its kind, version
    /// and hardware the rebuilt bundle's. Returns the base's version. The
    /// delta's bytes are not applied here: a till checks what it rebuilds
    /// against the bundle's signed hash, and fetches the bundle whole when
    /// that fails.
    fn check_delta(
        name: &str,
        info: &posfleet_bundle::tuf::BundleInfo,
        delta: &posfleet_bundle::tuf::DeltaInfo,
        targets: &Targets,
    ) -> Result<String, RepoError> {
        let refused = |why: String| RepoError::Refused(format!("delta {name}: {why}"));
        let published =
            |target: &str, sha256: &str| -> Result<posfleet_bundle::tuf::BundleInfo, RepoError> {
                let file = targets
                    .targets
                    .get(target)
                    .ok_or_else(|| refused(format!("{target} is not published")))?;
                if file.sha256() != Some(sha256) {
                    return Err(refused(format!(
                        "it names {target} with SHA-256 {sha256}, which is not the published one"
                    )));
                }
                let info = file.bundle_info(target)?;
                if info.delta.is_some() {
                    return Err(refused(format!("{target} is a delta, not a bundle")));
                }
                Ok(info)
            };
        let result = published(&delta.result, &delta.result_sha256)?;
        let base = published(&delta.base, &delta.base_sha256)?;
        let (result_name, _) = delta.result.split_once('/').unwrap_or_default();
        let (base_name, base_version) = delta.base.split_once('/').unwrap_or_default();
        let expected = format!("{}/from-{base_version}.delta", delta.result);
        if name != expected || base_name != result_name {
            return Err(refused(format!(
                "it must be named {expected}, after the bundle it rebuilds and one of its earlier versions"
            )));
        }
        let older = match (
            semver::Version::parse(&base.version),
            semver::Version::parse(&result.version),
        ) {
            (Ok(base), Ok(result)) => base < result,
            _ => false,
        };
        if !older {
            return Err(refused(format!(
                "it must rebuild a newer version than {}",
                delta.base
            )));
        }
        if (info.kind, &info.version, &info.hardware)
            != (result.kind, &result.version, &result.hardware)
        {
            return Err(refused(format!(
                "its kind, version and hardware must be those of {}",
                delta.result
            )));
        }
        Ok(base.version)
    }

    /// Re-signs the snapshot (and timestamp) or the timestamp alone when half
    /// of its lifetime is gone. Returns true when something was signed.
    pub async fn refresh(&self, now: DateTime<Utc>) -> Result<bool, RepoError> {
        self.signed_alone(|| self.refresh_alone(now)).await
    }

    async fn refresh_alone(&self, now: DateTime<Utc>) -> Result<bool, RepoError> {
        let Some((_, timestamp)) = self.latest(TIMESTAMP).await? else {
            return Ok(false);
        };
        let (_, snapshot) = self
            .latest(SNAPSHOT)
            .await?
            .ok_or(RepoError::NotInitialized)?;
        let timestamp: tuf::Timestamp =
            tuf::parse_envelope(TIMESTAMP, timestamp.as_bytes(), u64::MAX)?.decode(TIMESTAMP)?;
        let snapshot_meta: Snapshot =
            tuf::parse_envelope(SNAPSHOT, snapshot.as_bytes(), u64::MAX)?.decode(SNAPSHOT)?;
        let due = |expires: &str, lifetime: Duration| -> Result<bool, RepoError> {
            Ok(expires_ms(expires)? - now.timestamp_millis() < lifetime.num_milliseconds() / 2)
        };
        let files = if due(&snapshot_meta.expires, SNAPSHOT_LIFETIME)? {
            let (targets_version, targets) = self
                .latest(TARGETS)
                .await?
                .ok_or(RepoError::NotInitialized)?;
            self.sign_online(targets_version as u64, targets.as_bytes(), now)
                .await?
        } else if due(&timestamp.expires, TIMESTAMP_LIFETIME)? {
            let version = timestamp.version + 1;
            let t = repo::timestamp(
                version,
                now + TIMESTAMP_LIFETIME,
                snapshot_meta.version,
                snapshot.as_bytes(),
            );
            let bytes = tuf::sign(&t, &[&self.timestamp_key]);
            vec![record(TIMESTAMP, version, &bytes, &t.expires)?]
        } else {
            return Ok(false);
        };
        // Signed alone, so only a database edited by hand refuses it.
        let signed = self
            .storage
            .insert_metadata(&files, None, now.timestamp_millis())
            .await?;
        if signed {
            self.metadata.stored();
            tracing::info!(
                files = files.len(),
                "Re-signed repository metadata before it expires."
            );
        }
        Ok(signed)
    }
}

fn record(
    role: &str,
    version: u64,
    bytes: &[u8],
    expires: &str,
) -> Result<MetadataRecord, RepoError> {
    Ok(MetadataRecord {
        role: role.into(),
        version: version as i64,
        body: String::from_utf8(bytes.to_vec())
            .map_err(|_| RepoError::Refused(format!("{role} metadata is not UTF-8")))?,
        expires_at_ms: expires_ms(expires)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_written_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.key");
        // The temporary file cannot be written (a directory is in its way):
        // no key file appears, so the next start generates a key again.
        std::fs::create_dir(dir.path().join("snapshot.key.tmp")).unwrap();
        assert!(load_or_create_key(&path).is_err());
        assert!(!path.exists());
        // What a crash mid-write leaves: a torn, world-readable temp file.
        std::fs::remove_dir(dir.path().join("snapshot.key.tmp")).unwrap();
        std::fs::write(dir.path().join("snapshot.key.tmp"), b"12ab").unwrap();
        std::fs::set_permissions(
            dir.path().join("snapshot.key.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let key = load_or_create_key(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.path().join("snapshot.key.tmp").exists());
        // And it is the key read back at the next start.
        assert_eq!(
            load_or_create_key(&path).unwrap().to_bytes(),
            key.to_bytes()
        );
    }
}
