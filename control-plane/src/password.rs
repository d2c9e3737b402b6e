//! Operators' passwords: Argon2id (RFC 9106), stored as PHC strings
//! (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), so a hash keeps the
//! parameters it was made with and raising them later leaves existing
//! passwords working.
//!
//! Parameters: OWASP's minimum for Argon2id, m = 19 MiB, t = 2, p = 1, and a
//! random 16-byte salt per password. Measured on the development machine
//! (2 cores shared with other builds, Argon2 optimized): 45 to 75 ms per hash
//! or verification. That is a login's floor, and an attacker's cost per
//! guess.
//!
//! Hashing is deliberately slow and memory-hungry, so it never runs on the
//! async runtime: each hash runs on a blocking thread, and at most
//! [`CONCURRENT_HASHES`] at once (so a burst of logins costs at most
//! `CONCURRENT_HASHES` × 19 MiB, not a thread and 19 MiB per login).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::OnceLock;
use tokio::sync::Semaphore;

use crate::error::Error;

/// Memory per hash, KiB (19 MiB).
pub const MEMORY_KIB: u32 = 19 * 1024;
/// Passes over that memory.
pub const ITERATIONS: u32 = 2;
/// Lanes.
pub const PARALLELISM: u32 = 1;
/// Shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Hashes computed at once at most; more wait their turn.
pub const CONCURRENT_HASHES: usize = 4;

fn argon2() -> Argon2<'static> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None)
        .expect("the constant parameters are within Argon2's bounds (a unit test builds them)");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn permits() -> &'static Semaphore {
    static PERMITS: Semaphore = Semaphore::const_new(CONCURRENT_HASHES);
    &PERMITS
}

/// Why a new password is refused, for the person choosing it.
pub fn check_rules(password: &str) -> Result<(), String> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!("must be at most {MAX_PASSWORD_BYTES} bytes"));
    }
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(format!(
            "must be at least {MIN_PASSWORD_CHARS} characters (got {chars}); a few unrelated \
             words make a good one"
        ));
    }
    if password.trim() != password {
        return Err("must not begin or end with a space".into());
    }
    Ok(())
}

/// Runs `work` on a blocking thread, within the hashing budget.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let _permit = permits()
        .acquire()
        .await
        .map_err(|_| Error::Password("the hashing budget is closed".into()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Password(format!("the hashing thread failed: {e}")))
}

/// The PHC string of `password` with a fresh salt.
pub async fn hash(password: String) -> Result<String, Error> {
    blocking(move || {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        argon2()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| Error::Password(e.to_string()))
    })
    .await?
}

/// Whether `password` is the one `phc` was made from (with the parameters
/// `phc` names). A `phc` that does not parse was changed by hand: an error.
pub async fn verify(password: String, phc: String) -> Result<bool, Error> {
    blocking(move || {
        let parsed = PasswordHash::new(&phc)
            .map_err(|e| Error::Corrupt(format!("a stored password hash: {e}")))?;
        Ok(argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    })
    .await?
}

/// Spends the time of one [`verify`] for nothing: for a login whose user
/// does not exist or whose password is a setup code, so that it takes as
/// long as a wrong password (no one learns which names exist).
pub async fn waste_a_verify(password: String) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let dummy = DUMMY
        .get_or_init(|| {
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            argon2()
                .hash_password(b"not anyone's password", &salt)
                .map(|hash| hash.to_string())
                .unwrap_or_default()
        })
        .clone();
    let _ = verify(password, dummy).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_the_documented_parameters() {
        let phc = hash("correct horse battery".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_eq!((MEMORY_KIB, ITERATIONS, PARALLELISM), (19 * 1024, 2, 1));
        assert!(
            verify("correct horse battery".into(), phc.clone())
                .await
                .unwrap()
        );
        assert!(
            !verify("correct horse batterY".into(), phc.clone())
                .await
                .unwrap()
        );
        // A fresh salt each time.
        assert_ne!(hash("correct horse battery".into()).await.unwrap(), phc);
        assert!(matches!(
            verify("x".into(), "not a hash".into()).await,
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn password_rules() {
        assert!(check_rules("twelve chars").is_ok());
        assert!(check_rules("ünïcødé-pässwörd").is_ok());
        assert!(
            check_rules("eleven char")
                .unwrap_err()
                .contains("at least 12")
        );
        assert!(
            check_rules(&"x".repeat(1025))
                .unwrap_err()
                .contains("1024 bytes")
        );
        assert!(check_rules(" leading space here").is_err());
    }
}
