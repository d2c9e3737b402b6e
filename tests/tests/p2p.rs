//! Bundles shared inside a store with real processes: tills running
//! `posfleet-agent` on loopback, each with its own libp2p identity, the
//! control plane handing out the store's membership list, and the
//! repository counting the bundle bytes it sends
//! (`posfleet_repository_target_bytes_sent_total`).

use posfleet_e2e::fleet::{Fleet, StoreSpec, TIMEOUT, assert_slot_whole, logged};
use posfleet_e2e::link::PacedLink;
use posfleet_e2e::{check_ok, eventually};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Bundle payload: 24 pieces of 1 MiB and a bit.
const PAYLOAD: usize = 24 << 20;
const SENT: &str = "posfleet_repository_target_bytes_sent_total";

fn store_show(fleet: &Fleet, store: &str) -> Value {
    fleet.cp.cli_json(&["store", "show", store])
}

/// The transfer row of `store show` for pos-app `version` once every till
/// of the store has reported the bytes it got: a till's heartbeat says it
/// runs the version before its progress report with the counts is stored
/// (they travel apart), so the row is read when its counts stop being short
/// of `tills` whole copies of `size` bytes, or at the timeout as it is.
fn settled_transfer(fleet: &Fleet, store: &str, version: &str, tills: u64, size: u64) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let row = transfer(&store_show(fleet, store), version);
        let counted = row["bytes_from_origin"].as_u64().unwrap_or(0)
            + row["bytes_from_peers"].as_u64().unwrap_or(0);
        if (row["tills"] == tills && counted >= tills * size) || Instant::now() > deadline {
            return row;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
    let mut fleet = Fleet::builder().start();
    let size = fleet.publish("1.0.0", true, PAYLOAD);
    fleet.store("paris-01", 8, &[]);
    fleet.wait_for_membership("paris-01", 8);
    let before = fleet.cp.metric(SENT);
    // One assignment reaches all 8 with their next heartbeat (1 s).
    fleet.assign("paris-01", "pos-app@1.0.0");
    fleet.wait_until_active(&["paris-01"], "1.0.0");
    let sent = fleet.cp.metric(SENT) - before;
    assert!(
        sent <= 1.01 * size as f64,
        "the origin sent {sent} bytes for a bundle of {size}"
    );
    for till in &fleet.tills {
        assert_slot_whole(&till.data);
    }
    // The tills' own account agrees, as ops see it.
    let row = settled_transfer(&fleet, "paris-01", "1.0.0", 8, size);
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
    let mut fleet = Fleet::builder().start();
    let size = fleet.publish("1.0.0", true, PAYLOAD);
    let stores = ["lyon-01", "nice-01", "lille-01"];
    for store in stores {
        fleet.store(store, 5, &[]);
    }
    for store in stores {
        fleet.wait_for_membership(store, 5);
    }
    let before = fleet.cp.metric(SENT);
    for store in stores {
        fleet.assign(store, "pos-app@1.0.0");
    }
    fleet.wait_until_active(&stores, "1.0.0");
    let sent = fleet.cp.metric(SENT) - before;
    let piece = (1u64 << 20) as f64;
    assert!(
        (sent - 3.0 * size as f64).abs() <= 3.0 * piece,
        "the origin sent {sent} bytes for 3 stores and a bundle of {size}"
    );
    for store in stores {
        let row = settled_transfer(&fleet, store, "1.0.0", 5, size);
        assert_eq!(row["tills"], 5, "{row}");
        assert!(
            row["bytes_from_origin"].as_u64().unwrap() <= size + (1 << 20),
            "{row}"
        );
    }
}

#[test]
fn the_store_completes_when_its_origin_fetcher_is_killed_halfway() {
    let mut fleet = Fleet::builder().start();
    // Large and slow enough that the pieces lost with the fetcher (the one
    // it was receiving, those it had not passed on yet) are a few percent:
    // about 16 s for the bundle across the link.
    let size = fleet.publish("1.0.0", true, 64 << 20);
    let wan = PacedLink::start(&fleet.cp.http_address, 4 << 20);
    let url = format!("http://{}/repo/", wan.address());
    fleet.open_store(&StoreSpec {
        repository_url: Some(&url),
        ..StoreSpec::new("caen-01", 5)
    });
    fleet.wait_for_membership("caen-01", 5);
    let before = wan.delivered_to_clients();
    fleet.assign("caen-01", "pos-app@1.0.0");
    let fetcher = eventually("a till fetching from the origin", TIMEOUT, || {
        fleet
            .tills
            .iter()
            .position(|till| !logged(&till.process, "Fetching from the origin.").is_empty())
    });
    eventually("half the bundle across the WAN", TIMEOUT, || {
        (wan.delivered_to_clients() - before >= size / 2).then_some(())
    });
    fleet.tills[fetcher].process.kill9();
    let killed = Instant::now();
    let at_kill = wan.delivered_to_clients() - before;
    assert!(
        at_kill < size * 3 / 4,
        "killed after {at_kill} of {size} bytes"
    );

    // The other four finish without it.
    for (i, till) in fleet.tills.iter().enumerate() {
        if i == fetcher {
            continue;
        }
        let id = till.device_id();
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
    fleet.restart_till(fetcher);
    fleet.wait_until_active(&["caen-01"], "1.0.0");
    let crossed = wan.delivered_to_clients() - before;
    println!(
        "restarted till done after {:?}; {crossed} bytes crossed",
        restarted.elapsed()
    );
    // What crossed but died with the fetcher crosses again: the range it
    // was receiving, the pieces it had not passed on, and what sat in its
    // socket's kernel buffers (several MiB once TCP has grown them, more
    // when a loaded machine is slow to read). Measured at 1.00 to 1.09 of
    // the bundle on a quiet machine and 1.155 with a build running beside
    // it; a second download of the whole would be 1.5 or more.
    assert!(
        crossed as f64 <= 1.25 * size as f64,
        "{crossed} bytes crossed the WAN link for a bundle of {size}"
    );
    for till in &fleet.tills {
        assert_slot_whole(&till.data);
    }
}

#[test]
fn a_till_whose_peers_are_gone_falls_back_to_the_origin_after_the_delay() {
    let mut fleet = Fleet::builder().start();
    let size = fleet.publish("1.0.0", true, PAYLOAD);
    fleet.store("brest-01", 2, &["--p2p-origin-fallback-delay-seconds", "4"]);
    fleet.wait_for_membership("brest-01", 2);
    // One till goes away; the other still lists it as a member.
    fleet.tills[1].process.kill9();
    let alone = fleet.tills[0].device_id();
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
    let mut fleet = Fleet::builder().start();
    fleet.publish("1.0.0", true, PAYLOAD);
    fleet.store("metz-01", 3, &[]);
    fleet.wait_for_membership("metz-01", 3);
    let stolen = fleet.tills[2].device_id();
    let shown = fleet.cp.cli_json(&[
        "device",
        "revoke",
        &stolen,
        "--reason",
        "stolen from the shop floor",
    ]);
    assert!(!shown["revoked_at"].as_str().unwrap().is_empty(), "{shown}");
    // The other two learn a list without it; it hears "revoked".
    for till in &fleet.tills[..2] {
        eventually("a list without the revoked till", TIMEOUT, || {
            logged(&till.process, "Store membership list updated.")
                .iter()
                .any(|v| v["members"] == 2)
                .then_some(())
        });
    }
    fleet.tills[2]
        .process
        .wait_for_log("Heartbeat refused.", TIMEOUT);
    let refused = fleet.tills[2]
        .process
        .lines()
        .into_iter()
        .find(|l| l.contains("Heartbeat refused."))
        .unwrap();
    assert!(refused.contains("revoked"), "{refused}");
    // The store's release reaches the two, not the revoked one.
    fleet.assign("metz-01", "pos-app@1.0.0");
    for till in &fleet.tills[..2] {
        let id = till.device_id();
        eventually("the store's tills on pos-app 1.0.0", TIMEOUT, || {
            (fleet.cp.bundle_status(&id, "pos-app")["active_version"] == "1.0.0").then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(!fleet.tills[2].data.join("slots/pos-app").exists());
}
