//! What `/metrics` shows an ops team about the fleet and the control plane,
//! through real gRPC and HTTP on loopback, against SQLite and (with
//! --ignored) PostgreSQL.

mod common;

use common::{
    Backend, assert_metric as assert_sample, assert_status, eventually, heartbeat,
    metric_sample as sample, setup,
};
use posfleet_proto::v1;
use std::time::Duration;
use tonic::Code;

fn beat(agent_version: &str, disk_free: u64, printer: v1::PeripheralState) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        agent_version: agent_version.into(),
        health: Some(v1::Health {
            disk_free_bytes: disk_free,
            disk_total_bytes: 100 << 30,
            peripherals: vec![v1::Peripheral {
                kind: v1::PeripheralKind::Printer as i32,
                name: "receipt".into(),
                state: printer as i32,
                detail: String::new(),
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn fleet_gauges_show_stores_models_versions_and_health(backend: Backend) {
    let s = setup(backend, |c| {
        c.heartbeat_interval_seconds = 1;
        c.offline_after_missed_heartbeats = 2;
    })
    .await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    admin.store("s2").await;
    admin
        .client
        .set_store_labels(admin.req(v1::SetStoreLabelsRequest {
            store_id: "s1".into(),
            set: [("region".to_string(), "eu".to_string())].into(),
            remove: Vec::new(),
        }))
        .await
        .unwrap();
    let (a, a_cred) = s.enrolled_model("s1", "pos-x1").await;
    let (b, b_cred) = s.enrolled_model("s1", "pos-x2").await;
    // s2's only till never reports: the store goes dark.
    let _dark = s.enrolled_model("s2", "pos-x1").await;
    let (stolen, _) = s.enrolled_model("s2", "pos-x9").await;
    admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: stolen,
            reason: "stolen".into(),
        }))
        .await
        .unwrap();
    let mut agent = s.server.agent().await;
    // Past two intervals, with a and b reporting all along.
    for _ in 0..6 {
        let mut low = beat("0.4.0", 5 << 30, v1::PeripheralState::Failed);
        low.p2p_peers_banned = 1;
        agent.heartbeat(heartbeat(&a_cred, low)).await.unwrap();
        let fine = beat("0.5.0", 50 << 30, v1::PeripheralState::Ok);
        agent.heartbeat(heartbeat(&b_cred, fine)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_status(
        agent
            .heartbeat(heartbeat("not-a-credential", Default::default()))
            .await,
        Code::Unauthenticated,
        "",
    );
    // The heartbeat writer has stored both.
    eventually(&mut admin, &a, |d| d.agent_version == "0.4.0").await;
    eventually(&mut admin, &b, |d| d.agent_version == "0.5.0").await;

    let (code, text) = s.server.http_get("/metrics").await;
    assert_eq!(code, 200);
    let online = r#"posfleet_store_devices{region="eu",status="online",store="s1"}"#;
    assert_sample(&text, online, 2.0);
    let dark = r#"posfleet_store_devices{region="",status="offline",store="s2"}"#;
    assert_sample(&text, dark, 1.0);
    let s2_online = r#"posfleet_store_devices{region="",status="online",store="s2"}"#;
    assert_sample(&text, s2_online, 0.0);
    assert_sample(&text, r#"posfleet_devices{status="online"}"#, 2.0);
    assert_sample(&text, r#"posfleet_devices{status="offline"}"#, 1.0);
    assert_sample(&text, r#"posfleet_devices{status="revoked"}"#, 1.0);
    // The revoked till is counted as revoked only.
    assert_sample(
        &text,
        r#"posfleet_devices_by_hardware{hardware_model="pos-x1"}"#,
        2.0,
    );
    assert_sample(
        &text,
        r#"posfleet_devices_by_hardware{hardware_model="pos-x2"}"#,
        1.0,
    );
    assert_eq!(
        sample(
            &text,
            r#"posfleet_devices_by_hardware{hardware_model="pos-x9"}"#
        ),
        None
    );
    assert_sample(
        &text,
        r#"posfleet_devices_by_agent_version{version="0.4.0"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"posfleet_devices_by_agent_version{version="0.5.0"}"#,
        1.0,
    );
    assert_sample(&text, "posfleet_devices_low_disk", 1.0);
    assert_sample(
        &text,
        r#"posfleet_devices_peripheral_failed{kind="printer"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"posfleet_devices_peripheral_failed{kind="scanner"}"#,
        0.0,
    );
    assert_sample(&text, "posfleet_stores", 2.0);
    assert_sample(&text, "posfleet_p2p_peers_banned_total", 6.0);
    // The silent till's heartbeat is the oldest: at least two intervals.
    let oldest = sample(
        &text,
        r#"posfleet_device_heartbeat_age_seconds{quantile="1"}"#,
    )
    .expect("heartbeat age quantiles");
    assert!(oldest >= 2.0, "{oldest}");
    // Every call is counted by service, method and code.
    let ok = r#"posfleet_grpc_server_requests_total{code="OK",method="Heartbeat",service="AgentService"}"#;
    assert_sample(&text, ok, 12.0);
    let refused = r#"posfleet_grpc_server_requests_total{code="UNAUTHENTICATED",method="Heartbeat",service="AgentService"}"#;
    assert_sample(&text, refused, 1.0);
    let created = r#"posfleet_grpc_server_requests_total{code="OK",method="CreateStore",service="AdminService"}"#;
    assert_sample(&text, created, 2.0);
    let timed = r#"posfleet_grpc_server_request_duration_seconds_count{method="Heartbeat",service="AgentService"}"#;
    assert_sample(&text, timed, 13.0);
    assert_sample(
        &text,
        r#"posfleet_grpc_server_requests_in_flight{service="AgentService"}"#,
        0.0,
    );
    assert!(
        text.contains("posfleet_database_connections_max 8"),
        "{text}"
    );
    assert!(text.contains("posfleet_build_info{version="), "{text}");
    assert!(text.contains("process_resident_memory_bytes"), "{text}");

    // HTTP requests by route: a scrape is counted once it is answered, so
    // this one shows the one before.
    let (_, text) = s.server.http_get("/metrics").await;
    assert_sample(
        &text,
        r#"posfleet_http_requests_total{code="200",route="metrics"}"#,
        1.0,
    );
    assert_eq!(s.server.http_get("/repo/nothing.json").await.0, 404);
    let (_, text) = s.server.http_get("/metrics").await;
    let missing = r#"posfleet_http_requests_total{code="404",route="repo_metadata"}"#;
    assert_sample(&text, missing, 1.0);
    s.finish().await;
}

on_both_backends!(fleet_gauges_show_stores_models_versions_and_health);
