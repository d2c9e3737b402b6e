//! Desired state (bundle assignments, maintenance windows) and reported
//! bundle state (progress reports), as agents and ops see them through real
//! gRPC, on SQLite and (with --ignored) PostgreSQL.

mod common;

use common::{
    Admin, Backend, Setup, TestServer, assert_status, device_request, eventually, heartbeat, setup,
};
use ed25519_dalek::SigningKey;
use posfleet_bundle::manifest::Kind;
use posfleet_control_plane::desired::DESIRED_CACHE_TTL;
use posfleet_proto::v1;
use posfleet_proto::v1::assign_bundle_request::Target;
use std::time::Duration;
use tonic::Code;

const MIB: u64 = 1 << 20;

/// A store `s1` and a repository with pos-app 1.0.0 and 1.1.0 (for pos-x1),
/// and the store catalog 2026.1.0 (any hardware).
async fn fleet_with_bundles(backend: Backend) -> (Setup, Admin, SigningKey) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let key = admin.init_repository().await;
    for version in ["1.0.0", "1.1.0"] {
        admin
            .publish(&key, "pos-app", version, Kind::Software, &["pos-x1"])
            .await;
    }
    admin
        .publish(&key, "catalog", "2026.1.0", Kind::Catalog, &["*"])
        .await;
    (s, admin, key)
}

fn assign(
    target: Target,
    bundle: &str,
    download_ahead: Option<bool>,
    emergency: bool,
) -> v1::AssignBundleRequest {
    let (name, version) = bundle.split_once('@').unwrap();
    v1::AssignBundleRequest {
        target: Some(target),
        name: name.into(),
        version: version.into(),
        download_ahead,
        emergency,
    }
}

fn to_device(id: &str, bundle: &str) -> v1::AssignBundleRequest {
    assign(Target::DeviceId(id.into()), bundle, None, false)
}

fn to_store(id: &str, bundle: &str) -> v1::AssignBundleRequest {
    assign(Target::StoreId(id.into()), bundle, None, false)
}

async fn assigned(
    admin: &mut Admin,
    request: v1::AssignBundleRequest,
) -> Result<u64, tonic::Status> {
    let req = admin.req(request);
    admin
        .client
        .assign_bundle(req)
        .await
        .map(|r| r.into_inner().devices_assigned)
}

async fn beat(s: &Setup, credential: &str) -> v1::HeartbeatResponse {
    s.server
        .agent()
        .await
        .heartbeat(heartbeat(credential, Default::default()))
        .await
        .unwrap()
        .into_inner()
}

/// (name, version, kind, download_ahead, emergency) of a heartbeat's bundles.
fn desired(response: &v1::HeartbeatResponse) -> Vec<(String, String, v1::BundleKind, bool, bool)> {
    response
        .desired_bundles
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                b.version.clone(),
                b.kind(),
                b.download_ahead,
                b.emergency,
            )
        })
        .collect()
}

fn row(
    name: &str,
    version: &str,
    kind: v1::BundleKind,
    download_ahead: bool,
    emergency: bool,
) -> (String, String, v1::BundleKind, bool, bool) {
    (name.into(), version.into(), kind, download_ahead, emergency)
}

async fn bundles_are_assigned_to_devices_and_stores(backend: Backend) {
    let (s, mut admin, _key) = fleet_with_bundles(backend).await;
    let (a, a_credential) = s.enrolled_device("s1").await;
    let (_, b_credential) = s.enrolled_device("s1").await;
    assert!(beat(&s, &a_credential).await.desired_bundles.is_empty());

    // The whole store: both devices.
    assert_eq!(
        assigned(&mut admin, to_store("s1", "pos-app@1.0.0"))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        assigned(&mut admin, to_store("s1", "catalog@2026.1.0"))
            .await
            .unwrap(),
        2
    );
    // One device gets its own version, flags as given: an emergency,
    // so it applies once a second person approved it.
    let own = assign(
        Target::DeviceId(a.clone()),
        "pos-app@1.1.0",
        Some(false),
        true,
    );
    let req = admin.req(own);
    let held = admin.client.assign_bundle(req).await.unwrap().into_inner();
    assert_eq!(held.devices_assigned, 0);
    let held = held.held.expect("an emergency assignment is held");
    let (mut bob, _) = admin.with_new_user("bob", "deployer", &[]).await;
    let req = bob.req(v1::HeldAssignmentRequest { id: held.id });
    let approved = bob.client.approve_assignment(req).await.unwrap();
    assert_eq!(approved.into_inner().devices_assigned, 1);

    let software = v1::BundleKind::Software;
    let catalog = v1::BundleKind::Catalog;
    assert_eq!(
        desired(&beat(&s, &a_credential).await),
        vec![
            row("catalog", "2026.1.0", catalog, true, false),
            row("pos-app", "1.1.0", software, false, true),
        ],
        "the device's own row beats its store's"
    );
    assert_eq!(
        desired(&beat(&s, &b_credential).await),
        vec![
            row("catalog", "2026.1.0", catalog, true, false),
            row("pos-app", "1.0.0", software, true, false),
        ]
    );

    // A new store version reaches every device without its own row.
    assert_eq!(
        assigned(&mut admin, to_store("s1", "pos-app@1.1.0"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(desired(&beat(&s, &b_credential).await)[1].1, "1.1.0");
    assert_eq!(
        assigned(&mut admin, to_store("s1", "pos-app@1.0.0"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        desired(&beat(&s, &a_credential).await)[1],
        row("pos-app", "1.1.0", software, false, true),
        "still the device's own"
    );

    // A device enrolled later gets the store's assignments.
    let (late, late_credential) = s.enrolled_device("s1").await;
    assert_eq!(
        desired(&beat(&s, &late_credential).await),
        vec![
            row("catalog", "2026.1.0", catalog, true, false),
            row("pos-app", "1.0.0", software, true, false),
        ]
    );
    // Other stores are not touched.
    admin.store("s2").await;
    let (_, other_credential) = s.enrolled_device("s2").await;
    assert!(beat(&s, &other_credential).await.desired_bundles.is_empty());

    // GetDevice shows the merged desired state (no report yet).
    let device = admin.device(&late).await.unwrap();
    let names: Vec<_> = device.bundles.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, vec!["catalog", "pos-app"]);
    assert_eq!(device.bundles[1].desired.as_ref().unwrap().version, "1.0.0");
    assert!(device.bundles[1].status.is_none());
    s.finish().await;
}

async fn assignments_need_a_published_bundle_a_known_target_and_the_right_hardware(
    backend: Backend,
) {
    let (s, mut admin, key) = fleet_with_bundles(backend).await;
    let (x1, _) = s.enrolled_device("s1").await;
    let (x2, x2_credential) = s.enrolled_model("s1", "pos-x2").await;

    assert_status(
        assigned(&mut admin, to_device(&x1, "pos-app@9.9.9")).await,
        Code::NotFound,
        "bundle pos-app 9.9.9 is not published",
    );
    assert_status(
        assigned(&mut admin, to_store("s1", "nothing@1.0.0")).await,
        Code::NotFound,
        "bundle nothing 1.0.0 is not published",
    );
    assert_status(
        assigned(&mut admin, to_device("dev-missing", "pos-app@1.0.0")).await,
        Code::NotFound,
        "unknown device dev-missing",
    );
    assert_status(
        assigned(&mut admin, to_store("nowhere", "pos-app@1.0.0")).await,
        Code::NotFound,
        "unknown store nowhere",
    );
    assert_status(
        assigned(&mut admin, to_device(&x2, "pos-app@1.0.0")).await,
        Code::FailedPrecondition,
        "is for hardware pos-x1, not pos-x2",
    );
    assert_status(
        assigned(&mut admin, to_device(&x1, "pos-app@1.0")).await,
        Code::InvalidArgument,
        "version",
    );
    assert_status(
        assigned(&mut admin, to_device(&x1, "Pos App@1.0.0")).await,
        Code::InvalidArgument,
        "name",
    );
    let mut no_target = to_device(&x1, "pos-app@1.0.0");
    no_target.target = None;
    assert_status(
        assigned(&mut admin, no_target).await,
        Code::InvalidArgument,
        "target",
    );
    // A catalog goes to a whole store, never to one till.
    assert_status(
        assigned(&mut admin, to_device(&x2, "catalog@2026.1.0")).await,
        Code::FailedPrecondition,
        "catalogs are assigned per store",
    );
    // A bundle naming pos-x2 fits the pos-x2 till.
    admin
        .publish(
            &key,
            "pos-app",
            "1.2.0",
            Kind::Software,
            &["pos-x1", "pos-x2"],
        )
        .await;
    assert_eq!(
        assigned(&mut admin, to_device(&x2, "pos-app@1.2.0"))
            .await
            .unwrap(),
        1
    );
    let versions: Vec<_> = beat(&s, &x2_credential)
        .await
        .desired_bundles
        .into_iter()
        .map(|b| format!("{}@{}", b.name, b.version))
        .collect();
    assert_eq!(versions, vec!["pos-app@1.2.0"]);
    // Refused calls changed nothing.
    assert!(admin.device(&x1).await.unwrap().bundles.is_empty());
    s.finish().await;
}

async fn maintenance_windows_are_validated_set_and_cleared(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let created = admin.store("s1").await;
    assert_eq!(created.maintenance_window, None, "any time by default");
    let (_, credential) = s.enrolled_device("s1").await;
    assert_eq!(beat(&s, &credential).await.maintenance_window, None);

    let set = |store: &str, window: Option<(u32, u32)>| v1::SetMaintenanceWindowRequest {
        store_id: store.into(),
        maintenance_window: window.map(|(start_minute, duration_minutes)| v1::MaintenanceWindow {
            // Ignored: the store's own zone is used.
            time_zone: "Asia/Tokyo".into(),
            start_minute,
            duration_minutes,
        }),
    };
    let two_to_five = v1::MaintenanceWindow {
        time_zone: "Europe/Paris".into(),
        start_minute: 120,
        duration_minutes: 180,
    };
    let store = admin
        .client
        .set_maintenance_window(admin.req(set("s1", Some((120, 180)))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(store.maintenance_window, Some(two_to_five.clone()));
    assert_eq!(store.device_count, 1);
    let listed = admin
        .client
        .list_stores(admin.req(v1::ListStoresRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .stores;
    assert_eq!(listed[0].maintenance_window, Some(two_to_five.clone()));
    assert_eq!(
        beat(&s, &credential).await.maintenance_window,
        Some(two_to_five),
        "the heartbeat carries the window in the store's time zone"
    );

    for (window, field) in [
        ((1440, 60), "maintenance_window.start_minute"),
        ((0, 0), "maintenance_window.duration_minutes"),
        ((0, 1441), "maintenance_window.duration_minutes"),
    ] {
        assert_status(
            admin
                .client
                .set_maintenance_window(admin.req(set("s1", Some(window))))
                .await,
            Code::InvalidArgument,
            field,
        );
    }
    assert_status(
        admin
            .client
            .set_maintenance_window(admin.req(set("nowhere", Some((0, 60)))))
            .await,
        Code::NotFound,
        "unknown store nowhere",
    );
    // A window crossing midnight, then cleared.
    let late = admin
        .client
        .set_maintenance_window(admin.req(set("s1", Some((1380, 240)))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.maintenance_window.unwrap().start_minute, 1380);
    let cleared = admin
        .client
        .set_maintenance_window(admin.req(set("s1", None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.maintenance_window, None);
    assert_eq!(beat(&s, &credential).await.maintenance_window, None);
    s.finish().await;
}

fn status(name: &str, phase: v1::BundlePhase, updated_at_unix_ms: i64) -> v1::BundleStatus {
    v1::BundleStatus {
        name: name.into(),
        kind: v1::BundleKind::Software as i32,
        active_version: "1.0.0".into(),
        target_version: "1.1.0".into(),
        phase: phase as i32,
        bytes_done: 0,
        bytes_total: 0,
        error: String::new(),
        updated_at_unix_ms,
        ..Default::default()
    }
}

async fn report(
    s: &Setup,
    credential: &str,
    bundles: Vec<v1::BundleStatus>,
) -> Result<v1::ReportProgressResponse, tonic::Status> {
    s.server
        .agent()
        .await
        .report_progress(device_request(
            credential,
            v1::ReportProgressRequest { bundles },
        ))
        .await
        .map(|r| r.into_inner())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn progress_reports_show_in_get_device(backend: Backend) {
    let (s, mut admin, _key) = fleet_with_bundles(backend).await;
    let (id, credential) = s.enrolled_device("s1").await;
    assigned(&mut admin, to_device(&id, "pos-app@1.1.0"))
        .await
        .unwrap();
    let t = now_ms() - 10_000;
    let mut downloading = status("pos-app", v1::BundlePhase::Downloading, t);
    downloading.bytes_done = 12 * MIB;
    downloading.bytes_total = 32 * MIB;
    // A bundle the device has without any assignment is shown too.
    let mut tools = status("diag-tools", v1::BundlePhase::Installed, t);
    tools.active_version = "0.3.0".into();
    tools.target_version = "0.3.0".into();
    report(&s, &credential, vec![downloading.clone(), tools.clone()])
        .await
        .unwrap();

    let device = admin.device(&id).await.unwrap();
    let names: Vec<_> = device.bundles.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, vec!["diag-tools", "pos-app"], "sorted by name");
    assert_eq!(device.bundles[0].desired, None);
    assert_eq!(device.bundles[0].status, Some(tools));
    let app = &device.bundles[1];
    assert_eq!(app.desired.as_ref().unwrap().version, "1.1.0");
    assert_eq!(app.status, Some(downloading));

    // Installed: the latest report wins.
    let installed = v1::BundleStatus {
        active_version: "1.1.0".into(),
        ..status("pos-app", v1::BundlePhase::Installed, t + 5_000)
    };
    report(&s, &credential, vec![installed.clone()])
        .await
        .unwrap();
    let device = admin.device(&id).await.unwrap();
    assert_eq!(device.bundles[1].status, Some(installed));

    let (_, metrics) = s.server.http_get("/metrics").await;
    for expected in [
        r#"posfleet_bundle_reports_total{phase="downloading"} 1"#,
        r#"posfleet_bundle_reports_total{phase="installed"} 2"#,
        r#"posfleet_bundle_reports_total{phase="rolled_back"} 0"#,
    ] {
        assert!(metrics.contains(expected), "{expected} in {metrics}");
    }
    s.finish().await;
}

async fn agent_bundles_are_assigned_and_reported_as_agents(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let key = admin.init_repository().await;
    admin
        .publish(&key, "posfleet-agent", "2.0.0", Kind::Agent, &["*"])
        .await;
    let (id, credential) = s.enrolled_device("s1").await;
    assert_eq!(
        assigned(&mut admin, to_store("s1", "posfleet-agent@2.0.0"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        desired(&beat(&s, &credential).await),
        vec![row(
            "posfleet-agent",
            "2.0.0",
            v1::BundleKind::Agent,
            true,
            false
        )]
    );
    // A new agent its launcher reverted, as the agent before it reports it.
    let reverted = v1::BundleStatus {
        kind: v1::BundleKind::Agent as i32,
        target_version: "2.0.0".into(),
        error: "agent 2.0.0 did not reach the control plane and report healthy within 300 s".into(),
        ..status("posfleet-agent", v1::BundlePhase::RolledBack, now_ms())
    };
    report(&s, &credential, vec![reverted.clone()])
        .await
        .unwrap();
    let device = admin.device(&id).await.unwrap();
    let bundle = &device.bundles[0];
    assert_eq!(
        bundle.desired.as_ref().unwrap().kind(),
        v1::BundleKind::Agent
    );
    assert_eq!(bundle.status, Some(reverted));
    s.finish().await;
}

/// The status the device reported for its first bundle.
async fn reported(admin: &mut Admin, id: &str) -> v1::BundleStatus {
    admin.device(id).await.unwrap().bundles[0]
        .status
        .clone()
        .unwrap()
}

async fn an_older_report_does_not_replace_a_newer_one(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let t = now_ms() - 60_000;

    report(
        &s,
        &credential,
        vec![status("pos-app", v1::BundlePhase::Installed, t)],
    )
    .await
    .unwrap();
    // A retried report from before arrives late: ignored.
    report(
        &s,
        &credential,
        vec![status("pos-app", v1::BundlePhase::Downloading, t - 1)],
    )
    .await
    .unwrap();
    assert_eq!(
        reported(&mut admin, &id).await.phase(),
        v1::BundlePhase::Installed
    );

    // In one request, the newest status of a bundle counts, whatever its place.
    report(
        &s,
        &credential,
        vec![
            status("pos-app", v1::BundlePhase::RolledBack, t + 20),
            status("pos-app", v1::BundlePhase::Installing, t + 10),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        reported(&mut admin, &id).await.phase(),
        v1::BundlePhase::RolledBack
    );

    // An error string is cut to 1 KiB.
    let failed = v1::BundleStatus {
        error: "x".repeat(5000),
        ..status("pos-app", v1::BundlePhase::Failed, t + 30)
    };
    report(&s, &credential, vec![failed]).await.unwrap();
    let stored = reported(&mut admin, &id).await;
    assert_eq!(stored.phase(), v1::BundlePhase::Failed);
    assert_eq!(stored.error, "x".repeat(1024));

    // A status dated in the future (a fast clock) is kept as received now,
    // so the device's next report still counts.
    report(
        &s,
        &credential,
        vec![status(
            "pos-app",
            v1::BundlePhase::Pending,
            now_ms() + 3_600_000,
        )],
    )
    .await
    .unwrap();
    let stored = reported(&mut admin, &id).await;
    assert_eq!(stored.phase(), v1::BundlePhase::Pending);
    assert!(stored.updated_at_unix_ms <= now_ms());
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    report(
        &s,
        &credential,
        vec![status("pos-app", v1::BundlePhase::Downloading, now_ms())],
    )
    .await
    .unwrap();
    assert_eq!(
        reported(&mut admin, &id).await.phase(),
        v1::BundlePhase::Downloading
    );
    s.finish().await;
}

async fn malformed_reports_are_refused_and_change_nothing(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let t = now_ms();
    let good = || status("pos-app", v1::BundlePhase::Downloading, t);
    let cases: Vec<(Vec<v1::BundleStatus>, &str)> = vec![
        (
            vec![status("pos-app", v1::BundlePhase::Unspecified, t)],
            "bundles[0].phase: is required",
        ),
        (
            vec![v1::BundleStatus {
                phase: 99,
                ..good()
            }],
            "unknown phase 99",
        ),
        (
            vec![
                good(),
                v1::BundleStatus {
                    name: "Pos App".into(),
                    ..good()
                },
            ],
            "bundles[1].name",
        ),
        (
            vec![v1::BundleStatus {
                name: String::new(),
                ..good()
            }],
            "bundles[0].name",
        ),
        (
            vec![v1::BundleStatus {
                target_version: "1.1".into(),
                ..good()
            }],
            "bundles[0].target_version",
        ),
        (
            vec![v1::BundleStatus {
                active_version: "latest".into(),
                ..good()
            }],
            "bundles[0].active_version",
        ),
        (
            vec![v1::BundleStatus { kind: 7, ..good() }],
            "bundles[0].kind",
        ),
        (
            vec![v1::BundleStatus {
                updated_at_unix_ms: 0,
                ..good()
            }],
            "bundles[0].updated_at_unix_ms",
        ),
        (
            (0..65)
                .map(|i| status(&format!("b{i}"), v1::BundlePhase::Pending, t))
                .collect(),
            "at most 64",
        ),
    ];
    for (bundles, fragment) in cases {
        assert_status(
            report(&s, &credential, bundles).await,
            Code::InvalidArgument,
            fragment,
        );
    }
    assert!(
        admin.device(&id).await.unwrap().bundles.is_empty(),
        "nothing stored"
    );
    // 64 statuses, an empty version (nothing installed yet) and an empty
    // report are fine.
    let mut fresh = good();
    fresh.active_version.clear();
    report(&s, &credential, vec![fresh]).await.unwrap();
    report(&s, &credential, vec![]).await.unwrap();
    let many = (0..64)
        .map(|i| status(&format!("b{i}"), v1::BundlePhase::Pending, t))
        .collect();
    report(&s, &credential, many).await.unwrap();
    assert_eq!(admin.device(&id).await.unwrap().bundles.len(), 65);
    s.finish().await;
}

async fn reports_need_the_device_credential(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let one = || vec![status("pos-app", v1::BundlePhase::Downloading, now_ms())];
    let mut agent = s.server.agent().await;
    assert_status(
        agent
            .report_progress(v1::ReportProgressRequest { bundles: one() })
            .await,
        Code::Unauthenticated,
        "missing device credential",
    );
    let wrong_secret = format!("pfd.{id}.{}", "0".repeat(64));
    assert_status(
        report(&s, &wrong_secret, one()).await,
        Code::Unauthenticated,
        "not valid",
    );
    let unknown = credential.replace(&id, "dev-00000000000000000000");
    assert_status(
        report(&s, &unknown, one()).await,
        Code::Unauthenticated,
        "unknown device",
    );
    // An admin token is not a device credential.
    assert_status(
        report(&s, &s.server.admin_token, one()).await,
        Code::Unauthenticated,
        "malformed",
    );
    assert!(admin.device(&id).await.unwrap().bundles.is_empty());
    report(&s, &credential, one()).await.unwrap();
    eventually(&mut admin, &id, |d| d.bundles.len() == 1).await;
    s.finish().await;
}

async fn another_replica_answers_with_a_change_within_the_cache_ttl(backend: Backend) {
    // Two control planes on one database, as behind a load balancer.
    let (a, mut admin, _key) = fleet_with_bundles(backend).await;
    let b = TestServer::start(a.server.config.clone()).await;
    let (_, credential) = a.enrolled_device("s1").await;
    let beat_b = || async {
        b.agent()
            .await
            .heartbeat(heartbeat(&credential, Default::default()))
            .await
            .unwrap()
            .into_inner()
    };
    assert!(beat_b().await.desired_bundles.is_empty());
    assigned(&mut admin, to_store("s1", "pos-app@1.1.0"))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while beat_b().await.desired_bundles.is_empty() {
        assert!(
            started.elapsed() < DESIRED_CACHE_TTL + Duration::from_secs(2),
            "replica b still answers with the old desired state"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.stop().await;
    a.finish().await;
}

on_both_backends!(
    bundles_are_assigned_to_devices_and_stores,
    agent_bundles_are_assigned_and_reported_as_agents,
    assignments_need_a_published_bundle_a_known_target_and_the_right_hardware,
    maintenance_windows_are_validated_set_and_cleared,
    progress_reports_show_in_get_device,
    an_older_report_does_not_replace_a_newer_one,
    malformed_reports_are_refused_and_change_nothing,
    reports_need_the_device_credential,
    another_replica_answers_with_a_change_within_the_cache_ttl,
);
