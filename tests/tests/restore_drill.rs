//! The restore drill a store-ops team rehearses, with real processes: a
//! control plane serving TLS to 2 stores of 3 tills is backed up in the
//! middle of a rollout while it serves, killed, its data destroyed, and
//! restored into a fresh control plane on the same addresses. The tills
//! reconnect with the certificates they had (no enrollment again) and the
//! rollout resumes and completes.

use posfleet_e2e::fleet::{Fleet, TIMEOUT, logged};
use posfleet_e2e::{PostgresDb, eventually};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const STORES: [&str; 2] = ["lyon-01", "nice-01"];
const TILLS_PER_STORE: usize = 3;

fn device_ids(fleet: &Fleet) -> BTreeSet<String> {
    fleet
        .devices()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

fn rollout(fleet: &Fleet, id: &str) -> Value {
    fleet.cp.cli_json(&["rollout", "show", id])
}

fn drill(postgres: Option<&PostgresDb>) {
    let mut fleet = Fleet::builder()
        .database_url(postgres.map(|db| db.url.as_str()))
        .control_plane_args(&["--tls-server-name", "127.0.0.1"])
        .start();
    for store in STORES {
        fleet.store(store, TILLS_PER_STORE, &[]);
    }
    fleet.publish("1.0.0", true, 0);
    fleet.publish("1.1.0", true, 0);
    for store in STORES {
        fleet.assign(store, "pos-app@1.0.0");
    }
    fleet.wait_until_active(&STORES, "1.0.0");
    let enrolled = device_ids(&fleet);
    assert_eq!(enrolled.len(), STORES.len() * TILLS_PER_STORE);

    // One till first, then everyone after a bake: backed up while it bakes.
    let id = fleet.cp.cli_json(&[
        "rollout",
        "create",
        "--release",
        "pos-app@1.1.0",
        "--waves",
        "1,100%",
        "--bake",
        "20s",
        "--start",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually("wave 1 finished", TIMEOUT, || {
        let shown = rollout(&fleet, &id);
        (shown["counts"]["succeeded"] == 1).then_some(())
    });
    let backup = fleet.dir.path().join("backup");
    let summary = fleet.cp.backup(&backup);
    assert!(summary.contains("1 rollouts"), "{summary}");
    let shown = rollout(&fleet, &id);
    assert_eq!(shown["state"], "running", "mid-rollout: {shown}");

    // The control plane is lost with its data.
    fleet.cp.process.kill9();
    std::fs::remove_dir_all(&fleet.cp.data_dir).unwrap();
    if let Some(db) = postgres {
        db.wipe();
    }

    let summary = posfleet_e2e::restore(
        &fleet.cp.data_dir,
        fleet.cp.database_url.as_deref(),
        &backup,
    );
    assert!(summary.starts_with("Restored"), "{summary}");
    let restarted = Instant::now();
    fleet.restart_control_plane();

    let deadline = Instant::now() + TIMEOUT;
    let shown = loop {
        let shown = rollout(&fleet, &id);
        if shown["state"] == "completed" {
            break shown;
        }
        assert!(Instant::now() < deadline, "rollout not completed: {shown}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(shown["counts"]["succeeded"], 6, "{shown}");
    fleet.wait_until_active(&STORES, "1.1.0");
    assert_eq!(device_ids(&fleet), enrolled, "no till enrolled again");
    for till in &fleet.tills {
        assert_eq!(
            logged(&till.process, "Enrolled.").len(),
            1,
            "{} enrolled once, before the backup",
            till.data.display()
        );
    }
    eprintln!(
        "restore drill: rollout completed {:.1}s after the restored control plane started",
        restarted.elapsed().as_secs_f64()
    );
}

#[test]
fn a_fleet_restored_mid_rollout_reconnects_and_completes_it_on_sqlite() {
    drill(None);
}

#[test]
#[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
fn a_fleet_restored_mid_rollout_reconnects_and_completes_it_on_postgres() {
    let db = PostgresDb::create();
    drill(Some(&db));
}
