//! The audit log as ops read it: every mutating admin call, who made it, on
//! what, from where and how it ended; reads are not recorded. On SQLite and
//! (with --ignored) PostgreSQL.

mod common;

use common::{Backend, assert_status, setup};
use posfleet_proto::v1;
use serde_json::Value;
use tonic::Code;

/// The entries after `after_seq`, but for the first admin's setup (its
/// `Login` and `CompleteSetup`, which every test server begins with).
async fn entries(admin: &mut common::Admin, after_seq: u64, limit: u32) -> Vec<v1::AuditEntry> {
    let req = admin.req(v1::ListAuditEntriesRequest {
        after_seq,
        limit,
        ..Default::default()
    });
    admin
        .client
        .list_audit_entries(req)
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .filter(|e| e.actor_kind != "session")
        .collect()
}

fn target(entry: &v1::AuditEntry) -> Value {
    serde_json::from_str(&entry.target_json).unwrap()
}

async fn mutating_calls_are_recorded_and_reads_are_not(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    // Refused by the handler: recorded with its code.
    let again = admin.req(v1::CreateStoreRequest {
        id: "s1".into(),
        name: "Again".into(),
        time_zone: "UTC".into(),
    });
    assert_status(
        admin.client.create_store(again).await,
        Code::AlreadyExists,
        "already exists",
    );
    // Refused by validation.
    let bad = admin.req(v1::SetMaintenanceWindowRequest {
        store_id: "s1".into(),
        maintenance_window: Some(v1::MaintenanceWindow {
            time_zone: String::new(),
            start_minute: 5000,
            duration_minutes: 60,
        }),
    });
    assert_status(
        admin.client.set_maintenance_window(bad).await,
        Code::InvalidArgument,
        "start_minute",
    );
    let token = admin.token("s1", 2, 0).await.unwrap();
    // Reads: none of these is recorded.
    admin.devices(v1::ListDevicesRequest::default()).await;
    let _ = admin.device("nope").await;
    let req = admin.req(v1::ListStoresRequest::default());
    admin.client.list_stores(req).await.unwrap();
    entries(&mut admin, 0, 0).await;
    // A call without a valid token is recorded too, as unauthenticated,
    // with its method and peer only: its body is never read.
    let mut stranger = s.server.admin().await;
    stranger.token = Some("pfa_not-a-token".into());
    let req = stranger.req(v1::RevokeEnrollmentTokenRequest {
        id: token.token.as_ref().unwrap().id.clone(),
    });
    assert_status(
        stranger.client.revoke_enrollment_token(req).await,
        Code::Unauthenticated,
        "not valid",
    );
    // ... but not its reads.
    let req = stranger.req(v1::ListStoresRequest::default());
    assert!(stranger.client.list_stores(req).await.is_err());

    let log = entries(&mut admin, 0, 0).await;
    let summary: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|e| (e.actor.as_str(), e.method.as_str(), e.result.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("admin", "CreateStore", "OK"),
            ("admin", "CreateStore", "ALREADY_EXISTS"),
            ("admin", "SetMaintenanceWindow", "INVALID_ARGUMENT"),
            ("admin", "CreateEnrollmentToken", "OK"),
            (
                "unauthenticated",
                "RevokeEnrollmentToken",
                "UNAUTHENTICATED"
            ),
        ]
    );
    assert!(log.windows(2).all(|p| p[0].seq < p[1].seq), "{log:?}");
    assert_eq!(target(&log[0])["store_id"], "s1");
    assert_eq!(target(&log[1])["name"], "Again");
    assert_eq!(target(&log[3])["store_id"], "s1");
    assert_eq!(target(&log[3])["uses"], 2);
    assert_eq!(log[4].target_json, "{}");
    let before = chrono::Utc::now().timestamp_millis();
    for entry in &log {
        assert!(
            entry.peer_address.starts_with("127.0.0.1:"),
            "{}",
            entry.peer_address
        );
        assert!(entry.at_unix_ms > before - 60_000 && entry.at_unix_ms <= before);
        // Secrets never reach the log.
        assert!(!entry.target_json.contains(&token.secret));
    }

    // Paging with a cursor.
    let page = entries(&mut admin, log[1].seq, 2).await;
    assert_eq!(page, log[2..4].to_vec());
    assert!(entries(&mut admin, log[4].seq, 0).await.is_empty());
    s.finish().await;
}

/// Publishing streams its header: the entry names the target published.
async fn a_publish_is_recorded_with_its_target(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let key = admin.init_repository().await;
    admin
        .publish(
            &key,
            "pos-app",
            "1.0.0",
            posfleet_bundle::manifest::Kind::Software,
            &["*"],
        )
        .await;
    let log = entries(&mut admin, 0, 0).await;
    let methods: Vec<&str> = log.iter().map(|e| e.method.as_str()).collect();
    assert_eq!(methods, ["InitRepository", "PublishBundle"]);
    assert_eq!(target(&log[1])["target"], "pos-app/1.0.0");
    assert_eq!(log[1].result, "OK");
    assert_eq!(target(&log[0])["root_sha256"].as_str().unwrap().len(), 64);
    s.finish().await;
}

/// A flood of unauthenticated calls writes a bounded number of entries; the
/// rest are counted, and the next entry written says how many were skipped.
async fn an_unauthenticated_flood_is_rate_limited(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut stranger = s.server.admin().await;
    stranger.token = None;
    const CALLS: u32 = 150;
    for i in 0..CALLS {
        let req = stranger.req(v1::CreateStoreRequest {
            id: format!("s{i}"),
            name: "x".into(),
            time_zone: "UTC".into(),
        });
        assert!(stranger.client.create_store(req).await.is_err());
    }
    let mut admin = s.server.admin().await;
    let log = entries(&mut admin, 0, 1000).await;
    let limit = posfleet_control_plane::audit::UNAUTHENTICATED_BURST as usize;
    assert!(
        log.len() >= limit && log.len() < limit + 20,
        "{} entries",
        log.len()
    );
    assert!(
        log.iter()
            .all(|e| e.actor == "unauthenticated" && e.result == "UNAUTHENTICATED")
    );
    let (_, metrics) = s.server.http_get("/metrics").await;
    let suppressed: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("posfleet_audit_suppressed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(suppressed + log.len(), CALLS as usize, "{metrics}");
    // An admin's calls are never limited.
    admin.store("mine").await;
    let last = entries(&mut admin, 0, 1000).await.pop().unwrap();
    assert_eq!(
        (last.actor.as_str(), last.method.as_str()),
        ("admin", "CreateStore")
    );
    assert!(metrics.contains("posfleet_audit_write_failures_total 0"));
    s.finish().await;
}

/// Calls from several clients at once each get their own entry, numbered
/// without gaps.
async fn concurrent_calls_get_consecutive_entries(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut calls = Vec::new();
    for i in 0..16 {
        let mut admin = s.server.admin().await;
        calls.push(tokio::spawn(async move {
            admin.store(&format!("s{i}")).await;
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let mut admin = s.server.admin().await;
    let log = entries(&mut admin, 0, 0).await;
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    // Right after the first admin's two setup rows.
    assert_eq!(seqs, (3..=18).collect::<Vec<u64>>());
    assert!(log.iter().all(|e| e.result == "OK"));
    s.finish().await;
}

/// When the audit log cannot be written, a mutating call is refused before
/// it changes anything, and the failure is counted.
async fn a_call_that_cannot_be_recorded_is_refused(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("before").await;
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&s.db.url)
        .await
        .unwrap();
    sqlx::Executor::execute(&mut conn, "ALTER TABLE audit_log RENAME TO audit_log_away")
        .await
        .unwrap();
    let req = admin.req(v1::CreateStoreRequest {
        id: "after".into(),
        name: "x".into(),
        time_zone: "UTC".into(),
    });
    assert_status(
        admin.client.create_store(req).await,
        Code::Unavailable,
        "cannot write the audit log",
    );
    // Reads still work, and show nothing was changed.
    let req = admin.req(v1::ListStoresRequest::default());
    let stores = admin.client.list_stores(req).await.unwrap().into_inner();
    let ids: Vec<&str> = stores.stores.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["before"]);
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        !metrics.contains("posfleet_audit_write_failures_total 0"),
        "{metrics}"
    );
    sqlx::Executor::execute(&mut conn, "ALTER TABLE audit_log_away RENAME TO audit_log")
        .await
        .unwrap();
    drop(conn);
    s.finish().await;
}

/// Bytes the database holds for the audit log: the SQLite files (the
/// database and its WAL), or the PostgreSQL table with its TOAST and
/// indexes.
async fn audit_log_bytes(db: &common::TestDb) -> u64 {
    match db.url.strip_prefix("sqlite://") {
        Some(rest) => {
            let path = rest.split('?').next().unwrap();
            ["", "-wal"]
                .iter()
                .map(|suffix| {
                    std::fs::metadata(format!("{path}{suffix}"))
                        .map(|m| m.len())
                        .unwrap_or(0)
                })
                .sum()
        }
        None => {
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&db.url)
                .await
                .unwrap();
            let row = sqlx::query("SELECT pg_total_relation_size('audit_log') AS n")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            sqlx::Row::try_get::<i64, _>(&row, "n").unwrap() as u64
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// 60 unauthenticated `RevokeDevice` calls with an 8 MiB reason each (the
/// admin API takes 16 MiB messages): refused before their bodies are read,
/// recorded with method and peer only, so the database stays small and
/// `posfleet audit list` (4 MiB answers) still reads the log.
async fn an_unauthenticated_flood_of_large_bodies_leaves_the_database_small(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let before = audit_log_bytes(&s.db).await;
    let mut stranger = s.server.admin().await;
    stranger.token = None;
    let reason = "x".repeat(8 * MIB as usize);
    for _ in 0..60 {
        let req = stranger.req(v1::RevokeDeviceRequest {
            device_id: "dev-1".into(),
            reason: reason.clone(),
        });
        assert_status(
            stranger.client.revoke_device(req).await,
            Code::Unauthenticated,
            "missing admin API token",
        );
    }
    let grown = audit_log_bytes(&s.db).await.saturating_sub(before);
    assert!(grown < 4 * MIB, "the audit log grew by {grown} bytes");
    let mut admin = s.server.admin().await;
    let log = entries(&mut admin, 0, 1000).await;
    assert_eq!(log.len(), 60);
    for entry in &log {
        assert_eq!(
            (
                entry.actor.as_str(),
                entry.method.as_str(),
                entry.result.as_str()
            ),
            ("unauthenticated", "RevokeDevice", "UNAUTHENTICATED")
        );
        assert_eq!(entry.target_json, "{}");
        assert!(entry.peer_address.starts_with("127.0.0.1:"));
    }
    s.finish().await;
}

/// An admin's call whose strings break their documented limits is refused
/// (`INVALID_ARGUMENT` naming the field), and its audit row, written ahead
/// before the check, holds a bounded target.
async fn an_oversized_argument_is_refused_and_its_audit_row_is_bounded(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let reason = "x".repeat(8 * MIB as usize);
    let req = admin.req(v1::RevokeDeviceRequest {
        device_id: "dev-1".into(),
        reason: reason.clone(),
    });
    assert_status(
        admin.client.revoke_device(req).await,
        Code::InvalidArgument,
        "reason: is longer than 256 bytes",
    );
    let req = admin.req(v1::CreateStoreRequest {
        id: "s1".into(),
        name: "n".repeat(129),
        time_zone: "UTC".into(),
    });
    assert_status(
        admin.client.create_store(req).await,
        Code::InvalidArgument,
        "name: is longer than 128 bytes",
    );
    let req = admin.req(v1::AddWebhookRequest {
        url: format!("http://h/{}", "u".repeat(4096)),
        ..Default::default()
    });
    assert_status(
        admin.client.add_webhook(req).await,
        Code::InvalidArgument,
        "url: must be at most 2048 characters",
    );
    let req = admin.req(common::token_request(&"n".repeat(65), "admin"));
    assert_status(
        admin.client.create_admin_token(req).await,
        Code::InvalidArgument,
        "name",
    );
    let log = entries(&mut admin, 0, 0).await;
    let methods: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.method.as_str(), e.result.as_str()))
        .collect();
    assert_eq!(
        methods,
        [
            ("RevokeDevice", "INVALID_ARGUMENT"),
            ("CreateStore", "INVALID_ARGUMENT"),
            ("AddWebhook", "INVALID_ARGUMENT"),
            ("CreateAdminToken", "INVALID_ARGUMENT"),
        ]
    );
    let bound = posfleet_control_plane::audit::MAX_TARGET_BYTES;
    for entry in &log {
        assert!(
            entry.target_json.len() <= bound,
            "{}",
            entry.target_json.len()
        );
    }
    // The reason is kept, cut: who tried what stays readable.
    let kept = target(&log[0])["reason"].as_str().unwrap().to_string();
    assert!(kept.starts_with("xxx") && kept.ends_with('…'), "{kept}");
    assert_eq!(target(&log[0])["device_id"], "dev-1");
    assert!(audit_log_bytes(&s.db).await < 4 * MIB);
    s.finish().await;
}

/// Entries of unauthenticated calls are pruned to the newest that fit both
/// bounds, rows and bytes; an admin's entries are never pruned.
async fn unauthenticated_entries_are_pruned_by_rows_and_bytes(backend: Backend) {
    use posfleet_control_plane::storage::{
        AUDIT_ROW_OVERHEAD_BYTES, NewAuditEntry, Storage, UNAUTHENTICATED_ACTOR,
    };
    let s = setup(backend, |_| {}).await;
    let storage = Storage::connect(&s.db.url, 2).await.unwrap();
    let entry = |actor: &str| NewAuditEntry {
        at_ms: 1,
        actor: actor.into(),
        method: "CreateStore".into(),
        target_json: format!("{{\"x\":\"{}\"}}", "a".repeat(992)),
        peer_address: "127.0.0.1:1".into(),
        result: "UNAUTHENTICATED".into(),
        role: String::new(),
        actor_kind: String::new(),
        actor_owner: String::new(),
        bounded: actor == UNAUTHENTICATED_ACTOR,
    };
    let mut last_seq = 0;
    for i in 0..50 {
        let actor = if i % 10 == 0 {
            "admin"
        } else {
            UNAUTHENTICATED_ACTOR
        };
        last_seq = storage.insert_audit_entry(&entry(actor)).await.unwrap();
    }
    let one = entry(UNAUTHENTICATED_ACTOR);
    let row_bytes = (one.target_json.len()
        + one.method.len()
        + one.peer_address.len()
        + one.result.len()
        + one.actor.len()) as u64
        + AUDIT_ROW_OVERHEAD_BYTES as u64;
    let count =
        |log: &[v1::AuditEntry], actor: &str| log.iter().filter(|e| e.actor == actor).count();
    let mut admin = s.server.admin().await;
    // The byte bound holds 8 whole rows of these.
    let gone = storage
        .prune_bounded_audit_entries(30, 8 * row_bytes + row_bytes / 2)
        .await
        .unwrap();
    assert_eq!(gone, 45 - 8);
    let log = entries(&mut admin, 0, 0).await;
    assert_eq!(count(&log, "unauthenticated"), 8);
    assert_eq!(count(&log, "admin"), 5);
    // The newest are the ones kept.
    assert_eq!(log.last().unwrap().seq, last_seq);
    // The row bound.
    storage
        .prune_bounded_audit_entries(3, u64::MAX)
        .await
        .unwrap();
    let log = entries(&mut admin, 0, 0).await;
    assert_eq!(count(&log, "unauthenticated"), 3);
    assert_eq!(count(&log, "admin"), 5);
    storage.close().await;
    s.finish().await;
}

on_both_backends!(
    unauthenticated_entries_are_pruned_by_rows_and_bytes,
    an_unauthenticated_flood_of_large_bodies_leaves_the_database_small,
    an_oversized_argument_is_refused_and_its_audit_row_is_bounded,
    concurrent_calls_get_consecutive_entries,
    a_call_that_cannot_be_recorded_is_refused,
    mutating_calls_are_recorded_and_reads_are_not,
    a_publish_is_recorded_with_its_target,
    an_unauthenticated_flood_is_rate_limited,
);
