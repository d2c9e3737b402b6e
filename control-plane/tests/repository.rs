//! The repository's online signing: the first snapshot and timestamp, and
//! re-signing before they expire, on SQLite and (with --ignored) PostgreSQL.

mod common;

use chrono::{Duration, Utc};
use common::{Backend, TestDb};
use posfleet_bundle::repo::{self, RootKeys};
use posfleet_bundle::tuf::{self, Snapshot, TIMESTAMP, Timestamp};
use posfleet_control_plane::blobs::BlobStore;
use posfleet_control_plane::online_keys;
use posfleet_control_plane::repository::{RepoError, Repository};
use posfleet_control_plane::storage::Storage;
use std::sync::Arc;

async fn open(backend: Backend, dir: &std::path::Path) -> (Repository, TestDb) {
    let db = TestDb::new(backend, dir).await;
    let storage = Storage::connect(&db.url, 4).await.unwrap();
    let blobs = Arc::new(BlobStore::open_local(&dir.join("blobs")).unwrap());
    let keys = online_keys::load(&storage, &dir.join("keys"), None)
        .await
        .unwrap();
    (Repository::open(storage, blobs, keys), db)
}

fn decode<T: serde::de::DeserializeOwned>(role: &str, body: &str) -> T {
    tuf::parse_envelope(role, body.as_bytes(), u64::MAX)
        .unwrap()
        .decode(role)
        .unwrap()
}

async fn timestamp_and_snapshot_are_re_signed_before_they_expire(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (repository, db) = open(backend, dir.path()).await;
    let now = Utc::now();
    assert!(
        matches!(repository.refresh(now).await, Ok(false)),
        "nothing before init"
    );

    let (snapshot_key, timestamp_key) = repository.online_public_keys();
    let vk = |hex_key: &str| {
        ed25519_dalek::VerifyingKey::from_bytes(&hex::decode(hex_key).unwrap().try_into().unwrap())
            .unwrap()
    };
    let offline = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let keys = RootKeys {
        root: vec![offline.verifying_key()],
        root_threshold: 1,
        targets: vec![offline.verifying_key()],
        targets_threshold: 1,
        snapshot: vk(&snapshot_key),
        timestamp: vk(&timestamp_key),
    };
    let root = tuf::sign(
        &repo::root(&keys, 1, now + Duration::days(365)),
        &[&offline],
    );
    let targets = tuf::sign(
        &repo::targets(1, now + Duration::days(90), Default::default()),
        &[&offline],
    );
    repository.init(&root, &targets, now).await.unwrap();
    assert!(matches!(
        repository.init(&root, &targets, now).await,
        Err(RepoError::AlreadyInitialized)
    ));

    let latest = |role: &'static str| {
        let storage = repository.storage().clone();
        async move { storage.latest_metadata(role).await.unwrap().unwrap() }
    };
    assert_eq!(latest(TIMESTAMP).await.0, 1);
    // Fresh: nothing to do.
    assert!(!repository.refresh(now + Duration::hours(1)).await.unwrap());
    // Past half of the timestamp's day: a new timestamp over the same snapshot.
    assert!(repository.refresh(now + Duration::hours(13)).await.unwrap());
    let (version, body) = latest(TIMESTAMP).await;
    let timestamp: Timestamp = decode(TIMESTAMP, &body);
    assert_eq!((version, timestamp.meta["snapshot.json"].version), (2, 1));
    assert!(!repository.refresh(now + Duration::hours(14)).await.unwrap());
    // Past half of the snapshot's week: a new snapshot and timestamp.
    assert!(repository.refresh(now + Duration::days(4)).await.unwrap());
    let (version, body) = latest("snapshot").await;
    let snapshot: Snapshot = decode("snapshot", &body);
    assert_eq!((version, snapshot.meta["targets.json"].version), (2, 1));
    let timestamp: Timestamp = decode(TIMESTAMP, &latest(TIMESTAMP).await.1);
    assert_eq!(timestamp.meta["snapshot.json"].version, 2);
    // History is kept.
    assert!(
        repository
            .storage()
            .metadata(TIMESTAMP, 1)
            .await
            .unwrap()
            .is_some()
    );
    db.cleanup().await;
}

async fn a_root_that_ignores_the_online_keys_is_refused(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (repository, db) = open(backend, dir.path()).await;
    let now = Utc::now();
    let offline = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let vk = offline.verifying_key();
    let keys = RootKeys {
        root: vec![vk],
        root_threshold: 1,
        targets: vec![vk],
        targets_threshold: 1,
        snapshot: vk,
        timestamp: vk,
    };
    let root = tuf::sign(
        &repo::root(&keys, 1, now + Duration::days(365)),
        &[&offline],
    );
    let targets = tuf::sign(
        &repo::targets(1, now + Duration::days(90), Default::default()),
        &[&offline],
    );
    let err = repository.init(&root, &targets, now).await.unwrap_err();
    assert!(err.to_string().contains("online key"), "{err}");
    assert!(
        matches!(repository.current().await.unwrap(), (r, _) if r.is_empty()),
        "nothing stored"
    );
    db.cleanup().await;
}

on_both_backends!(
    timestamp_and_snapshot_are_re_signed_before_they_expire,
    a_root_that_ignores_the_online_keys_is_refused,
);
