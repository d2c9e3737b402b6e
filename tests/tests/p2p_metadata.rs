//! TUF metadata from store peers, with real processes: a till whose
//! repository URL leads nowhere (its WAN is down) but whose store peer has
//! the metadata and the bundle gets both from the peer, verified, and
//! installs; metadata a peer tampered with is rejected and nothing installs.

use posfleet_e2e::fleet::{Fleet, assert_slot_whole, logged};
use posfleet_e2e::{Process, check_ok, enrolled_device_id, eventually};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);
/// A few pieces of 1 MiB.
const PAYLOAD: usize = 3 << 20;
/// Nothing listens there: connections are refused at once.
const DEAD_REPOSITORY: &str = "http://127.0.0.1:1/repo/";

const STORE: &str = "oslo-01";

/// A control plane with pos-app 1.0.0 published and store `oslo-01` open to
/// two tills, which the tests start and hold themselves.
struct Store {
    fleet: Fleet,
    token: String,
}

impl Store {
    /// Returns the bundle size too.
    fn start() -> (Store, u64) {
        let fleet = Fleet::builder().start();
        let size = fleet.publish("1.0.0", true, PAYLOAD);
        fleet.create_store(STORE, "UTC");
        let token = fleet.enrollment_token(STORE, 2);
        (Store { fleet, token }, size)
    }

    /// Starts a till of the store that reaches the bundle repository at
    /// `repository_url`; returns its data dir, device id and process.
    fn till(&self, name: &str, repository_url: &str) -> (PathBuf, String, Process) {
        let data = self.fleet.dir.path().join(name);
        let args = self.fleet.agent_args(Some(repository_url), &[]);
        let process = self.fleet.spawn_agent(&data, &self.token, &args);
        let id = eventually("the till enrolled", TIMEOUT, || enrolled_device_id(&data));
        (data, id, process)
    }

    fn origin(&self) -> String {
        format!("http://{}/repo/", self.fleet.cp.http_address)
    }

    fn assign(&self, device: &str) {
        check_ok(
            self.fleet
                .cp
                .cli(&["device", "assign", device, "pos-app@1.0.0"]),
        );
    }

    fn wait_active(&self, device: &str) -> Value {
        eventually("pos-app 1.0.0 active", TIMEOUT, || {
            let status = self.fleet.cp.bundle_status(device, "pos-app");
            (status["active_version"] == "1.0.0").then_some(status)
        })
    }
}

/// The till's libp2p PeerId, from its log.
fn peer_id(process: &Process) -> String {
    process.wait_for_log("Sharing bundles with the store.", TIMEOUT)["peer_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_till_without_its_wan_takes_verified_metadata_and_the_bundle_from_its_peer() {
    let (store, size) = Store::start();
    let (seeder_data, seeder, seeder_process) = store.till("seeder", &store.origin());
    store.assign(&seeder);
    store.wait_active(&seeder);

    let (data, offline, process) = store.till("offline", DEAD_REPOSITORY);
    store.assign(&offline);
    let status = store.wait_active(&offline);
    assert_slot_whole(&data);
    assert_eq!(status["bytes_from_origin"], 0, "{status}");
    assert!(
        status["bytes_from_peers"].as_u64().unwrap() >= size,
        "{status}"
    );
    // The metadata came from the peer, and was verified before use.
    let from_peer = logged(
        &process,
        "Repository metadata from a store peer, verified (the origin is unreachable).",
    );
    assert!(!from_peer.is_empty(), "{}", process.lines().join("\n"));
    assert_eq!(from_peer[0]["peer_id"], peer_id(&seeder_process).as_str());
    assert!(
        process
            .lines()
            .iter()
            .any(|l| l.contains("Chunk list from a store peer")),
        "{}",
        process.lines().join("\n")
    );
    // What the offline till saved is what its peer had verified.
    for name in ["timestamp.json", "snapshot.json", "targets.json"] {
        assert_eq!(
            std::fs::read(data.join("tuf").join(name)).unwrap(),
            std::fs::read(seeder_data.join("tuf").join(name)).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn metadata_a_peer_tampered_with_is_rejected_and_nothing_installs() {
    let (store, _) = Store::start();
    let (seeder_data, seeder, seeder_process) = store.till("seeder", &store.origin());
    store.assign(&seeder);
    store.wait_active(&seeder);
    let seeder_peer = peer_id(&seeder_process);
    // The seeder's saved targets now claim another length for the bundle:
    // well formed, but not what the targets key signed.
    let path = seeder_data.join("tuf/targets.json");
    let mut targets: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let length = &mut targets["signed"]["targets"]["pos-app/1.0.0"]["length"];
    *length = (length.as_u64().unwrap() + 1).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&targets).unwrap()).unwrap();

    let (data, offline, process) = store.till("offline", DEAD_REPOSITORY);
    store.assign(&offline);
    let rejected = process.wait_for_log("Repository metadata from a store peer rejected.", TIMEOUT);
    assert_eq!(rejected["peer_id"], seeder_peer.as_str(), "{rejected}");
    let error = rejected["error"].as_str().unwrap();
    assert!(error.contains("targets"), "{error}");
    // It keeps asking (and keeps refusing) while the till waits.
    eventually("a second refusal", TIMEOUT, || {
        (logged(&process, "Repository metadata from a store peer rejected.").len() >= 2)
            .then_some(())
    });
    assert!(
        logged(
            &process,
            "Repository metadata from a store peer, verified (the origin is unreachable)."
        )
        .is_empty()
    );
    assert!(
        !data.join("tuf/targets.json").exists(),
        "rejected metadata was saved"
    );
    assert!(!data.join("slots/pos-app").exists(), "something installed");
    let status = store.fleet.cp.bundle_status(&offline, "pos-app");
    assert_ne!(status["active_version"], "1.0.0", "{status}");
}
