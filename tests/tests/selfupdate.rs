//! The agent updating itself, with real processes: tills run by
//! `posfleet-agent-launcher`, agent releases holding the agent cargo built.
//! A short kill -9 campaign (the long one is `cargo run --release -p
//! posfleet-e2e --bin selfupdate-campaign`), and a bad agent release that
//! never reaches the control plane: reverted by each till's launcher within
//! the confirm window, reported, and its rollout paused.

use posfleet_e2e::fleet::{Fleet, TIMEOUT};
use posfleet_e2e::selfupdate::{self, AGENT, LaunchedTill, Options, publish_agent};
use posfleet_e2e::{check_ok, eventually};
use std::collections::BTreeMap;
use std::time::Duration;

#[test]
fn every_kill_of_a_self_update_leaves_one_runnable_agent_and_the_till_settles() {
    let report = selfupdate::campaign(&Options {
        trials: 4,
        seed: rand::random(),
        confirm_seconds: 8,
        bad_every: 2,
    });
    eprintln!("{report:#?}");
    assert!(report.failures.is_empty(), "{report:#?}");
    assert_eq!(report.converged, report.trials, "{report:#?}");
    assert_eq!((report.torn, report.two_agents), (0, 0), "{report:#?}");
    assert_eq!(report.bad_reverted, 2, "{report:#?}");
}

const CONFIRM_SECONDS: u64 = 8;

#[test]
fn a_bad_agent_release_reverts_by_itself_and_pauses_its_rollout() {
    let fleet = Fleet::builder().start();
    let stores = ["self-01", "self-02"];
    let mut tills: Vec<(String, LaunchedTill)> = Vec::new();
    for store in stores {
        fleet.create_store(store, "UTC");
        let token = fleet.enrollment_token(store, 2);
        for i in 0..2 {
            let data = fleet.dir.path().join(format!("{store}-{i}"));
            tills.push((
                store.to_string(),
                LaunchedTill::start(&fleet, &data, &token, CONFIRM_SECONDS),
            ));
        }
    }
    // From the factory agent to release 1.0.0 on every till.
    publish_agent(&fleet, "1.0.0", true);
    for store in stores {
        fleet.assign(store, &format!("{AGENT}@1.0.0"));
    }
    let devices: BTreeMap<String, usize> = tills
        .iter()
        .enumerate()
        .map(|(i, (_, till))| (till.device_id(), i))
        .collect();
    eventually("every till on agent 1.0.0", TIMEOUT, || {
        fleet
            .devices()
            .iter()
            .all(|d| d["installed_bundles"][AGENT] == "1.0.0")
            .then_some(())
    });
    for (_, till) in &tills {
        assert_eq!(till.current(), Ok(Some("1.0.0".into())));
        assert_eq!(till.journal()["state"], "confirmed");
        assert_eq!(till.agent_processes().len(), 1);
    }

    // 2.0.0 never reaches the control plane. Its canary store's till takes
    // it, the launcher reverts it once the confirm window passes, the agent
    // back on 1.0.0 reports it rolled back, and the rollout pauses before
    // the other store hears of it.
    publish_agent(&fleet, "2.0.0", false);
    let id = fleet.cp.cli_json(&[
        "rollout",
        "create",
        "--release",
        &format!("{AGENT}@2.0.0"),
        "--canary-stores",
        "self-01",
        "--waves",
        "100%",
        "--max-failures",
        "20%",
        "--min-failures",
        "1",
        "--start",
    ])["id"]
        .as_str()
        .expect("rollout id")
        .to_string();
    let ids: BTreeMap<usize, String> = devices.iter().map(|(id, i)| (*i, id.clone())).collect();
    let mut trials: BTreeMap<usize, i64> = BTreeMap::new();
    // Tills seen reporting 2.0.0 `installing` while it was on trial.
    let mut installing = std::collections::BTreeSet::new();
    let shown = eventually("the rollout pauses", TIMEOUT, || {
        for (i, (_, till)) in tills.iter().enumerate() {
            let journal = till.journal();
            if journal["state"] == "trying" {
                trials.insert(i, journal["started_at_ms"].as_i64().unwrap());
                let status = fleet.cp.bundle_status(&ids[&i], AGENT);
                if status["phase"] == "installing" && status["target_version"] == "2.0.0" {
                    installing.insert(i);
                }
            }
        }
        let shown = fleet.cp.cli_json(&["rollout", "show", &id]);
        (shown["state"] == "paused").then_some(shown)
    });
    assert!(
        shown["reason"].as_str().unwrap().contains("wave 1"),
        "{shown}"
    );
    let failures = shown["failures"].as_array().unwrap();
    assert!(!failures.is_empty(), "{shown}");
    for failure in failures {
        assert_eq!(failure["store_id"], "self-01", "{failure}");
        let till = &tills[devices[failure["device_id"].as_str().unwrap()]].1;
        let journal = till.journal();
        assert_eq!(journal["state"], "reverted", "{journal}");
        assert_eq!(journal["to"], "2.0.0", "{journal}");
        let reason = journal["reason"].as_str().unwrap();
        assert!(
            reason.contains("did not reach the control plane"),
            "{journal}"
        );
        assert!(
            installing.contains(&devices[failure["device_id"].as_str().unwrap()]),
            "{failure}: not seen installing while on trial"
        );
        // Within the confirm window (and the launcher's stop of the agent).
        if let Some(started) = trials.get(&devices[failure["device_id"].as_str().unwrap()]) {
            let took = journal["at_ms"].as_i64().unwrap() - started;
            assert!(
                took >= (CONFIRM_SECONDS * 1000) as i64
                    && took < (CONFIRM_SECONDS * 1000 + 12_000) as i64,
                "reverted after {took} ms"
            );
        }
        let status = fleet
            .cp
            .bundle_status(failure["device_id"].as_str().unwrap(), AGENT);
        assert_eq!(status["phase"], "rolled_back", "{status}");
        assert!(
            status["error"]
                .as_str()
                .unwrap()
                .contains("did not reach the control plane"),
            "{status}"
        );
    }
    // The failing tills are back on 1.0.0, one agent each, and nobody
    // outside the canary store was told about 2.0.0.
    std::thread::sleep(Duration::from_secs(3));
    for device in fleet.devices() {
        assert_eq!(device["installed_bundles"][AGENT], "1.0.0", "{device}");
        let id = device["id"].as_str().unwrap();
        let (store, till) = &tills[devices[id]];
        assert_eq!(till.current(), Ok(Some("1.0.0".into())), "{id}");
        assert_eq!(till.agent_processes().len(), 1, "{id}");
        if store != "self-01" {
            assert_ne!(
                fleet.cp.bundle_status(id, AGENT)["target_version"],
                "2.0.0",
                "{device}"
            );
        }
    }
    // A reverted release is not tried again.
    let failed = failures[0]["device_id"].as_str().unwrap();
    std::thread::sleep(Duration::from_secs(CONFIRM_SECONDS));
    assert_eq!(tills[devices[failed]].1.journal()["state"], "reverted");
    check_ok(fleet.cp.cli(&["rollout", "abort", &id]));
}
