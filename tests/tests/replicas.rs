//! Three control-plane replicas on one PostgreSQL database behind HAProxy,
//! real tills enrolling and heartbeating through it, a release published
//! and rolled out, while replicas are SIGKILLed one at a time and started
//! again: during heartbeats, during the publish and during the rollout.

use posfleet_e2e::replicas::{Operator, Replicas};
use posfleet_e2e::{PostgresDb, Process, eventually, pos_app_source, psql_rows, start_agent};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const STORES: [&str; 2] = ["lyon-01", "nice-01"];
const TILLS_PER_STORE: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(120);
/// What a revoked till logs when a replica refuses it (at the handshake,
/// or per request on a connection opened before).
const REFUSED: [&str; 2] = [
    "This till's certificate is revoked: the control plane refuses it. Retrying with backoff.",
    "Heartbeat refused.",
];
/// How long a killed replica stays down, and how long it serves again
/// before the next one is killed.
const DOWN_FOR: Duration = Duration::from_millis(1000);
const UP_FOR: Duration = Duration::from_millis(1500);

struct Till {
    store: &'static str,
    data: PathBuf,
    process: Process,
}

/// Builds pos-app `version` (with `payload` bytes) into a bundle file.
fn build(operator: &Operator, dir: &Path, version: &str, payload: usize) -> PathBuf {
    let src = pos_app_source(
        &dir.join(format!("pos-app-{version}")),
        version,
        true,
        payload,
    );
    let file = src.with_extension("bundle");
    posfleet_e2e::check_ok(
        operator
            .command()
            .arg("bundle")
            .arg("build")
            .arg(&src)
            .arg("-o")
            .arg(&file)
            .output()
            .unwrap(),
    );
    file
}

/// `posfleet bundle publish` through HAProxy.
fn publish(operator: &Operator, file: &Path, keys: &Path) -> Result<Value, String> {
    operator.try_json(&[
        "bundle",
        "publish",
        file.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
        // Deltas are tested in deltas.rs.
        "--no-deltas",
    ])
}

/// The targets published, as ops list them.
fn published(operator: &Operator) -> Vec<String> {
    let mut targets: Vec<String> = operator
        .read(&["bundle", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["target"].as_str().unwrap().to_string())
        .collect();
    targets.sort();
    targets
}

/// Every till of the fleet on pos-app `version`, as ops see it.
fn all_on(operator: &Operator, version: &str) -> bool {
    let devices = operator.read(&["device", "list"]);
    let devices = devices.as_array().unwrap();
    devices.len() == STORES.len() * TILLS_PER_STORE
        && devices
            .iter()
            .all(|d| d["installed_bundles"]["pos-app"] == version)
}

/// The JSON log lines of `process` with this message.
fn logged(process: &Process, message: &str) -> Vec<Value> {
    process.with_log(|log| {
        log.iter()
            .filter(|line| line.value["message"] == message)
            .map(|line| line.value.clone())
            .collect()
    })
}

/// Whether `check` holds within `timeout` (asked every 200 ms).
fn within(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Fails the test with `why`, after what the tills and replicas last logged.
fn fail(cluster: &Replicas, tills: &[Till], why: &str) -> ! {
    for till in tills {
        let lines = till.process.lines();
        eprintln!("== till {}", till.data.display());
        for line in &lines[lines.len().saturating_sub(15)..] {
            eprintln!("{line}");
        }
    }
    for (i, replica) in cluster.replicas.iter().enumerate() {
        if let Some(cp) = &replica.control_plane {
            let lines = cp.process.lines();
            eprintln!("== replica {i}");
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }
    panic!("{why}");
}

fn timestamp_ms(line: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(line["timestamp"].as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

#[test]
#[ignore = "needs PostgreSQL and haproxy: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
fn three_replicas_on_postgres_behind_haproxy_survive_kill9_during_heartbeats_publish_and_rollout() {
    let db = PostgresDb::create();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Replicas::start(
        dir.path(),
        &db.url,
        3,
        true,
        &["--heartbeat-interval-seconds", "1"],
    );
    let operator = cluster.operator();
    let keys = dir.path().join("keys");
    posfleet_e2e::check_ok(
        operator
            .command()
            .args(["keys", "init", keys.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    let first = build(&operator, dir.path(), "1.0.0", 1 << 20);
    publish(&operator, &first, &keys).unwrap();

    // Tills enroll and heartbeat through HAProxy, over TLS then mutual TLS,
    // and refresh the repository's metadata every 10 s (the shortest
    // allowed; each time from any replica).
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(&agent_config, "repository_refresh_seconds = 10\n").unwrap();
    let agent_args: Vec<String> = [
        "--config",
        agent_config.to_str().unwrap(),
        "--root-json-path",
        keys.join("root.json").to_str().unwrap(),
        "--repository-url",
        &cluster.repository_url(),
        "--ca-cert-path",
        cluster.ca_file.as_deref().unwrap().to_str().unwrap(),
        "--install-check-interval-seconds",
        "1",
        "--log-level",
        "info,posfleet_agent::agent=debug",
    ]
    .map(String::from)
    .to_vec();
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let mut tills = Vec::new();
    for store in STORES {
        operator.json(&posfleet_e2e::create_store_args(store, "UTC"));
        let token = operator.json(&[
            "enroll-token",
            "create",
            "--store",
            store,
            "--uses",
            &TILLS_PER_STORE.to_string(),
        ])["secret"]
            .as_str()
            .unwrap()
            .to_string();
        operator.json(&["device", "assign", "--store", store, "pos-app@1.0.0"]);
        for i in 0..TILLS_PER_STORE {
            let data = dir.path().join(format!("{store}-{i}"));
            let process = start_agent(&cluster.url(), &data, &token, &agent_args);
            tills.push(Till {
                store,
                data,
                process,
            });
        }
    }

    std::thread::sleep(Duration::from_secs(1));
    for till in &mut tills {
        if let Err(exit) = till.process.check_running() {
            panic!("till {} {exit}", till.data.display());
        }
    }

    // Heartbeats (and the first install) while replicas die one by one.
    let reader = operator.clone();
    let converged = cluster.killing_while("heartbeats", 0, 3, (DOWN_FOR, UP_FOR), move || {
        within(TIMEOUT, || all_on(&reader, "1.0.0"))
    });
    if !converged {
        fail(
            &cluster,
            &tills,
            &format!("timed out after {TIMEOUT:?} waiting for every till on pos-app 1.0.0"),
        );
    }

    // The publish of 1.1.0: the replica receiving the upload is killed
    // under it. The operator runs the command again, while replicas die.
    let release = build(&operator, dir.path(), "1.1.0", 16 << 20);
    let (publisher, file, root) = (operator.clone(), release.clone(), keys.clone());
    let attempt = std::thread::spawn(move || publish(&publisher, &file, &root));
    // Looked for often, since the upload may last a fraction of a second;
    // should the command end before any replica was seen receiving it, the
    // failure says how it ended.
    let seen_by = Instant::now() + TIMEOUT;
    let receiving = loop {
        if let Some(replica) = cluster.receiving_upload() {
            break replica;
        }
        if attempt.is_finished() {
            let outcome = attempt.join().unwrap();
            fail(
                &cluster,
                &tills,
                &format!("the publish ended before a replica was seen receiving it: {outcome:?}"),
            );
        }
        if Instant::now() > seen_by {
            fail(
                &cluster,
                &tills,
                &format!("timed out after {TIMEOUT:?} waiting for a replica receiving the upload"),
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    cluster.kill_and_restart(receiving, "publish", DOWN_FOR);
    let cut = attempt.join().unwrap();
    eprintln!("the publish whose replica was killed: {cut:?}");
    if cut.is_err() {
        assert_eq!(
            published(&operator),
            ["pos-app/1.0.0"],
            "nothing half-published"
        );
        let (publisher, file, root) = (operator.clone(), release.clone(), keys.clone());
        let rerun =
            cluster.killing_while("publish", receiving + 1, 1, (DOWN_FOR, UP_FOR), move || {
                publish(&publisher, &file, &root)
            });
        if let Err(error) = rerun {
            // Its replica was killed too: did it land before?
            assert!(
                published(&operator).contains(&"pos-app/1.1.0".to_string()),
                "{error}"
            );
        }
    }
    assert_eq!(published(&operator), ["pos-app/1.0.0", "pos-app/1.1.0"]);

    // The rollout, one till then the rest, while replicas die.
    let id = operator.json(&[
        "rollout",
        "create",
        "--release",
        "pos-app@1.1.0",
        "--waves",
        "1,100%",
        "--max-unavailable",
        "2",
        "--start",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (reader, rollout) = (operator.clone(), id.clone());
    let shown = cluster.killing_while("rollout", 2, 3, (DOWN_FOR, UP_FOR), move || {
        let shown = eventually("the rollout completed", TIMEOUT, || {
            let shown = reader.read(&["rollout", "show", &rollout]);
            assert!(
                !["paused", "aborted", "rolled_back"].contains(&shown["state"].as_str().unwrap()),
                "{shown}"
            );
            (shown["state"] == "completed").then_some(shown)
        });
        eventually("every till on pos-app 1.1.0", TIMEOUT, || {
            all_on(&reader, "1.1.0").then_some(())
        });
        shown
    });
    eprintln!("kills: {:#?}", cluster.kills);
    for during in ["heartbeats", "publish", "rollout"] {
        assert!(
            cluster.kills.iter().any(|k| k.during == during),
            "no replica was killed during the {during}"
        );
    }

    // The rollout completed, each till notified once and installing 1.1.0
    // once.
    let total = STORES.len() * TILLS_PER_STORE;
    assert_eq!(shown["counts"]["succeeded"], total, "{shown}");
    let events = operator.read(&["rollout", "events", &id]);
    let mut notified: BTreeMap<String, usize> = BTreeMap::new();
    for event in events.as_array().unwrap() {
        if event["kind"] == "rollout.device_notified" {
            *notified
                .entry(event["device_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(notified.len(), total, "{events}");
    assert!(notified.values().all(|&n| n == 1), "{notified:?}");
    for till in &tills {
        let installs: Vec<Value> = logged(&till.process, "Installing.")
            .into_iter()
            .filter(|l| l["version"] == "1.1.0")
            .collect();
        assert_eq!(installs.len(), 1, "{}: {installs:?}", till.data.display());
        // No failed update, and the repository kept verifying: a refresh
        // failed only for want of an answer, never for metadata it refused.
        assert!(
            logged(&till.process, "Bundle update failed.").is_empty(),
            "{}",
            till.process.lines().join("\n")
        );
        for warning in logged(
            &till.process,
            "Cannot refresh the bundle repository; keeping what was trusted.",
        ) {
            let error = warning["error"].as_str().unwrap_or_default();
            assert!(
                ![
                    "signature",
                    "older than",
                    "not the version",
                    "does not match",
                    "expired",
                    "malformed"
                ]
                .iter()
                .any(|refused| error.contains(refused)),
                "{}: metadata refused: {error}",
                till.data.display()
            );
        }
    }

    // A till revoked through HAProxy (so through one replica) is refused
    // soon: within a second every replica knows, and the till's next
    // heartbeats (1 s apart, each on a loaded machine) meet the refusal or
    // a closed connection. From then on every replica refuses it:
    // it retries on a new connection each time, spread over all of them,
    // and none acknowledges it again.
    let stolen = &tills[0];
    let device = posfleet_e2e::enrolled_device_id(&stolen.data).unwrap();
    operator.json(&["device", "revoke", &device, "--reason", "stolen"]);
    let revoked_at = Instant::now();
    let refused = eventually("the revoked till refused", TIMEOUT, || {
        stolen.process.with_log(|log| {
            log.iter()
                .find(|l| {
                    l.at >= revoked_at
                        && REFUSED.contains(&l.value["message"].as_str().unwrap_or_default())
                })
                .map(|l| l.at)
        })
    });
    assert!(
        refused - revoked_at <= Duration::from_secs(4),
        "refused {:?} after the revocation",
        refused - revoked_at
    );
    let after_refusal = || -> Vec<String> {
        stolen.process.with_log(|log| {
            log.iter()
                .filter(|l| l.at > refused)
                .map(|l| l.text.clone())
                .collect()
        })
    };
    let refusals = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| REFUSED.iter().any(|r| l.contains(r)))
            .count()
    };
    let within = eventually("three more refusals", TIMEOUT, || {
        let lines = after_refusal();
        (refusals(&lines) >= 3).then_some(lines)
    });
    assert!(
        !within.iter().any(|l| l.contains("Heartbeat acknowledged.")),
        "a replica served the revoked till: {within:#?}"
    );

    // Nothing a till was told was acknowledged is missing: once the tills
    // stop, the database holds each one's last acknowledged heartbeat and
    // its last acknowledged progress report.
    for till in &mut tills {
        till.process.terminate();
    }
    std::thread::sleep(Duration::from_secs(1));
    let seen: BTreeMap<String, (i64, String)> = psql_rows(
        &db.url,
        "SELECT id, last_seen_ms, installed_bundles_json FROM devices",
    )
    .into_iter()
    .map(|row| (row[0].clone(), (row[1].parse().unwrap(), row[2].clone())))
    .collect();
    let reported: BTreeMap<String, (String, String, i64)> = psql_rows(
        &db.url,
        "SELECT device_id, target_version, phase, updated_at_ms FROM device_bundle_status \
         WHERE name = 'pos-app'",
    )
    .into_iter()
    .map(|row| {
        (
            row[0].clone(),
            (row[1].clone(), row[2].clone(), row[3].parse().unwrap()),
        )
    })
    .collect();
    for till in &tills {
        let device = posfleet_e2e::enrolled_device_id(&till.data).unwrap();
        let acks = logged(&till.process, "Heartbeat acknowledged.");
        let [.., before_last, last] = acks.as_slice() else {
            panic!("{device}: fewer than two heartbeats acknowledged");
        };
        let (last_seen_ms, installed) = &seen[&device];
        // The last heartbeat was received after the one before it was
        // acknowledged: a database still holding that one lost it.
        assert!(
            *last_seen_ms > timestamp_ms(before_last),
            "{device} ({}): the last acknowledged heartbeat is not stored (last seen {last_seen_ms}, \
             the one before acknowledged at {})",
            till.store,
            timestamp_ms(before_last)
        );
        let installed: BTreeMap<String, String> = serde_json::from_str(installed).unwrap();
        assert_eq!(
            format!("{installed:?}"),
            last["installed"].as_str().unwrap(),
            "{device}"
        );
        let report = logged(&till.process, "Bundle progress acknowledged.")
            .into_iter()
            .rfind(|l| l["bundle"] == "pos-app")
            .unwrap();
        let (target, phase, updated_at_ms) = &reported[&device];
        assert_eq!(
            (target.as_str(), phase.as_str(), *updated_at_ms),
            (
                report["target_version"].as_str().unwrap(),
                report["phase"].as_str().unwrap().to_lowercase().as_str(),
                report["updated_at_unix_ms"].as_i64().unwrap()
            ),
            "{device}: the last acknowledged progress report is not the one stored"
        );
        assert_eq!(target, "1.1.0");
    }
}
