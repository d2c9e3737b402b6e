//! The fleet as ops see it, with real processes: a control plane, agents,
//! and the CLI.

use posfleet_e2e::fleet::{Fleet, StoreSpec};
use posfleet_e2e::{ControlPlane, PostgresDb, eventually, start_agent};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

fn online_ids(cp: &ControlPlane) -> BTreeSet<String> {
    cp.cli_json(&["device", "list", "--status", "online"])
        .as_array()
        .expect("a JSON array")
        .iter()
        .filter(|d| d["memory_total_bytes"].as_u64() > Some(0)) // has heartbeated
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

/// Kills the control plane with SIGKILL while three tills run, starts it
/// again on the same addresses, and checks that the tills come back on
/// their own without re-enrolling and that nothing was lost.
fn tills_come_back_after_the_control_plane_is_killed(database_url: Option<&str>) {
    let mut fleet = Fleet::builder().database_url(database_url).start();
    fleet.open_store(&StoreSpec {
        time_zone: "Europe/Paris",
        agent_args: &["--peripherals", "fake"],
        ..StoreSpec::new("lyon-02", 3)
    });
    let cp = &fleet.cp;
    let before = eventually("3 tills online", Duration::from_secs(30), || {
        let ids = online_ids(cp);
        (ids.len() == 3).then_some(ids)
    });
    let first = before.iter().next().unwrap().clone();
    cp.cli_json(&["device", "label", &first, "ring=canary", "floor=1"]);
    let enrollment =
        |i: usize| std::fs::read_to_string(fleet.tills[i].data.join("enrollment.json")).unwrap();
    let enrollments: Vec<String> = (0..3).map(enrollment).collect();

    fleet.cp.process.kill9();
    // The tills keep running while the control plane is gone.
    std::thread::sleep(Duration::from_secs(2));
    for till in &mut fleet.tills {
        assert!(
            till.process.is_running(),
            "an agent died with the control plane: {:?}",
            till.process.lines()
        );
    }

    fleet.restart_control_plane();
    let cp = &fleet.cp;
    // Each agent says it reached the new process (the fleet view alone could
    // still show heartbeats from before the kill as online).
    for till in &fleet.tills {
        till.process
            .wait_for_log("Control plane reachable again.", Duration::from_secs(30));
    }
    let after = eventually("3 tills back online", Duration::from_secs(30), || {
        let ids = online_ids(cp);
        (ids.len() == 3).then_some(ids)
    });
    assert_eq!(after, before, "the same devices came back");
    let all = cp.cli_json(&["device", "list"]);
    assert_eq!(
        all.as_array().unwrap().len(),
        3,
        "no device was added or lost"
    );
    let labelled = cp.cli_json(&["device", "show", &first]);
    assert_eq!(labelled["labels"]["ring"], "canary");
    assert_eq!(labelled["labels"]["floor"], "1");
    // Nobody re-enrolled: the token is spent exactly 3 times and each till
    // still holds its first credential.
    let tokens = cp.cli_json(&["enroll-token", "list", "--store", "lyon-02"]);
    assert_eq!(tokens[0]["uses_remaining"], 0);
    for (i, before) in enrollments.iter().enumerate() {
        let now = std::fs::read_to_string(fleet.tills[i].data.join("enrollment.json")).unwrap();
        assert_eq!(&now, before);
    }
    for till in &fleet.tills {
        assert!(
            till.process
                .lines()
                .iter()
                .filter(|l| l.contains("\"Enrolled.\""))
                .count()
                == 1,
            "each agent enrolled once: {:?}",
            till.process.lines()
        );
    }
}

#[test]
fn tills_come_back_after_the_control_plane_is_killed_on_sqlite() {
    tills_come_back_after_the_control_plane_is_killed(None);
}

#[test]
#[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
fn tills_come_back_after_the_control_plane_is_killed_on_postgres() {
    let db = PostgresDb::create();
    tills_come_back_after_the_control_plane_is_killed(Some(&db.url));
}

#[test]
fn an_agent_with_a_spent_token_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    cp.cli_json(&["store", "create", "s1", "--name", "S", "--time-zone", "UTC"]);
    let token = cp.cli_json(&["enroll-token", "create", "--store", "s1"]);
    let secret = token["secret"].as_str().unwrap();
    let mut first = start_agent(&cp.url(), &dir.path().join("a"), secret, &[]);
    first.wait_for_log("Enrolled.", Duration::from_secs(30));
    let mut second = start_agent(&cp.url(), &dir.path().join("b"), secret, &[]);
    let status = second.wait();
    assert!(!status.success());
    let log = second.lines().join("\n");
    assert!(log.contains("enrollment token has no uses left"), "{log}");
    assert!(first.is_running());
    first.terminate();

    // Not enrolled and no token: says what to set.
    let mut none = start_agent(&cp.url(), &dir.path().join("c"), "", &[]);
    assert!(!none.wait().success());
    assert!(
        none.lines().join("\n").contains("set enrollment_token"),
        "{:?}",
        none.lines()
    );
}

#[test]
fn an_agent_started_before_the_control_plane_enrolls_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    // Reserve an address, then start the agent pointing at it with nothing there.
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    cp.cli_json(&["store", "create", "s1", "--name", "S", "--time-zone", "UTC"]);
    let secret = cp.cli_json(&["enroll-token", "create", "--store", "s1"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let (grpc, http, url) = (cp.grpc_address.clone(), cp.http_address.clone(), cp.url());
    let mut cp = cp;
    cp.process.terminate();
    let agent = start_agent(&url, &dir.path().join("a"), &secret, &[]);
    agent.wait_for_log("Cannot enroll yet.", Duration::from_secs(30));
    let _cp = ControlPlane::start(&dir.path().join("cp"), None, &grpc, &http, &[]);
    agent.wait_for_log("Enrolled.", Duration::from_secs(30));
}

#[test]
fn sigterm_stops_the_control_plane_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    let status = cp.process.terminate();
    assert!(status.success(), "{status:?}");
    cp.process.wait_for_log("Stopped.", Duration::from_secs(5));
    // The first admin's setup code is written once, readable by its owner
    // only; a restart neither rewrites it nor ends the admin's session.
    use std::os::unix::fs::PermissionsExt;
    let setup_code = dir.path().join("cp").join("admin-setup-code");
    let mode = std::fs::metadata(&setup_code).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let code = std::fs::read_to_string(&setup_code).unwrap();
    let cp2 = ControlPlane::start_sqlite(&dir.path().join("cp"));
    assert_eq!(std::fs::read_to_string(&setup_code).unwrap(), code);
    let stores: Value = cp2.cli_json(&["store", "list"]);
    assert_eq!(stores, Value::Array(vec![]));
}

/// The fleet simulator's per-till connections, short: 100 tills enroll over
/// plaintext and over TLS, each opens a connection of its own, heartbeats
/// at a fixed rate, and all come back after the control plane restarts.
#[test]
fn fleet_sim_connects_every_till_on_its_own_connection_over_plaintext_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("figures.json");
    let tills = 100;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_fleet-sim"))
        .args(["--tls", "--devices", &tills.to_string()])
        .args(["--devices-per-store", "25", "--rate", "50"])
        .args(["--phase-seconds", "2", "--storm-deadline-seconds", "60"])
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let figures: Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    let runs = figures["runs"].as_array().unwrap();
    let transports: Vec<&str> = runs
        .iter()
        .map(|r| r["transport"].as_str().unwrap())
        .collect();
    assert_eq!(transports, ["plaintext", "tls"]);
    for run in runs {
        assert_eq!(run["enrollment"]["errors"], serde_json::json!({}), "{run}");
        let connect = &run["connect"];
        assert_eq!(connect["phase"]["ok"], tills, "{run}");
        // The control plane holds a socket per till: nobody shares.
        assert!(
            connect["control_plane_open_files"].as_u64().unwrap() >= tills,
            "{run}"
        );
        assert!(
            connect["control_plane_rss_per_connection_bytes"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        let steady = &run["steady"]["phase"];
        assert_eq!(steady["sent"], 100, "{run}");
        assert_eq!(steady["ok"], 100, "{run}");
        let storm = &run["storm"];
        assert_eq!(storm["online"], tills, "{run}");
        assert_eq!(storm["gave_up"], 0, "{run}");
        assert!(storm["all_online_seconds"].as_f64().unwrap() > 0.0, "{run}");
        assert!(
            storm["control_plane_cpu_seconds"].as_f64().unwrap() > 0.0,
            "{run}"
        );
    }
}
