//! Staged rollouts over real gRPC, with simulated tills that heartbeat and
//! report progress the way agents do, on SQLite and (with --ignored)
//! PostgreSQL.

mod common;

use common::fleet::*;
use common::{Admin, Backend, TestServer, assert_metric, assert_status, heartbeat};
use posfleet_bundle::manifest::Kind;
use posfleet_proto::v1;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tonic::Code;

/// The most tills of one store that were dispatched and not done at the
/// same time, per store, replayed from the event log.
fn most_in_flight_per_store(events: &[v1::Event]) -> BTreeMap<String, usize> {
    let mut in_flight: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut most: BTreeMap<String, usize> = BTreeMap::new();
    for e in events {
        let d = data(e);
        let Some(store) = d["store_id"].as_str() else {
            continue;
        };
        let set = in_flight.entry(store.to_string()).or_default();
        match e.kind.as_str() {
            "rollout.device_notified" => {
                set.insert(e.device_id.clone());
            }
            "rollout.device_succeeded"
            | "rollout.device_failed"
            | "rollout.device_rolled_back"
            | "rollout.device_timed_out" => {
                set.remove(&e.device_id);
            }
            _ => {}
        }
        let n = set.len();
        let m = most.entry(store.to_string()).or_default();
        *m = (*m).max(n);
    }
    most
}

fn kinds(events: &[v1::Event]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

/// The desired pos-app of a till, as its heartbeat answers.
async fn desired_of(sim: &mut Sim, id: &str) -> Option<v1::DesiredBundle> {
    let credential = sim.till(id).credential.clone();
    sim.agent
        .heartbeat(heartbeat(&credential, Default::default()))
        .await
        .unwrap()
        .into_inner()
        .desired_bundles
        .into_iter()
        .find(|d| d.name == APP)
}

async fn a_good_release_completes_wave_by_wave(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 3, 4, Some("1.0.0")).await;
    let mut st = strategy(vec![stores(&["s1"]), percent(50.0), percent(100.0)]);
    st.bake_seconds = 2;
    st.max_unavailable_per_store = 2;
    let rollout = create(&mut admin, request("1.1.0", Default::default(), st))
        .await
        .unwrap();
    assert_eq!(rollout.state(), v1::RolloutState::Draft);
    assert_eq!(rollout.wave_count, 3);
    assert_eq!(rollout.created_by, "admin");
    let started = start(&mut admin, &rollout.id).await.unwrap();
    assert_eq!(started.state(), v1::RolloutState::Running);
    assert_eq!(started.counts.unwrap().pending, 12);

    // During the first bake, a new till joins store s2.
    let detail = sim
        .until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
            d.waves[0].finished_at_unix_ms > 0
        })
        .await;
    assert_eq!(detail.waves[0].devices, 4, "the canary store's tills");
    assert_eq!(detail.waves[1].started_at_unix_ms, 0, "baking");
    let (late_id, late_credential) = s.enroll("s2").await;
    sim.tills.push(Till {
        id: late_id.clone(),
        credential: late_credential,
        active: Some("1.0.0".into()),
        working: None,
        given_up: BTreeSet::new(),
        silent: false,
        reported_until: 0,
    });

    let detail = sim
        .until(&mut admin, &rollout.id, Duration::from_secs(120), |d| {
            state(d) == v1::RolloutState::Completed
        })
        .await;
    let r = detail.rollout.clone().unwrap();
    assert_eq!(r.counts.unwrap().succeeded, 13, "{detail:#?}");
    assert!(r.finished_at_unix_ms >= r.started_at_unix_ms);
    assert!(detail.failures.is_empty());
    assert_eq!(detail.stores.len(), 3);
    for store in &detail.stores {
        let expected = if store.store_id == "s2" { 5 } else { 4 };
        assert_eq!(
            store.counts.unwrap().succeeded,
            expected,
            "{}",
            store.store_id
        );
    }
    // Cumulative: s1 (4), then up to 50% of 12 (2 more), then the rest;
    // the late till joins the wave its seed falls in (never the first,
    // which had gone by).
    let mut sizes: Vec<u64> = detail.waves.iter().map(|w| w.devices).collect();
    let all_events = events(&mut admin, &rollout.id).await;
    let joined = all_events
        .iter()
        .find(|e| e.kind == "rollout.device_joined")
        .unwrap();
    assert_eq!(joined.device_id, late_id);
    let late_wave = data(joined)["wave"].as_u64().unwrap() as usize;
    assert!(late_wave >= 1);
    sizes[late_wave] -= 1;
    assert_eq!(sizes, vec![4, 2, 6]);
    for pair in detail.waves.windows(2) {
        assert!(
            pair[1].started_at_unix_ms >= pair[0].finished_at_unix_ms + 2_000,
            "bake honoured: {pair:#?}"
        );
    }
    for till in &sim.tills {
        assert_eq!(till.active.as_deref(), Some("1.1.0"), "{}", till.id);
    }

    let events = events(&mut admin, &rollout.id).await;
    let ks = kinds(&events);
    assert_eq!(ks.first(), Some(&"rollout.created"));
    assert_eq!(ks.last(), Some(&"rollout.completed"));
    assert!(events.windows(2).all(|p| p[0].seq < p[1].seq));
    // Each till notified once, in its wave, only after the wave before it
    // finished.
    let mut notified = BTreeMap::new();
    let mut finished_waves = BTreeSet::new();
    for e in &events {
        let d = data(e);
        match e.kind.as_str() {
            "rollout.device_notified" => {
                assert!(
                    notified
                        .insert(e.device_id.clone(), d["wave"].clone())
                        .is_none()
                );
                let wave = d["wave"].as_u64().unwrap();
                assert!(
                    (0..wave).all(|w| finished_waves.contains(&w)),
                    "wave {wave} early"
                );
            }
            "rollout.wave_finished" => {
                finished_waves.insert(d["wave"].as_u64().unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(notified.len(), 13);
    assert!(ks.contains(&"rollout.device_joined"));
    assert!(notified.contains_key(&late_id));
    for (store, most) in most_in_flight_per_store(&events) {
        assert!(most <= 2, "store {store} had {most} tills in flight");
    }
    let (_, metrics) = s.server.http_get("/metrics").await;
    assert!(
        metrics.contains("posfleet_rollout_dispatched_total 13"),
        "{metrics}"
    );
    assert!(metrics.contains(r#"posfleet_rollout_device_results_total{state="succeeded"} 13"#));
    s.finish().await;
}

async fn a_broken_release_pauses_in_its_first_wave(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 3, 2, Some("1.1.0")).await;
    sim.bad.insert("1.2.0".into());
    let rollout = create(
        &mut admin,
        request(
            "1.2.0",
            Default::default(),
            strategy(vec![stores(&["s1"]), percent(100.0)]),
        ),
    )
    .await
    .unwrap();
    start(&mut admin, &rollout.id).await.unwrap();
    let detail = sim
        .until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
            state(d) == v1::RolloutState::Paused
        })
        .await;
    let r = detail.rollout.clone().unwrap();
    assert!(
        r.reason
            .starts_with("wave 1: 1 of 2 devices failed (50% ≥ 5%, ≥ 1)"),
        "{}",
        r.reason
    );
    assert_eq!(detail.failures.len(), 1);
    let failure = &detail.failures[0];
    assert_eq!(failure.store_id, "s1");
    assert_eq!(failure.wave, 0);
    assert_eq!(failure.state(), v1::RolloutDeviceState::RolledBack);
    assert_eq!(
        failure.reason,
        "the till rolled it back: health check failed: exit status 1"
    );
    // Paused: nothing moves, not even the canary store's other till.
    for _ in 0..30 {
        sim.step().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let detail = get(&mut admin, &rollout.id).await;
    assert_eq!(state(&detail), v1::RolloutState::Paused);
    assert_eq!(detail.rollout.unwrap().current_wave, 0);
    assert_eq!(detail.waves[1].started_at_unix_ms, 0);
    assert_eq!(detail.waves[1].counts.unwrap().pending, 4);
    assert_eq!(detail.waves[0].counts.unwrap().pending, 1);
    let events = events(&mut admin, &rollout.id).await;
    assert!(
        events
            .iter()
            .filter(|e| e.kind == "rollout.device_notified")
            .all(|e| data(e)["store_id"] == "s1"),
        "no till outside the canary store was dispatched"
    );
    assert!(
        !kinds(&events).contains(&"rollout.wave_started") || {
            events
                .iter()
                .filter(|e| e.kind == "rollout.wave_started")
                .all(|e| data(e)["wave"] == 0)
        }
    );
    let paused = events.iter().find(|e| e.kind == "rollout.paused").unwrap();
    assert_eq!(data(paused)["by"], "engine");
    for till in &sim.tills {
        assert_eq!(till.active.as_deref(), Some("1.1.0"));
    }
    // What Grafana sees of it.
    let (_, text) = s.server.http_get("/metrics").await;
    let id = &rollout.id;
    let series = |name: &str, labels: &str| format!("{name}{{{labels}}}");
    for (name, labels, value) in [
        (
            "posfleet_rollout_state",
            format!(r#"rollout="{id}",state="paused""#),
            1.0,
        ),
        (
            "posfleet_rollout_info",
            format!(r#"bundle="{APP}",rollout="{id}",version="1.2.0""#),
            1.0,
        ),
        (
            "posfleet_rollout_current_wave",
            format!(r#"rollout="{id}""#),
            0.0,
        ),
        ("posfleet_rollout_waves", format!(r#"rollout="{id}""#), 2.0),
        (
            "posfleet_rollout_devices",
            format!(r#"rollout="{id}",state="failed""#),
            1.0,
        ),
        (
            "posfleet_rollout_devices",
            format!(r#"rollout="{id}",state="pending""#),
            5.0,
        ),
        (
            "posfleet_rollout_wave_devices",
            format!(r#"rollout="{id}",state="failed",wave="0""#),
            1.0,
        ),
        (
            "posfleet_rollout_wave_devices",
            format!(r#"rollout="{id}",state="pending",wave="1""#),
            4.0,
        ),
        (
            "posfleet_rollout_pauses_total",
            r#"reason="failure_threshold""#.into(),
            1.0,
        ),
        (
            "posfleet_rollout_pauses_total",
            r#"reason="operator""#.into(),
            0.0,
        ),
        (
            "posfleet_rollout_events_total",
            r#"event="rollout.paused""#.into(),
            1.0,
        ),
        ("posfleet_rollouts", r#"state="paused""#.into(), 1.0),
    ] {
        assert_metric(&text, &series(name, &labels), value);
    }

    // Resumed by ops, the canary store's other till gets it, fails too,
    // and the new failure pauses the rollout again.
    let req = admin.req(rollout_request(&rollout.id, "one till only"));
    let resumed = admin.client.resume_rollout(req).await.unwrap().into_inner();
    assert_eq!(resumed.state(), v1::RolloutState::Running);
    let detail = sim
        .until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
            state(d) == v1::RolloutState::Paused
        })
        .await;
    let reason = detail.rollout.unwrap().reason;
    assert!(
        reason.starts_with("wave 1: 2 of 2 devices failed"),
        "{reason}"
    );
    assert_eq!(detail.waves[1].started_at_unix_ms, 0);
    s.finish().await;
}

async fn abort_stops_dispatching(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 2, 3, Some("1.0.0")).await;
    let rollout = create(
        &mut admin,
        request("1.1.0", Default::default(), strategy(vec![percent(100.0)])),
    )
    .await
    .unwrap();
    start(&mut admin, &rollout.id).await.unwrap();
    // One till per store dispatched; they stay busy (no steps).
    let mut detail = get(&mut admin, &rollout.id).await;
    for _ in 0..50 {
        if detail.rollout.as_ref().unwrap().counts.unwrap().notified == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        detail = get(&mut admin, &rollout.id).await;
    }
    assert_eq!(detail.rollout.unwrap().counts.unwrap().notified, 2);
    let req = admin.req(rollout_request(&rollout.id, "wrong release"));
    let aborted = admin.client.abort_rollout(req).await.unwrap().into_inner();
    assert_eq!(aborted.state(), v1::RolloutState::Aborted);
    assert_eq!(aborted.reason, "aborted by admin: wrong release");
    assert!(aborted.finished_at_unix_ms > 0);
    // The dispatched tills finish; nobody else is dispatched.
    for _ in 0..30 {
        sim.step().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let detail = get(&mut admin, &rollout.id).await;
    let counts = detail.rollout.unwrap().counts.unwrap();
    assert_eq!((counts.succeeded, counts.pending), (2, 4), "{counts:?}");
    let events = events(&mut admin, &rollout.id).await;
    let abort = events
        .iter()
        .position(|e| e.kind == "rollout.aborted")
        .unwrap();
    assert!(!kinds(&events[abort..]).contains(&"rollout.device_notified"));
    assert!(kinds(&events[abort..]).contains(&"rollout.device_succeeded"));
    let req = admin.req(rollout_request(&rollout.id, ""));
    assert_status(
        admin.client.resume_rollout(req).await,
        Code::FailedPrecondition,
        "is aborted",
    );
    s.finish().await;
}

async fn rollback_puts_the_previous_version_back(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 2, 2, Some("1.0.0")).await;
    // A till with no pos-app at all.
    let (fresh, credential) = s.enroll("s1").await;
    sim.tills.push(Till {
        id: fresh.clone(),
        credential,
        active: None,
        working: None,
        given_up: BTreeSet::new(),
        silent: false,
        reported_until: 0,
    });
    let mut st = strategy(vec![percent(100.0)]);
    st.max_unavailable_per_store = 2;
    let rollout = create(&mut admin, request("1.1.0", Default::default(), st))
        .await
        .unwrap();
    start(&mut admin, &rollout.id).await.unwrap();
    sim.until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
        state(d) == v1::RolloutState::Completed
    })
    .await;
    let req = admin.req(rollout_request(&rollout.id, "tills slow"));
    let rolled = admin
        .client
        .rollback_rollout(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.state(), v1::RolloutState::RolledBack);
    assert_eq!(rolled.reason, "rolled back by admin: tills slow");
    assert_eq!(rolled.counts.unwrap().rolled_back, 5);
    let ids: Vec<String> = sim.tills.iter().map(|t| t.id.clone()).collect();
    for id in &ids {
        let desired = desired_of(&mut sim, id).await;
        if *id == fresh {
            assert_eq!(desired, None, "a till that had nothing gets nothing back");
        } else {
            let desired = desired.unwrap();
            assert_eq!(
                (desired.version.as_str(), desired.rollback),
                ("1.0.0", true),
                "{id}"
            );
        }
    }
    // The tills step back (the simulated agent honours the rollback flag).
    for _ in 0..5 {
        sim.step().await;
    }
    for till in &sim.tills {
        let expected = if till.id == fresh { "1.1.0" } else { "1.0.0" };
        assert_eq!(till.active.as_deref(), Some(expected), "{}", till.id);
    }
    let events = events(&mut admin, &rollout.id).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "rollout.device_rolled_back")
            .count(),
        5
    );
    assert_eq!(kinds(&events).last(), Some(&"rollout.rolled_back"));
    let req = admin.req(rollout_request(&rollout.id, ""));
    assert_status(
        admin.client.rollback_rollout(req).await,
        Code::FailedPrecondition,
        "rolled_back",
    );
    s.finish().await;
}

async fn rollouts_are_validated_and_overlaps_refused(backend: Backend) {
    let (s, mut admin, _sim, key) = fleet(backend, 2, 1, Some("1.0.0")).await;
    admin
        .publish(&key, "catalog-s1", "2026.1.0", Kind::Catalog, &["*"])
        .await;
    let all = || v1::RolloutSelector::default();
    let bad = [
        (
            request("9.9.9", all(), strategy(vec![percent(100.0)])),
            Code::NotFound,
            "not published",
        ),
        (
            request("1.1.0", all(), strategy(vec![])),
            Code::InvalidArgument,
            "strategy.waves",
        ),
        (
            request("1.1.0", all(), strategy(vec![percent(0.0)])),
            Code::InvalidArgument,
            "more than 0",
        ),
        (
            request("1.1.0", all(), strategy(vec![percent(150.0)])),
            Code::InvalidArgument,
            "at most 100",
        ),
        (
            request("1.1.0", all(), strategy(vec![percent(50.0), percent(10.0)])),
            Code::InvalidArgument,
            "cumulative",
        ),
        (
            request("1.1.0", all(), strategy(vec![count(5), count(5)])),
            Code::InvalidArgument,
            "cumulative",
        ),
        (
            request("1.1.0", all(), strategy(vec![count(0)])),
            Code::InvalidArgument,
            "reaches nobody",
        ),
        (
            request("1.1.0", all(), strategy(vec![stores(&["nope"])])),
            Code::NotFound,
            "unknown store nope",
        ),
        (
            request("1.1.0", all(), strategy(vec![stores(&[])])),
            Code::InvalidArgument,
            "at least one store",
        ),
        (
            request("1.1.0", all(), strategy(vec![v1::WaveSpec { size: None }])),
            Code::InvalidArgument,
            "strategy.waves[0]",
        ),
        (
            request(
                "1.1.0",
                v1::RolloutSelector {
                    store_ids: vec!["zz".into()],
                    ..all()
                },
                strategy(vec![percent(100.0)]),
            ),
            Code::NotFound,
            "unknown store zz",
        ),
        (
            request(
                "1.1.0",
                v1::RolloutSelector {
                    hardware_model: "pos-z9".into(),
                    ..all()
                },
                strategy(vec![percent(100.0)]),
            ),
            Code::FailedPrecondition,
            "not pos-z9",
        ),
        (
            request(
                "1.1.0",
                all(),
                v1::RolloutStrategy {
                    max_failures_percent: 101.0,
                    ..strategy(vec![percent(100.0)])
                },
            ),
            Code::InvalidArgument,
            "max_failures_percent",
        ),
        (
            v1::CreateRolloutRequest {
                bundle_name: "catalog-s1".into(),
                analysis_policy: String::new(),
                ..request("2026.1.0", all(), strategy(vec![percent(100.0)]))
            },
            Code::FailedPrecondition,
            "catalog",
        ),
    ];
    for (req, code, fragment) in bad {
        assert_status(create(&mut admin, req).await, code, fragment);
    }

    let only = |store: &str| v1::RolloutSelector {
        store_ids: vec![store.into()],
        ..Default::default()
    };
    let first = create(
        &mut admin,
        request("1.1.0", only("s1"), strategy(vec![percent(100.0)])),
    )
    .await
    .unwrap();
    start(&mut admin, &first.id).await.unwrap();
    assert_status(
        start(&mut admin, &first.id).await,
        Code::FailedPrecondition,
        "only a draft",
    );
    // The same bundle on the same tills: refused, naming the other rollout.
    let refused = create(
        &mut admin,
        request("1.2.0", all(), strategy(vec![percent(100.0)])),
    )
    .await;
    assert_status(
        refused,
        Code::FailedPrecondition,
        &format!("rollout {} (pos-app 1.1.0, running)", first.id),
    );
    // Other tills: fine. A draft made before the first started is checked
    // again when it starts.
    let other = create(
        &mut admin,
        request("1.2.0", only("s2"), strategy(vec![percent(100.0)])),
    )
    .await
    .unwrap();
    assert_eq!(other.state(), v1::RolloutState::Draft);
    let req = admin.req(rollout_request(&first.id, ""));
    admin.client.pause_rollout(req).await.unwrap();
    let refused = create(
        &mut admin,
        request("1.2.0", only("s1"), strategy(vec![percent(100.0)])),
    )
    .await;
    assert_status(refused, Code::FailedPrecondition, "paused");
    let req = admin.req(rollout_request(&first.id, ""));
    admin.client.abort_rollout(req).await.unwrap();
    create(
        &mut admin,
        request("1.2.0", only("s1"), strategy(vec![percent(100.0)])),
    )
    .await
    .unwrap();
    // A selector that matches nobody cannot start.
    let nobody = create(
        &mut admin,
        request(
            "1.1.0",
            v1::RolloutSelector {
                installed_version: "0.1.0".into(),
                ..all()
            },
            strategy(vec![percent(100.0)]),
        ),
    )
    .await
    .unwrap();
    assert_status(
        start(&mut admin, &nobody.id).await,
        Code::FailedPrecondition,
        "selects no device",
    );

    assert_status(
        start(&mut admin, "ro-nope").await,
        Code::NotFound,
        "unknown rollout",
    );
    let req = admin.req(v1::ListRolloutsRequest {
        state: v1::RolloutState::Draft as i32,
    });
    let drafts = admin
        .client
        .list_rollouts(req)
        .await
        .unwrap()
        .into_inner()
        .rollouts;
    let ids: BTreeSet<String> = drafts.iter().map(|r| r.id.clone()).collect();
    assert!(ids.contains(&other.id) && ids.contains(&nobody.id) && !ids.contains(&first.id));
    let req = admin.req(v1::ListRolloutsRequest::default());
    let everything = admin
        .client
        .list_rollouts(req)
        .await
        .unwrap()
        .into_inner()
        .rollouts;
    assert_eq!(everything.len(), 4);
    let listed = everything.iter().find(|r| r.id == first.id).unwrap();
    assert_eq!(listed.state(), v1::RolloutState::Aborted);
    assert_eq!(
        listed.counts.unwrap().pending
            + listed.counts.unwrap().notified
            + listed.counts.unwrap().succeeded,
        1
    );
    s.finish().await;
}

async fn a_silent_till_times_out_and_pauses_the_rollout(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 1, 2, Some("1.0.0")).await;
    let silent = sim.tills[0].id.clone();
    sim.till(&silent).silent = true;
    let mut st = strategy(vec![percent(100.0)]);
    st.device_timeout_seconds = 2;
    st.max_failures_percent = 50.0;
    let rollout = create(&mut admin, request("1.1.0", Default::default(), st))
        .await
        .unwrap();
    start(&mut admin, &rollout.id).await.unwrap();
    let detail = sim
        .until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
            state(d) == v1::RolloutState::Paused
        })
        .await;
    let timed_out: Vec<_> = detail
        .failures
        .iter()
        .filter(|f| f.state() == v1::RolloutDeviceState::TimedOut)
        .collect();
    assert_eq!(timed_out.len(), 1, "{detail:#?}");
    assert_eq!(timed_out[0].reason, "not done 2s after it was notified");
    assert!(
        detail
            .rollout
            .unwrap()
            .reason
            .starts_with("wave 1: 1 of 2 devices failed (50% ≥ 50%, ≥ 1)")
    );
    s.finish().await;
}

async fn store_labels_are_set_and_select_stores(backend: Backend) {
    let (s, mut admin, _sim, _key) = fleet(backend, 3, 1, Some("1.0.0")).await;
    let label = |admin: &Admin, store: &str, set: &[(&str, &str)], remove: &[&str]| {
        admin.req(v1::SetStoreLabelsRequest {
            store_id: store.into(),
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
        })
    };
    let req = label(&admin, "s1", &[("region", "north"), ("tier", "pilot")], &[]);
    let store = admin
        .client
        .set_store_labels(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        store.labels.get("region").map(String::as_str),
        Some("north")
    );
    let req = label(&admin, "s2", &[("region", "north")], &[]);
    admin.client.set_store_labels(req).await.unwrap();
    let req = label(&admin, "s1", &[], &["tier"]);
    let store = admin
        .client
        .set_store_labels(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(store.labels.len(), 1);
    let req = admin.req(v1::ListStoresRequest::default());
    let listed = admin
        .client
        .list_stores(req)
        .await
        .unwrap()
        .into_inner()
        .stores;
    let regions: Vec<_> = listed
        .iter()
        .map(|s| s.labels.get("region").cloned().unwrap_or_default())
        .collect();
    assert_eq!(regions, vec!["north", "north", ""]);
    let req = label(&admin, "nope", &[("a", "b")], &[]);
    assert_status(
        admin.client.set_store_labels(req).await,
        Code::NotFound,
        "unknown store nope",
    );
    let req = label(&admin, "s1", &[("bad key!", "b")], &[]);
    assert_status(
        admin.client.set_store_labels(req).await,
        Code::InvalidArgument,
        "label key",
    );

    let north = v1::RolloutSelector {
        store_labels: [("region".to_string(), "north".to_string())].into(),
        ..Default::default()
    };
    let rollout = create(
        &mut admin,
        request("1.1.0", north, strategy(vec![percent(100.0)])),
    )
    .await
    .unwrap();
    start(&mut admin, &rollout.id).await.unwrap();
    let detail = get(&mut admin, &rollout.id).await;
    let stores: Vec<&str> = detail.stores.iter().map(|s| s.store_id.as_str()).collect();
    assert_eq!(stores, vec!["s1", "s2"]);
    let req = admin.req(v1::ListEventsRequest::default());
    let all = admin
        .client
        .list_events(req)
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        all.iter()
            .filter(|e| e.kind == "store.labels_changed")
            .count(),
        3
    );
    s.finish().await;
}

/// A control plane stopped mid-rollout and another opened on the same
/// database carry on where it left off: nobody dispatched twice, no wave
/// skipped.
async fn a_restarted_control_plane_resumes_the_rollout(backend: Backend) {
    let (s, mut admin, mut sim, _key) = fleet(backend, 2, 3, Some("1.0.0")).await;
    let mut st = strategy(vec![count(2), percent(100.0)]);
    st.bake_seconds = 1;
    let rollout = create(&mut admin, request("1.1.0", Default::default(), st))
        .await
        .unwrap();
    start(&mut admin, &rollout.id).await.unwrap();
    sim.until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
        d.waves[1].counts.unwrap().succeeded >= 1
    })
    .await;
    let Fleet { server, db, dir } = s;
    let config = server.config.clone();
    server.stop().await;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    sim.agent = server.agent().await;
    let detail = sim
        .until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
            state(d) == v1::RolloutState::Completed
        })
        .await;
    assert_eq!(detail.rollout.unwrap().counts.unwrap().succeeded, 6);
    let events = events(&mut admin, &rollout.id).await;
    let notified: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "rollout.device_notified")
        .map(|e| e.device_id.as_str())
        .collect();
    assert_eq!(notified.len(), 6);
    assert_eq!(notified.iter().collect::<BTreeSet<_>>().len(), 6);
    let waves: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == "rollout.wave_started")
        .map(|e| data(e)["wave"].as_u64().unwrap())
        .collect();
    assert_eq!(waves, vec![0, 1]);
    server.stop().await;
    db.cleanup().await;
    drop(dir);
}

/// Every change to a rollout is checked against the revision it was
/// computed from: a second change from the same read writes nothing, and a
/// change dropped before its commit leaves no trace, events included.
async fn a_change_from_a_stale_read_writes_nothing(backend: Backend) {
    use posfleet_control_plane::rollout::model::RolloutState;
    use posfleet_control_plane::storage::rollouts::RolloutRecord;
    use posfleet_control_plane::storage::{NewEvent, Storage};
    let f = Fleet::new(backend).await;
    let storage = Storage::connect(&f.db.url, 2).await.unwrap();
    let record = RolloutRecord {
        id: "ro-test".into(),
        bundle_name: APP.into(),
        bundle_version: "1.1.0".into(),
        bundle_kind: "software".into(),
        selector_json: "{}".into(),
        strategy_json: "{}".into(),
        state: RolloutState::Draft,
        current_wave: 0,
        wave_count: 1,
        reason: String::new(),
        revision: 0,
        created_by: "test".into(),
        created_at_ms: 1,
        started_at_ms: None,
        finished_at_ms: None,
        updated_at_ms: 1,
        created_by_id: "adm-test".into(),
        selected_devices: 0,
        approved_by: String::new(),
        approved_by_id: String::new(),
        approved_at_ms: None,
        analysis_policy: String::new(),
    };
    let event = |kind: &str| NewEvent::new(kind, "ro-test", "", serde_json::json!({}));
    storage
        .insert_rollout(&record, &event("created"))
        .await
        .unwrap();
    let mut write = storage
        .write_rollout("ro-test", 0, 2)
        .await
        .unwrap()
        .unwrap();
    write
        .set_state(RolloutState::Aborted, "first", true)
        .await
        .unwrap();
    write.commit(&[event("first")]).await.unwrap();
    // Computed from revision 0 too: refused.
    assert!(
        storage
            .write_rollout("ro-test", 0, 3)
            .await
            .unwrap()
            .is_none()
    );
    // Dropped before its commit: nothing of it stays.
    let mut write = storage
        .write_rollout("ro-test", 1, 4)
        .await
        .unwrap()
        .unwrap();
    write
        .set_state(RolloutState::Paused, "dropped", false)
        .await
        .unwrap();
    drop(write);
    let stored = storage.get_rollout("ro-test").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.state,
            stored.reason.as_str(),
            stored.revision,
            stored.finished_at_ms
        ),
        (RolloutState::Aborted, "first", 1, Some(2))
    );
    let kinds: Vec<String> = storage
        .events_after(0, Some("ro-test"), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec!["created", "first"]);
    storage.close().await;
    f.finish().await;
}

on_both_backends!(
    a_change_from_a_stale_read_writes_nothing,
    a_good_release_completes_wave_by_wave,
    a_broken_release_pauses_in_its_first_wave,
    abort_stops_dispatching,
    rollback_puts_the_previous_version_back,
    rollouts_are_validated_and_overlaps_refused,
    a_silent_till_times_out_and_pauses_the_rollout,
    store_labels_are_set_and_select_stores,
    a_restarted_control_plane_resumes_the_rollout,
);

/// Two control planes on one PostgreSQL database: exactly one runs the
/// engine; when it stops, the other takes over and finishes the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
async fn postgres_two_replicas_run_one_engine() {
    let (s, mut admin, mut sim, _key) = fleet(Backend::Postgres, 2, 2, Some("1.0.0")).await;
    let Fleet {
        server: first,
        db,
        dir,
    } = s;
    // The second replica shares the database and the data dir (the admin
    // token file and the repository keys), like replicas on shared storage.
    let second = TestServer::start(first.config.clone()).await;
    let leader = |text: &str| {
        text.lines()
            .any(|l| l == "posfleet_rollout_engine_leader 1")
    };
    let mut leaders = (false, false);
    for _ in 0..100 {
        leaders = (
            leader(&first.http_get("/metrics").await.1),
            leader(&second.http_get("/metrics").await.1),
        );
        if leaders.0 || leaders.1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the other replica time to (wrongly) take the lock too.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let again = (
        leader(&first.http_get("/metrics").await.1),
        leader(&second.http_get("/metrics").await.1),
    );
    assert_eq!(leaders, again);
    assert!(leaders.0 ^ leaders.1, "exactly one engine: {leaders:?}");
    let (running, standby) = if leaders.0 {
        (first, second)
    } else {
        (second, first)
    };

    let mut st = strategy(vec![count(1), percent(100.0)]);
    st.bake_seconds = 1;
    let rollout = create(&mut admin, request("1.1.0", Default::default(), st))
        .await
        .unwrap();
    start(&mut admin, &rollout.id).await.unwrap();
    sim.until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
        d.waves[0].counts.unwrap().succeeded == 1
    })
    .await;
    running.stop().await;
    let mut admin = standby.admin().await;
    sim.agent = standby.agent().await;
    let mut took_over = false;
    for _ in 0..100 {
        if leader(&standby.http_get("/metrics").await.1) {
            took_over = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(took_over, "the standby replica took the engine over");
    let detail = sim
        .until(&mut admin, &rollout.id, Duration::from_secs(60), |d| {
            state(d) == v1::RolloutState::Completed
        })
        .await;
    assert_eq!(detail.rollout.unwrap().counts.unwrap().succeeded, 4);
    standby.stop().await;
    db.cleanup().await;
    drop(dir);
}
