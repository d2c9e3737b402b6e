//! Delta bundles with real processes: `bundle publish` makes a signed delta
//! from the version tills run, and tills that hold that exact version
//! rebuild the release from it, fetched once per store,
//! and check it against the release's signed hash before they install it;
//! a till whose base changed on disk fetches the whole release instead and
//! says why.

use posfleet_e2e::eventually;
use posfleet_e2e::fleet::{Fleet, TIMEOUT, assert_slot_whole, logged};
use serde_json::Value;

/// Incompressible bytes both releases share (a library the point release
/// leaves alone), 8 pieces of 1 MiB.
const PAYLOAD: usize = 8 << 20;
const SENT: &str = "posfleet_repository_target_bytes_sent_total";
const SAVED: &str = "posfleet_delta_bytes_saved_total";
const FALLBACKS: &str = "posfleet_delta_fallbacks_total";

/// What a till last reported of pos-app, once it reports `version` active.
fn settled_status(fleet: &Fleet, device: &str, version: &str) -> Value {
    eventually(
        &format!("{device} reports pos-app {version}"),
        TIMEOUT,
        || {
            let status = fleet.cp.bundle_status(device, "pos-app");
            (status["active_version"] == version && status["phase"] == "installed")
                .then_some(status)
        },
    )
}

#[test]
fn a_store_rebuilds_a_point_release_from_one_delta_fetched_once() {
    let mut fleet = Fleet::builder().start();
    fleet.publish("1.0.0", true, PAYLOAD);
    fleet.store("paris-02", 3, &[]);
    fleet.wait_for_membership("paris-02", 3);
    fleet.assign("paris-02", "pos-app@1.0.0");
    fleet.wait_until_active(&["paris-02"], "1.0.0");
    // `bundle list` says how many tills run each version; `bundle publish`
    // makes a delta from the ones they run, without being told.
    eventually("the three tills counted on 1.0.0", TIMEOUT, || {
        let listed = fleet.cp.cli_json(&["bundle", "list", "--name", "pos-app"]);
        (listed[0]["target"] == "pos-app/1.0.0" && listed[0]["active_devices"] == 3).then_some(())
    });
    let (size, delta) = fleet.publish_with_delta("1.1.0", "1.0.0", false);
    assert!(delta * 20 < size, "a delta of {delta} bytes for {size}");
    let (sent_before, saved_before) = (fleet.cp.metric(SENT), fleet.cp.metric(SAVED));
    fleet.assign("paris-02", "pos-app@1.1.0");
    fleet.wait_until_active(&["paris-02"], "1.1.0");

    // The store's WAN link carried the delta once, not the release.
    let sent = fleet.cp.metric(SENT) - sent_before;
    assert!(
        sent <= delta as f64 + 4096.0,
        "the origin sent {sent} bytes; the delta is {delta}, the release {size}"
    );
    for till in &fleet.tills {
        assert_slot_whole(&till.data);
        let status = settled_status(&fleet, &till.device_id(), "1.1.0");
        assert_eq!(status["bytes_saved_by_delta"], size - delta, "{status}");
        assert_eq!(status["delta_error"], "", "{status}");
        let rebuilt = logged(&till.process, "Bundle rebuilt from a delta and verified.");
        assert_eq!(rebuilt.len(), 1, "{:?}", till.process.lines());
        assert_eq!(rebuilt[0]["base"], "pos-app/1.0.0");
    }
    let saved = eventually("the savings are counted", TIMEOUT, || {
        let saved = fleet.cp.metric(SAVED) - saved_before;
        (saved >= 3.0 * (size - delta) as f64).then_some(saved)
    });
    assert_eq!(saved, 3.0 * (size - delta) as f64);
    // Ops see it in `device show`.
    let device = fleet.tills[0].device_id();
    let shown = String::from_utf8(
        fleet
            .cp
            .cli(&["device", "show", &device, "--output", "table"])
            .stdout,
    )
    .unwrap();
    assert!(shown.contains("saved 8."), "{shown}");
}

#[test]
fn a_till_whose_base_changed_on_disk_fetches_the_whole_release_and_says_why() {
    let mut fleet = Fleet::builder().start();
    fleet.publish("1.0.0", true, PAYLOAD);
    fleet.store("lyon-02", 1, &[]);
    fleet.assign("lyon-02", "pos-app@1.0.0");
    fleet.wait_until_active(&["lyon-02"], "1.0.0");
    // Someone edited the installed program's configuration by hand: the
    // slot no longer packs into the signed 1.0.0, so the delta cannot apply.
    let conf = fleet.tills[0].data.join("slots/pos-app/1.0.0/pos-app.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("# edited on the till\n");
    std::fs::write(&conf, text).unwrap();

    let (size, _delta) = fleet.publish_with_delta("1.1.0", "1.0.0", true);
    let (sent_before, fallbacks_before) = (fleet.cp.metric(SENT), fleet.cp.metric(FALLBACKS));
    fleet.assign("lyon-02", "pos-app@1.1.0");
    fleet.wait_until_active(&["lyon-02"], "1.1.0");
    assert_slot_whole(&fleet.tills[0].data);
    let status = settled_status(&fleet, &fleet.tills[0].device_id(), "1.1.0");
    assert_eq!(status["bytes_saved_by_delta"], 0, "{status}");
    let why = status["delta_error"].as_str().unwrap();
    assert!(
        why.contains("pos-app/1.0.0 as installed does not pack into its signed bundle"),
        "{status}"
    );
    let sent = fleet.cp.metric(SENT) - sent_before;
    assert!(sent >= size as f64, "the origin sent {sent} of {size}");
    eventually("the fallback is counted", TIMEOUT, || {
        (fleet.cp.metric(FALLBACKS) - fallbacks_before == 1.0).then_some(())
    });
    assert_eq!(
        logged(
            &fleet.tills[0].process,
            "Cannot use the delta; fetching the whole bundle."
        )
        .len(),
        1
    );
}
