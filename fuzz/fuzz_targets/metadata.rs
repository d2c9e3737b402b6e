//! TUF metadata and chunk lists from arbitrary bytes: errors are expected, a
//! panic is a bug.
//!
//! Every input goes, as is, to each entry point a mirror's bytes reach: as a
//! pinned root, and, against a valid repository built once, as a root update,
//! a timestamp, a snapshot and targets. Arbitrary bytes never carry a valid
//! signature, so an input that parses as an envelope is also re-signed with
//! the repository's key for the role its `_type` names: the checks after
//! signature verification (versions, rollback, expiry, lengths, hashes,
//! bundle fields) are fuzzed too. The same input is last read as a chunk
//! list: chunk size (u32 LE), bundle length (u64 LE), then the hashes.
//!
//! Byte flips rarely keep JSON well formed, so half of the mutations are
//! edits of the parsed document instead (`fuzz_mutator!`): a field added,
//! removed or set to an edge value (floats, numbers past u64, deep nesting,
//! wrong types). Inputs stay plain bytes: a crash file is the metadata file a
//! mirror would serve. The seeds (fuzz/seeds/metadata) are the valid files
//! of the fixture below, which writes them when POSFLEET_FUZZ_WRITE_SEEDS
//! names a folder, and two chunk lists.
#![no_main]

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};
use posfleet_bundle::chunks::{self, ChunkList};
use posfleet_bundle::client::{Limits, TrustedMetadata};
use posfleet_bundle::manifest::{Kind, Manifest};
use posfleet_bundle::repo::{self, RootKeys};
use posfleet_bundle::tuf::{self, Envelope, ROOT, SNAPSHOT, TARGETS, TIMESTAMP};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::OnceLock;

const BUNDLE: &str = "pos-app/1.0.0";
const HARDWARE: &str = "pos-x1";

/// A valid repository, its keys from fixed seeds, and the client states an
/// agent goes through when refreshing from it.
struct Fixture {
    now: DateTime<Utc>,
    expires: DateTime<Utc>,
    root_keys: Vec<SigningKey>,
    targets_key: SigningKey,
    snapshot_key: SigningKey,
    timestamp_key: SigningKey,
    timestamp_bytes: Vec<u8>,
    /// Only the pinned root (version 1) is trusted.
    pinned: TrustedMetadata,
    /// Root and timestamp (version 1) are trusted.
    with_timestamp: TrustedMetadata,
    /// Root, timestamp and snapshot (version 1) are trusted.
    with_snapshot: TrustedMetadata,
    /// Everything, targets (version 1) too.
    complete: TrustedMetadata,
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

impl Fixture {
    fn new() -> Fixture {
        // The fixture is fixed input: a failure here is a broken harness,
        // not a finding.
        let now = DateTime::parse_from_rfc3339("2026-11-21T12:00:00Z")
            .expect("a valid time")
            .with_timezone(&Utc);
        let expires = now + Duration::days(30);
        let root_keys = vec![key(1), key(2), key(3)];
        let (targets_key, snapshot_key, timestamp_key) = (key(11), key(21), key(31));
        let root = repo::root(
            &RootKeys {
                root: root_keys.iter().map(SigningKey::verifying_key).collect(),
                root_threshold: 2,
                targets: vec![targets_key.verifying_key()],
                targets_threshold: 1,
                snapshot: snapshot_key.verifying_key(),
                timestamp: timestamp_key.verifying_key(),
            },
            1,
            now + Duration::days(365),
        );
        let root_bytes = tuf::sign(&root, &root_keys.iter().collect::<Vec<_>>());

        let manifest = Manifest {
            name: "pos-app".into(),
            version: "1.0.0".parse().expect("a valid version"),
            kind: Kind::Software,
            hardware: vec![HARDWARE.into()],
            pre_activate: None,
            health_check: None,
            service: None,
        };
        let digest = chunks::digest_reader(&[7u8; 100][..]).expect("reading memory");
        let entries = BTreeMap::from([(BUNDLE.into(), repo::target_file(&manifest, &digest))]);
        let targets_bytes = tuf::sign(&repo::targets(1, expires, entries), &[&targets_key]);
        let snapshot = repo::snapshot(1, expires, 1, &targets_bytes);
        let snapshot_bytes = tuf::sign(&snapshot, &[&snapshot_key]);
        let timestamp = repo::timestamp(1, expires, 1, &snapshot_bytes);
        let timestamp_bytes = tuf::sign(&timestamp, &[&timestamp_key]);

        // POSFLEET_FUZZ_WRITE_SEEDS=seeds/metadata regenerates the seeds.
        if let Some(dir) = std::env::var_os("POSFLEET_FUZZ_WRITE_SEEDS") {
            let dir = std::path::Path::new(&dir);
            for (name, bytes) in [
                ("root.json", &root_bytes),
                ("timestamp.json", &timestamp_bytes),
                ("snapshot.json", &snapshot_bytes),
                ("targets.json", &targets_bytes),
            ] {
                std::fs::write(dir.join(name), bytes).expect("writing a seed");
            }
        }
        let pinned = TrustedMetadata::from_pinned_root(&root_bytes, Limits::default())
            .expect("the fixture's root is valid");
        let mut with_timestamp = pinned.clone();
        with_timestamp
            .update_timestamp(&timestamp_bytes, now)
            .expect("the fixture's timestamp is valid");
        let mut with_snapshot = with_timestamp.clone();
        with_snapshot
            .update_snapshot(&snapshot_bytes, now)
            .expect("the fixture's snapshot is valid");
        let mut complete = with_snapshot.clone();
        complete
            .update_targets(&targets_bytes, now)
            .expect("the fixture's targets are valid");
        complete
            .bundle(BUNDLE, HARDWARE, now)
            .expect("the fixture's bundle is valid");
        Fixture {
            now,
            expires,
            root_keys,
            targets_key,
            snapshot_key,
            timestamp_key,
            timestamp_bytes,
            pinned,
            with_timestamp,
            with_snapshot,
            complete,
        }
    }

    fn get() -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(Fixture::new)
    }

    /// A timestamp of `version` naming `snapshot`.
    fn timestamp(&self, version: u64, snapshot: &[u8]) -> Vec<u8> {
        let snapshot_version = signed_version(snapshot);
        let timestamp = repo::timestamp(version, self.expires, snapshot_version, snapshot);
        tuf::sign(&timestamp, &[&self.timestamp_key])
    }

    /// A snapshot of `version` naming `targets`.
    fn snapshot(&self, version: u64, targets: &[u8]) -> Vec<u8> {
        let targets_version = signed_version(targets);
        let snapshot = repo::snapshot(version, self.expires, targets_version, targets);
        tuf::sign(&snapshot, &[&self.snapshot_key])
    }
}

/// The `version` a metadata file claims, so that files naming it agree.
fn signed_version(bytes: &[u8]) -> u64 {
    tuf::parse_envelope("any", bytes, u64::MAX)
        .ok()
        .and_then(|e| e.signed.get("version").and_then(|v| v.as_u64()))
        .unwrap_or(1)
}

/// Whether `tuf::sign`, the editor's signing, takes `value`: canonical JSON
/// has no floats. The editor only signs metadata it built itself, so the
/// harness does not feed it anything else.
fn signable(value: &Value) -> bool {
    match value {
        Value::Number(n) => !n.is_f64(),
        Value::Array(items) => items.iter().all(signable),
        Value::Object(map) => map.values().all(signable),
        _ => true,
    }
}

/// The input as sent by a mirror, to every entry point.
fn as_received(f: &Fixture, data: &[u8]) {
    if let Ok(mut client) = TrustedMetadata::from_pinned_root(data, Limits::default()) {
        let _ = client.next_root_version();
        let _ = client.finish_root_updates(f.now);
    }
    let _ = f.pinned.clone().update_root(data);
    let _ = f.pinned.clone().update_timestamp(data, f.now);
    let mut client = f.with_timestamp.clone();
    if let Ok(true) = client.update_timestamp(data, f.now) {
        let _ = client.snapshot_to_fetch();
    }
    let _ = f.with_timestamp.clone().update_snapshot(data, f.now);
    let _ = f.with_snapshot.clone().update_snapshot(data, f.now);
    let _ = f.with_snapshot.clone().update_targets(data, f.now);
    let _ = f.complete.clone().update_targets(data, f.now);
}

/// The input's signed object, signed by the keys of the role it names, and
/// accepted in turn by each state that role can follow.
fn re_signed(f: &Fixture, envelope: &Envelope) {
    if !signable(&envelope.signed) {
        return;
    }
    match envelope.signed.get("_type").and_then(|t| t.as_str()) {
        Some(ROOT) => {
            let bytes = tuf::sign(&envelope.signed, &f.root_keys.iter().collect::<Vec<_>>());
            if let Ok(mut client) = TrustedMetadata::from_pinned_root(&bytes, Limits::default()) {
                let _ = client.next_root_version();
                let _ = client.finish_root_updates(f.now);
                let _ = client.update_timestamp(&f.timestamp_bytes, f.now);
            }
            let mut client = f.complete.clone();
            if client.update_root(&bytes).is_ok() {
                let _ = client.next_root_version();
                let _ = client.finish_root_updates(f.now);
                let _ = client.update_timestamp(&f.timestamp_bytes, f.now);
                let _ = client.snapshot_to_fetch();
                let _ = client.bundle(BUNDLE, HARDWARE, f.now);
            }
        }
        Some(TIMESTAMP) => {
            let bytes = tuf::sign(&envelope.signed, &[&f.timestamp_key]);
            for state in [&f.pinned, &f.with_timestamp, &f.complete] {
                let mut client = state.clone();
                if client.update_timestamp(&bytes, f.now).is_ok() {
                    let _ = client.snapshot_to_fetch();
                    let _ = client.targets_to_fetch();
                }
            }
        }
        Some(SNAPSHOT) => {
            let bytes = tuf::sign(&envelope.signed, &[&f.snapshot_key]);
            let timestamp = f.timestamp(2, &bytes);
            for state in [&f.with_timestamp, &f.with_snapshot] {
                let mut client = state.clone();
                if client.update_timestamp(&timestamp, f.now).is_ok()
                    && client.update_snapshot(&bytes, f.now).is_ok()
                {
                    let _ = client.targets_to_fetch();
                }
            }
        }
        Some(TARGETS) => {
            let bytes = tuf::sign(&envelope.signed, &[&f.targets_key]);
            let snapshot = f.snapshot(2, &bytes);
            let timestamp = f.timestamp(2, &snapshot);
            let mut client = f.complete.clone();
            if client.update_timestamp(&timestamp, f.now).is_ok()
                && client.update_snapshot(&snapshot, f.now).is_ok()
                && client.update_targets(&bytes, f.now).is_ok()
            {
                let names: Vec<String> = client
                    .targets()
                    .map(|t| t.targets.keys().take(16).cloned().collect())
                    .unwrap_or_default();
                for name in names {
                    let _ = client.bundle(&name, HARDWARE, f.now);
                }
                let _ = client.bundle(BUNDLE, HARDWARE, f.now);
            }
        }
        _ => {}
    }
}

/// The input as a chunk list: piece size, bundle length, then the hashes.
fn chunk_list(data: &[u8]) {
    let Some((chunk_size, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Some((length, list)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let (chunk_size, length) = (u32::from_le_bytes(*chunk_size), u64::from_le_bytes(*length));
    // The digest as signed metadata gives it, computed by the crate.
    let Some(digest) = hex::decode(tuf::sha256_hex(list))
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
    else {
        return;
    };
    if let Ok(decoded) = ChunkList::decode(list, chunk_size, length, &digest) {
        assert_eq!(decoded.encode(), list, "a decoded list encodes as received");
        assert_eq!(decoded.digest(), digest);
        for index in 0..decoded.count().min(4) {
            let _ = decoded.chunk_len(index);
            let _ = decoded.verify_piece(index, list);
        }
        let _ = decoded.chunk_len(decoded.count());
    }
    let mut wrong = digest;
    wrong[0] ^= 1;
    assert!(
        ChunkList::decode(list, chunk_size, length, &wrong).is_err(),
        "a list not matching its signed digest is refused"
    );
}

/// splitmix64, seeded by libFuzzer so that runs replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Names a metadata file has, and one it does not.
const FIELDS: &[&str] = &[
    "_type",
    "spec_version",
    "version",
    "expires",
    "meta",
    "length",
    "hashes",
    "sha256",
    "keys",
    "keytype",
    "scheme",
    "keyval",
    "public",
    "roles",
    "keyids",
    "threshold",
    "targets",
    "custom",
    "signed",
    "signatures",
    "keyid",
    "sig",
    "snapshot.json",
    "targets.json",
    "x-extra",
];
const ROLES: &[&str] = &[ROOT, TIMESTAMP, SNAPSHOT, TARGETS];

/// A value at the edge of what the client parses.
fn edge_value(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(u64::MAX),
        3 => Value::from(rng.next() >> rng.below(64)),
        // Floats, and an integer too large for u64, which JSON parsers
        // read as a float.
        4 => Value::from(1.5),
        5 => Value::from(18_446_744_073_709_551_616.0),
        6 => Value::from(""),
        7 => Value::from("zz"),
        8 => Value::from(rng.pick(&["2026-11-21T12:00:00Z", "9999-12-31T23:59:59Z", "soon"])),
        9 => Value::from(rng.pick(ROLES)),
        10 => Value::Null,
        11 => Value::Bool(rng.below(2) == 0),
        12 => Value::Object(Map::new()),
        _ => (0..rng.below(200)).fold(Value::Array(Vec::new()), |inner, _| {
            Value::Array(vec![inner])
        }),
    }
}

fn count(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count).sum(),
        Value::Object(map) => map.values().map(count).sum(),
        _ => 0,
    }
}

fn nth<'a>(value: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
    if *n == 0 {
        return Some(value);
    }
    *n -= 1;
    match value {
        Value::Array(items) => items.iter_mut().find_map(|v| nth(v, n)),
        Value::Object(map) => map.values_mut().find_map(|v| nth(v, n)),
        _ => None,
    }
}

/// One edit of a node of a JSON document: the structure survives, so the
/// edit reaches the checks after parsing, where byte flips rarely get.
fn mutate_json(document: &mut Value, rng: &mut Rng) {
    let mut n = rng.below(count(document));
    let Some(node) = nth(document, &mut n) else {
        return;
    };
    match (node, rng.below(3)) {
        (Value::Object(map), 0) => {
            map.insert(rng.pick(FIELDS).into(), edge_value(rng));
        }
        (Value::Object(map), 1) if !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).cloned();
            key.map(|k| map.remove(&k));
        }
        (Value::Array(items), 0) if !items.is_empty() => {
            let item = items[rng.below(items.len())].clone();
            items.push(item);
        }
        (Value::Array(items), 1) if !items.is_empty() => {
            items.remove(rng.below(items.len()));
        }
        (node @ Value::Number(_), 0) => {
            if let Some(n) = node.as_u64() {
                *node = Value::from(n.wrapping_add(rng.below(3) as u64).wrapping_sub(1));
            }
        }
        (node, _) => *node = edge_value(rng),
    }
}

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = Rng(u64::from(seed));
    if rng.below(2) == 0 {
        return fuzzer_mutate(data, size, max_size);
    }
    let Ok(mut document) = serde_json::from_slice::<Value>(&data[..size]) else {
        return fuzzer_mutate(data, size, max_size);
    };
    for _ in 0..=rng.below(3) {
        mutate_json(&mut document, &mut rng);
    }
    match serde_json::to_vec(&document) {
        Ok(bytes) if bytes.len() <= max_size => {
            data[..bytes.len()].copy_from_slice(&bytes);
            bytes.len()
        }
        _ => fuzzer_mutate(data, size, max_size),
    }
});

fuzz_target!(|data: &[u8]| {
    let f = Fixture::get();
    as_received(f, data);
    if let Ok(envelope) = tuf::parse_envelope("any", data, u64::MAX) {
        re_signed(f, &envelope);
    }
    chunk_list(data);
});
