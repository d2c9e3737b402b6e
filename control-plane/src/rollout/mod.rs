//! Staged rollouts: a release rolled out to a selection of devices in
//! waves, paused by its own failures, store-safe and crash-safe.
//!
//! - `model`: states, selector and strategy;
//! - `decide`: the engine's decisions as pure functions, unit-tested;
//! - `engine`: the one task that applies them (`EngineHandle` wakes it);
//! - `ops`: the operations behind `AdminService`;
//! - `analysis`: canary analysis, judging a wave's tills against the
//!   control tills of the same stores (pure, like `decide`).

pub mod analysis;
pub(crate) mod canary;
pub(crate) mod decide;
pub(crate) mod engine;
pub mod model;
pub(crate) mod ops;

pub(crate) use ops::Rollouts;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every value of the `state` label of
/// `posfleet_rollout_device_results_total`: how a device's part ended.
pub const DEVICE_RESULTS: [&str; 4] = ["succeeded", "failed", "rolled_back", "timed_out"];

/// The rollout engine's metrics.
#[derive(Clone)]
pub struct RolloutMetrics {
    /// Devices whose desired state a rollout set to its release.
    pub dispatched: IntCounter,
    /// Devices done within a rollout, by `state` (`DEVICE_RESULTS`).
    pub device_results: IntCounterVec,
    /// 1 on the replica that runs the engine, 0 on the others.
    pub engine_leader: IntGauge,
    /// Pauses, by `reason` (`crate::metrics::PAUSE_REASONS`).
    pub pauses: IntCounterVec,
    /// Time the engine took per tick (every rollout it looks after).
    pub tick_seconds: Histogram,
    /// Canary analysis verdicts reached, by `verdict` (`ANALYSIS_VERDICTS`).
    pub analysis_verdicts: IntCounterVec,
}

/// Every value of the `verdict` label of
/// `posfleet_rollout_analysis_verdicts_total`.
pub const ANALYSIS_VERDICTS: [&str; 3] = ["pass", "fail", "inconclusive"];

impl RolloutMetrics {
    pub fn register(registry: &Registry) -> RolloutMetrics {
        let dispatched = IntCounter::new(
            "posfleet_rollout_dispatched_total",
            "Devices whose desired state a rollout set to its release.",
        )
        .expect("static metric definition is valid");
        let device_results = IntCounterVec::new(
            Opts::new(
                "posfleet_rollout_device_results_total",
                "Devices done within a rollout, by how they ended.",
            ),
            &["state"],
        )
        .expect("static metric definition is valid");
        let engine_leader = IntGauge::new(
            "posfleet_rollout_engine_leader",
            "Whether this replica runs the rollout engine (1) or stands by (0).",
        )
        .expect("static metric definition is valid");
        let pauses = IntCounterVec::new(
            Opts::new(
                "posfleet_rollout_pauses_total",
                "Rollouts paused, by reason: failure_threshold (the engine), analysis_fail or \
                 analysis_inconclusive (canary analysis), or operator.",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let tick_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "posfleet_rollout_engine_tick_duration_seconds",
                "Time the rollout engine took for one tick over every rollout it drives.",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 15).expect("valid buckets")),
        )
        .expect("static metric definition is valid");
        let analysis_verdicts = IntCounterVec::new(
            Opts::new(
                "posfleet_rollout_analysis_verdicts_total",
                "Waves whose canary analysis reached a verdict, by verdict.",
            ),
            &["verdict"],
        )
        .expect("static metric definition is valid");
        for collector in [
            Box::new(dispatched.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(device_results.clone()),
            Box::new(engine_leader.clone()),
            Box::new(pauses.clone()),
            Box::new(tick_seconds.clone()),
            Box::new(analysis_verdicts.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        for state in DEVICE_RESULTS {
            device_results.with_label_values(&[state]);
        }
        for reason in crate::metrics::PAUSE_REASONS {
            pauses.with_label_values(&[reason]);
        }
        for verdict in ANALYSIS_VERDICTS {
            analysis_verdicts.with_label_values(&[verdict]);
        }
        RolloutMetrics {
            analysis_verdicts,
            dispatched,
            device_results,
            engine_leader,
            pauses,
            tick_seconds,
        }
    }
}
