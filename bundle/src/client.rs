//! The client side of TUF: which metadata to trust, given bytes from
//! anywhere. It follows the TUF client workflow: start from a pinned root,
//! follow root rotations one version at a time, then timestamp, snapshot
//! and targets, each checked for size, signatures, version and expiry.
//! Fetching is the caller's job (this crate does no I/O); trust is decided
//! here only.

use chrono::{DateTime, Utc};
use std::path::Path;

use crate::chunks::{self, ChunkList};
use crate::error::{Error, Result};
use crate::manifest::Kind;
use crate::tuf::{
    self, Envelope, ROOT, Root, SNAPSHOT, Snapshot, TARGETS, TIMESTAMP, TargetFile, Targets,
    Timestamp, check_expiry, parse_envelope, sha256_hex,
};

/// Upper bounds on what the client downloads and accepts (TUF's endless data
/// attack). The defaults suit a fleet repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_root_size: u64,
    pub max_timestamp_size: u64,
    /// Used when the timestamp gives no length for the snapshot.
    pub max_snapshot_size: u64,
    /// Used when the snapshot gives no length for targets.
    pub max_targets_size: u64,
    /// Root versions followed in one update.
    pub max_root_updates: u64,
    pub max_bundle_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_root_size: 512 * 1024,
            max_timestamp_size: 16 * 1024,
            max_snapshot_size: 1024 * 1024,
            max_targets_size: 32 * 1024 * 1024,
            max_root_updates: 256,
            max_bundle_size: 8 * 1024 * 1024 * 1024,
        }
    }
}

/// A delta the repository vouches for: its file, fetched and verified like
/// any target, and the bundle it applies to. Only
/// [`TrustedMetadata::delta_to`] builds one, for a till holding that bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDelta {
    file: VerifiedTarget,
    base: String,
    base_sha256: [u8; 32],
}

impl VerifiedDelta {
    /// The delta file as a target (fetch it, verify it, as any target).
    pub fn file(&self) -> &VerifiedTarget {
        &self.file
    }

    /// The bundle target it applies to.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn base_sha256(&self) -> &[u8; 32] {
        &self.base_sha256
    }
}

/// A target the repository vouches for, with its posfleet fields. Only
/// [`TrustedMetadata::bundle`] builds one, from metadata it verified and
/// that has not expired; its fields are private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTarget {
    name: String,
    length: u64,
    sha256: [u8; 32],
    kind: Kind,
    version: String,
    hardware: Vec<String>,
    chunk_size: u32,
    chunks_sha256: [u8; 32],
}

impl VerifiedTarget {
    /// `<bundle>/<version>`, the target's path in the repository.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bundle's signed length in bytes.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The bundle's signed SHA-256.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The version in the signed `custom` fields.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The hardware models it is signed for (`*`: any).
    pub fn hardware(&self) -> &[String] {
        &self.hardware
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The signed digest of the bundle's chunk list.
    pub fn chunks_sha256(&self) -> &[u8; 32] {
        &self.chunks_sha256
    }

    pub fn chunks_sha256_hex(&self) -> String {
        hex::encode(self.chunks_sha256)
    }

    /// The size of this bundle's encoded chunk list: the most to accept
    /// from whoever serves it.
    pub fn chunk_list_len(&self) -> u64 {
        // `bundle` checked the chunk size (not 0) and the length (bounded),
        // so this cannot overflow; u64::MAX would only make the bound loose.
        chunks::encoded_len(self.chunk_size, self.length).unwrap_or(u64::MAX)
    }

    /// Parses this bundle's chunk list, fetched from anywhere, against its
    /// signed digest, piece size and length (see [`ChunkList::decode`]).
    pub fn decode_chunk_list(&self, bytes: &[u8]) -> Result<ChunkList> {
        ChunkList::decode(bytes, self.chunk_size, self.length, &self.chunks_sha256)
    }

    /// Checks the whole file at `path` against the signed length and
    /// SHA-256: [`Error::LengthMismatch`] or [`Error::HashMismatch`] when
    /// it is not the bundle ([`Error::is_bad_digest`]), [`Error::Read`]
    /// when it cannot be read. Blocking; hashes each byte once.
    pub fn verify_file(&self, path: &Path) -> Result<()> {
        let read = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let actual = file.metadata().map_err(read)?.len();
        if actual != self.length {
            return Err(Error::LengthMismatch {
                what: format!("{} at {}", self.name, path.display()),
                expected: self.length,
                actual,
            });
        }
        let (read_len, sha256) = chunks::sha256_reader(file).map_err(read)?;
        if read_len != self.length {
            return Err(Error::LengthMismatch {
                what: format!("{} at {}", self.name, path.display()),
                expected: self.length,
                actual: read_len,
            });
        }
        if sha256 != self.sha256 {
            return Err(Error::HashMismatch {
                what: format!("{} at {}", self.name, path.display()),
            });
        }
        Ok(())
    }
}

fn digest_field(name: &str, field: &str, value: &str) -> Result<[u8; 32]> {
    hex::decode(value)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| Error::Malformed {
            role: TARGETS.into(),
            message: format!("target {name} has a {field} that is not a SHA-256 in hex"),
        })
}

/// The metadata trusted so far, each file kept as received.
#[derive(Debug, Clone)]
pub struct TrustedMetadata {
    limits: Limits,
    root: Root,
    root_updates: u64,
    timestamp: Option<(Timestamp, Vec<u8>)>,
    snapshot: Option<(Snapshot, Vec<u8>)>,
    targets: Option<(Targets, Vec<u8>)>,
}

fn check_length_and_hashes(what: &str, bytes: &[u8], meta: &tuf::MetaFile) -> Result<()> {
    if let Some(length) = meta.length
        && bytes.len() as u64 != length
    {
        return Err(Error::LengthMismatch {
            what: what.into(),
            expected: length,
            actual: bytes.len() as u64,
        });
    }
    if let Some(hashes) = &meta.hashes {
        let sha256 = hashes.get("sha256").ok_or_else(|| Error::Malformed {
            role: what.into(),
            message: "no sha256 hash given".into(),
        })?;
        if &sha256_hex(bytes) != sha256 {
            return Err(Error::HashMismatch { what: what.into() });
        }
    }
    Ok(())
}

/// A root must be rotatable: version N+1 must exist.
fn check_root_version(root: &Root) -> Result<()> {
    if root.version == 0 || root.version == u64::MAX {
        return Err(Error::Malformed {
            role: ROOT.into(),
            message: format!("version {} cannot be followed by a rotation", root.version),
        });
    }
    Ok(())
}

impl TrustedMetadata {
    /// Starts from the root shipped with the agent. It must be signed by a
    /// threshold of its own root keys; its expiry is checked after updates.
    pub fn from_pinned_root(bytes: &[u8], limits: Limits) -> Result<TrustedMetadata> {
        let envelope = parse_envelope(ROOT, bytes, limits.max_root_size)?;
        let root: Root = envelope.decode(ROOT)?;
        check_root_version(&root)?;
        envelope.verify(ROOT, &root)?;
        Ok(TrustedMetadata {
            limits,
            root,
            root_updates: 0,
            timestamp: None,
            snapshot: None,
            targets: None,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The version of root to ask for next.
    pub fn next_root_version(&self) -> u64 {
        self.root.version + 1
    }

    /// Accepts root version N+1: signed by a threshold of the trusted root's
    /// root keys and of its own. When the timestamp or snapshot keys change,
    /// trusted timestamp and snapshot are dropped (fast-forward recovery).
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<()> {
        if self.root_updates >= self.limits.max_root_updates {
            return Err(Error::TooManyRootUpdates {
                limit: self.limits.max_root_updates,
            });
        }
        let envelope = parse_envelope(ROOT, bytes, self.limits.max_root_size)?;
        let new: Root = envelope.decode(ROOT)?;
        check_root_version(&new)?;
        envelope.verify(ROOT, &self.root)?;
        if new.version != self.root.version + 1 {
            return Err(Error::RootVersionSkip {
                trusted: self.root.version,
                offered: new.version,
            });
        }
        envelope.verify(ROOT, &new)?;
        let keys_of = |root: &Root, role: &str| {
            root.roles.get(role).map(|r| {
                let mut ids = r.keyids.clone();
                ids.sort();
                (ids, r.threshold)
            })
        };
        if keys_of(&self.root, TIMESTAMP) != keys_of(&new, TIMESTAMP)
            || keys_of(&self.root, SNAPSHOT) != keys_of(&new, SNAPSHOT)
        {
            self.timestamp = None;
            self.snapshot = None;
        }
        self.root = new;
        self.root_updates += 1;
        Ok(())
    }

    /// Called once no newer root is found: the final root must be current.
    pub fn finish_root_updates(&mut self, now: DateTime<Utc>) -> Result<()> {
        self.root_updates = 0;
        check_expiry(ROOT, &self.root.expires, now)
    }

    /// Accepts a timestamp. Returns false when it is the one already trusted.
    pub fn update_timestamp(&mut self, bytes: &[u8], now: DateTime<Utc>) -> Result<bool> {
        self.accept_timestamp(bytes, Some(now))
    }

    /// Reloads the timestamp this client trusted before a restart (saved
    /// on disk): checked like a fresh one, except that it may have expired
    /// since. An expired timestamp still holds the rollback baseline (the
    /// versions below which nothing is accepted); it never vouches for a
    /// target ([`TrustedMetadata::bundle`] checks expiry).
    pub fn restore_timestamp(&mut self, bytes: &[u8]) -> Result<()> {
        self.accept_timestamp(bytes, None).map(drop)
    }

    /// Reloads the snapshot trusted before a restart, which the restored
    /// timestamp names; expired or not, as [`Self::restore_timestamp`].
    pub fn restore_snapshot(&mut self, bytes: &[u8]) -> Result<()> {
        self.accept_snapshot(bytes, None)
    }

    /// Reloads the targets trusted before a restart, which the restored
    /// snapshot names; expired or not, as [`Self::restore_timestamp`].
    pub fn restore_targets(&mut self, bytes: &[u8]) -> Result<()> {
        self.accept_targets(bytes, None)
    }

    /// `now`: the time to check expiry at; `None` for metadata trusted
    /// before (a restart), whose expiry is checked when it is used.
    fn accept_timestamp(&mut self, bytes: &[u8], now: Option<DateTime<Utc>>) -> Result<bool> {
        let envelope = parse_envelope(TIMESTAMP, bytes, self.limits.max_timestamp_size)?;
        let new: Timestamp = envelope.decode(TIMESTAMP)?;
        envelope.verify(TIMESTAMP, &self.root)?;
        let new_snapshot = new
            .meta
            .get("snapshot.json")
            .ok_or_else(|| Error::Malformed {
                role: TIMESTAMP.into(),
                message: "no snapshot.json entry".into(),
            })?;
        if let Some((old, _)) = &self.timestamp {
            if new.version < old.version {
                return Err(Error::RollbackAttempt {
                    role: TIMESTAMP.into(),
                    trusted: old.version,
                    offered: new.version,
                });
            }
            let old_snapshot = old
                .meta
                .get("snapshot.json")
                .map(|m| m.version)
                .unwrap_or(0);
            if new_snapshot.version < old_snapshot {
                return Err(Error::RollbackAttempt {
                    role: SNAPSHOT.into(),
                    trusted: old_snapshot,
                    offered: new_snapshot.version,
                });
            }
            if new.version == old.version {
                if let Some(now) = now {
                    check_expiry(TIMESTAMP, &old.expires, now)?;
                }
                return Ok(false);
            }
        }
        if let Some(now) = now {
            check_expiry(TIMESTAMP, &new.expires, now)?;
        }
        self.timestamp = Some((new, bytes.to_vec()));
        Ok(true)
    }

    /// The snapshot version and size the trusted timestamp names.
    pub fn snapshot_to_fetch(&self) -> Result<(u64, u64)> {
        let (timestamp, _) = self
            .timestamp
            .as_ref()
            .ok_or(Error::MissingMetadata(TIMESTAMP))?;
        let meta = &timestamp.meta["snapshot.json"];
        Ok((
            meta.version,
            meta.length.unwrap_or(self.limits.max_snapshot_size),
        ))
    }

    pub fn update_snapshot(&mut self, bytes: &[u8], now: DateTime<Utc>) -> Result<()> {
        self.accept_snapshot(bytes, Some(now))
    }

    fn accept_snapshot(&mut self, bytes: &[u8], now: Option<DateTime<Utc>>) -> Result<()> {
        let (timestamp, _) = self
            .timestamp
            .as_ref()
            .ok_or(Error::MissingMetadata(TIMESTAMP))?;
        let meta = &timestamp.meta["snapshot.json"];
        let limit = meta
            .length
            .unwrap_or(self.limits.max_snapshot_size)
            .min(self.limits.max_snapshot_size);
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                role: SNAPSHOT.into(),
                size: bytes.len() as u64,
                limit,
            });
        }
        check_length_and_hashes(SNAPSHOT, bytes, meta)?;
        let envelope = parse_envelope(SNAPSHOT, bytes, limit)?;
        let new: Snapshot = envelope.decode(SNAPSHOT)?;
        envelope.verify(SNAPSHOT, &self.root)?;
        if new.version != meta.version {
            return Err(Error::VersionMismatch {
                role: SNAPSHOT.into(),
                expected: meta.version,
                offered: new.version,
                by: TIMESTAMP.into(),
            });
        }
        if !new.meta.contains_key("targets.json") {
            return Err(Error::Malformed {
                role: SNAPSHOT.into(),
                message: "no targets.json entry".into(),
            });
        }
        if let Some((old, _)) = &self.snapshot {
            for (name, old_meta) in &old.meta {
                match new.meta.get(name) {
                    Some(m) if m.version >= old_meta.version => {}
                    Some(m) => {
                        return Err(Error::RollbackAttempt {
                            role: name.trim_end_matches(".json").into(),
                            trusted: old_meta.version,
                            offered: m.version,
                        });
                    }
                    None => {
                        return Err(Error::Malformed {
                            role: SNAPSHOT.into(),
                            message: format!("{name} disappeared"),
                        });
                    }
                }
            }
        }
        if let Some(now) = now {
            check_expiry(SNAPSHOT, &new.expires, now)?;
        }
        self.snapshot = Some((new, bytes.to_vec()));
        Ok(())
    }

    /// The targets version and size the trusted snapshot names.
    pub fn targets_to_fetch(&self) -> Result<(u64, u64)> {
        let (snapshot, _) = self
            .snapshot
            .as_ref()
            .ok_or(Error::MissingMetadata(SNAPSHOT))?;
        let meta = &snapshot.meta["targets.json"];
        Ok((
            meta.version,
            meta.length.unwrap_or(self.limits.max_targets_size),
        ))
    }

    pub fn update_targets(&mut self, bytes: &[u8], now: DateTime<Utc>) -> Result<()> {
        self.accept_targets(bytes, Some(now))
    }

    fn accept_targets(&mut self, bytes: &[u8], now: Option<DateTime<Utc>>) -> Result<()> {
        let (snapshot, _) = self
            .snapshot
            .as_ref()
            .ok_or(Error::MissingMetadata(SNAPSHOT))?;
        let meta = &snapshot.meta["targets.json"];
        let limit = meta
            .length
            .unwrap_or(self.limits.max_targets_size)
            .min(self.limits.max_targets_size);
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                role: TARGETS.into(),
                size: bytes.len() as u64,
                limit,
            });
        }
        check_length_and_hashes(TARGETS, bytes, meta)?;
        let envelope: Envelope = parse_envelope(TARGETS, bytes, limit)?;
        let new: Targets = envelope.decode(TARGETS)?;
        envelope.verify(TARGETS, &self.root)?;
        if new.version != meta.version {
            return Err(Error::VersionMismatch {
                role: TARGETS.into(),
                expected: meta.version,
                offered: new.version,
                by: SNAPSHOT.into(),
            });
        }
        if let Some(now) = now {
            check_expiry(TARGETS, &new.expires, now)?;
        }
        self.targets = Some((new, bytes.to_vec()));
        Ok(())
    }

    pub fn targets(&self) -> Result<&Targets> {
        self.targets
            .as_ref()
            .map(|(t, _)| t)
            .ok_or(Error::MissingMetadata(TARGETS))
    }

    /// Whether every piece of trusted metadata is still current at `now`:
    /// root, timestamp, snapshot and targets. Expired metadata vouches for
    /// nothing (TUF's freeze attack): [`Error::ExpiredMetadata`] names the
    /// first role found expired.
    pub fn check_current(&self, now: DateTime<Utc>) -> Result<()> {
        let (timestamp, _) = self
            .timestamp
            .as_ref()
            .ok_or(Error::MissingMetadata(TIMESTAMP))?;
        let (snapshot, _) = self
            .snapshot
            .as_ref()
            .ok_or(Error::MissingMetadata(SNAPSHOT))?;
        let targets = self.targets()?;
        check_expiry(ROOT, &self.root.expires, now)?;
        check_expiry(TIMESTAMP, &timestamp.expires, now)?;
        check_expiry(SNAPSHOT, &snapshot.expires, now)?;
        check_expiry(TARGETS, &targets.expires, now)
    }

    /// A target the trusted targets metadata lists, for `hardware_model`,
    /// if that metadata is current at `now` ([`Self::check_current`]).
    /// Anything not listed is refused: no extraneous bundle gets in; nor is
    /// a delta a bundle ([`Self::delta_to`]).
    pub fn bundle(
        &self,
        name: &str,
        hardware_model: &str,
        now: DateTime<Utc>,
    ) -> Result<VerifiedTarget> {
        self.check_current(now)?;
        let target: &TargetFile = self
            .targets()?
            .targets
            .get(name)
            .ok_or_else(|| Error::UnknownTarget(name.into()))?;
        let info = target.bundle_info(name)?;
        if info.delta.is_some() {
            return Err(Error::Malformed {
                role: TARGETS.into(),
                message: format!("target {name} is a delta, not a bundle"),
            });
        }
        self.verified(name, target, info, hardware_model)
    }

    /// The smallest delta the trusted targets metadata lists that rebuilds
    /// `result` from the bundle whose SHA-256 is `have` (the copy a till
    /// holds), if that metadata is current at `now`. `None` when there
    /// is none: the till fetches `result` whole.
    pub fn delta_to(
        &self,
        result: &VerifiedTarget,
        have: &[u8; 32],
        hardware_model: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<VerifiedDelta>> {
        self.check_current(now)?;
        let (result_sha256, base_sha256) = (result.sha256_hex(), hex::encode(have));
        let mut best: Option<VerifiedDelta> = None;
        for (name, target) in &self.targets()?.targets {
            // Another target's malformed fields are not this one's concern.
            let Ok(info) = target.bundle_info(name) else {
                continue;
            };
            let Some(delta) = info.delta.clone() else {
                continue;
            };
            if delta.result != result.name
                || delta.result_sha256 != result_sha256
                || delta.base_sha256 != base_sha256
            {
                continue;
            }
            let Ok(file) = self.verified(name, target, info, hardware_model) else {
                continue;
            };
            if best.as_ref().is_none_or(|b| file.length < b.file.length) {
                best = Some(VerifiedDelta {
                    file,
                    base: delta.base,
                    base_sha256: *have,
                });
            }
        }
        Ok(best)
    }

    /// `target` (named `name`, with its posfleet fields `info`) as a
    /// verified target, if its fields hold up and it is for `hardware_model`.
    fn verified(
        &self,
        name: &str,
        target: &TargetFile,
        info: crate::tuf::BundleInfo,
        hardware_model: &str,
    ) -> Result<VerifiedTarget> {
        if info.chunk_size == 0 || info.chunk_size > crate::chunks::MAX_CHUNK_SIZE {
            return Err(Error::Malformed {
                role: TARGETS.into(),
                message: format!("target {name} has chunk_size {}", info.chunk_size),
            });
        }
        if !info
            .hardware
            .iter()
            .any(|h| h == "*" || h == hardware_model)
        {
            return Err(Error::WrongHardware {
                name: name.into(),
                model: hardware_model.into(),
                allowed: info.hardware,
            });
        }
        if target.length > self.limits.max_bundle_size {
            return Err(Error::TooLarge {
                role: format!("target {name}"),
                size: target.length,
                limit: self.limits.max_bundle_size,
            });
        }
        let sha256 = target.sha256().ok_or_else(|| Error::Malformed {
            role: TARGETS.into(),
            message: format!("target {name} has no sha256"),
        })?;
        Ok(VerifiedTarget {
            name: name.into(),
            length: target.length,
            sha256: digest_field(name, "sha256", sha256)?,
            chunks_sha256: digest_field(name, "chunks_sha256", &info.chunks_sha256)?,
            kind: info.kind,
            version: info.version,
            hardware: info.hardware,
            chunk_size: info.chunk_size,
        })
    }
}
