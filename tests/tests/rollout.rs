//! Staged rollouts with real processes: 3 stores × 4 tills running
//! `posfleet-agent`, the example POS program published as signed releases,
//! and `posfleet rollout` driving the control plane's engine.

use posfleet_e2e::fleet::{Fleet, TIMEOUT};
use posfleet_e2e::{check_ok, eventually};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const STORES: [&str; 3] = ["lyon-01", "nice-01", "lille-01"];
const TILLS_PER_STORE: usize = 4;

const LEADER: &str = "posfleet_rollout_engine_leader";

/// The fleet every test here starts from: 3 stores of 4 tills, pos-app
/// 1.0.0, 1.1.0 and a 1.2.0 whose health check fails published, and every
/// till on 1.0.0. With `standby` replicas started first on the same
/// PostgreSQL database (the first runs the engine; the tills and the CLI
/// talk to the last one started).
fn start_fleet(database_url: Option<&str>, standby: usize) -> Fleet {
    let mut fleet = Fleet::builder()
        .database_url(database_url)
        .standby_replicas(standby)
        .start();
    for store in STORES {
        fleet.store(store, TILLS_PER_STORE, &[]);
    }
    for (version, healthy) in [("1.0.0", true), ("1.1.0", true), ("1.2.0", false)] {
        fleet.publish(version, healthy, 0);
    }
    for store in STORES {
        fleet.assign(store, "pos-app@1.0.0");
    }
    fleet.wait_until_active(&STORES, "1.0.0");
    fleet
}

/// Rollouts driven through the CLI.
trait Rollouts {
    fn rollout(&self, args: &[&str]) -> String;
    fn show(&self, id: &str) -> Value;
    fn wait_for_state(&self, id: &str, state: &str) -> Value;
    fn max_in_flight_per_store(&self, id: &str) -> usize;
}

impl Rollouts for Fleet {
    fn rollout(&self, args: &[&str]) -> String {
        let mut all = vec!["rollout", "create"];
        all.extend_from_slice(args);
        all.push("--start");
        self.cp.cli_json(&all)["id"].as_str().unwrap().to_string()
    }

    fn show(&self, id: &str) -> Value {
        self.cp.cli_json(&["rollout", "show", id])
    }

    fn wait_for_state(&self, id: &str, state: &str) -> Value {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let shown = self.show(id);
            if shown["state"] == state {
                return shown;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rollout {id} not {state} after {TIMEOUT:?}: {shown}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The highest number of tills of one store in flight (notified,
    /// downloading or installing) at any point, replayed from the events.
    fn max_in_flight_per_store(&self, id: &str) -> usize {
        let stores: BTreeMap<String, String> = self
            .devices()
            .iter()
            .map(|d| {
                (
                    d["id"].as_str().unwrap().to_string(),
                    d["store_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let events = self.cp.cli_json(&["rollout", "events", id]);
        let mut state: BTreeMap<String, String> = BTreeMap::new();
        let mut max = 0;
        for event in events.as_array().unwrap() {
            let kind = event["kind"].as_str().unwrap();
            let Some(to) = kind.strip_prefix("rollout.device_") else {
                continue;
            };
            let device = event["device_id"].as_str().unwrap().to_string();
            state.insert(device, to.to_string());
            let mut per_store: BTreeMap<&str, usize> = BTreeMap::new();
            for (device, s) in &state {
                if matches!(s.as_str(), "notified" | "downloading" | "installing") {
                    *per_store.entry(stores[device].as_str()).or_default() += 1;
                }
            }
            max = max.max(per_store.values().copied().max().unwrap_or(0));
        }
        max
    }
}

fn ms(value: &Value) -> i64 {
    value
        .as_str()
        .filter(|s| !s.is_empty())
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .timestamp_millis()
        })
        .unwrap_or(0)
}

fn good_then_bad(fleet: &Fleet) {
    // A good release, wave by wave, one till per store at a time.
    let good = fleet.rollout(&[
        "--release",
        "pos-app@1.1.0",
        "--waves",
        "1,50%,100%",
        "--bake",
        "2s",
        "--max-failures",
        "20%",
    ]);
    let shown = fleet.wait_for_state(&good, "completed");
    let waves = shown["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 3, "{shown}");
    for pair in waves.windows(2) {
        // The next wave started only after the previous one finished and baked.
        let finished = ms(&pair[0]["finished_at"]);
        assert!(finished > 0, "{shown}");
        assert!(ms(&pair[1]["started_at"]) >= finished + 2000, "{shown}");
    }
    assert_eq!(shown["counts"]["succeeded"], 12, "{shown}");
    fleet.wait_until_active(&STORES, "1.1.0");
    assert!(fleet.max_in_flight_per_store(&good) <= 1);

    // A bad release: its canary store fails and the rollout pauses itself
    // before the second wave.
    let bad = fleet.rollout(&[
        "--release",
        "pos-app@1.2.0",
        "--canary-stores",
        "lyon-01",
        "--waves",
        "100%",
        "--max-failures",
        "20%",
        "--min-failures",
        "1",
    ]);
    let shown = fleet.wait_for_state(&bad, "paused");
    let reason = shown["reason"].as_str().unwrap();
    assert!(reason.contains("wave 1"), "{shown}");
    let waves = shown["waves"].as_array().unwrap();
    assert_eq!(ms(&waves[1]["started_at"]), 0, "{shown}");
    let failures = shown["failures"].as_array().unwrap();
    assert!(!failures.is_empty(), "{shown}");
    for failure in failures {
        assert_eq!(failure["store_id"], "lyon-01", "{failure}");
    }
    // The failing tills rolled back by themselves; the other stores were
    // never told about 1.2.0.
    std::thread::sleep(Duration::from_secs(3));
    for device in fleet.devices() {
        assert_eq!(device["installed_bundles"]["pos-app"], "1.1.0", "{device}");
        if device["store_id"] != "lyon-01" {
            let status = fleet
                .cp
                .bundle_status(device["id"].as_str().unwrap(), "pos-app");
            assert_ne!(status["target_version"], "1.2.0", "{device}");
        }
    }

    // Rolled back: the canary tills' desired state is 1.1.0 again.
    check_ok(
        fleet
            .cp
            .cli(&["rollout", "rollback", &bad, "--reason", "cash drawer"]),
    );
    fleet.wait_for_state(&bad, "rolled_back");
    for device in fleet.devices() {
        let shown = fleet
            .cp
            .cli_json(&["device", "show", device["id"].as_str().unwrap()]);
        let desired = shown["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "pos-app")
            .map(|b| b["desired"]["version"].clone())
            .unwrap();
        assert_ne!(desired, "1.2.0", "{shown}");
    }
}

#[test]
fn a_good_release_completes_in_waves_and_a_bad_one_pauses_in_its_canary() {
    let fleet = start_fleet(None, 0);
    good_then_bad(&fleet);
}

#[test]
fn an_aborted_rollout_dispatches_no_more_and_overlaps_are_refused() {
    let fleet = start_fleet(None, 0);
    let slow = fleet.rollout(&[
        "--release",
        "pos-app@1.1.0",
        "--waves",
        "1,100%",
        "--bake",
        "1h",
    ]);
    // Wave 1 done, baking for an hour.
    eventually("wave 1 finished", TIMEOUT, || {
        let shown = fleet.show(&slow);
        (ms(&shown["waves"][0]["finished_at"]) > 0).then_some(())
    });
    let overlap = fleet.cp.cli(&[
        "rollout",
        "create",
        "--release",
        "pos-app@1.1.0",
        "--stores",
        "nice-01",
    ]);
    assert!(!overlap.status.success());
    let stderr = String::from_utf8_lossy(&overlap.stderr);
    assert!(stderr.contains(&slow), "{stderr}");

    check_ok(
        fleet
            .cp
            .cli(&["rollout", "abort", &slow, "--reason", "not today"]),
    );
    let shown = fleet.wait_for_state(&slow, "aborted");
    assert_eq!(shown["counts"]["succeeded"], 1, "{shown}");
    std::thread::sleep(Duration::from_secs(3));
    let on_new = fleet
        .devices()
        .iter()
        .filter(|d| d["installed_bundles"]["pos-app"] == "1.1.0")
        .count();
    assert_eq!(on_new, 1);
}

/// Kills the control plane mid-rollout and starts it again: the rollout
/// completes, with every till counted once.
fn survives_a_control_plane_kill(database_url: Option<&str>) {
    let mut fleet = start_fleet(database_url, 0);
    let id = fleet.rollout(&["--release", "pos-app@1.1.0", "--waves", "25%,100%"]);
    eventually("some tills on 1.1.0", TIMEOUT, || {
        (fleet.show(&id)["counts"]["succeeded"].as_u64() >= Some(2)).then_some(())
    });
    fleet.cp.process.kill9();
    fleet.restart_control_plane();
    completes_with_every_till_once(&fleet, &id);
}

/// The rollout `id` completes with all 12 tills on 1.1.0, each notified
/// exactly once.
fn completes_with_every_till_once(fleet: &Fleet, id: &str) {
    let shown = fleet.wait_for_state(id, "completed");
    assert_eq!(shown["counts"]["succeeded"], 12, "{shown}");
    let notified = fleet
        .cp
        .cli_json(&["rollout", "events", id])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "rollout.device_notified")
        .count();
    assert_eq!(notified, 12, "each till notified once");
    fleet.wait_until_active(&STORES, "1.1.0");
}

#[test]
fn a_rollout_survives_a_control_plane_kill_on_sqlite() {
    survives_a_control_plane_kill(None);
}

#[test]
#[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
fn a_rollout_survives_a_control_plane_kill_on_postgres() {
    let db = posfleet_e2e::PostgresDb::create();
    survives_a_control_plane_kill(Some(&db.url));
}

/// Two replicas on one PostgreSQL database; the one running the engine is
/// killed mid-rollout: the other, which serves the tills, takes the
/// engine over and the rollout completes, every till notified once.
#[test]
#[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
fn a_killed_engine_replica_hands_the_rollout_over_on_postgres() {
    let db = posfleet_e2e::PostgresDb::create();
    let mut fleet = start_fleet(Some(&db.url), 1);
    assert_eq!(fleet.cp.metric(LEADER), 0.0, "one engine at a time");
    let id = fleet.rollout(&[
        "--release",
        "pos-app@1.1.0",
        "--waves",
        "25%,100%",
        "--bake",
        "10s",
    ]);
    // Killed while wave 1 bakes: the other replica must finish the bake
    // and run wave 2.
    let shown = eventually("wave 1 finished", TIMEOUT, || {
        let shown = fleet.show(&id);
        (ms(&shown["waves"][0]["finished_at"]) > 0).then_some(shown)
    });
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["counts"]["succeeded"], 3, "{shown}");
    let mut engine = fleet.standby.pop().expect("an engine replica");
    assert_eq!(engine.metric(LEADER), 1.0);
    assert_eq!(fleet.cp.metric(LEADER), 0.0, "one engine at a time");
    engine.process.kill9();
    eventually("the serving replica runs the engine", TIMEOUT, || {
        (fleet.cp.metric(LEADER) == 1.0).then_some(())
    });
    completes_with_every_till_once(&fleet, &id);
}
