//! Attacks on the AgentService and the HTTP endpoints by anyone who can
//! reach them (no credential) or by an enrolled till, and what they cost:
//! the database work is counted with `posfleet_database_connection_uses_total`
//! (one per statement outside a transaction, one per transaction). Run
//! against SQLite and (with --ignored) PostgreSQL.

mod common;

use common::{
    Backend, Setup, assert_status, device_request, enroll_request, heartbeat, new_key, setup,
};
use posfleet_proto::v1;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use sqlx::{Connection, Executor};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

/// Database work any background task (rollout engine, webhook dispatcher)
/// may do per second while a test runs, on a loaded machine.
const BACKGROUND_USES_PER_SECOND: f64 = 10.0;

/// A sample of `/metrics`.
async fn metric(s: &Setup, name: &str) -> f64 {
    let (_, text) = s.server.http_get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Database connection uses so far (after in-flight ones are given back).
async fn db_uses(s: &Setup) -> f64 {
    tokio::time::sleep(Duration::from_millis(100)).await;
    metric(s, "posfleet_database_connection_uses_total").await
}

/// Runs `attack` and checks that the database saw at most `budget` uses
/// for it, besides background work while it ran.
async fn assert_db_uses_within<F: std::future::Future<Output = ()>>(
    s: &Setup,
    what: &str,
    budget: f64,
    attack: F,
) {
    // A first scrape counts the fleet gauges; the ones below do not.
    let before = db_uses(s).await;
    let started = Instant::now();
    attack.await;
    let used = db_uses(s).await - before;
    let allowed = budget + BACKGROUND_USES_PER_SECOND * started.elapsed().as_secs_f64().ceil();
    assert!(
        used <= allowed,
        "{what}: {used} database uses, at most {allowed} allowed"
    );
}

/// A control plane with a store `s1` and one till enrolled in it.
struct OneTill {
    s: Setup,
    id: String,
    credential: String,
    agent: AgentServiceClient<Channel>,
}

async fn one_till(backend: Backend) -> OneTill {
    let s = setup(backend, |_| {}).await;
    s.server.admin().await.store("s1").await;
    let (id, credential) = s.enrolled_device("s1").await;
    let agent = s.server.agent().await;
    OneTill {
        s,
        id,
        credential,
        agent,
    }
}

fn bogus_enroll() -> v1::EnrollRequest {
    // A valid signature over a token nobody issued: the request passes every
    // check that needs no database.
    enroll_request(
        &new_key(),
        &format!("pfe_{}", uuid::Uuid::new_v4().simple()),
        "SN-X",
    )
}

async fn bogus_enroll_flood_does_not_reach_the_database_beyond_a_bound(backend: Backend) {
    let s = setup(backend, |c| c.peer_failed_burst_calls = 20).await;
    let mut agent = s.server.agent().await;
    let mut codes = std::collections::BTreeMap::new();
    let mut limited_message = String::new();
    assert_db_uses_within(&s, "300 bogus Enroll calls", 40.0, async {
        for _ in 0..300 {
            let status = agent.enroll(bogus_enroll()).await.unwrap_err();
            *codes.entry(format!("{:?}", status.code())).or_insert(0) += 1;
            if status.code() == Code::ResourceExhausted {
                limited_message = status.message().to_string();
            }
        }
    })
    .await;
    // The first ones are told why; past the budget, to slow down.
    assert!(
        codes.get("Unauthenticated").is_some_and(|n| *n >= 20),
        "{codes:?}"
    );
    assert!(
        codes.get("ResourceExhausted").is_some_and(|n| *n > 200),
        "{codes:?}"
    );
    assert!(
        limited_message.contains("from this address; retry in"),
        "{limited_message}"
    );
    // The same bad token again and again: answered from memory.
    let s2 = setup(backend, |_| {}).await;
    let mut agent2 = s2.server.agent().await;
    let token = "pfe_0123456789abcdef";
    assert_db_uses_within(&s2, "50 Enroll calls with one bad token", 3.0, async {
        for _ in 0..50 {
            assert_status(
                agent2
                    .enroll(enroll_request(&new_key(), token, "SN-X"))
                    .await,
                Code::Unauthenticated,
                "enrollment token is not valid",
            );
        }
    })
    .await;
    s2.finish().await;
    s.finish().await;
}

/// A refused enrollment only reads: it answers while another connection
/// holds the write lock (SQLite has one writer; on PostgreSQL the tables
/// are locked against writes).
async fn bogus_enroll_takes_no_write_lock(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut locker = sqlx::AnyConnection::connect(&s.db.url).await.unwrap();
    match backend {
        Backend::Sqlite => {
            locker.execute("BEGIN IMMEDIATE").await.unwrap();
        }
        Backend::Postgres => {
            locker.execute("BEGIN").await.unwrap();
            locker
                .execute("LOCK TABLE enrollment_tokens, devices IN EXCLUSIVE MODE")
                .await
                .unwrap();
        }
    }
    let mut agent = s.server.agent().await;
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(3), agent.enroll(bogus_enroll())).await;
    locker.execute("ROLLBACK").await.unwrap();
    let answer = answer.expect("a bogus Enroll must not wait for the write lock");
    assert_status(
        answer,
        Code::Unauthenticated,
        "enrollment token is not valid",
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(locker);
    s.finish().await;
}

async fn unknown_device_id_flood_does_not_reach_the_database_beyond_a_bound(backend: Backend) {
    let s = setup(backend, |c| c.peer_failed_burst_calls = 20).await;
    let mut agent = s.server.agent().await;
    let secret = "0".repeat(64);
    // One unknown id, again and again: remembered as unknown.
    assert_db_uses_within(&s, "200 heartbeats of one unknown device", 2.0, async {
        for _ in 0..200 {
            assert_status(
                agent
                    .heartbeat(heartbeat(
                        &format!("pfd.dev-0000000000.{secret}"),
                        Default::default(),
                    ))
                    .await,
                Code::Unauthenticated,
                "unknown device dev-0000000000",
            );
        }
    })
    .await;
    // A new unknown id each time: the budget of refused calls stops them.
    let mut limited = 0;
    assert_db_uses_within(&s, "200 heartbeats of new unknown devices", 25.0, async {
        for i in 0..200 {
            let credential = format!("pfd.dev-{i:010}.{secret}");
            let status = agent
                .heartbeat(heartbeat(&credential, Default::default()))
                .await
                .unwrap_err();
            if status.code() == Code::ResourceExhausted {
                limited += 1;
            }
        }
    })
    .await;
    assert!(limited > 150, "{limited} of 200 rate-limited");
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        !metrics.contains(r#"posfleet_heartbeats_total{result="rate_limited"} 0"#),
        "{metrics}"
    );
    s.finish().await;
}

async fn wrong_secret_flood_does_not_reach_the_database_beyond_a_bound(backend: Backend) {
    let OneTill {
        s,
        id,
        credential,
        mut agent,
    } = one_till(backend).await;
    agent
        .heartbeat(heartbeat(&credential, Default::default()))
        .await
        .unwrap();
    let wrong = format!("pfd.{id}.{}", "f".repeat(64));
    assert_db_uses_within(&s, "200 heartbeats with a wrong secret", 2.0, async {
        for _ in 0..200 {
            assert_status(
                agent.heartbeat(heartbeat(&wrong, Default::default())).await,
                Code::Unauthenticated,
                "not valid for device",
            );
        }
    })
    .await;
    // The till itself is not locked out.
    agent
        .heartbeat(heartbeat(&credential, Default::default()))
        .await
        .expect("the right credential still works");
    s.finish().await;
}

async fn metrics_scrape_flood_does_not_count_the_devices_table_per_scrape(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    s.enrolled_device("s1").await;
    assert_db_uses_within(&s, "100 scrapes of /metrics", 4.0, async {
        for _ in 0..100 {
            let (code, body) = s.server.http_get("/metrics").await;
            assert_eq!(code, 200);
            assert!(body.contains("posfleet_stores 1"), "{body}");
        }
    })
    .await;
    s.finish().await;
}

async fn repository_metadata_flood_is_served_from_memory(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.init_repository().await;
    let (_, timestamp) = s.server.http_get("/repo/timestamp.json").await;
    assert_db_uses_within(&s, "300 requests for repository metadata", 8.0, async {
        for _ in 0..100 {
            let (code, body) = s.server.http_get("/repo/timestamp.json").await;
            assert_eq!((code, &body), (200, &timestamp));
            assert_eq!(s.server.http_get("/repo/1.root.json").await.0, 200);
            assert_eq!(s.server.http_get("/repo/9.root.json").await.0, 404);
        }
    })
    .await;
    s.finish().await;
}

/// A till alternating its P2P addresses: each change would be a write and
/// a new membership list for its whole store.
async fn alternating_p2p_addresses_cause_at_most_one_write_per_interval(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    admin.store("s1").await;
    let (_, a_cred) = s.enrolled_device("s1").await;
    let (_, b_cred) = s.enrolled_device("s1").await;
    let mut agent = s.server.agent().await;
    let beat = |addr: &str, digest: Vec<u8>| v1::HeartbeatRequest {
        p2p_listen_addrs: vec![addr.to_string()],
        store_peers_digest: digest,
        ..Default::default()
    };
    // B settles on its list.
    let mut b_digest = Vec::new();
    for _ in 0..2 {
        if let Some(list) = agent
            .heartbeat(heartbeat(
                &b_cred,
                beat("/ip4/10.0.0.2/tcp/7410", b_digest.clone()),
            ))
            .await
            .unwrap()
            .into_inner()
            .store_peers
        {
            b_digest = list.digest;
        }
    }
    let mut lists_b_got = 0;
    for i in 0..20 {
        let addr = if i % 2 == 0 {
            "/ip4/10.0.0.1/tcp/7410"
        } else {
            "/ip4/10.0.0.1/tcp/7411"
        };
        agent
            .heartbeat(heartbeat(&a_cred, beat(addr, vec![])))
            .await
            .unwrap();
        if let Some(list) = agent
            .heartbeat(heartbeat(
                &b_cred,
                beat("/ip4/10.0.0.2/tcp/7410", b_digest.clone()),
            ))
            .await
            .unwrap()
            .into_inner()
            .store_peers
        {
            lists_b_got += 1;
            b_digest = list.digest;
        }
    }
    assert!(
        lists_b_got <= 1,
        "B got {lists_b_got} new lists from 20 address changes of A"
    );
    s.finish().await;
}

async fn absurd_added_bytes_are_refused(backend: Backend) {
    let OneTill {
        s,
        credential,
        mut agent,
        ..
    } = one_till(backend).await;
    let status = |name: &str, origin: u64| v1::BundleStatus {
        name: name.into(),
        kind: v1::BundleKind::Software as i32,
        target_version: "1.1.0".into(),
        phase: v1::BundlePhase::Downloading as i32,
        updated_at_unix_ms: posfleet_control_plane::now_ms(),
        bytes_from_origin: origin,
        ..Default::default()
    };
    for bundles in [
        vec![status("pos-app", u64::MAX)],
        // Each near i64::MAX: their sum would overflow.
        vec![
            status("a", i64::MAX as u64),
            status("b", i64::MAX as u64),
            status("c", i64::MAX as u64),
        ],
    ] {
        assert_status(
            agent
                .report_progress(device_request(
                    &credential,
                    v1::ReportProgressRequest { bundles },
                ))
                .await,
            Code::InvalidArgument,
            "bytes_from_origin",
        );
    }
    // A real figure is still counted.
    agent
        .report_progress(device_request(
            &credential,
            v1::ReportProgressRequest {
                bundles: vec![status("pos-app", 5 << 20)],
            },
        ))
        .await
        .unwrap();
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        metrics.contains(&format!(
            r#"posfleet_bundle_bytes_total{{source="origin"}} {}"#,
            5 << 20
        )),
        "{metrics}"
    );
    s.finish().await;
}

/// Addresses no store LAN has are not handed to the store's tills. (From a
/// till calling from loopback, as tests do, loopback addresses are kept;
/// the unit test of `store_lan_addr` covers a till on a LAN.)
async fn public_and_unspecified_p2p_addresses_are_refused_by_the_rule(backend: Backend) {
    let OneTill {
        s,
        id: a,
        credential: a_cred,
        mut agent,
    } = one_till(backend).await;
    let list = agent
        .heartbeat(heartbeat(
            &a_cred,
            v1::HeartbeatRequest {
                p2p_listen_addrs: vec![
                    "/ip4/0.0.0.0/tcp/7410".into(),
                    "/ip4/203.0.113.9/tcp/7410".into(),
                    "/dns4/example.com/tcp/7410".into(),
                    "/ip4/10.0.0.1/tcp/7410".into(),
                ],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .store_peers
        .expect("a till without a list gets one");
    let own = list.peers.iter().find(|p| p.device_id == a).unwrap();
    assert_eq!(own.addrs, ["/ip4/10.0.0.1/tcp/7410"]);
    s.finish().await;
}

on_both_backends!(
    bogus_enroll_flood_does_not_reach_the_database_beyond_a_bound,
    bogus_enroll_takes_no_write_lock,
    unknown_device_id_flood_does_not_reach_the_database_beyond_a_bound,
    wrong_secret_flood_does_not_reach_the_database_beyond_a_bound,
    metrics_scrape_flood_does_not_count_the_devices_table_per_scrape,
    repository_metadata_flood_is_served_from_memory,
    alternating_p2p_addresses_cause_at_most_one_write_per_interval,
    absurd_added_bytes_are_refused,
    public_and_unspecified_p2p_addresses_are_refused_by_the_rule,
);
