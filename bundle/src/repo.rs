//! The repository editor: builds and signs root, targets, snapshot and
//! timestamp metadata. Ops hold the root and targets keys (`posfleet keys`,
//! `posfleet bundle publish`); the control plane holds the online snapshot
//! and timestamp keys.

use chrono::{DateTime, Utc};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::collections::BTreeMap;

use crate::chunks::FileDigest;
use crate::manifest::Manifest;
use crate::tuf::{
    self, BundleInfo, DeltaInfo, Key, MetaFile, ROOT, RoleKeys, SNAPSHOT, SPEC_VERSION, Snapshot,
    TARGETS, TIMESTAMP, TargetFile, Targets, Timestamp, format_time, sha256_hex,
};

/// The public keys and thresholds of each role of a root.
#[derive(Debug, Clone)]
pub struct RootKeys {
    pub root: Vec<VerifyingKey>,
    pub root_threshold: u64,
    pub targets: Vec<VerifyingKey>,
    pub targets_threshold: u64,
    pub snapshot: VerifyingKey,
    pub timestamp: VerifyingKey,
}

/// An unsigned root of `version`, expiring at `expires`.
pub fn root(keys: &RootKeys, version: u64, expires: DateTime<Utc>) -> tuf::Root {
    let mut all = BTreeMap::new();
    let mut role = |keys: &[VerifyingKey], threshold: u64| {
        let keyids = keys
            .iter()
            .map(|k| {
                let key = Key::ed25519(k);
                let id = key.id();
                all.insert(id.clone(), key);
                id
            })
            .collect();
        RoleKeys { keyids, threshold }
    };
    let roles = BTreeMap::from([
        (ROOT.to_string(), role(&keys.root, keys.root_threshold)),
        (
            TARGETS.to_string(),
            role(&keys.targets, keys.targets_threshold),
        ),
        (SNAPSHOT.to_string(), role(&[keys.snapshot], 1)),
        (TIMESTAMP.to_string(), role(&[keys.timestamp], 1)),
    ]);
    tuf::Root {
        type_: ROOT.into(),
        spec_version: SPEC_VERSION.into(),
        consistent_snapshot: true,
        version,
        expires: format_time(expires),
        keys: all,
        roles,
    }
}

/// The target entry of a bundle file.
pub fn target_file(manifest: &Manifest, digest: &FileDigest) -> TargetFile {
    entry(manifest, digest, None)
}

/// The target name of the delta rebuilding `result` from `base` (two
/// versions of one bundle): `<name>/<version>/from-<base version>.delta`,
/// beside the bundle's `<name>/<version>`.
pub fn delta_target_name(result: &Manifest, base: &Manifest) -> String {
    format!("{}/from-{}.delta", result.target_name(), base.version)
}

/// The target entry of a delta file (`digest`) rebuilding the bundle
/// `result` (published as `result_target`) from the bundle published as
/// `base_target`.
pub fn delta_target_file(
    result: &Manifest,
    digest: &FileDigest,
    base_target: (&str, &TargetFile),
    result_target: (&str, &TargetFile),
) -> crate::Result<TargetFile> {
    let sha256 = |(name, file): (&str, &TargetFile)| {
        file.sha256()
            .map(str::to_string)
            .ok_or_else(|| crate::Error::Malformed {
                role: TARGETS.into(),
                message: format!("target {name} has no sha256"),
            })
    };
    let delta = DeltaInfo {
        base: base_target.0.to_string(),
        base_sha256: sha256(base_target)?,
        result: result_target.0.to_string(),
        result_sha256: sha256(result_target)?,
    };
    Ok(entry(result, digest, Some(delta)))
}

fn entry(manifest: &Manifest, digest: &FileDigest, delta: Option<DeltaInfo>) -> TargetFile {
    let info = BundleInfo {
        kind: manifest.kind,
        version: manifest.version.to_string(),
        hardware: manifest.hardware.clone(),
        chunk_size: digest.chunks.chunk_size(),
        chunks_sha256: hex::encode(digest.chunks.digest()),
        delta,
    };
    TargetFile {
        length: digest.length,
        hashes: BTreeMap::from([("sha256".to_string(), hex::encode(digest.sha256))]),
        custom: Some(serde_json::to_value(info).expect("plain data serializes")),
    }
}

pub fn targets(
    version: u64,
    expires: DateTime<Utc>,
    targets: BTreeMap<String, TargetFile>,
) -> Targets {
    Targets {
        type_: TARGETS.into(),
        spec_version: SPEC_VERSION.into(),
        version,
        expires: format_time(expires),
        targets,
    }
}

/// A snapshot naming the targets metadata file `targets_bytes`.
pub fn snapshot(
    version: u64,
    expires: DateTime<Utc>,
    targets_version: u64,
    targets_bytes: &[u8],
) -> Snapshot {
    Snapshot {
        type_: SNAPSHOT.into(),
        spec_version: SPEC_VERSION.into(),
        version,
        expires: format_time(expires),
        meta: BTreeMap::from([(
            "targets.json".to_string(),
            MetaFile {
                version: targets_version,
                length: Some(targets_bytes.len() as u64),
                hashes: Some(BTreeMap::from([(
                    "sha256".to_string(),
                    sha256_hex(targets_bytes),
                )])),
            },
        )]),
    }
}

/// A timestamp naming the snapshot metadata file `snapshot_bytes`.
pub fn timestamp(
    version: u64,
    expires: DateTime<Utc>,
    snapshot_version: u64,
    snapshot_bytes: &[u8],
) -> Timestamp {
    Timestamp {
        type_: TIMESTAMP.into(),
        spec_version: SPEC_VERSION.into(),
        version,
        expires: format_time(expires),
        meta: BTreeMap::from([(
            "snapshot.json".to_string(),
            MetaFile {
                version: snapshot_version,
                length: Some(snapshot_bytes.len() as u64),
                hashes: Some(BTreeMap::from([(
                    "sha256".to_string(),
                    sha256_hex(snapshot_bytes),
                )])),
            },
        )]),
    }
}

/// A fresh Ed25519 key.
pub fn generate_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}
