//! The control plane's behaviour as agents and ops see it, through real gRPC
//! on loopback, run against SQLite and (with --ignored) PostgreSQL.

mod common;

use common::{
    Backend, TestDb, TestServer, assert_status, device_request, enroll_request, eventually,
    heartbeat, new_key, setup,
};
use posfleet_proto::v1;
use std::collections::HashMap;
use std::time::Duration;
use tonic::Code;

async fn admin_calls_need_a_valid_token(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.token = None;
    assert_status(
        admin
            .client
            .list_stores(admin.req(v1::ListStoresRequest::default()))
            .await,
        Code::Unauthenticated,
        "missing admin API token",
    );
    admin.token = Some("pfa_0000".into());
    assert_status(
        admin
            .client
            .list_stores(admin.req(v1::ListStoresRequest::default()))
            .await,
        Code::Unauthenticated,
        "not valid",
    );
    // A device credential is not an admin token either.
    s.server.admin().await.store("s1").await;
    let (_, credential) = s.enrolled_device("s1").await;
    admin.token = Some(credential);
    assert_status(
        admin
            .client
            .list_stores(admin.req(v1::ListStoresRequest::default()))
            .await,
        Code::Unauthenticated,
        "not valid",
    );
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        metrics.contains("posfleet_admin_auth_failures_total 3"),
        "{metrics}"
    );
    s.finish().await;
}

async fn stores_are_validated_and_listed(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    for id in ["b-store", "a-store", "c-store"] {
        admin.store(id).await;
    }
    let create = |id: &str, tz: &str| v1::CreateStoreRequest {
        id: id.into(),
        name: "Name".into(),
        time_zone: tz.into(),
    };
    assert_status(
        admin
            .client
            .create_store(admin.req(create("a-store", "UTC")))
            .await,
        Code::AlreadyExists,
        "already exists",
    );
    assert_status(
        admin
            .client
            .create_store(admin.req(create("d-store", "Europe/Atlantis")))
            .await,
        Code::InvalidArgument,
        "time_zone",
    );
    assert_status(
        admin
            .client
            .create_store(admin.req(create("Bad Id", "UTC")))
            .await,
        Code::InvalidArgument,
        "id",
    );
    // Pages of two give every store once, in id order.
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .client
            .list_stores(admin.req(v1::ListStoresRequest {
                page_size: 2,
                page_token,
            }))
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.stores.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(ids, vec!["a-store", "b-store", "c-store"]);
    s.finish().await;
}

async fn enrollment_tokens_are_spent_expire_and_are_revoked(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let mut agent = s.server.agent().await;
    assert_status(
        admin.token("nowhere", 1, 0).await,
        Code::NotFound,
        "unknown store nowhere",
    );
    admin.store("s1").await;

    // Two uses: two devices, then refused.
    let token = admin.token("s1", 2, 0).await.unwrap();
    for serial in ["A", "B"] {
        agent
            .enroll(enroll_request(&new_key(), &token.secret, serial))
            .await
            .unwrap();
    }
    assert_status(
        agent
            .enroll(enroll_request(&new_key(), &token.secret, "C"))
            .await,
        Code::PermissionDenied,
        "no uses left",
    );

    // Expired.
    let short = admin.token("s1", 1, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_status(
        agent
            .enroll(enroll_request(&new_key(), &short.secret, "D"))
            .await,
        Code::Unauthenticated,
        "expired",
    );

    // Revoked.
    let revoked = admin.token("s1", 5, 0).await.unwrap();
    let id = revoked.token.unwrap().id;
    let listed = admin
        .client
        .revoke_enrollment_token(admin.req(v1::RevokeEnrollmentTokenRequest { id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.revoked_at_unix_ms > 0);
    assert_status(
        agent
            .enroll(enroll_request(&new_key(), &revoked.secret, "E"))
            .await,
        Code::PermissionDenied,
        "revoked",
    );
    assert_status(
        admin
            .client
            .revoke_enrollment_token(admin.req(v1::RevokeEnrollmentTokenRequest {
                id: "tok-nope".into(),
            }))
            .await,
        Code::NotFound,
        "tok-nope",
    );

    // Never issued.
    assert_status(
        agent
            .enroll(enroll_request(&new_key(), "pfe_forged", "F"))
            .await,
        Code::Unauthenticated,
        "not valid",
    );

    let tokens = admin
        .client
        .list_enrollment_tokens(admin.req(v1::ListEnrollmentTokensRequest {
            store_id: "s1".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let remaining: HashMap<_, _> = tokens
        .iter()
        .map(|t| (t.id.clone(), t.uses_remaining))
        .collect();
    assert_eq!(remaining[&token.token.unwrap().id], 0);
    assert_eq!(remaining[&id], 5, "a refused enrollment spends nothing");
    assert_eq!(admin.devices(Default::default()).await.len(), 2);
    s.finish().await;
}

async fn enrollment_requires_proof_of_the_device_key(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let mut agent = s.server.agent().await;
    admin.store("s1").await;
    let token = admin.token("s1", 1, 0).await.unwrap();

    // Signed by another key than the one presented.
    let mut forged = enroll_request(&new_key(), &token.secret, "A");
    forged.public_key = new_key().verifying_key().to_bytes().to_vec();
    assert_status(
        agent.enroll(forged).await,
        Code::Unauthenticated,
        "possession",
    );

    let mut short_key = enroll_request(&new_key(), &token.secret, "A");
    short_key.public_key.truncate(16);
    assert_status(
        agent.enroll(short_key).await,
        Code::InvalidArgument,
        "public_key",
    );

    let mut no_model = enroll_request(&new_key(), &token.secret, "A");
    no_model.hardware_model.clear();
    assert_status(
        agent.enroll(no_model).await,
        Code::InvalidArgument,
        "hardware_model",
    );

    // The token is still whole.
    agent
        .enroll(enroll_request(&new_key(), &token.secret, "A"))
        .await
        .unwrap();
    s.finish().await;
}

async fn an_enrollment_retry_recovers_the_same_device(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let mut agent = s.server.agent().await;
    admin.store("s1").await;
    let token = admin.token("s1", 1, 0).await.unwrap();
    let key = new_key();
    let first = agent
        .enroll(enroll_request(&key, &token.secret, "A"))
        .await
        .unwrap()
        .into_inner();
    // The answer was lost: the agent asks again with the same key and token.
    let second = agent
        .enroll(enroll_request(&key, &token.secret, "A"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.device_id, first.device_id);
    assert_ne!(second.device_credential, first.device_credential);
    assert_status(
        agent
            .heartbeat(heartbeat(&first.device_credential, Default::default()))
            .await,
        Code::Unauthenticated,
        "not valid",
    );
    let hello = v1::HeartbeatRequest {
        agent_version: "1.0.0".into(),
        ..Default::default()
    };
    agent
        .heartbeat(heartbeat(&second.device_credential, hello))
        .await
        .unwrap();
    eventually(&mut admin, &first.device_id, |d| d.agent_version == "1.0.0").await;

    // Once the device has heartbeated, the same request (say, a captured
    // copy) is refused and the device keeps its credential.
    assert_status(
        agent.enroll(enroll_request(&key, &token.secret, "A")).await,
        Code::PermissionDenied,
        "no uses left",
    );
    agent
        .heartbeat(heartbeat(&second.device_credential, Default::default()))
        .await
        .expect("the device still holds its credential");
    // The same key with another token is a different request: refused.
    let other = admin.token("s1", 1, 0).await.unwrap();
    assert_status(
        agent.enroll(enroll_request(&key, &other.secret, "A")).await,
        Code::AlreadyExists,
        &first.device_id,
    );
    assert_eq!(admin.devices(Default::default()).await.len(), 1);
    s.finish().await;
}

async fn an_enrollment_retry_needs_a_live_token(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let mut agent = s.server.agent().await;
    admin.store("s1").await;
    let token = admin.token("s1", 1, 1).await.unwrap();
    let key = new_key();
    agent
        .enroll(enroll_request(&key, &token.secret, "A"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_status(
        agent.enroll(enroll_request(&key, &token.secret, "A")).await,
        Code::Unauthenticated,
        "expired",
    );
    s.finish().await;
}

async fn heartbeats_fill_the_fleet_view(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let request = v1::HeartbeatRequest {
        agent_version: "1.2.3".into(),
        installed_bundles: [("pos-app".to_string(), "1.0.0".to_string())].into(),
        agent_uptime_seconds: 42,
        p2p_listen_addrs: Vec::new(),
        store_peers_digest: Vec::new(),
        trust_bundle_sha256: Vec::new(),
        p2p_peers_banned: 0,
        signal_minutes: Vec::new(),
        signals_dropped: 0,
        health: Some(v1::Health {
            uptime_seconds: 3600,
            disk_free_bytes: 5 << 30,
            disk_total_bytes: 32 << 30,
            memory_total_bytes: 4 << 30,
            memory_available_bytes: 1 << 30,
            peripherals: vec![v1::Peripheral {
                kind: v1::PeripheralKind::Printer as i32,
                name: "receipt-printer".into(),
                state: v1::PeripheralState::Degraded as i32,
                detail: "paper low".into(),
            }],
        }),
    };
    let response = s
        .server
        .agent()
        .await
        .heartbeat(heartbeat(&credential, request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.next_heartbeat_interval_seconds, 30);
    let device = eventually(&mut admin, &id, |d| d.agent_version == "1.2.3").await;
    assert_eq!(device.status, v1::DeviceStatus::Online as i32);
    assert_eq!(device.installed_bundles["pos-app"], "1.0.0");
    assert_eq!(device.agent_uptime_seconds, 42);
    let health = device.health.unwrap();
    assert_eq!(health.disk_free_bytes, 5 << 30);
    assert_eq!(health.memory_available_bytes, 1 << 30);
    assert_eq!(health.peripherals[0].detail, "paper low");
    assert_eq!(
        health.peripherals[0].state,
        v1::PeripheralState::Degraded as i32
    );
    s.finish().await;
}

async fn heartbeats_need_the_device_credential(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    s.server.admin().await.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let mut agent = s.server.agent().await;
    assert_status(
        agent.heartbeat(v1::HeartbeatRequest::default()).await,
        Code::Unauthenticated,
        "missing device credential",
    );
    assert_status(
        agent
            .heartbeat(heartbeat("garbage", Default::default()))
            .await,
        Code::Unauthenticated,
        "malformed",
    );
    let wrong_secret = format!("pfd.{id}.{}", "0".repeat(64));
    assert_status(
        agent
            .heartbeat(heartbeat(&wrong_secret, Default::default()))
            .await,
        Code::Unauthenticated,
        "not valid",
    );
    let unknown = credential.replace(&id, "dev-00000000000000000000");
    assert_status(
        agent
            .heartbeat(heartbeat(&unknown, Default::default()))
            .await,
        Code::Unauthenticated,
        "unknown device",
    );
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"posfleet_heartbeats_total{result="unauthenticated"} 4"#),
        "{metrics}"
    );
    s.finish().await;
}

async fn oversized_and_malformed_heartbeats_lose_nothing(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let mut agent = s.server.agent().await;
    let good = v1::HeartbeatRequest {
        agent_version: "1.0.0".into(),
        ..Default::default()
    };
    agent.heartbeat(heartbeat(&credential, good)).await.unwrap();
    eventually(&mut admin, &id, |d| d.agent_version == "1.0.0").await;

    let oversized = v1::HeartbeatRequest {
        agent_version: "x".repeat(100 * 1024),
        ..Default::default()
    };
    let status = agent
        .heartbeat(heartbeat(&credential, oversized))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");

    let too_many = v1::HeartbeatRequest {
        agent_version: "2.0.0".into(),
        installed_bundles: (0..300)
            .map(|i| (format!("b{i}"), "1".to_string()))
            .collect(),
        ..Default::default()
    };
    assert_status(
        agent.heartbeat(heartbeat(&credential, too_many)).await,
        Code::InvalidArgument,
        "installed_bundles",
    );
    let control = v1::HeartbeatRequest {
        agent_version: "2.0.0\u{0}".into(),
        ..Default::default()
    };
    assert_status(
        agent.heartbeat(heartbeat(&credential, control)).await,
        Code::InvalidArgument,
        "agent_version",
    );
    // The refused heartbeats changed nothing; the connection still works.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(admin.device(&id).await.unwrap().agent_version, "1.0.0");
    agent
        .heartbeat(heartbeat(&credential, v1::HeartbeatRequest::default()))
        .await
        .unwrap();
    s.finish().await;
}

async fn devices_go_offline_after_missed_heartbeats(backend: Backend) {
    let s = setup(backend, |c| {
        c.heartbeat_interval_seconds = 1;
        c.offline_after_missed_heartbeats = 2;
    })
    .await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let (quiet, _) = s.enrolled_device("s1").await;
    let status_filter = |status: v1::DeviceStatus| v1::ListDevicesRequest {
        status: status as i32,
        ..Default::default()
    };
    assert_eq!(
        admin
            .devices(status_filter(v1::DeviceStatus::Online))
            .await
            .len(),
        2
    );
    // One device keeps reporting, the other stays silent past 2 intervals.
    let mut agent = s.server.agent().await;
    for _ in 0..5 {
        agent
            .heartbeat(heartbeat(&credential, Default::default()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let online: Vec<_> = admin.devices(status_filter(v1::DeviceStatus::Online)).await;
    let offline: Vec<_> = admin
        .devices(status_filter(v1::DeviceStatus::Offline))
        .await;
    assert_eq!(online.iter().map(|d| &d.id).collect::<Vec<_>>(), vec![&id]);
    assert_eq!(
        offline.iter().map(|d| &d.id).collect::<Vec<_>>(),
        vec![&quiet]
    );
    assert_eq!(
        admin.device(&quiet).await.unwrap().status,
        v1::DeviceStatus::Offline as i32
    );
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"posfleet_devices{status="offline"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"posfleet_devices{status="online"} 1"#),
        "{metrics}"
    );
    s.finish().await;
}

async fn labels_are_set_removed_and_filtered(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    admin.store("s2").await;
    let (a, _) = s.enrolled_device("s1").await;
    let (b, _) = s.enrolled_device("s2").await;
    let label = |id: &str, set: &[(&str, &str)], remove: &[&str]| v1::SetDeviceLabelsRequest {
        device_id: id.into(),
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        remove: remove.iter().map(|k| k.to_string()).collect(),
    };
    admin
        .client
        .set_device_labels(admin.req(label(&a, &[("ring", "canary"), ("floor", "1")], &[])))
        .await
        .unwrap();
    let device = admin
        .client
        .set_device_labels(admin.req(label(&a, &[("ring", "early")], &["floor"])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        device.labels,
        [("ring".to_string(), "early".to_string())].into()
    );
    admin
        .client
        .set_device_labels(admin.req(label(&b, &[("ring", "late")], &[])))
        .await
        .unwrap();

    let by_label = admin
        .devices(v1::ListDevicesRequest {
            labels: [("ring".to_string(), "early".to_string())].into(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_label.iter().map(|d| &d.id).collect::<Vec<_>>(), vec![&a]);
    let by_store = admin
        .devices(v1::ListDevicesRequest {
            store_id: "s2".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(by_store.iter().map(|d| &d.id).collect::<Vec<_>>(), vec![&b]);
    assert_eq!(by_store[0].labels["ring"], "late");

    assert_status(
        admin
            .client
            .set_device_labels(admin.req(label(&a, &[("bad key", "x")], &[])))
            .await,
        Code::InvalidArgument,
        "bad key",
    );
    assert_status(
        admin
            .client
            .set_device_labels(admin.req(label("dev-missing", &[("k", "v")], &[])))
            .await,
        Code::NotFound,
        "dev-missing",
    );
    assert_status(
        admin.device("dev-missing").await,
        Code::NotFound,
        "unknown device",
    );
    s.finish().await;
}

async fn listing_pages_through_the_whole_fleet(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let token = admin.token("s1", 25, 0).await.unwrap().secret;
    let mut agent = s.server.agent().await;
    for i in 0..25 {
        agent
            .enroll(enroll_request(&new_key(), &token, &format!("SN{i}")))
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        let page = admin
            .client
            .list_devices(admin.req(v1::ListDevicesRequest {
                page_size: 10,
                page_token,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        ids.extend(page.devices.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((pages, ids.len()), (3, 25));
    assert_eq!(sorted, ids, "pages are in id order without repeats");
    s.finish().await;
}

async fn the_fleet_survives_a_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(backend, dir.path()).await;
    let config = common::config(dir.path(), &db);
    let server = TestServer::start(config.clone()).await;
    let mut admin = server.admin().await;
    admin.store("s1").await;
    let token = admin.token("s1", 1, 0).await.unwrap().secret;
    let enrolled = server
        .agent()
        .await
        .enroll(enroll_request(&new_key(), &token, "A"))
        .await
        .unwrap()
        .into_inner();
    admin
        .client
        .set_device_labels(admin.req(v1::SetDeviceLabelsRequest {
            device_id: enrolled.device_id.clone(),
            set: [("ring".to_string(), "canary".to_string())].into(),
            remove: vec![],
        }))
        .await
        .unwrap();
    server
        .agent()
        .await
        .heartbeat(heartbeat(
            &enrolled.device_credential,
            v1::HeartbeatRequest {
                agent_version: "1.0.0".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let admin_token = server.admin_token.clone();
    // A graceful stop writes the queued heartbeat before returning.
    server.stop().await;

    let server = TestServer::start(config).await;
    assert_eq!(
        server.admin_token, admin_token,
        "the first admin's session is kept"
    );
    let mut admin = server.admin().await;
    let device = admin.device(&enrolled.device_id).await.unwrap();
    assert_eq!(device.labels["ring"], "canary");
    assert_eq!(device.agent_version, "1.0.0");
    server
        .agent()
        .await
        .heartbeat(heartbeat(&enrolled.device_credential, Default::default()))
        .await
        .expect("the device credential still works");
    server.stop().await;
    db.cleanup().await;
}

async fn health_and_readiness_endpoints_answer(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    assert_eq!(s.server.http_get("/healthz").await.0, 200);
    assert_eq!(s.server.http_get("/readyz").await.0, 200);
    let (code, body) = s.server.http_get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("# TYPE posfleet_heartbeats_total counter"),
        "{body}"
    );
    assert!(body.contains("posfleet_stores 0"), "{body}");

    // What grpcurl-style tools use: the standard health service and reflection.
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut health = HealthClient::new(s.server.channel().await);
    for service in ["posfleet.v1.AgentService", "posfleet.v1.AdminService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    let mut reflection = ServerReflectionClient::new(s.server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("reflection did not list services");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "posfleet.v1.AgentService",
        "posfleet.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // The older v1alpha name, which some clients still ask for, answers
    // the same.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut reflection = ServerReflectionClient::new(s.server.channel().await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.message().await.unwrap().unwrap().message_response
        else {
            panic!("v1alpha reflection did not list services");
        };
        let alpha_names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        // Each reflection service lists itself; the rest is the same.
        let served = |list: &[String]| -> Vec<String> {
            let mut served: Vec<_> = list
                .iter()
                .filter(|n| !n.starts_with("grpc.reflection."))
                .cloned()
                .collect();
            served.sort();
            served
        };
        assert_eq!(served(&alpha_names), served(&names));
        assert!(alpha_names.contains(&"grpc.reflection.v1alpha.ServerReflection".to_string()));
    }
    s.finish().await;
}

/// The heartbeat carries a till's P2P addresses up and its store's
/// membership list down, only when it changed; revoked devices leave the
/// list and are refused; bad addresses are refused whole.
async fn heartbeats_carry_the_store_membership_list(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    admin.store("s2").await;
    let (a, a_cred) = s.enrolled_device("s1").await;
    let (b, b_cred) = s.enrolled_device("s1").await;
    let (_, other_cred) = s.enrolled_device("s2").await;
    let mut agent = s.server.agent().await;
    let beat = |addrs: &[&str], digest: Vec<u8>| v1::HeartbeatRequest {
        p2p_listen_addrs: addrs.iter().map(|a| a.to_string()).collect(),
        store_peers_digest: digest,
        ..Default::default()
    };
    let first = agent
        .heartbeat(heartbeat(
            &a_cred,
            beat(&["/ip4/10.0.0.1/tcp/7410"], vec![]),
        ))
        .await
        .unwrap()
        .into_inner()
        .store_peers
        .expect("a till without a list gets one");
    let ids: Vec<&str> = first.peers.iter().map(|p| p.device_id.as_str()).collect();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort();
    assert_eq!(ids, want, "only its own store's tills");
    assert!(first.peers.iter().all(|p| p.public_key.len() == 32));
    let own = first.peers.iter().find(|p| p.device_id == a).unwrap();
    assert_eq!(own.addrs, ["/ip4/10.0.0.1/tcp/7410"]);
    // Holding the current list: nothing is sent.
    let again = agent
        .heartbeat(heartbeat(
            &a_cred,
            beat(&["/ip4/10.0.0.1/tcp/7410"], first.digest.clone()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.store_peers, None);
    // B reports where it listens: A's next heartbeat brings the change.
    agent
        .heartbeat(heartbeat(
            &b_cred,
            beat(&["/ip4/10.0.0.2/tcp/7410"], vec![]),
        ))
        .await
        .unwrap();
    let changed = agent
        .heartbeat(heartbeat(
            &a_cred,
            beat(&["/ip4/10.0.0.1/tcp/7410"], first.digest.clone()),
        ))
        .await
        .unwrap()
        .into_inner()
        .store_peers
        .expect("a changed list is sent");
    let peer_b = changed.peers.iter().find(|p| p.device_id == b).unwrap();
    assert_eq!(peer_b.addrs, ["/ip4/10.0.0.2/tcp/7410"]);
    // Bad addresses are refused, naming the field.
    for addrs in [vec!["not a multiaddr"], vec!["/ip4/10.0.0.1/tcp/1"; 17]] {
        assert_status(
            agent
                .heartbeat(heartbeat(&a_cred, beat(&addrs, vec![])))
                .await,
            Code::InvalidArgument,
            "p2p_listen_addrs",
        );
    }
    // B is revoked: refused with the reason, and gone from A's list.
    let revoked = admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: b.clone(),
            reason: "stolen".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked_at_unix_ms > 0);
    assert_eq!(revoked.revoked_reason, "stolen");
    assert_status(
        agent.heartbeat(heartbeat(&b_cred, beat(&[], vec![]))).await,
        Code::PermissionDenied,
        "stolen",
    );
    assert_status(
        agent
            .report_progress(device_request(
                &b_cred,
                v1::ReportProgressRequest::default(),
            ))
            .await,
        Code::PermissionDenied,
        "revoked",
    );
    let after = agent
        .heartbeat(heartbeat(
            &a_cred,
            beat(&["/ip4/10.0.0.1/tcp/7410"], changed.digest.clone()),
        ))
        .await
        .unwrap()
        .into_inner()
        .store_peers
        .expect("the list changed");
    let ids: Vec<&str> = after.peers.iter().map(|p| p.device_id.as_str()).collect();
    assert_eq!(ids, [a.as_str()]);
    // A till with P2P off (no addresses) gets no list.
    let off = agent
        .heartbeat(heartbeat(&a_cred, beat(&[], vec![])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(off.store_peers, None);
    // Another store's till never sees s1's.
    let theirs = agent
        .heartbeat(heartbeat(
            &other_cred,
            beat(&["/ip4/10.0.1.1/tcp/7410"], vec![]),
        ))
        .await
        .unwrap()
        .into_inner()
        .store_peers
        .unwrap();
    assert!(theirs.peers.iter().all(|p| p.device_id != a));
    let unknown = admin
        .client
        .revoke_device(admin.req(v1::RevokeDeviceRequest {
            device_id: "dev-nope".into(),
            reason: String::new(),
        }))
        .await;
    assert_status(unknown, Code::NotFound, "unknown device");
    s.finish().await;
}

on_both_backends!(
    heartbeats_carry_the_store_membership_list,
    admin_calls_need_a_valid_token,
    stores_are_validated_and_listed,
    enrollment_tokens_are_spent_expire_and_are_revoked,
    enrollment_requires_proof_of_the_device_key,
    an_enrollment_retry_recovers_the_same_device,
    an_enrollment_retry_needs_a_live_token,
    heartbeats_fill_the_fleet_view,
    heartbeats_need_the_device_credential,
    oversized_and_malformed_heartbeats_lose_nothing,
    devices_go_offline_after_missed_heartbeats,
    labels_are_set_removed_and_filtered,
    listing_pages_through_the_whole_fleet,
    the_fleet_survives_a_restart,
    health_and_readiness_endpoints_answer,
);
