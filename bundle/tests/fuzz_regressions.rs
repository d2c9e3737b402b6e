//! What fuzzing (fuzz/, `scripts/fuzz-metadata`) found, kept as tests, and
//! hand-picked malformed metadata. Every input must be refused with an error:
//! a panic is a crash of the agent, which any mirror could cause at will.

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use posfleet_bundle::Error;
use posfleet_bundle::chunks::ChunkList;
use posfleet_bundle::client::{Limits, TrustedMetadata};
use posfleet_bundle::repo::{self, RootKeys};
use posfleet_bundle::tuf;
use std::panic::{AssertUnwindSafe, catch_unwind};

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-21T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A root of `version` for keys from fixed seeds (as in the fuzz target),
/// signed by its root keys.
fn root(version: u64) -> Vec<u8> {
    let root_keys = [key(1), key(2), key(3)];
    let root = repo::root(
        &RootKeys {
            root: root_keys.iter().map(SigningKey::verifying_key).collect(),
            root_threshold: 2,
            targets: vec![key(11).verifying_key()],
            targets_threshold: 1,
            snapshot: key(21).verifying_key(),
            timestamp: key(31).verifying_key(),
        },
        version,
        now() + Duration::days(365),
    );
    tuf::sign(&root, &root_keys.iter().collect::<Vec<_>>())
}

/// A valid timestamp (version 1) for `root(_)`.
fn timestamp() -> Vec<u8> {
    let timestamp = repo::timestamp(1, now() + Duration::days(30), 1, b"snapshot");
    tuf::sign(&timestamp, &[&key(31)])
}

fn client() -> TrustedMetadata {
    TrustedMetadata::from_pinned_root(&root(1), Limits::default()).unwrap()
}

/// The error a malformed input must get.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Not a metadata file of that role.
    Malformed,
    /// Well formed, but not signed by the role's keys.
    Unsigned,
    TooLarge,
    /// A chunk list that does not fit its signed length and piece size.
    ChunkList,
}

impl Refusal {
    fn matches(self, error: &Error) -> bool {
        matches!(
            (self, error),
            (Refusal::Malformed, Error::Malformed { .. })
                | (Refusal::Unsigned, Error::ThresholdNotMet { .. })
                | (Refusal::TooLarge, Error::TooLarge { .. })
                | (Refusal::ChunkList, Error::ChunkList(_))
        )
    }
}

/// Runs `accept` on `input`, returning what went wrong, if anything: a panic,
/// acceptance, or an error other than `expected`.
fn refused<T>(
    input: &[u8],
    expected: Refusal,
    accept: impl FnOnce(&[u8]) -> Result<T, Error>,
) -> Option<String> {
    match catch_unwind(AssertUnwindSafe(|| accept(input))) {
        Err(panic) => Some(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
        Ok(Ok(_)) => Some("was accepted".into()),
        Ok(Err(e)) if expected.matches(&e) => None,
        Ok(Err(e)) => Some(format!("expected {expected:?}, got {e:?}")),
    }
}

/// `signed` of a metadata file, edited.
fn edit_signed(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut file: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    edit(&mut file["signed"]);
    serde_json::to_vec_pretty(&file).unwrap()
}

/// A metadata file's text, with `field` set to `value` (JSON text, so that
/// what no `serde_json::Value` holds can be written).
fn set_field(bytes: &[u8], field: &str, value: &str) -> Vec<u8> {
    let text = String::from_utf8(edit_signed(bytes, |s| s[field] = "PLACEHOLDER".into())).unwrap();
    text.replace("\"PLACEHOLDER\"", value).into_bytes()
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

type Case = (&'static str, fn(&[u8]) -> Vec<u8>, Refusal);

/// Malformed versions of a valid metadata file.
const CASES: &[Case] = &[
    ("empty input", |_| Vec::new(), Refusal::Malformed),
    ("empty object", |_| b"{}".to_vec(), Refusal::Malformed),
    ("null", |_| b"null".to_vec(), Refusal::Malformed),
    (
        "truncated JSON",
        |b| b[..b.len() / 2].to_vec(),
        Refusal::Malformed,
    ),
    (
        "signed is an array",
        |_| br#"{"signed": [], "signatures": []}"#.to_vec(),
        Refusal::Malformed,
    ),
    (
        "wrong _type",
        |b| edit_signed(b, |s| s["_type"] = "targets".into()),
        Refusal::Malformed,
    ),
    (
        "no _type",
        |b| edit_signed(b, |s| _ = s.as_object_mut().unwrap().remove("_type")),
        Refusal::Malformed,
    ),
    (
        "version over u64::MAX",
        |b| set_field(b, "version", "18446744073709551616"),
        Refusal::Malformed,
    ),
    (
        "negative version",
        |b| set_field(b, "version", "-1"),
        Refusal::Malformed,
    ),
    (
        "number out of f64 range",
        |b| set_field(b, "version", "1e400"),
        Refusal::Malformed,
    ),
    (
        "expires a number",
        |b| set_field(b, "expires", "20261231"),
        Refusal::Malformed,
    ),
    // Found by the fuzzer too: canonical JSON has no floats, and an `expect`
    // on it crashed any agent served such a file (fixed in 388065b).
    (
        "a float in an extra field",
        |b| set_field(b, "x-extra", "1.5"),
        Refusal::Malformed,
    ),
    (
        "an extra number over u64::MAX (read as a float)",
        |b| set_field(b, "x-extra", "18446744073709551616"),
        Refusal::Malformed,
    ),
    (
        "arrays nested deeper than the parser goes",
        |b| set_field(b, "x-extra", &nested_arrays(5_000)),
        Refusal::Malformed,
    ),
    (
        "arrays nested 100 deep, altering what was signed",
        |b| set_field(b, "x-extra", &nested_arrays(100)),
        Refusal::Unsigned,
    ),
    (
        "non-hex signatures",
        |b| {
            let mut file: serde_json::Value = serde_json::from_slice(b).unwrap();
            for signature in file["signatures"].as_array_mut().unwrap() {
                signature["sig"] = "zz".repeat(64).into();
            }
            serde_json::to_vec(&file).unwrap()
        },
        Refusal::Unsigned,
    ),
    (
        "signatures of the wrong length",
        |b| {
            let mut file: serde_json::Value = serde_json::from_slice(b).unwrap();
            for signature in file["signatures"].as_array_mut().unwrap() {
                let sig = signature["sig"].as_str().unwrap()[..64].to_string();
                signature["sig"] = sig.into();
            }
            serde_json::to_vec(&file).unwrap()
        },
        Refusal::Unsigned,
    ),
    (
        "signatures not a list",
        |b| {
            let mut file: serde_json::Value = serde_json::from_slice(b).unwrap();
            file["signatures"] = serde_json::json!({"keyid": "00", "sig": "00"});
            serde_json::to_vec(&file).unwrap()
        },
        Refusal::Malformed,
    ),
    (
        "over the size limit",
        |b| [b, &vec![b' '; 1 << 20][..]].concat(),
        Refusal::TooLarge,
    ),
];

#[test]
fn malformed_metadata_is_refused_not_a_panic() {
    let (root, timestamp) = (root(1), timestamp());
    // The unedited files are accepted, so each refusal below is the edit's.
    client().update_timestamp(&timestamp, now()).unwrap();
    let mut failures = Vec::new();
    for (name, malform, expected) in CASES {
        let input = malform(&root);
        let outcome = refused(&input, *expected, |bytes| {
            TrustedMetadata::from_pinned_root(bytes, Limits::default())
        });
        if let Some(failure) = outcome {
            failures.push(format!("from_pinned_root, {name}: {failure}"));
        }
        let input = malform(&timestamp);
        let outcome = refused(&input, *expected, |bytes| {
            client().update_timestamp(bytes, now())
        });
        if let Some(failure) = outcome {
            failures.push(format!("update_timestamp, {name}: {failure}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Found by the fuzzer (minimised: chunk size 5, a length near 2^64, no
/// hashes): the expected list size overflowed u64.
#[test]
fn a_chunk_list_for_an_absurd_length_is_refused() {
    let input = hex::decode("050000000079 2f2f2fcb2fcb".replace(' ', "")).unwrap();
    let chunk_size = u32::from_le_bytes(input[..4].try_into().unwrap());
    let length = u64::from_le_bytes(input[4..12].try_into().unwrap());
    let list = &input[12..];
    let digest: [u8; 32] = hex::decode(tuf::sha256_hex(list))
        .unwrap()
        .try_into()
        .unwrap();
    let outcome = refused(list, Refusal::ChunkList, |bytes| {
        ChunkList::decode(bytes, chunk_size, length, &digest)
    });
    assert_eq!(outcome, None);
}

/// Found by the fuzzer (a root it wrote, signed by the harness with the
/// root keys): a trusted root of version u64::MAX has no next version, and
/// `next_root_version` then `update_root` overflowed. Such a root can never
/// be rotated, so it is refused, pinned or as an update.
#[test]
fn a_root_with_no_next_version_is_refused() {
    let pinned = refused(&root(u64::MAX), Refusal::Malformed, |bytes| {
        TrustedMetadata::from_pinned_root(bytes, Limits::default())
    });
    let mut client = TrustedMetadata::from_pinned_root(&root(u64::MAX - 1), Limits::default())
        .expect("version u64::MAX - 1 has a next version");
    let update = refused(&root(u64::MAX), Refusal::Malformed, |bytes| {
        client.update_root(bytes)
    });
    assert_eq!((pinned, update), (None, None), "(pinned, as an update)");
}
