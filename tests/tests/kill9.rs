//! A short kill -9 campaign in the default test run (the long one is
//! `cargo run --release -p posfleet-e2e --bin kill9-campaign`).

use posfleet_e2e::kill9::{self, Options};

#[test]
fn every_kill_leaves_one_whole_version_and_the_agent_converges() {
    let report = kill9::run(&Options {
        trials: 12,
        payload_bytes: 4 << 20,
        health_seconds: 0.3,
        seed: rand::random(),
    });
    eprintln!("{report:#?}");
    assert_eq!(report.torn, 0, "{report:#?}");
    assert_eq!(report.converged, report.trials, "{report:#?}");
    assert!(report.failures.is_empty(), "{report:#?}");
}
