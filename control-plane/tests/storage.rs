//! Storage conformance: the same checks on SQLite and (with --ignored)
//! PostgreSQL, for what the API tests cannot reach easily.

mod common;

use common::{Backend, TestDb};
use posfleet_control_plane::storage::{
    AssignTarget, BundleStatusRecord, DesiredBundleRecord, EnrollError, EnrollmentTokenRecord,
    HeartbeatRecord, NewDevice, Storage, StoreDesiredState, StoreRecord, WindowRecord,
};
use std::collections::BTreeMap;

async fn open(backend: Backend) -> (Storage, TestDb, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(backend, dir.path()).await;
    let storage = Storage::connect(&db.url, 8).await.unwrap();
    storage
        .create_store(&StoreRecord {
            id: "s1".into(),
            name: "S1".into(),
            time_zone: "UTC".into(),
            created_at_ms: 0,
            device_count: 0,
            maintenance_window: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
    (storage, db, dir)
}

async fn token(storage: &Storage, uses: i64) -> String {
    let secret = format!("secret-{}", uuid::Uuid::new_v4());
    storage
        .create_enrollment_token(
            &EnrollmentTokenRecord {
                id: format!("tok-{}", uuid::Uuid::new_v4().simple()),
                store_id: "s1".into(),
                uses_total: uses,
                uses_remaining: uses,
                expires_at_ms: i64::MAX,
                revoked_at_ms: None,
                created_at_ms: 0,
            },
            &secret,
        )
        .await
        .unwrap();
    secret
}

fn device(i: usize) -> NewDevice {
    NewDevice {
        id: format!("dev-{i:06}"),
        public_key_hex: format!("{i:064x}"),
        credential_sha256: "h".into(),
        hardware_model: "m".into(),
        serial_number: format!("SN{i}"),
        agent_version: "1".into(),
        heartbeat_interval_seconds: 30,
    }
}

async fn concurrent_enrollments_spend_exactly_the_tokens_uses(backend: Backend) {
    let (storage, db, _dir) = open(backend).await;
    let secret = token(&storage, 10).await;
    let attempts = (0..25).map(|i| {
        let storage = storage.clone();
        let secret = secret.clone();
        tokio::spawn(async move { storage.enroll_device(&secret, &device(i), 1).await })
    });
    let mut enrolled = 0;
    let mut used_up = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => enrolled += 1,
            Err(EnrollError::UsedUp) => used_up += 1,
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert_eq!((enrolled, used_up), (10, 15));
    let tokens = storage.list_enrollment_tokens(Some("s1")).await.unwrap();
    assert_eq!(tokens[0].uses_remaining, 0);
    storage.close().await;
    db.cleanup().await;
}

async fn heartbeat_batches_span_several_statements(backend: Backend) {
    let (storage, db, _dir) = open(backend).await;
    let secret = token(&storage, 1200).await;
    for i in 0..1200 {
        storage.enroll_device(&secret, &device(i), 1).await.unwrap();
    }
    let batch: Vec<HeartbeatRecord> = (0..1200)
        .map(|i| HeartbeatRecord {
            device_id: format!("dev-{i:06}"),
            seen_at_ms: 1_000 + i as i64,
            heartbeat_interval_seconds: 60,
            agent_version: format!("v{i}"),
            installed_bundles: BTreeMap::from([("pos-app".to_string(), format!("1.{i}.0"))]),
            agent_uptime_seconds: i as i64,
            health: Default::default(),
        })
        .collect();
    storage.record_heartbeats(&batch).await.unwrap();
    for i in [0, 499, 500, 1199] {
        let d = storage
            .get_device(&format!("dev-{i:06}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.agent_version, format!("v{i}"));
        assert_eq!(d.last_seen_ms, 1_000 + i as i64);
        assert_eq!(d.installed_bundles["pos-app"], format!("1.{i}.0"));
    }
    // Seen at 1.0 to 2.2 s, 60 s interval, offline after 3 missed: all online
    // until 181 s, all offline after 182.2 s.
    assert_eq!(
        storage.count_devices(180_000, 3).await.unwrap(),
        (1200, 1200)
    );
    assert_eq!(storage.count_devices(182_200, 3).await.unwrap(), (0, 1200));
    storage.close().await;
    db.cleanup().await;
}

async fn a_heartbeat_for_an_unknown_device_changes_nothing(backend: Backend) {
    let (storage, db, _dir) = open(backend).await;
    let secret = token(&storage, 1).await;
    storage.enroll_device(&secret, &device(1), 1).await.unwrap();
    let record = |id: &str| HeartbeatRecord {
        device_id: id.into(),
        seen_at_ms: 5_000,
        heartbeat_interval_seconds: 30,
        agent_version: "2.0".into(),
        installed_bundles: BTreeMap::new(),
        agent_uptime_seconds: 0,
        health: Default::default(),
    };
    // A batch holding a real device and one that does not exist.
    storage
        .record_heartbeats(&[record("dev-ghost"), record("dev-000001")])
        .await
        .unwrap();
    let real = storage.get_device("dev-000001").await.unwrap().unwrap();
    assert_eq!(
        (real.agent_version.as_str(), real.last_seen_ms),
        ("2.0", 5_000)
    );
    assert!(storage.get_device("dev-ghost").await.unwrap().is_none());
    assert_eq!(storage.count_devices(0, 3).await.unwrap(), (1, 1));
    storage.close().await;
    db.cleanup().await;
}

/// Two replicas write a device's heartbeats: the one that received the
/// older heartbeat writes its batch last (it was stopping, or retrying
/// its write). The newer heartbeat stays.
async fn a_late_batch_from_another_replica_leaves_a_newer_heartbeat(backend: Backend) {
    let (storage, db, _dir) = open(backend).await;
    let secret = token(&storage, 1).await;
    storage.enroll_device(&secret, &device(1), 1).await.unwrap();
    let record = |seen_at_ms: i64, version: &str| HeartbeatRecord {
        device_id: "dev-000001".into(),
        seen_at_ms,
        heartbeat_interval_seconds: 30,
        agent_version: "2.0".into(),
        installed_bundles: BTreeMap::from([("pos-app".to_string(), version.to_string())]),
        agent_uptime_seconds: 0,
        health: Default::default(),
    };
    storage
        .record_heartbeats(&[record(9_000, "1.1.0")])
        .await
        .unwrap();
    storage
        .record_heartbeats(&[record(8_000, "1.0.0")])
        .await
        .unwrap();
    let seen = storage.get_device("dev-000001").await.unwrap().unwrap();
    assert_eq!(seen.last_seen_ms, 9_000);
    assert_eq!(seen.installed_bundles["pos-app"], "1.1.0");
    // The same heartbeat written twice, and a newer one, are taken.
    storage
        .record_heartbeats(&[record(9_000, "1.1.0")])
        .await
        .unwrap();
    storage
        .record_heartbeats(&[record(10_000, "1.2.0")])
        .await
        .unwrap();
    let seen = storage.get_device("dev-000001").await.unwrap().unwrap();
    assert_eq!(seen.last_seen_ms, 10_000);
    assert_eq!(seen.installed_bundles["pos-app"], "1.2.0");
    storage.close().await;
    db.cleanup().await;
}

async fn bundle_reports_keep_the_newest_and_ties_go_to_the_later(backend: Backend) {
    let (storage, db, _dir) = open(backend).await;
    let secret = token(&storage, 1).await;
    storage.enroll_device(&secret, &device(1), 1).await.unwrap();
    let id = "dev-000001";
    let at = |phase: &str, updated_at_ms: i64| BundleStatusRecord {
        name: "pos-app".into(),
        kind: "software".into(),
        active_version: "1.0.0".into(),
        target_version: "1.1.0".into(),
        phase: phase.into(),
        bytes_done: 0,
        bytes_total: 0,
        error: String::new(),
        updated_at_ms,
        bytes_from_origin: 0,
        bytes_from_peers: 0,
        bytes_saved_by_delta: 0,
        delta_error: String::new(),
    };
    let phase = || async {
        let statuses = storage.bundle_statuses(id).await.unwrap();
        assert_eq!(statuses.len(), 1);
        statuses[0].phase.clone()
    };
    storage
        .record_bundle_statuses(id, &[at("downloading", 100)])
        .await
        .unwrap();
    storage
        .record_bundle_statuses(id, &[at("pending", 99)])
        .await
        .unwrap();
    assert_eq!(phase().await, "downloading");
    storage
        .record_bundle_statuses(id, &[at("downloaded", 100)])
        .await
        .unwrap();
    assert_eq!(phase().await, "downloaded", "same time: the later report");
    storage.close().await;
    db.cleanup().await;
}

async fn the_desired_state_merges_device_and_store_rows(backend: Backend) {
    let (storage, db, _dir) = open(backend).await;
    let secret = token(&storage, 3).await;
    for i in [1, 2, 3] {
        storage.enroll_device(&secret, &device(i), 1).await.unwrap();
    }
    assert_eq!(storage.store_desired_state("nowhere").await.unwrap(), None);
    let empty = storage.store_desired_state("s1").await.unwrap().unwrap();
    assert_eq!(
        StoreDesiredState {
            peers: Vec::new(),
            peers_digest: Vec::new(),
            ..empty
        },
        StoreDesiredState {
            time_zone: "UTC".into(),
            ..Default::default()
        }
    );

    let bundle = |name: &str, version: &str| DesiredBundleRecord {
        name: name.into(),
        version: version.into(),
        kind: "software".into(),
        download_ahead: false,
        emergency: true,
        rollback: false,
    };
    let store = AssignTarget::Store("s1".into());
    let own = |id: &str| AssignTarget::Device(id.into());
    let assign = |target: AssignTarget, name: &'static str, version: &'static str| {
        let storage = storage.clone();
        async move {
            storage
                .assign_bundle(&target, &bundle(name, version), 1)
                .await
                .unwrap()
        }
    };
    assert_eq!(assign(store.clone(), "app", "1.0.0").await, 3);
    assert_eq!(assign(own("dev-000001"), "app", "2.0.0").await, 1);
    assert_eq!(assign(own("dev-000003"), "app", "3.0.0").await, 1);
    assert_eq!(assign(own("dev-000003"), "app", "3.1.0").await, 1);
    assert_eq!(assign(store.clone(), "app", "1.1.0").await, 1);
    assert_eq!(assign(store, "cat", "1.0.0").await, 3);
    let window = WindowRecord {
        start_minute: 1380,
        duration_minutes: 240,
    };
    let updated = storage
        .set_maintenance_window("s1", Some(window))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (updated.maintenance_window, updated.device_count),
        (Some(window), 3)
    );
    assert!(
        storage
            .set_maintenance_window("nowhere", None)
            .await
            .unwrap()
            .is_none()
    );

    let state = storage.store_desired_state("s1").await.unwrap().unwrap();
    assert_eq!(state.maintenance_window, Some(window));
    let versions = |id: &str| -> Vec<String> {
        let bundles = state.for_device(id);
        assert!(bundles.iter().all(|b| b.emergency && !b.download_ahead));
        bundles
            .into_iter()
            .map(|b| format!("{}@{}", b.name, b.version))
            .collect()
    };
    assert_eq!(versions("dev-000001"), vec!["app@2.0.0", "cat@1.0.0"]);
    assert_eq!(versions("dev-000002"), vec!["app@1.1.0", "cat@1.0.0"]);
    assert_eq!(versions("dev-000003"), vec!["app@3.1.0", "cat@1.0.0"]);
    assert_eq!(state.device_bundles.len(), 2);
    // Another store sees none of it.
    storage
        .create_store(&StoreRecord {
            id: "s2".into(),
            name: "S2".into(),
            time_zone: "Europe/Paris".into(),
            created_at_ms: 0,
            device_count: 0,
            maintenance_window: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
    let other = storage.store_desired_state("s2").await.unwrap().unwrap();
    assert!(other.peers.is_empty());
    assert_eq!(
        StoreDesiredState {
            peers_digest: Vec::new(),
            ..other
        },
        StoreDesiredState {
            time_zone: "Europe/Paris".into(),
            ..Default::default()
        }
    );
    storage.close().await;
    db.cleanup().await;
}

/// The membership list: every enrolled device of the store, until it is
/// revoked; its digest changes with any change a till must learn.
async fn the_membership_list_follows_enrollments_addresses_and_revocations(backend: Backend) {
    let (storage, db, _dir) = open(backend).await;
    let secret = token(&storage, 3).await;
    for i in [1, 2, 3] {
        storage.enroll_device(&secret, &device(i), 1).await.unwrap();
    }
    let state = || async { storage.store_desired_state("s1").await.unwrap().unwrap() };
    let first = state().await;
    let ids: Vec<&str> = first.peers.iter().map(|p| p.device_id.as_str()).collect();
    assert_eq!(ids, ["dev-000001", "dev-000002", "dev-000003"]);
    assert_eq!(first.peers[0].public_key_hex, format!("{:064x}", 1));
    assert!(first.peers.iter().all(|p| p.addrs.is_empty()));
    assert_eq!(first.peers_digest.len(), 32);

    let addrs = vec!["/ip4/10.1.0.2/tcp/7410".to_string()];
    storage.set_p2p_addrs("dev-000002", &addrs).await.unwrap();
    let moved = state().await;
    assert_eq!(moved.peers[1].addrs, addrs);
    assert_ne!(moved.peers_digest, first.peers_digest);

    let store = storage
        .revoke_device("dev-000003", "stolen", 42)
        .await
        .unwrap();
    assert_eq!(store.as_deref(), Some("s1"));
    let revoked = state().await;
    assert_eq!(revoked.peers.len(), 2);
    assert_ne!(revoked.peers_digest, moved.peers_digest);
    let record = &revoked.revoked["dev-000003"];
    assert_eq!((record.at_ms, record.reason.as_str()), (42, "stolen"));
    // A second revocation keeps the first; an unknown device is None.
    storage
        .revoke_device("dev-000003", "again", 43)
        .await
        .unwrap();
    assert_eq!(state().await.revoked["dev-000003"].at_ms, 42);
    assert_eq!(storage.revoke_device("nope", "", 1).await.unwrap(), None);
    storage.close().await;
    db.cleanup().await;
}

on_both_backends!(
    concurrent_enrollments_spend_exactly_the_tokens_uses,
    heartbeat_batches_span_several_statements,
    a_heartbeat_for_an_unknown_device_changes_nothing,
    a_late_batch_from_another_replica_leaves_a_newer_heartbeat,
    bundle_reports_keep_the_newest_and_ties_go_to_the_later,
    the_desired_state_merges_device_and_store_rows,
    the_membership_list_follows_enrollments_addresses_and_revocations,
);
