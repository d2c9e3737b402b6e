//! TUF's attack list, one test (or more) per attack, each asserting the
//! specific refusal. A repository is built in memory with the editor, and a
//! client starts from its pinned first root, as an agent does.

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::SigningKey;
use posfleet_bundle::Error;
use posfleet_bundle::chunks::{self, ChunkList};
use posfleet_bundle::client::{Limits, TrustedMetadata};
use posfleet_bundle::manifest::{Kind, Manifest};
use posfleet_bundle::repo::{self, RootKeys};
use posfleet_bundle::tuf::{self, TargetFile};
use std::collections::BTreeMap;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-21T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A repository: keys, published metadata files, bundle bytes.
struct Repo {
    root_keys: Vec<SigningKey>,
    root_threshold: u64,
    targets_keys: Vec<SigningKey>,
    targets_threshold: u64,
    snapshot_key: SigningKey,
    timestamp_key: SigningKey,
    roots: Vec<Vec<u8>>,
    entries: BTreeMap<String, TargetFile>,
    bundles: BTreeMap<String, (Vec<u8>, ChunkList)>,
    targets_version: u64,
    snapshot_version: u64,
    timestamp_version: u64,
    expires: DateTime<Utc>,
    /// The last published (targets, snapshot, timestamp) files.
    published: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>,
}

impl Repo {
    fn new() -> Repo {
        let mut repo = Repo {
            root_keys: vec![key(1), key(2), key(3)],
            root_threshold: 2,
            targets_keys: vec![key(11), key(12)],
            targets_threshold: 2,
            snapshot_key: key(21),
            timestamp_key: key(31),
            roots: Vec::new(),
            entries: BTreeMap::new(),
            bundles: BTreeMap::new(),
            targets_version: 0,
            snapshot_version: 0,
            timestamp_version: 0,
            expires: now() + Duration::days(30),
            published: None,
        };
        let root = repo.root(1);
        let signers: Vec<&SigningKey> = repo.root_keys.iter().collect();
        repo.roots.push(tuf::sign(&root, &signers));
        repo
    }

    fn root_keys(&self) -> RootKeys {
        RootKeys {
            root: self.root_keys.iter().map(|k| k.verifying_key()).collect(),
            root_threshold: self.root_threshold,
            targets: self
                .targets_keys
                .iter()
                .map(|k| k.verifying_key())
                .collect(),
            targets_threshold: self.targets_threshold,
            snapshot: self.snapshot_key.verifying_key(),
            timestamp: self.timestamp_key.verifying_key(),
        }
    }

    fn root(&self, version: u64) -> tuf::Root {
        repo::root(&self.root_keys(), version, now() + Duration::days(365))
    }

    /// Rotates root: `change` edits the keys; the new root is signed by the
    /// old root keys and the new ones.
    fn rotate(&mut self, change: impl FnOnce(&mut Repo)) -> Vec<u8> {
        let old_keys = self.root_keys.clone();
        change(self);
        let root = self.root(self.roots.len() as u64 + 1);
        let mut signers: Vec<&SigningKey> = old_keys.iter().collect();
        signers.extend(self.root_keys.iter());
        let bytes = tuf::sign(&root, &signers);
        self.roots.push(bytes.clone());
        bytes
    }

    fn add(&mut self, name: &str, hardware: &[&str], data: Vec<u8>) {
        let (bundle, version) = name.split_once('/').unwrap();
        let manifest = Manifest {
            name: bundle.into(),
            version: version.parse().unwrap(),
            kind: Kind::Software,
            hardware: hardware.iter().map(|h| h.to_string()).collect(),
            pre_activate: None,
            health_check: None,
            service: None,
        };
        let digest = chunks::digest_reader(&data[..]).unwrap();
        self.entries
            .insert(name.into(), repo::target_file(&manifest, &digest));
        self.bundles.insert(name.into(), (data, digest.chunks));
    }

    fn publish(&mut self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        self.targets_version += 1;
        self.snapshot_version += 1;
        self.timestamp_version += 1;
        let targets = repo::targets(self.targets_version, self.expires, self.entries.clone());
        let signers: Vec<&SigningKey> = self.targets_keys.iter().collect();
        let targets = tuf::sign(&targets, &signers);
        let snapshot = repo::snapshot(
            self.snapshot_version,
            self.expires,
            self.targets_version,
            &targets,
        );
        let snapshot = tuf::sign(&snapshot, &[&self.snapshot_key]);
        let timestamp = repo::timestamp(
            self.timestamp_version,
            self.expires,
            self.snapshot_version,
            &snapshot,
        );
        let timestamp = tuf::sign(&timestamp, &[&self.timestamp_key]);
        self.published = Some((targets.clone(), snapshot.clone(), timestamp.clone()));
        (targets, snapshot, timestamp)
    }

    fn client(&self) -> TrustedMetadata {
        TrustedMetadata::from_pinned_root(&self.roots[0], Limits::default()).unwrap()
    }
}

/// The whole client workflow against what `repo` serves now.
fn refresh(client: &mut TrustedMetadata, repo: &Repo, at: DateTime<Utc>) -> Result<(), Error> {
    while let Some(next) = repo.roots.get(client.next_root_version() as usize - 1) {
        client.update_root(next)?;
    }
    client.finish_root_updates(at)?;
    let (targets, snapshot, timestamp) = repo.published.clone().expect("published");
    if client.update_timestamp(&timestamp, at)? {
        client.update_snapshot(&snapshot, at)?;
        client.update_targets(&targets, at)?;
    }
    Ok(())
}

fn sample() -> Repo {
    let mut repo = Repo::new();
    repo.add(
        "pos-app/1.0.0",
        &["pos-x1"],
        vec![7u8; 3 * 1024 * 1024 + 10],
    );
    repo.publish();
    repo
}

#[test]
fn a_fresh_client_trusts_a_good_repository() {
    let repo = sample();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    let target = client.bundle("pos-app/1.0.0", "pos-x1", now()).unwrap();
    assert_eq!(target.length(), 3 * 1024 * 1024 + 10);
    let (data, list) = &repo.bundles["pos-app/1.0.0"];
    let fetched = target.decode_chunk_list(&list.encode()).unwrap();
    fetched.verify_reader(&data[..]).unwrap();
    // The whole file, as a till checks a staged bundle before installing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    std::fs::write(&path, data).unwrap();
    target.verify_file(&path).unwrap();
}

#[test]
fn arbitrary_software_installation_is_refused() {
    let mut repo = sample();
    // An attacker without the targets keys signs its own targets metadata.
    let stolen = std::mem::replace(&mut repo.targets_keys, vec![key(91), key(92)]);
    repo.add("evil/6.6.6", &["*"], b"rm -rf /".to_vec());
    repo.publish();
    repo.targets_keys = stolen;
    let mut client = repo.client();
    let err = refresh(&mut client, &repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, valid: 0, .. } if role == "targets"),
        "{err}"
    );
}

#[test]
fn rollback_attack_is_refused() {
    let mut repo = sample();
    let mut client = repo.client();
    let old = repo.published.clone().unwrap();
    repo.add("pos-app/1.1.0", &["pos-x1"], vec![8u8; 100]);
    repo.publish();
    refresh(&mut client, &repo, now()).unwrap();
    // The mirror serves the older timestamp again.
    let err = client.update_timestamp(&old.2, now()).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempt { ref role, trusted: 2, offered: 1 } if role == "timestamp"),
        "{err}"
    );
}

#[test]
fn rollback_of_targets_through_a_newer_snapshot_is_refused() {
    let mut repo = sample();
    let mut client = repo.client();
    repo.publish();
    refresh(&mut client, &repo, now()).unwrap();
    // A compromised snapshot key signs a newer snapshot naming older targets.
    repo.snapshot_version += 1;
    repo.timestamp_version += 1;
    let (old_targets, ..) = repo.published.clone().unwrap();
    let snapshot = repo::snapshot(repo.snapshot_version, repo.expires, 1, &old_targets);
    let snapshot = tuf::sign(&snapshot, &[&repo.snapshot_key]);
    let timestamp = repo::timestamp(
        repo.timestamp_version,
        repo.expires,
        repo.snapshot_version,
        &snapshot,
    );
    let timestamp = tuf::sign(&timestamp, &[&repo.timestamp_key]);
    assert!(client.update_timestamp(&timestamp, now()).unwrap());
    let err = client.update_snapshot(&snapshot, now()).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempt { ref role, trusted: 2, offered: 1 } if role == "targets"),
        "{err}"
    );
}

#[test]
fn fast_forward_attack_is_undone_by_rotating_the_timestamp_key() {
    let mut repo = sample();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    // A stolen timestamp key pushes the version far ahead.
    let (_, snapshot, _) = repo.published.clone().unwrap();
    let forged = repo::timestamp(1_000_000, repo.expires, repo.snapshot_version, &snapshot);
    client
        .update_timestamp(&tuf::sign(&forged, &[&repo.timestamp_key]), now())
        .unwrap();
    repo.publish();
    let err = refresh(&mut client, &repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempt { .. }),
        "stuck until rotation: {err}"
    );
    // Ops rotate the timestamp key; the client drops the forged timestamp.
    repo.rotate(|r| r.timestamp_key = key(32));
    repo.publish();
    refresh(&mut client, &repo, now()).unwrap();
    client.bundle("pos-app/1.0.0", "pos-x1", now()).unwrap();
}

#[test]
fn indefinite_freeze_attack_is_refused() {
    let repo = sample();
    let mut client = repo.client();
    // The mirror keeps serving metadata that has expired.
    let later = repo.expires + Duration::seconds(1);
    let err = refresh(&mut client, &repo, later).unwrap_err();
    assert!(
        matches!(err, Error::ExpiredMetadata { ref role, .. } if role == "timestamp"),
        "{err}"
    );
    // Metadata trusted while it was current vouches for nothing once it
    // has expired: the till that lost its repository starts nothing new.
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    client.bundle("pos-app/1.0.0", "pos-x1", now()).unwrap();
    let err = client.bundle("pos-app/1.0.0", "pos-x1", later).unwrap_err();
    assert!(matches!(err, Error::ExpiredMetadata { .. }), "{err}");
    // An expired root is refused too.
    let err = refresh(&mut repo.client(), &repo, now() + Duration::days(400)).unwrap_err();
    assert!(
        matches!(err, Error::ExpiredMetadata { ref role, .. } if role == "root"),
        "{err}"
    );
}

#[test]
fn endless_data_attack_is_refused() {
    let repo = sample();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    let huge = vec![b' '; 1 << 20];
    let err = client.update_timestamp(&huge, now()).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { ref role, .. } if role == "timestamp"),
        "{err}"
    );
    let err = client.update_root(&vec![b' '; 1 << 20]).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { ref role, .. } if role == "root"),
        "{err}"
    );
    // A snapshot longer than the timestamp says.
    let (_, snapshot, _) = repo.published.clone().unwrap();
    let mut longer = snapshot.clone();
    longer.extend(std::iter::repeat_n(b' ', 100));
    let mut fresh = repo.client();
    fresh
        .update_timestamp(&repo.published.clone().unwrap().2, now())
        .unwrap();
    let err = fresh.update_snapshot(&longer, now()).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { ref role, .. } if role == "snapshot"),
        "{err}"
    );
    // A bundle stream longer than its signed length.
    let (data, list) = &repo.bundles["pos-app/1.0.0"];
    let mut endless = data.clone();
    endless.extend(vec![0u8; 4096]);
    assert!(matches!(
        list.verify_reader(&endless[..]),
        Err(Error::LengthMismatch { .. })
    ));
    // A target over the bundle size limit.
    let small = Limits {
        max_bundle_size: 1024,
        ..Limits::default()
    };
    let mut limited = TrustedMetadata::from_pinned_root(&repo.roots[0], small).unwrap();
    refresh(&mut limited, &repo, now()).unwrap();
    assert!(matches!(
        limited.bundle("pos-app/1.0.0", "pos-x1", now()),
        Err(Error::TooLarge { .. })
    ));
    // Signed metadata asking for 4 GiB pieces (each piece is one buffer).
    let mut repo = sample();
    let entry = repo.entries.get_mut("pos-app/1.0.0").unwrap();
    entry.custom.as_mut().unwrap()["chunk_size"] = serde_json::json!(u32::MAX);
    repo.publish();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    let err = client.bundle("pos-app/1.0.0", "pos-x1", now()).unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err}");
}

#[test]
fn extraneous_dependencies_are_refused() {
    let repo = sample();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    let err = client
        .bundle("libcrypto-backdoor/1.0.0", "pos-x1", now())
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownTarget(ref name) if name == "libcrypto-backdoor/1.0.0"),
        "{err}"
    );
}

#[test]
fn mix_and_match_attack_is_refused() {
    let mut repo = sample();
    let (old_targets, ..) = repo.published.clone().unwrap();
    repo.add("pos-app/1.1.0", &["pos-x1"], vec![9u8; 10]);
    let (_, snapshot, timestamp) = repo.publish();
    let mut client = repo.client();
    client.update_timestamp(&timestamp, now()).unwrap();
    client.update_snapshot(&snapshot, now()).unwrap();
    // Targets from the previous snapshot, served with the current one.
    let err = client.update_targets(&old_targets, now()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch { .. } | Error::HashMismatch { .. }
        ),
        "{err}"
    );

    // With a snapshot that gives only versions, the version check catches it.
    let versions_only = tuf::Snapshot {
        meta: BTreeMap::from([(
            "targets.json".to_string(),
            tuf::MetaFile {
                version: repo.targets_version,
                length: None,
                hashes: None,
            },
        )]),
        ..repo::snapshot(repo.snapshot_version + 1, repo.expires, 0, b"")
    };
    let snapshot = tuf::sign(&versions_only, &[&repo.snapshot_key]);
    let timestamp = repo::timestamp(
        repo.timestamp_version + 1,
        repo.expires,
        repo.snapshot_version + 1,
        &snapshot,
    );
    let timestamp = tuf::sign(&timestamp, &[&repo.timestamp_key]);
    let mut client = repo.client();
    client.update_timestamp(&timestamp, now()).unwrap();
    client.update_snapshot(&snapshot, now()).unwrap();
    let err = client.update_targets(&old_targets, now()).unwrap_err();
    assert!(
        matches!(err, Error::VersionMismatch { ref role, expected: 2, offered: 1, .. } if role == "targets"),
        "{err}"
    );
}

#[test]
fn wrong_software_is_refused() {
    let repo = sample();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    let err = client
        .bundle("pos-app/1.0.0", "kiosk-k2", now())
        .unwrap_err();
    assert!(
        matches!(err, Error::WrongHardware { ref model, .. } if model == "kiosk-k2"),
        "{err}"
    );
}

#[test]
fn malicious_mirror_pieces_are_refused() {
    let repo = sample();
    let (data, list) = &repo.bundles["pos-app/1.0.0"];
    let size = list.chunk_size() as usize;
    let mut piece = data[size..2 * size].to_vec();
    piece[100] ^= 0xff;
    let err = list.verify_piece(1, &piece).unwrap_err();
    assert!(
        matches!(err, Error::ChunkHashMismatch { index: 1 }) && err.is_bad_digest(),
        "{err}"
    );
    // A doctored chunk list does not match its signed digest.
    let mut encoded = list.encode();
    encoded[40] ^= 1;
    let err =
        ChunkList::decode(&encoded, list.chunk_size(), list.length(), &list.digest()).unwrap_err();
    assert!(
        matches!(err, Error::ChunkListMismatch) && err.is_bad_digest(),
        "{err}"
    );
    // A bundle on disk (a mirror, a peer, a rotting disk) that is not the
    // signed one, byte for byte or by length.
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    let target = client.bundle("pos-app/1.0.0", "pos-x1", now()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bundle");
    let mut doctored = data.clone();
    doctored[7] ^= 1;
    std::fs::write(&path, &doctored).unwrap();
    let err = target.verify_file(&path).unwrap_err();
    assert!(
        matches!(err, Error::HashMismatch { .. }) && err.is_bad_digest(),
        "{err}"
    );
    doctored.pop();
    std::fs::write(&path, &doctored).unwrap();
    let err = target.verify_file(&path).unwrap_err();
    assert!(
        matches!(err, Error::LengthMismatch { .. }) && err.is_bad_digest(),
        "{err}"
    );
}

#[test]
fn key_compromise_below_threshold_is_refused() {
    let mut repo = sample();
    // One of the two targets keys is stolen; the other is not.
    let honest = repo.targets_keys.remove(1);
    repo.targets_keys.push(key(99));
    repo.add("evil/1.0.0", &["*"], b"x".to_vec());
    repo.publish();
    repo.targets_keys.pop();
    repo.targets_keys.push(honest);
    let err = refresh(&mut repo.client(), &repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, valid: 1, threshold: 2 } if role == "targets"),
        "{err}"
    );

    // A root signed by one root key of the 2 required is refused.
    let mut rogue = repo.root(2);
    rogue.expires = tuf::format_time(now() + Duration::days(9999));
    let bytes = tuf::sign(&rogue, &[&repo.root_keys[0]]);
    let err = repo.client().update_root(&bytes).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, valid: 1, threshold: 2 } if role == "root"),
        "{err}"
    );
}

#[test]
fn a_rotated_out_key_is_no_longer_accepted() {
    let mut repo = sample();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();
    // Ops replace targets key 11 with key 13.
    let retired = repo.targets_keys[0].clone();
    repo.rotate(|r| r.targets_keys[0] = key(13));
    repo.publish();
    refresh(&mut client, &repo, now()).unwrap();
    // Targets signed with the retired key (and the one still valid).
    let keep = repo.targets_keys[1].clone();
    repo.targets_keys = vec![retired, keep];
    repo.publish();
    let err = refresh(&mut client, &repo, now()).unwrap_err();
    assert!(
        matches!(err, Error::ThresholdNotMet { ref role, valid: 1, threshold: 2 } if role == "targets"),
        "{err}"
    );
}

#[test]
fn root_versions_cannot_be_skipped() {
    let mut repo = sample();
    repo.rotate(|_| {});
    let third = repo.rotate(|_| {});
    let err = repo.client().update_root(&third).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RootVersionSkip {
                trusted: 1,
                offered: 3
            }
        ),
        "{err}"
    );
}

/// A root that lists one key under two key ids: under an id that is not
/// its own, or under the id of another spelling of it (upper-case hex).
/// Two signatures by that one key, one per id, are one signer, not the
/// two a threshold of 2 asks for.
#[test]
fn a_key_listed_under_two_ids_counts_once() {
    let signer = key(1);
    let real = tuf::Key::ed25519(&signer.verifying_key());
    let mut upper = real.clone();
    upper.keyval.public = upper.keyval.public.to_uppercase();
    for (alias_id, alias) in [("ab".repeat(32), real.clone()), (upper.id(), upper)] {
        let mut root = Repo::new().root(1);
        root.keys.insert(alias_id.clone(), alias);
        root.roles.insert(
            "root".into(),
            tuf::RoleKeys {
                keyids: vec![real.id(), alias_id.clone()],
                threshold: 2,
            },
        );
        let mut envelope =
            tuf::parse_envelope("root", &tuf::sign(&root, &[&signer]), 1 << 20).unwrap();
        let twice = tuf::Signature {
            keyid: alias_id,
            sig: envelope.signatures[0].sig.clone(),
        };
        envelope.signatures.push(twice);
        let bytes = serde_json::to_vec(&envelope).unwrap();
        let err = TrustedMetadata::from_pinned_root(&bytes, Limits::default()).unwrap_err();
        assert!(
            matches!(err, Error::ThresholdNotMet { ref role, valid: 1, threshold: 2 } if role == "root"),
            "{err}"
        );
    }
}

/// A restart reloads what the till trusted. A saved timestamp that expired
/// meanwhile still sets the floor: an older one, signed to live longer,
/// is a rollback. A newer one is taken over it.
#[test]
fn a_restored_expired_timestamp_still_blocks_a_rollback() {
    let mut repo = sample();
    repo.expires = now() + Duration::days(30);
    let old = repo.publish();
    repo.expires = now() + Duration::days(1);
    let saved = repo.publish();
    let later = now() + Duration::days(2);

    let mut restarted = repo.client();
    restarted.restore_timestamp(&saved.2).unwrap();
    restarted.restore_snapshot(&saved.1).unwrap();
    restarted.restore_targets(&saved.0).unwrap();
    let err = restarted
        .bundle("pos-app/1.0.0", "pos-x1", later)
        .unwrap_err();
    assert!(
        matches!(err, Error::ExpiredMetadata { ref role, .. } if role == "timestamp"),
        "{err}"
    );
    let err = restarted.update_timestamp(&old.2, later).unwrap_err();
    assert!(
        matches!(err, Error::RollbackAttempt { ref role, trusted: 3, offered: 2 } if role == "timestamp"),
        "{err}"
    );

    repo.expires = now() + Duration::days(30);
    repo.publish();
    refresh(&mut restarted, &repo, later).unwrap();
    restarted.bundle("pos-app/1.0.0", "pos-x1", later).unwrap();
}

/// What ops upload is checked against its signed entry before the control
/// plane serves it: a tampered, cut or padded file, or an entry whose
/// chunk list digest is not the file's, is refused.
#[test]
fn an_upload_that_is_not_the_signed_bundle_is_refused() {
    let repo = sample();
    let (data, _) = &repo.bundles["pos-app/1.0.0"];
    let entry = &repo.entries["pos-app/1.0.0"];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload");
    std::fs::write(&path, data).unwrap();
    let digest = entry.verify_file("pos-app/1.0.0", &path).unwrap();
    assert_eq!(
        digest.chunks.encode(),
        repo.bundles["pos-app/1.0.0"].1.encode()
    );

    let mut tampered = data.clone();
    tampered[3] ^= 1;
    let mut longer = data.clone();
    longer.push(0);
    for (bytes, what) in [
        (tampered, "tampered"),
        (data[..data.len() - 1].to_vec(), "cut"),
        (longer, "padded"),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let err = entry.verify_file("pos-app/1.0.0", &path).unwrap_err();
        assert!(err.is_bad_digest(), "{what}: {err}");
    }

    let mut wrong_list = entry.clone();
    wrong_list.custom.as_mut().unwrap()["chunks_sha256"] = serde_json::json!("00".repeat(32));
    std::fs::write(&path, data).unwrap();
    let err = wrong_list.verify_file("pos-app/1.0.0", &path).unwrap_err();
    assert!(
        matches!(err, Error::HashMismatch { ref what } if what.contains("chunk list")),
        "{err}"
    );
}

impl Repo {
    /// Adds a delta target of `len` bytes rebuilding `result` from `base`
    /// (both added already).
    fn add_delta(&mut self, base: &str, result: &str, len: usize, hardware: &[&str]) -> String {
        let (bundle, version) = result.split_once('/').unwrap();
        let (_, base_version) = base.split_once('/').unwrap();
        let manifest = |version: &str| Manifest {
            name: bundle.into(),
            version: version.parse().unwrap(),
            kind: Kind::Software,
            hardware: hardware.iter().map(|h| h.to_string()).collect(),
            pre_activate: None,
            health_check: None,
            service: None,
        };
        let (result_manifest, base_manifest) = (manifest(version), manifest(base_version));
        let data = vec![len as u8; len];
        let digest = chunks::digest_reader(&data[..]).unwrap();
        let name = repo::delta_target_name(&result_manifest, &base_manifest);
        let file = repo::delta_target_file(
            &result_manifest,
            &digest,
            (base, &self.entries[base]),
            (result, &self.entries[result]),
        )
        .unwrap();
        self.entries.insert(name.clone(), file);
        self.bundles.insert(name.clone(), (data, digest.chunks));
        name
    }
}

/// A till holding 1.0.0 gets the smallest delta to 1.1.0 from 1.0.0, and
/// none from a base it does not hold, nor for another hardware; a delta is
/// never handed out as a bundle to install.
#[test]
fn a_delta_is_offered_only_for_the_base_a_till_holds_and_never_as_a_bundle() {
    let mut repo = sample();
    repo.add("pos-app/0.9.0", &["pos-x1"], vec![5u8; 2 * 1024 * 1024]);
    repo.add("pos-app/1.1.0", &["pos-x1"], vec![8u8; 3 * 1024 * 1024]);
    let from_1_0 = repo.add_delta("pos-app/1.0.0", "pos-app/1.1.0", 5000, &["pos-x1"]);
    repo.add_delta("pos-app/0.9.0", "pos-app/1.1.0", 9000, &["pos-x1"]);
    assert_eq!(from_1_0, "pos-app/1.1.0/from-1.0.0.delta");
    repo.publish();
    let mut client = repo.client();
    refresh(&mut client, &repo, now()).unwrap();

    let result = client.bundle("pos-app/1.1.0", "pos-x1", now()).unwrap();
    let held = client.bundle("pos-app/1.0.0", "pos-x1", now()).unwrap();
    let delta = client
        .delta_to(&result, held.sha256(), "pos-x1", now())
        .unwrap()
        .expect("a delta from 1.0.0");
    assert_eq!(delta.file().name(), from_1_0);
    assert_eq!(delta.file().length(), 5000);
    assert_eq!(delta.base(), "pos-app/1.0.0");
    assert_eq!(delta.base_sha256(), held.sha256());
    let (data, list) = &repo.bundles[&from_1_0];
    let fetched = delta.file().decode_chunk_list(&list.encode()).unwrap();
    fetched.verify_reader(&data[..]).unwrap();

    // A base the till does not hold (a corrupt copy of 1.0.0, say).
    assert_eq!(
        client
            .delta_to(&result, &[0u8; 32], "pos-x1", now())
            .unwrap(),
        None
    );
    // Another model: the delta is for pos-x1 only.
    let other = {
        let mut repo = sample();
        repo.add("pos-app/1.1.0", &["*"], vec![8u8; 3 * 1024 * 1024]);
        repo.add_delta("pos-app/1.0.0", "pos-app/1.1.0", 5000, &["pos-x1"]);
        repo.publish();
        let mut client = repo.client();
        refresh(&mut client, &repo, now()).unwrap();
        let result = client.bundle("pos-app/1.1.0", "pos-x9", now()).unwrap();
        let held: [u8; 32] = hex::decode(repo.entries["pos-app/1.0.0"].sha256().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        client.delta_to(&result, &held, "pos-x9", now()).unwrap()
    };
    assert_eq!(other, None);
    // A delta is not a bundle.
    let err = client.bundle(&from_1_0, "pos-x1", now()).unwrap_err();
    assert!(
        err.to_string().contains("is a delta, not a bundle"),
        "{err}"
    );
    // Expired metadata offers nothing.
    let later = now() + Duration::days(31);
    assert!(
        client
            .delta_to(&result, held.sha256(), "pos-x1", later)
            .is_err()
    );
}
