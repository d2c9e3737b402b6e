//! Bundles shared inside a store with real processes: tills running
//! `posfleet-agent` on loopback, each with its own libp2p identity, the
//! control plane handing out the store's membership list, and the
//! repository counting the bundle bytes it sends
//! (`posfleet_repository_target_bytes_sent_total`).

use posfleet_e2e::link::PacedLink;
use posfleet_e2e::{
    ControlPlane, Process, check_ok, enrolled_device_id, eventually, pos_app_source, start_agent,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(180);
/// Bundle payload: 24 pieces of 1 MiB and a bit.
const PAYLOAD: usize = 24 << 20;
const SENT: &str = "posfleet_repository_target_bytes_sent_total";

struct Fleet {
    dir: tempfile::TempDir,
    cp: ControlPlane,
    keys: PathBuf,
    /// (store, device data dir, process)
    tills: Vec<(String, PathBuf, Process)>,
}

impl Fleet {
    fn start() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(
            &dir.path().join("cp"),
            None,
            "127.0.0.1:0",
            "127.0.0.1:0",
            &["--heartbeat-interval-seconds", "1"],
        );
        let keys = dir.path().join("keys");
        cp.init_repository(&keys);
        Fleet {
            dir,
            cp,
            keys,
            tills: Vec::new(),
        }
    }

    /// Creates `store` and starts `count` tills in it with `extra` flags.
    fn store(&mut self, store: &str, count: usize, extra: &[&str]) {
        self.store_via(store, count, extra, None);
    }

    /// `store`, with the tills reaching the bundle repository at
    /// `repository_url` (a `Wan`) when given; returns the flags they run
    /// with.
    fn store_via(
        &mut self,
        store: &str,
        count: usize,
        extra: &[&str],
        repository_url: Option<&str>,
    ) -> Vec<String> {
        self.cp.cli_json(&[
            "store",
            "create",
            store,
            "--name",
            store,
            "--time-zone",
            "UTC",
        ]);
        let token = self.cp.cli_json(&[
            "enroll-token",
            "create",
            "--store",
            store,
            "--uses",
            &count.to_string(),
        ]);
        let mut owned = self.cp.repository_args(&self.keys);
        if let Some(url) = repository_url {
            let at = owned.iter().position(|a| a == "--repository-url").unwrap();
            owned[at + 1] = url.to_string();
        }
        owned.extend(["--install-check-interval-seconds".into(), "1".into()]);
        owned.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        for till in 0..count {
            let data = self.dir.path().join(format!("{store}-{till}"));
            let process = start_agent(
                &self.cp.url(),
                &data,
                token["secret"].as_str().unwrap(),
                &args,
            );
            self.tills.push((store.to_string(), data, process));
        }
        owned
    }

    /// Publishes pos-app `version` with the test payload; returns the
    /// bundle's size in bytes.
    fn publish(&self, version: &str) -> u64 {
        self.publish_sized(version, PAYLOAD)
    }

    fn publish_sized(&self, version: &str, payload: usize) -> u64 {
        let src = self.dir.path().join(format!("pos-app-{version}"));
        pos_app_source(&src, version, true, payload);
        let file = self.cp.publish(&src, &self.keys);
        std::fs::metadata(file).unwrap().len()
    }

    /// Waits until every till of `store` holds a membership list naming
    /// all `count` of them and has had a moment to connect.
    fn wait_for_membership(&self, store: &str, count: usize) {
        for (_, _, process) in self.tills.iter().filter(|(s, _, _)| s == store) {
            eventually("the store's membership list", TIMEOUT, || {
                process
                    .lines()
                    .iter()
                    .rev()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find(|v| v["message"] == "Store membership list updated.")
                    .filter(|v| v["members"] == count)
                    .map(|_| ())
            });
        }
        // Members are dialed as soon as the list arrives.
        std::thread::sleep(Duration::from_secs(2));
    }

    fn assign(&self, store: &str, version: &str) {
        check_ok(self.cp.cli(&[
            "device",
            "assign",
            "--store",
            store,
            &format!("pos-app@{version}"),
        ]));
    }

    /// Waits until every till of `stores` runs pos-app `version`.
    fn wait_until_active(&self, stores: &[&str], count: usize, version: &str) {
        eventually(&format!("{stores:?} on pos-app {version}"), TIMEOUT, || {
            let devices: Vec<Value> = self
                .cp
                .cli_json(&["device", "list"])
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| stores.contains(&d["store_id"].as_str().unwrap()))
                .cloned()
                .collect();
            (devices.len() == count
                && devices
                    .iter()
                    .all(|d| d["installed_bundles"]["pos-app"] == version))
            .then_some(())
        });
    }

    fn store_show(&self, store: &str) -> Value {
        self.cp.cli_json(&["store", "show", store])
    }
}

/// A store's WAN link: a paced TCP proxy in front of the control plane's
/// HTTP listener (the bundle repository), its rate shared by all its
/// connections, as one link is; it counts the bytes it delivered to the
/// store.
struct Wan {
    link: PacedLink,
}

impl Wan {
    fn start(upstream: &str, bytes_per_second: u64) -> Wan {
        Wan {
            link: PacedLink::start(upstream, bytes_per_second),
        }
    }

    fn repository_url(&self) -> String {
        format!("http://{}/repo/", self.link.address())
    }

    fn delivered(&self) -> u64 {
        self.link.delivered_to_clients()
    }
}

/// The payload in a till's active slot is the one published.
fn assert_slot_whole(data: &Path) {
    let slot = data.join("slots/pos-app/current");
    let want = std::fs::read_to_string(slot.join("payload.sha256")).unwrap();
    let have = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(slot.join("payload.bin")).unwrap(),
        ))
    };
    assert_eq!(have, want.trim(), "{}", data.display());
}

/// The transfer row of `store show` for pos-app `version`.
fn transfer(shown: &Value, version: &str) -> Value {
    shown["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["bundle"] == "pos-app" && t["version"] == version)
        .cloned()
        .unwrap_or_else(|| panic!("no transfer of {version}: {shown}"))
}

#[test]
fn eight_tills_starting_at_once_take_a_bundle_from_the_origin_once() {
    let mut fleet = Fleet::start();
    let size = fleet.publish("1.0.0");
    fleet.store("paris-01", 8, &[]);
    fleet.wait_for_membership("paris-01", 8);
    let before = fleet.cp.metric(SENT);
    // One assignment reaches all 8 with their next heartbeat (1 s).
    fleet.assign("paris-01", "1.0.0");
    fleet.wait_until_active(&["paris-01"], 8, "1.0.0");
    let sent = fleet.cp.metric(SENT) - before;
    assert!(
        sent <= 1.01 * size as f64,
        "the origin sent {sent} bytes for a bundle of {size}"
    );
    for (_, data, _) in &fleet.tills {
        assert_slot_whole(data);
    }
    // The tills' own account agrees, as ops see it.
    let row = transfer(&fleet.store_show("paris-01"), "1.0.0");
    assert_eq!(row["tills"], 8, "{row}");
    assert_eq!(row["size_bytes"], size, "{row}");
    let from_origin = row["bytes_from_origin"].as_u64().unwrap();
    let from_peers = row["bytes_from_peers"].as_u64().unwrap();
    assert!(from_origin <= size + (1 << 20), "{row}");
    // Every byte counted once, but for a piece asked of two peers at the
    // end of a download.
    assert!(from_origin + from_peers >= 8 * size, "{row}");
    assert!(
        from_origin + from_peers <= 8 * size + 8 * (1 << 20),
        "{row}"
    );
    assert!(
        fleet
            .cp
            .metric(r#"posfleet_bundle_bytes_total{source="peer"}"#)
            >= (7 * size) as f64
    );
}

#[test]
fn three_stores_of_five_take_it_once_per_store() {
    let mut fleet = Fleet::start();
    let size = fleet.publish("1.0.0");
    let stores = ["lyon-01", "nice-01", "lille-01"];
    for store in stores {
        fleet.store(store, 5, &[]);
    }
    for store in stores {
        fleet.wait_for_membership(store, 5);
    }
    let before = fleet.cp.metric(SENT);
    for store in stores {
        fleet.assign(store, "1.0.0");
    }
    fleet.wait_until_active(&stores, 15, "1.0.0");
    let sent = fleet.cp.metric(SENT) - before;
    let piece = (1u64 << 20) as f64;
    assert!(
        (sent - 3.0 * size as f64).abs() <= 3.0 * piece,
        "the origin sent {sent} bytes for 3 stores and a bundle of {size}"
    );
    for store in stores {
        let row = transfer(&fleet.store_show(store), "1.0.0");
        assert_eq!(row["tills"], 5, "{row}");
        assert!(
            row["bytes_from_origin"].as_u64().unwrap() <= size + (1 << 20),
            "{row}"
        );
    }
}

#[test]
fn the_store_completes_when_its_origin_fetcher_is_killed_halfway() {
    let mut fleet = Fleet::start();
    // Large and slow enough that the pieces lost with the fetcher (the one
    // it was receiving, those it had not passed on yet) are a few percent:
    // about 16 s for the bundle across the link.
    let size = fleet.publish_sized("1.0.0", 64 << 20);
    let wan = Wan::start(&fleet.cp.http_address, 4 << 20);
    let args = fleet.store_via("caen-01", 5, &[], Some(&wan.repository_url()));
    fleet.wait_for_membership("caen-01", 5);
    let before = wan.delivered();
    fleet.assign("caen-01", "1.0.0");
    let fetcher = eventually("a till fetching from the origin", TIMEOUT, || {
        fleet.tills.iter().position(|(_, _, process)| {
            process
                .lines()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|v| v["message"] == "Fetching from the origin.")
        })
    });
    eventually("half the bundle across the WAN", TIMEOUT, || {
        (wan.delivered() - before >= size / 2).then_some(())
    });
    fleet.tills[fetcher].2.kill9();
    let killed = Instant::now();
    let at_kill = wan.delivered() - before;
    assert!(
        at_kill < size * 3 / 4,
        "killed after {at_kill} of {size} bytes"
    );

    // The other four finish without it.
    for (i, (_, data, _)) in fleet.tills.iter().enumerate() {
        if i == fetcher {
            continue;
        }
        let id = enrolled_device_id(data).unwrap();
        eventually("the others on pos-app 1.0.0", TIMEOUT, || {
            (fleet.cp.bundle_status(&id, "pos-app")["active_version"] == "1.0.0").then_some(())
        });
    }
    println!(
        "{at_kill} of {size} bytes across the WAN when the fetcher was killed; the others done {:?} later",
        killed.elapsed()
    );
    // The killed till, started again, resumes from what it has and its peers.
    let restarted = Instant::now();
    let data = fleet.tills[fetcher].1.clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleet.tills[fetcher].2 = start_agent(&fleet.cp.url(), &data, "", &args);
    fleet.wait_until_active(&["caen-01"], 5, "1.0.0");
    let crossed = wan.delivered() - before;
    println!(
        "restarted till done after {:?}; {crossed} bytes crossed",
        restarted.elapsed()
    );
    assert!(
        crossed as f64 <= 1.05 * size as f64,
        "{crossed} bytes crossed the WAN link for a bundle of {size}"
    );
    for (_, data, _) in &fleet.tills {
        assert_slot_whole(data);
    }
}

#[test]
fn a_till_whose_peers_are_gone_falls_back_to_the_origin_after_the_delay() {
    let mut fleet = Fleet::start();
    let size = fleet.publish("1.0.0");
    fleet.store("brest-01", 2, &["--p2p-origin-fallback-delay-seconds", "4"]);
    fleet.wait_for_membership("brest-01", 2);
    // One till goes away; the other still lists it as a member.
    fleet.tills[1].2.kill9();
    let alone = enrolled_device_id(&fleet.tills[0].1).unwrap();
    let assigned = Instant::now();
    check_ok(fleet.cp.cli(&["device", "assign", &alone, "pos-app@1.0.0"]));
    eventually("the till alone on pos-app 1.0.0", TIMEOUT, || {
        (fleet.cp.bundle_status(&alone, "pos-app")["active_version"] == "1.0.0").then_some(())
    });
    let took = assigned.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "installed after {took:?}: it did not wait for its peers"
    );
    let status = fleet.cp.bundle_status(&alone, "pos-app");
    assert_eq!(status["bytes_from_origin"], size, "{status}");
    assert_eq!(status["bytes_from_peers"], 0, "{status}");
}

#[test]
fn a_revoked_till_is_refused_and_dropped_from_its_store() {
    let mut fleet = Fleet::start();
    fleet.publish("1.0.0");
    fleet.store("metz-01", 3, &[]);
    fleet.wait_for_membership("metz-01", 3);
    let stolen = enrolled_device_id(&fleet.tills[2].1).unwrap();
    let shown = fleet.cp.cli_json(&[
        "device",
        "revoke",
        &stolen,
        "--reason",
        "stolen from the shop floor",
    ]);
    assert!(!shown["revoked_at"].as_str().unwrap().is_empty(), "{shown}");
    // The other two learn a list without it; it hears "revoked".
    for (_, _, process) in &fleet.tills[..2] {
        eventually("a list without the revoked till", TIMEOUT, || {
            process
                .lines()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|v| v["message"] == "Store membership list updated." && v["members"] == 2)
                .then_some(())
        });
    }
    fleet.tills[2].2.wait_for_log("Heartbeat refused.", TIMEOUT);
    let refused = fleet.tills[2]
        .2
        .lines()
        .into_iter()
        .find(|l| l.contains("Heartbeat refused."))
        .unwrap();
    assert!(refused.contains("revoked"), "{refused}");
    // The store's release reaches the two, not the revoked one.
    fleet.assign("metz-01", "1.0.0");
    for (_, data, _) in &fleet.tills[..2] {
        let id = enrolled_device_id(data).unwrap();
        eventually("the store's tills on pos-app 1.0.0", TIMEOUT, || {
            (fleet.cp.bundle_status(&id, "pos-app")["active_version"] == "1.0.0").then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(!fleet.tills[2].1.join("slots/pos-app").exists());
}
