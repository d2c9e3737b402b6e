//! Secrets handed out by the control plane (admin API tokens, session
//! tokens, enrollment tokens, device credentials, users' setup and recovery
//! codes). Only their SHA-256 is ever stored: they carry at least 100
//! random bits, so a fast hash is enough (passwords, which people choose,
//! are another matter: `crate::password`).

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A fresh secret: `prefix` followed by 64 lowercase hex digits.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Hex SHA-256 of a secret, as stored.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A code people type or copy: `groups` groups of four characters of
/// lowercase base32 (5 random bits each), joined by `-`, e.g.
/// `k2vq-7mxa-…`. Typed codes are read by [`normalize_code`].
pub fn grouped_code(groups: usize) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = vec![0u8; groups * 4];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
        .chunks(4)
        .map(|group| {
            group
                .iter()
                .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// A typed code as [`grouped_code`] made it: lowercase, without spaces.
pub fn normalize_code(typed: &str) -> String {
    typed
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// A short random id, e.g. `tok-3f9a0c2b7d1e`.
pub fn short_id(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    format!("{prefix}{}", hex::encode(buf))
}

/// Prefix of admin API tokens.
pub const ADMIN_TOKEN_PREFIX: &str = "pfa_";
/// Prefix of users' session tokens (from `SessionService.Login`).
pub const SESSION_TOKEN_PREFIX: &str = "pfs_";
/// Prefix of the token naming a setup under way (`SetupChallenge`).
pub const SETUP_TOKEN_PREFIX: &str = "pfc_";
/// Prefix of enrollment token secrets.
pub const ENROLLMENT_TOKEN_PREFIX: &str = "pfe_";

/// A device credential is `pfd.<device id>.<secret>`: the device id lets the
/// server find the stored hash (of the secret) without scanning.
pub fn device_credential(device_id: &str, secret: &str) -> String {
    format!("pfd.{device_id}.{secret}")
}

/// Splits a device credential into device id and secret; `None` if malformed.
pub fn parse_device_credential(credential: &str) -> Option<(&str, &str)> {
    let mut parts = credential.split('.');
    let (Some("pfd"), Some(id), Some(secret), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (!id.is_empty() && secret.len() == 64).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_and_malformed_ones_are_refused() {
        let secret = generate("");
        let credential = device_credential("dev-abc", &secret);
        assert_eq!(
            parse_device_credential(&credential),
            Some(("dev-abc", secret.as_str()))
        );
        for bad in [
            "",
            "pfd.dev-abc",
            "pfd..x",
            "pfx.dev-abc.00",
            &format!("{credential}.x"),
        ] {
            assert_eq!(parse_device_credential(bad), None, "{bad}");
        }
        assert_ne!(generate("p"), generate("p"));
        let code = grouped_code(5);
        assert_eq!(code.len(), 5 * 4 + 4, "{code}");
        assert_eq!(normalize_code(&format!(" {} ", code.to_uppercase())), code);
        assert_ne!(grouped_code(5), code);
        assert_eq!(hash("a"), hash("a"));
    }
}
