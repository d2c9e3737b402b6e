//! Operators' second factor: TOTP (RFC 6238) as the control plane checks it
//! and every client (the CLI, the demo, the test harnesses) computes it.
//! The parameters are part of the protocol, so they live here, once:
//! HMAC-SHA-1, 6 digits, 30-second steps, codes of the step before and
//! after the current one accepted (clocks drift), a 160-bit secret shown to
//! authenticator apps in base32. What the server adds on top (a code is
//! accepted once: never a step at or before the last one accepted) is the
//! server's.

use std::time::{SystemTime, UNIX_EPOCH};
use totp_rs::{Algorithm, Builder, Secret, Totp};

/// Digits of a code.
pub const DIGITS: u8 = 6;
/// Seconds one code is current.
pub const STEP_SECONDS: u64 = 30;
/// Steps before and after the current one whose codes are accepted.
pub const SKEW_STEPS: u16 = 1;
/// Bytes of a secret (RFC 4226 recommends 160 bits).
pub const SECRET_BYTES: usize = 20;
/// The issuer authenticator apps show beside the user name.
pub const ISSUER: &str = "posfleet";

/// A secret that is not base32 of at least 128 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSecret;

impl std::fmt::Display for BadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the TOTP secret is not base32 of at least 128 bits")
    }
}

impl std::error::Error for BadSecret {}

/// The generator for a base32 secret.
fn totp(secret_base32: &str) -> Result<Totp, BadSecret> {
    let secret = Secret::try_from_base32(secret_base32.trim()).map_err(|_| BadSecret)?;
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(DIGITS)
        .with_skew(SKEW_STEPS)
        .with_step_duration(STEP_SECONDS)
        .with_secret(secret)
        .build()
        .map_err(|_| BadSecret)
}

/// `bytes` as authenticator apps take a secret: base32, no padding.
pub fn encode_secret(bytes: &[u8]) -> String {
    Secret::from(bytes.to_vec()).to_base32()
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The step `unix_seconds` falls in.
pub fn step_at(unix_seconds: u64) -> u64 {
    unix_seconds / STEP_SECONDS
}

/// The code of the step `unix_seconds` falls in.
pub fn code_at(secret_base32: &str, unix_seconds: u64) -> Result<String, BadSecret> {
    Ok(totp(secret_base32)?.generate(unix_seconds).to_string())
}

/// The code an authenticator shows now.
pub fn code_now(secret_base32: &str) -> Result<String, BadSecret> {
    code_at(secret_base32, unix_now())
}

/// The step whose code `code` is, among the current step at `unix_seconds`
/// and [`SKEW_STEPS`] on each side; `None` if it is none of theirs.
pub fn matching_step(
    secret_base32: &str,
    code: &str,
    unix_seconds: u64,
) -> Result<Option<u64>, BadSecret> {
    Ok(totp(secret_base32)?.check(code.trim(), unix_seconds))
}

/// Whether `code` is the code of a step up to `steps` before the accepted
/// window at `unix_seconds`: an authenticator whose clock is behind, or a
/// code typed too late.
pub fn is_stale(
    secret_base32: &str,
    code: &str,
    unix_seconds: u64,
    steps: u64,
) -> Result<bool, BadSecret> {
    let totp = totp(secret_base32)?;
    let oldest_accepted = step_at(unix_seconds).saturating_sub(u64::from(SKEW_STEPS));
    Ok((1..=steps).any(|back| {
        oldest_accepted
            .checked_sub(back)
            .is_some_and(|step| totp.generate(step * STEP_SECONDS).to_string() == code.trim())
    }))
}

/// `otpauth://totp/...` for authenticator apps (and their QR codes):
/// issuer [`ISSUER`], the account `user`, and the parameters above.
/// `user` is a posfleet user name (lowercase letters, digits, `-`, `_`,
/// `.`), which needs no escaping.
pub fn otpauth_uri(secret_base32: &str, user: &str) -> String {
    format!(
        "otpauth://totp/{ISSUER}:{user}?secret={secret_base32}&issuer={ISSUER}\
         &algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 (the last 6 of its 8 digits).
    #[test]
    fn codes_match_the_rfc_test_vectors() {
        let secret = encode_secret(b"12345678901234567890");
        for (time, code) in [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (1_111_111_111, "050471"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
            (20_000_000_000, "353130"),
        ] {
            assert_eq!(code_at(&secret, time).unwrap(), code, "at {time}");
        }
    }

    #[test]
    fn a_code_matches_its_step_and_one_on_each_side_only() {
        let secret = encode_secret(&[7; SECRET_BYTES]);
        let now = 1_700_000_000;
        let step = step_at(now);
        let code = code_at(&secret, now).unwrap();
        assert_eq!(matching_step(&secret, &code, now).unwrap(), Some(step));
        // A code of the step before is still accepted, and names its step.
        let previous = code_at(&secret, now - STEP_SECONDS).unwrap();
        assert_eq!(
            matching_step(&secret, &previous, now).unwrap(),
            Some(step - 1)
        );
        // Two steps back: refused, and recognised as stale.
        let old = code_at(&secret, now - 2 * STEP_SECONDS).unwrap();
        assert_eq!(matching_step(&secret, &old, now).unwrap(), None);
        assert!(is_stale(&secret, &old, now, 10).unwrap());
        assert!(!is_stale(&secret, "000000x", now, 10).unwrap());
        assert_eq!(matching_step(&secret, "12345", now).unwrap(), None);
        assert_eq!(matching_step("not base32!", &code, now), Err(BadSecret));
        // Too short a secret is refused, not used.
        assert_eq!(code_at(&encode_secret(&[1; 8]), now), Err(BadSecret));
    }

    #[test]
    fn the_uri_names_issuer_user_and_parameters() {
        assert_eq!(
            otpauth_uri("JBSWY3DPEHPK3PXP", "alice"),
            "otpauth://totp/posfleet:alice?secret=JBSWY3DPEHPK3PXP&issuer=posfleet\
             &algorithm=SHA1&digits=6&period=30"
        );
    }
}
