//! TUF 1.0 metadata (root, targets, snapshot, timestamp) in canonical JSON,
//! signed with Ed25519 (ed25519-dalek). Signatures cover the canonical form
//! of the `signed` object exactly as received, so fields this code does not
//! know still count.

use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signature as DalekSignature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use crate::chunks::FileDigest;
use crate::error::{Error, Result};
use crate::hash::sha256;
use crate::manifest::Kind;

pub const SPEC_VERSION: &str = "1.0.31";

pub const ROOT: &str = "root";
pub const TARGETS: &str = "targets";
pub const SNAPSHOT: &str = "snapshot";
pub const TIMESTAMP: &str = "timestamp";

/// Canonical JSON (OLPC), as TUF signs it. Fails on what canonical JSON
/// cannot express (floating-point numbers).
pub fn try_canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::new();
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, olpc_cjson::CanonicalFormatter::new());
    value.serialize(&mut serializer)?;
    Ok(out)
}

/// Canonical JSON of metadata this crate builds (strings, integers,
/// booleans, lists and maps only, so it cannot fail).
pub fn canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    try_canonical_json(value).expect("metadata built here holds no floats")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha256(bytes))
}

/// `expires` values: whole seconds, UTC, `Z` (the form TUF clients expect).
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVal {
    pub public: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub keytype: String,
    pub scheme: String,
    pub keyval: KeyVal,
}

impl Key {
    pub fn ed25519(key: &VerifyingKey) -> Key {
        Key {
            keytype: "ed25519".into(),
            scheme: "ed25519".into(),
            keyval: KeyVal {
                public: hex::encode(key.as_bytes()),
            },
        }
    }

    /// The key id: SHA-256 of the key's canonical JSON.
    pub fn id(&self) -> String {
        sha256_hex(&canonical_json(self))
    }

    fn verifying_key(&self) -> Option<VerifyingKey> {
        if self.keytype != "ed25519" || self.scheme != "ed25519" {
            return None;
        }
        let bytes: [u8; 32] = hex::decode(&self.keyval.public).ok()?.try_into().ok()?;
        VerifyingKey::from_bytes(&bytes).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    pub keyids: Vec<String>,
    pub threshold: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    #[serde(rename = "_type")]
    pub type_: String,
    pub spec_version: String,
    pub consistent_snapshot: bool,
    pub version: u64,
    pub expires: String,
    pub keys: BTreeMap<String, Key>,
    pub roles: BTreeMap<String, RoleKeys>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaFile {
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    #[serde(rename = "_type")]
    pub type_: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    pub meta: BTreeMap<String, MetaFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    #[serde(rename = "_type")]
    pub type_: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    pub meta: BTreeMap<String, MetaFile>,
}

/// posfleet's fields in a target's `custom` object. A delta's `kind`,
/// `version` and `hardware` are those of the bundle it rebuilds; its chunk
/// fields, length and hashes are the delta file's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleInfo {
    pub kind: Kind,
    pub version: String,
    pub hardware: Vec<String>,
    pub chunk_size: u32,
    pub chunks_sha256: String,
    /// Set on a delta target: what it rebuilds, from what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaInfo>,
}

/// What a delta target rebuilds (`posfleet_bundle::delta`): the bundle
/// target `result` from the bundle target `base`, each named with its
/// SHA-256 so a till knows its copy of the base is the right one and the
/// rebuilt bundle is checked against the result's signed hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaInfo {
    pub base: String,
    pub base_sha256: String,
    pub result: String,
    pub result_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFile {
    pub length: u64,
    pub hashes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<serde_json::Value>,
}

impl TargetFile {
    /// The posfleet fields of this target, if it is a bundle.
    pub fn bundle_info(&self, name: &str) -> Result<BundleInfo> {
        let custom = self.custom.clone().ok_or_else(|| Error::Malformed {
            role: TARGETS.into(),
            message: format!("target {name} has no custom bundle fields"),
        })?;
        serde_json::from_value(custom).map_err(|e| Error::Malformed {
            role: TARGETS.into(),
            message: format!("target {name}: {e}"),
        })
    }

    pub fn sha256(&self) -> Option<&str> {
        self.hashes.get("sha256").map(String::as_str)
    }

    /// Reads the bundle file at `path` whole and checks it against this
    /// signed entry `name`, as the control plane does with what ops
    /// upload: its length, its SHA-256, and the digest of its chunk list
    /// (`chunks_sha256`), from one read. Returns what was read, chunk list
    /// included, for storing. A mismatch is [`Error::LengthMismatch`] or
    /// [`Error::HashMismatch`]; an unreadable file is [`Error::Read`].
    pub fn verify_file(&self, name: &str, path: &std::path::Path) -> Result<FileDigest> {
        let info = self.bundle_info(name)?;
        let read = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let digest = std::fs::File::open(path)
            .and_then(crate::chunks::digest_reader)
            .map_err(read)?;
        if digest.length != self.length {
            return Err(Error::LengthMismatch {
                what: format!("the bundle file of target {name}"),
                expected: self.length,
                actual: digest.length,
            });
        }
        if self.sha256() != Some(hex::encode(digest.sha256).as_str()) {
            return Err(Error::HashMismatch {
                what: format!("the bundle file of target {name}"),
            });
        }
        if info.chunks_sha256 != hex::encode(digest.chunks.digest()) {
            return Err(Error::HashMismatch {
                what: format!("the chunk list of target {name}"),
            });
        }
        Ok(digest)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    #[serde(rename = "_type")]
    pub type_: String,
    pub spec_version: String,
    pub version: u64,
    pub expires: String,
    pub targets: BTreeMap<String, TargetFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    pub sig: String,
}

/// A metadata file as sent: the signed object, kept as received, and its
/// signatures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub signed: serde_json::Value,
    pub signatures: Vec<Signature>,
}

/// Signs `signed` with each key and returns the metadata file's bytes.
pub fn sign<T: Serialize>(signed: &T, keys: &[&SigningKey]) -> Vec<u8> {
    let value = serde_json::to_value(signed).expect("metadata serializes");
    let payload = canonical_json(&value);
    let signatures = keys
        .iter()
        .map(|key| Signature {
            keyid: Key::ed25519(&key.verifying_key()).id(),
            sig: hex::encode(key.sign(&payload).to_bytes()),
        })
        .collect();
    let mut bytes = serde_json::to_vec_pretty(&Envelope {
        signed: value,
        signatures,
    })
    .expect("metadata serializes");
    bytes.push(b'\n');
    bytes
}

/// Parses a metadata file of `role`, refusing it unparsed when over `limit`.
pub fn parse_envelope(role: &str, bytes: &[u8], limit: u64) -> Result<Envelope> {
    if bytes.len() as u64 > limit {
        return Err(Error::TooLarge {
            role: role.into(),
            size: bytes.len() as u64,
            limit,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| Error::Malformed {
        role: role.into(),
        message: e.to_string(),
    })
}

impl Envelope {
    /// The signed object as `T`, after checking its `_type`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self, role: &str) -> Result<T> {
        let malformed = |message: String| Error::Malformed {
            role: role.into(),
            message,
        };
        match self.signed.get("_type").and_then(|t| t.as_str()) {
            Some(t) if t == role => {}
            other => return Err(malformed(format!("_type is {other:?}, expected {role}"))),
        }
        serde_json::from_value(self.signed.clone()).map_err(|e| malformed(e.to_string()))
    }

    /// Checks that a threshold of `role`'s keys in `root` signed this file.
    /// Keys are counted, not key ids: a key listed under an id that is not
    /// its own (`keyid` must be the SHA-256 of the key's canonical JSON)
    /// does not count at all, and a key listed under several ids (two
    /// spellings of one public key) counts once however many signatures
    /// carry its ids.
    pub fn verify(&self, role: &str, root: &Root) -> Result<()> {
        let role_keys = root.roles.get(role).ok_or_else(|| Error::Malformed {
            role: ROOT.into(),
            message: format!("no {role} role"),
        })?;
        // Received metadata may hold anything, floats included.
        let payload = try_canonical_json(&self.signed).map_err(|e| Error::Malformed {
            role: role.into(),
            message: format!("not canonical JSON: {e}"),
        })?;
        let mut valid: BTreeSet<[u8; 32]> = BTreeSet::new();
        for signature in &self.signatures {
            if !role_keys.keyids.contains(&signature.keyid) {
                continue;
            }
            let Some(key) = root
                .keys
                .get(&signature.keyid)
                .filter(|key| key.id() == signature.keyid)
                .and_then(Key::verifying_key)
            else {
                continue;
            };
            if valid.contains(key.as_bytes()) {
                continue;
            }
            let Ok(sig) = hex::decode(&signature.sig)
                .map_err(|_| ())
                .and_then(|b| DalekSignature::from_slice(&b).map_err(|_| ()))
            else {
                continue;
            };
            if key.verify_strict(&payload, &sig).is_ok() {
                valid.insert(key.to_bytes());
            }
        }
        if role_keys.threshold == 0 || (valid.len() as u64) < role_keys.threshold {
            return Err(Error::ThresholdNotMet {
                role: role.into(),
                valid: valid.len(),
                threshold: role_keys.threshold,
            });
        }
        Ok(())
    }
}

/// Refuses metadata whose `expires` is not after `now`.
pub fn check_expiry(role: &str, expires: &str, now: DateTime<Utc>) -> Result<()> {
    let at = DateTime::parse_from_rfc3339(expires).map_err(|e| Error::Malformed {
        role: role.into(),
        message: format!("expires `{expires}`: {e}"),
    })?;
    if at <= now {
        return Err(Error::ExpiredMetadata {
            role: role.into(),
            expires: expires.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_float_in_received_metadata_is_refused_not_a_panic() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let id = Key::ed25519(&key.verifying_key()).id();
        let root = Root {
            type_: ROOT.into(),
            spec_version: SPEC_VERSION.into(),
            consistent_snapshot: true,
            version: 1,
            expires: "2099-01-01T00:00:00Z".into(),
            keys: BTreeMap::from([(id.clone(), Key::ed25519(&key.verifying_key()))]),
            roles: BTreeMap::from([(
                ROOT.to_string(),
                RoleKeys {
                    keyids: vec![id],
                    threshold: 1,
                },
            )]),
        };
        let mut envelope = parse_envelope(ROOT, &sign(&root, &[&key]), 1 << 20).unwrap();
        envelope.signed["x-extra"] = serde_json::json!(1.5);
        assert!(matches!(
            envelope.verify(ROOT, &root),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_spaces() {
        let value = serde_json::json!({"b": 1, "a": {"d": "x", "c": [true, null]}});
        assert_eq!(
            canonical_json(&value),
            br#"{"a":{"c":[true,null],"d":"x"},"b":1}"#
        );
    }

    #[test]
    fn a_signature_covers_unknown_fields_too() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut root = Root {
            type_: ROOT.into(),
            spec_version: SPEC_VERSION.into(),
            consistent_snapshot: true,
            version: 1,
            expires: "2099-01-01T00:00:00Z".into(),
            keys: BTreeMap::from([(
                Key::ed25519(&key.verifying_key()).id(),
                Key::ed25519(&key.verifying_key()),
            )]),
            roles: BTreeMap::new(),
        };
        root.roles.insert(
            ROOT.into(),
            RoleKeys {
                keyids: root.keys.keys().cloned().collect(),
                threshold: 1,
            },
        );
        let bytes = sign(&root, &[&key]);
        let envelope = parse_envelope(ROOT, &bytes, 1 << 20).unwrap();
        envelope.verify(ROOT, &root).unwrap();
        let mut tampered = envelope.clone();
        tampered.signed["x-extra"] = serde_json::json!("added later");
        assert!(matches!(
            tampered.verify(ROOT, &root),
            Err(Error::ThresholdNotMet { .. })
        ));
        assert!(matches!(
            parse_envelope(ROOT, &bytes, 10),
            Err(Error::TooLarge { .. })
        ));
    }
}
