//! The repository's online keys (snapshot and timestamp), which every
//! replica must hold the same of: the root names one key per role, and
//! metadata signed by any other is refused by every till.
//!
//! One control plane keeps them as files in `<data_dir>/repository-keys`
//! (made at first start). Replicas that do not share a data dir share them
//! through the database instead, sealed with a key-encryption key (KEK)
//! every replica reads from a file (`repository_key_encryption_key_path`):
//! XChaCha20-Poly1305, a random nonce per key, the role as associated data.
//! The first replica to start stores them (the ones from its files if it
//! has any, so a single control plane becomes the first of several without
//! a new root); the others read them. The database alone does not hold
//! them: a copy of it without the KEK signs nothing.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
use posfleet_bundle::tuf::{SNAPSHOT, TIMESTAMP};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::storage::{SealedKey, Storage};

/// The signing keys the control plane holds.
pub struct OnlineKeys {
    pub snapshot: SigningKey,
    pub timestamp: SigningKey,
}

/// The key that seals the online keys in the database.
pub struct KeyEncryptionKey {
    key: [u8; 32],
    /// The first 8 bytes of its SHA-256, hex: names it in the database and in
    /// errors without revealing it.
    id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key-encryption key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the key-encryption key {path} is readable by others (mode {mode:o}): \
         make it readable by the control plane's user only (chmod 600)"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "the key-encryption key {path} must hold 32 random bytes as 64 hex digits \
         (e.g. from `openssl rand -hex 32`)"
    )]
    Malformed { path: PathBuf },
    #[error(
        "the {role} key in the database was sealed with key-encryption key {stored}, \
         and this control plane has {ours}: give every replica the same \
         repository_key_encryption_key_path file"
    )]
    OtherKek {
        role: String,
        stored: String,
        ours: String,
    },
    #[error(
        "the {role} key in the database does not open with key-encryption key {id}: it was changed or corrupted"
    )]
    Unsealable { role: String, id: String },
}

impl KeyEncryptionKey {
    /// Reads 64 hex digits from `path`, a file only its owner may read.
    pub fn load(path: &Path) -> Result<KeyEncryptionKey, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let read_error = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path)
            .map_err(read_error)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let key: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| KeyError::Malformed {
                path: path.to_path_buf(),
            })?;
        Ok(KeyEncryptionKey::from_bytes(key))
    }

    pub fn from_bytes(key: [u8; 32]) -> KeyEncryptionKey {
        let id = hex::encode(&Sha256::digest(key)[..8]);
        KeyEncryptionKey { key, id }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.key).into())
    }

    fn seal(&self, role: &str, key: &SigningKey) -> SealedKey {
        let nonce: [u8; 24] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: key.as_bytes(),
                    aad: role.as_bytes(),
                },
            )
            .expect("sealing 32 bytes cannot fail");
        SealedKey {
            kek_id: self.id.clone(),
            nonce_hex: hex::encode(nonce),
            sealed_hex: hex::encode(sealed),
        }
    }

    fn open(&self, role: &str, sealed: &SealedKey) -> Result<SigningKey, KeyError> {
        if sealed.kek_id != self.id {
            return Err(KeyError::OtherKek {
                role: role.to_string(),
                stored: sealed.kek_id.clone(),
                ours: self.id.clone(),
            });
        }
        let unsealable = || KeyError::Unsealable {
            role: role.to_string(),
            id: self.id.clone(),
        };
        let nonce = hex::decode(&sealed.nonce_hex)
            .ok()
            .filter(|n| n.len() == 24)
            .ok_or_else(unsealable)?;
        let bytes = hex::decode(&sealed.sealed_hex).map_err(|_| unsealable())?;
        let seed: [u8; 32] = self
            .cipher()
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &bytes,
                    aad: role.as_bytes(),
                },
            )
            .ok()
            .and_then(|seed| seed.try_into().ok())
            .ok_or_else(unsealable)?;
        Ok(SigningKey::from_bytes(&seed))
    }
}

/// The online keys: from the database, sealed with `kek`, when one is
/// given (storing them first if no replica has); else from the files in
/// `key_dir` (made on first start).
pub async fn load(
    storage: &Storage,
    key_dir: &Path,
    kek: Option<&KeyEncryptionKey>,
) -> Result<OnlineKeys, Error> {
    let Some(kek) = kek else {
        return from_files(key_dir).map_err(|source| Error::DataDir {
            path: key_dir.to_path_buf(),
            source,
        });
    };
    let mut keys = Vec::with_capacity(2);
    for role in [SNAPSHOT, TIMESTAMP] {
        let sealed = match storage.sealed_online_key(role).await? {
            Some(sealed) => sealed,
            None => {
                // This control plane's own, if it had any: its root names them.
                let file = key_dir.join(format!("{role}.key"));
                let key = if file.exists() {
                    crate::repository::load_or_create_key(&file).map_err(|source| {
                        Error::DataDir {
                            path: file.clone(),
                            source,
                        }
                    })?
                } else {
                    posfleet_bundle::repo::generate_key()
                };
                // Another replica starting at once may win: both then use its.
                if storage
                    .insert_sealed_online_key(role, &kek.seal(role, &key), crate::now_ms())
                    .await?
                {
                    tracing::info!(
                        role,
                        kek = kek.id(),
                        "Stored the online key, sealed, for every replica."
                    );
                }
                storage
                    .sealed_online_key(role)
                    .await?
                    .ok_or_else(|| Error::Corrupt(format!("the sealed {role} key vanished")))?
            }
        };
        keys.push(kek.open(role, &sealed).map_err(Error::OnlineKeys)?);
    }
    let timestamp = keys.pop().expect("two keys");
    let snapshot = keys.pop().expect("two keys");
    Ok(OnlineKeys {
        snapshot,
        timestamp,
    })
}

/// The keys in `key_dir` (mode 0700), made there if missing.
fn from_files(key_dir: &Path) -> std::io::Result<OnlineKeys> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(key_dir)?;
    std::fs::set_permissions(key_dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(OnlineKeys {
        snapshot: crate::repository::load_or_create_key(&key_dir.join("snapshot.key"))?,
        timestamp: crate::repository::load_or_create_key(&key_dir.join("timestamp.key"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_its_kek_and_for_its_role() {
        let kek = KeyEncryptionKey::from_bytes([7; 32]);
        let key = SigningKey::from_bytes(&[9; 32]);
        let sealed = kek.seal(SNAPSHOT, &key);
        assert!(!sealed.sealed_hex.contains(&hex::encode(key.as_bytes())));
        assert_eq!(
            kek.open(SNAPSHOT, &sealed).unwrap().as_bytes(),
            key.as_bytes()
        );
        // Moved to the other role's row: refused.
        assert!(matches!(
            kek.open(TIMESTAMP, &sealed),
            Err(KeyError::Unsealable { .. })
        ));
        // Another KEK: refused by name, before any decryption.
        let other = KeyEncryptionKey::from_bytes([8; 32]);
        let error = other.open(SNAPSHOT, &sealed).unwrap_err().to_string();
        assert!(
            error.contains(kek.id()) && error.contains(other.id()),
            "{error}"
        );
        // A flipped byte: refused.
        let mut tampered = sealed.clone();
        tampered.sealed_hex.replace_range(
            0..2,
            if &tampered.sealed_hex[0..2] == "00" {
                "01"
            } else {
                "00"
            },
        );
        assert!(matches!(
            kek.open(SNAPSHOT, &tampered),
            Err(KeyError::Unsealable { .. })
        ));
    }

    #[test]
    fn a_kek_file_must_be_private_and_hold_32_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, format!("{}\n", hex::encode([1u8; 32]))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyEncryptionKey::load(&path),
            Err(KeyError::Exposed { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            KeyEncryptionKey::load(&path).unwrap().id(),
            KeyEncryptionKey::from_bytes([1; 32]).id()
        );
        std::fs::write(&path, "abcd").unwrap();
        assert!(matches!(
            KeyEncryptionKey::load(&path),
            Err(KeyError::Malformed { .. })
        ));
    }
}
