//! The device's Ed25519 key, generated on first start and kept in the data
//! dir (mode 0600). Its public half is the device's identity.

use ed25519_dalek::SigningKey;
use std::path::Path;

use crate::error::Error;
use crate::files;

pub const KEY_FILE: &str = "device.key";

/// Loads the device key, generating and saving one on first start.
pub fn load_or_create(data_dir: &Path) -> Result<SigningKey, Error> {
    let path = data_dir.join(KEY_FILE);
    if let Some(bytes) = files::read_optional(&path)? {
        let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| Error::Corrupt {
            path: path.clone(),
            detail: format!(
                "expected a 32-byte Ed25519 seed, found {} bytes",
                bytes.len()
            ),
        })?;
        return Ok(SigningKey::from_bytes(&seed));
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    files::write_private(&path, key.as_bytes())?;
    tracing::info!(path = %path.display(), "Generated the device key.");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_survives_restarts_and_a_corrupt_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(first.verifying_key(), again.verifying_key());
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(Error::Corrupt { .. })
        ));
    }
}
