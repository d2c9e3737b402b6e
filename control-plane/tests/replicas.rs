//! Replicas on one PostgreSQL database tell each other of changes their
//! caches hold: a change made through one shows on the others within a
//! second, not a cache's lifetime.

mod common;

use common::{Backend, TestServer, heartbeat, setup};
use posfleet_proto::v1;
use std::time::{Duration, Instant};
use tonic::Code;

/// How soon a change must show on another replica.
const PROPAGATION: Duration = Duration::from_secs(1);

/// A till is revoked through one replica while the other, which just
/// answered its heartbeat from its cache, keeps serving it: the other
/// refuses it within a second (its cache alone would keep it for
/// `DESIRED_CACHE_TTL`, 5 s).
async fn a_device_revoked_through_one_replica_is_refused_by_the_other_within_a_second(
    backend: Backend,
) {
    let s = setup(backend, |_| {}).await;
    let replica = TestServer::start(s.server.config.clone()).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (device, credential) = s.enrolled_device("s1").await;
    let mut on_replica = replica.agent().await;
    // The replica now holds the store's desired state and the credential.
    for _ in 0..2 {
        on_replica
            .heartbeat(heartbeat(&credential, Default::default()))
            .await
            .expect("served before the revocation");
    }
    admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: device.clone(),
            reason: "stolen".into(),
        }))
        .await
        .expect("revoked");
    let revoked_at = Instant::now();
    let refused_after = loop {
        match on_replica
            .heartbeat(heartbeat(&credential, Default::default()))
            .await
        {
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert!(status.message().contains("stolen"), "{status:?}");
                break revoked_at.elapsed();
            }
            Ok(_) if revoked_at.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(_) => panic!("the replica still serves a revoked device after 10 s"),
        }
    };
    assert!(
        refused_after <= PROPAGATION,
        "the other replica refused the revoked device only after {refused_after:?}"
    );
    replica.stop().await;
    s.finish().await;
}

/// Writes a key-encryption key file (mode 0600) and returns its path.
fn kek_file(dir: &std::path::Path, name: &str, byte: u8) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", hex::encode([byte; 32]))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

async fn online_keys(server: &TestServer) -> (String, String) {
    let mut admin = server.admin().await;
    let repo = admin
        .client
        .get_repository(admin.req(v1::GetRepositoryRequest {}))
        .await
        .unwrap()
        .into_inner();
    (repo.snapshot_public_key, repo.timestamp_public_key)
}

/// A till's check of what `server` serves: the timestamp verifies against
/// the root.
async fn timestamp_verifies(server: &TestServer) -> Result<(), String> {
    let (_, root) = server.http_get("/repo/1.root.json").await;
    let (code, timestamp) = server.http_get("/repo/timestamp.json").await;
    assert_eq!(code, 200, "{timestamp}");
    let mut trusted = posfleet_bundle::client::TrustedMetadata::from_pinned_root(
        root.as_bytes(),
        Default::default(),
    )
    .map_err(|e| e.to_string())?;
    trusted
        .update_timestamp(timestamp.as_bytes(), chrono::Utc::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A control plane whose online keys are files becomes the first of several
/// replicas with their own data dirs: with the same key-encryption key they
/// all sign with the keys its root names; a replica with another KEK, or
/// with keys of its own, refuses to start instead of signing what every
/// till would refuse.
async fn replicas_share_the_online_keys_sealed_in_the_database(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut admin = s.server.admin().await;
    admin.init_repository().await;
    let keys = online_keys(&s.server).await;
    timestamp_verifies(&s.server).await.unwrap();
    let mut config = s.server.config.clone();
    let (setup_server, db) = (s.server, s.db);
    setup_server.stop().await;

    // The same control plane, now with a KEK: its own keys go to the database.
    config.repository_key_encryption_key_path = Some(kek_file(dir.path(), "kek", 1));
    let first = TestServer::start(config.clone()).await;
    assert_eq!(online_keys(&first).await, keys);
    // A replica with a data dir of its own signs with the same keys.
    let mut second = config.clone();
    second.data_dir = dir.path().join("second");
    let second = TestServer::start_replica(second, &first).await;
    assert_eq!(online_keys(&second).await, keys);
    timestamp_verifies(&second).await.unwrap();
    assert!(
        !second.config.data_dir.join("repository-keys").exists(),
        "keys from the database are not written to disk"
    );

    // Another KEK: refused at start, naming both.
    let mut other = config.clone();
    other.data_dir = dir.path().join("other-kek");
    other.repository_key_encryption_key_path = Some(kek_file(dir.path(), "other", 2));
    let refused = posfleet_control_plane::ControlPlane::open(other)
        .await
        .err()
        .map(|e| e.to_string())
        .expect("another KEK is refused");
    assert!(
        refused.contains("sealed with key-encryption key"),
        "{refused}"
    );
    // No KEK, so keys of its own: refused, since the root names others.
    let mut own = config.clone();
    own.data_dir = dir.path().join("own-keys");
    own.repository_key_encryption_key_path = None;
    let refused = posfleet_control_plane::ControlPlane::open(own)
        .await
        .err()
        .map(|e| e.to_string())
        .expect("keys other than the root's are refused");
    assert!(refused.contains("other online keys"), "{refused}");

    second.stop().await;
    first.stop().await;
    db.cleanup().await;
}

/// Replicas sign online metadata one at a time: while one holds the
/// signing lock another waits for it, and a holder that goes away without
/// releasing it (a cancelled call) lets the next one in.
async fn online_signing_is_one_replica_at_a_time(backend: Backend) {
    use posfleet_control_plane::storage::Storage;
    let s = setup(backend, |_| {}).await;
    let first = Storage::connect(&s.db.url, 2).await.unwrap();
    let second = Storage::connect(&s.db.url, 2).await.unwrap();
    let held = first.lock_online_signing().await.unwrap();
    let mut waiting = tokio::spawn(async move { second.lock_online_signing().await.unwrap() });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a second replica took the lock while the first held it"
    );
    drop(held);
    let taken = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a dropped lock is released")
        .unwrap();
    taken.release().await;
    tokio::time::timeout(Duration::from_secs(5), first.lock_online_signing())
        .await
        .expect("a released lock is free")
        .unwrap()
        .release()
        .await;
    s.finish().await;
}

mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
    async fn online_signing_is_one_replica_at_a_time() {
        super::online_signing_is_one_replica_at_a_time(super::Backend::Postgres).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
    async fn a_device_revoked_through_one_replica_is_refused_by_the_other_within_a_second() {
        super::a_device_revoked_through_one_replica_is_refused_by_the_other_within_a_second(
            super::Backend::Postgres,
        )
        .await
    }
}

on_both_backends!(replicas_share_the_online_keys_sealed_in_the_database);
