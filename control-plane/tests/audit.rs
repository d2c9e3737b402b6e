//! The audit log as ops read it: every mutating admin call, who made it, on
//! what, from where and how it ended; reads are not recorded. On SQLite and
//! (with --ignored) PostgreSQL.

mod common;

use common::{Backend, assert_status, setup};
use posfleet_proto::v1;
use serde_json::Value;
use tonic::Code;

async fn entries(admin: &mut common::Admin, after_seq: u64, limit: u32) -> Vec<v1::AuditEntry> {
    let req = admin.req(v1::ListAuditEntriesRequest { after_seq, limit });
    admin
        .client
        .list_audit_entries(req)
        .await
        .unwrap()
        .into_inner()
        .entries
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
    // A call without a valid token is recorded too, as unauthenticated.
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
            ("bootstrap", "CreateStore", "OK"),
            ("bootstrap", "CreateStore", "ALREADY_EXISTS"),
            ("bootstrap", "SetMaintenanceWindow", "INVALID_ARGUMENT"),
            ("bootstrap", "CreateEnrollmentToken", "OK"),
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
    assert_eq!(
        target(&log[4])["token_id"],
        token.token.as_ref().unwrap().id.as_str()
    );
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
        ("bootstrap", "CreateStore")
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
    assert_eq!(seqs, (1..=16).collect::<Vec<u64>>());
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

on_both_backends!(
    concurrent_calls_get_consecutive_entries,
    a_call_that_cannot_be_recorded_is_refused,
    mutating_calls_are_recorded_and_reads_are_not,
    a_publish_is_recorded_with_its_target,
    an_unauthenticated_flood_is_rate_limited,
);
