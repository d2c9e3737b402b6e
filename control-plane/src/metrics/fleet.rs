//! The gauges read from the database at a scrape (`FleetSnapshot`): devices
//! by status, store, model, agent version and bundle state, health, rollout
//! progress, the stores' origin copies and the webhook backlog; and the
//! per-store byte counters.
//!
//! Cardinality is bounded: no device id anywhere; per-store series for at
//! most `store_series_limit` stores; at most `MAX_VALUES_PER_LABEL` models,
//! agent versions and versions per bundle (the rest summed as `_other`);
//! rollout series only for running or paused rollouts.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use prometheus::{GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::storage::FleetSnapshot;

/// Most distinct values of a reported label (hardware model, agent
/// version, active version per bundle); the rest are summed as `_other`.
pub const MAX_VALUES_PER_LABEL: usize = 50;
/// The label value standing for what a cap left out.
pub const OTHER: &str = "_other";
/// The heartbeat age quantiles published.
pub const HEARTBEAT_AGE_QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 1.0];
/// Every value of the `state` label of the rollout device gauges.
pub const ROLLOUT_DEVICE_STATES: [&str; 4] = ["succeeded", "failed", "in_flight", "pending"];
/// Every value of the `kind` label of `posfleet_devices_peripheral_failed`.
pub const PERIPHERAL_KINDS: [&str; 4] = ["printer", "scanner", "cash_drawer", "other"];
/// Every rollout state, for `posfleet_rollouts`.
pub const ROLLOUT_STATES: [&str; 6] = [
    "draft",
    "running",
    "paused",
    "completed",
    "aborted",
    "rolled_back",
];

fn int_gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let gauges =
        IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition is valid");
    registry
        .register(Box::new(gauges.clone()))
        .expect("each metric is registered once");
    gauges
}

fn float_gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let gauges =
        GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition is valid");
    registry
        .register(Box::new(gauges.clone()))
        .expect("each metric is registered once");
    gauges
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("static metric definition is valid");
    registry
        .register(Box::new(gauge.clone()))
        .expect("each metric is registered once");
    gauge
}

#[derive(Clone)]
pub struct FleetMetrics {
    devices: IntGaugeVec,
    stores: IntGauge,
    by_hardware: IntGaugeVec,
    by_agent_version: IntGaugeVec,
    bundle_active: IntGaugeVec,
    bundle_phase: IntGaugeVec,
    low_disk: IntGauge,
    peripheral_failed: IntGaugeVec,
    health_check_failed: IntGauge,
    heartbeat_age: GaugeVec,
    store_devices: IntGaugeVec,
    store_series_dropped: IntGauge,
    origin_copies: GaugeVec,
    rollouts: IntGaugeVec,
    rollout_info: IntGaugeVec,
    rollout_state: IntGaugeVec,
    rollout_current_wave: IntGaugeVec,
    rollout_waves: IntGaugeVec,
    rollout_devices: IntGaugeVec,
    rollout_wave_devices: IntGaugeVec,
    rollout_last_progress: GaugeVec,
    webhook_backlog: IntGauge,
    /// Per-store bundle bytes, by `store` and `source`.
    store_bytes: IntCounterVec,
    /// The stores that have per-store byte series (at most the limit).
    store_bytes_stores: Arc<Mutex<HashSet<String>>>,
    store_series_limit: usize,
}

impl FleetMetrics {
    pub fn register(registry: &Registry, store_series_limit: usize) -> FleetMetrics {
        let g = |name: &str, help: &str, labels: &[&str]| int_gauges(registry, name, help, labels);
        let devices = g(
            "posfleet_devices",
            "Enrolled devices, by status: online, offline (not revoked) or revoked.",
            &["status"],
        );
        let stores = int_gauge(registry, "posfleet_stores", "Stores.");
        let by_hardware = g(
            "posfleet_devices_by_hardware",
            "Enrolled devices (not revoked), by hardware model.",
            &["hardware_model"],
        );
        let by_agent_version = g(
            "posfleet_devices_by_agent_version",
            "Enrolled devices (not revoked), by the agent version they report.",
            &["version"],
        );
        let bundle_active = g(
            "posfleet_bundle_active_devices",
            "Devices by the version of a bundle they run (their last report).",
            &["bundle", "version"],
        );
        let bundle_phase = g(
            "posfleet_bundle_phase_devices",
            "Devices by the phase of their last report of a bundle.",
            &["bundle", "phase"],
        );
        let low_disk = int_gauge(
            registry,
            "posfleet_devices_low_disk",
            "Devices whose data filesystem has less than a tenth free.",
        );
        let peripheral_failed = g(
            "posfleet_devices_peripheral_failed",
            "Devices reporting a failed peripheral, by kind.",
            &["kind"],
        );
        let health_check_failed = int_gauge(
            registry,
            "posfleet_devices_health_check_failed",
            "Devices whose last report of a bundle is rolled_back (a failed health check or a \
             crash before the install was confirmed).",
        );
        let heartbeat_age = float_gauges(
            registry,
            "posfleet_device_heartbeat_age_seconds",
            "Seconds since enrolled devices' last heartbeat, as quantiles over the fleet.",
            &["quantile"],
        );
        let store_devices = g(
            "posfleet_store_devices",
            "Enrolled devices (not revoked) of a store, by status; a store's region is its \
             `region` label.",
            &["store", "region", "status"],
        );
        let store_series_dropped = int_gauge(
            registry,
            "posfleet_store_series_dropped",
            "Stores left out of the per-store gauges by metrics_store_series_limit.",
        );
        let origin_copies = float_gauges(
            registry,
            "posfleet_store_origin_copies",
            "Per store, the most copies of one bundle version its tills received from the \
                 origin (1: fetched once; P2P shares the rest).",
            &["store"],
        );
        let rollouts = g("posfleet_rollouts", "Rollouts, by state.", &["state"]);
        let rollout_info = g(
            "posfleet_rollout_info",
            "1 per running or paused rollout, naming its release.",
            &["rollout", "bundle", "version"],
        );
        let rollout_state = g(
            "posfleet_rollout_state",
            "1 for the state a running or paused rollout is in.",
            &["rollout", "state"],
        );
        let rollout_current_wave = g(
            "posfleet_rollout_current_wave",
            "The wave a rollout is at (0-based).",
            &["rollout"],
        );
        let rollout_waves = g("posfleet_rollout_waves", "A rollout's waves.", &["rollout"]);
        let rollout_devices = g(
            "posfleet_rollout_devices",
            "A rollout's devices, by state: succeeded, failed, in_flight, pending.",
            &["rollout", "state"],
        );
        let rollout_wave_devices = g(
            "posfleet_rollout_wave_devices",
            "A rollout's devices per wave (0-based), by state.",
            &["rollout", "wave", "state"],
        );
        let rollout_last_progress = float_gauges(
            registry,
            "posfleet_rollout_last_progress_timestamp_seconds",
            "When a rollout or one of its devices last changed state (Unix time).",
            &["rollout"],
        );
        let webhook_backlog = int_gauge(
            registry,
            "posfleet_webhook_backlog",
            "Webhook deliveries waiting to be delivered (neither delivered nor given up).",
        );
        let store_bytes = IntCounterVec::new(
            Opts::new(
                "posfleet_store_bundle_bytes_total",
                "Verified bundle bytes a store's tills received, from the origin or from the \
                 store's other tills.",
            ),
            &["store", "source"],
        )
        .expect("static metric definition is valid");
        registry
            .register(Box::new(store_bytes.clone()))
            .expect("each metric is registered once");
        for status in ["online", "offline", "revoked"] {
            devices.with_label_values(&[status]);
        }
        for state in ROLLOUT_STATES {
            rollouts.with_label_values(&[state]);
        }
        for kind in PERIPHERAL_KINDS {
            peripheral_failed.with_label_values(&[kind]);
        }
        FleetMetrics {
            devices,
            stores,
            by_hardware,
            by_agent_version,
            bundle_active,
            bundle_phase,
            low_disk,
            peripheral_failed,
            health_check_failed,
            heartbeat_age,
            store_devices,
            store_series_dropped,
            origin_copies,
            rollouts,
            rollout_info,
            rollout_state,
            rollout_current_wave,
            rollout_waves,
            rollout_devices,
            rollout_wave_devices,
            rollout_last_progress,
            webhook_backlog,
            store_bytes,
            store_bytes_stores: Arc::new(Mutex::new(HashSet::new())),
            store_series_limit,
        }
    }

    /// Sets the store count (every store, with or without devices).
    pub fn set_stores(&self, stores: i64) {
        self.stores.set(stores);
    }

    /// Counts bundle bytes a store's tills received, from `source`
    /// (`origin` or `peer`). Past the store limit, under `_other`.
    pub fn add_store_bytes(&self, store_id: &str, source: &str, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let store = {
            let mut stores = self
                .store_bytes_stores
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if stores.contains(store_id) || stores.len() < self.store_series_limit {
                stores.insert(store_id.to_string());
                store_id
            } else {
                OTHER
            }
        };
        self.store_bytes
            .with_label_values(&[store, source])
            .inc_by(bytes);
    }

    /// Replaces every gauge with what `snapshot` says, at `now_ms`.
    pub fn apply(&self, snapshot: &FleetSnapshot, now_ms: i64) {
        let online: i64 = snapshot.stores.iter().map(|s| s.online).sum();
        let offline: i64 = snapshot.stores.iter().map(|s| s.offline).sum();
        self.devices.with_label_values(&["online"]).set(online);
        self.devices.with_label_values(&["offline"]).set(offline);
        self.devices
            .with_label_values(&["revoked"])
            .set(snapshot.revoked);

        // Per store: over the limit, the stores with most offline tills
        // (the ones someone is looking for) are kept.
        let mut stores: Vec<_> = snapshot.stores.iter().collect();
        if stores.len() > self.store_series_limit {
            stores.sort_by(|a, b| b.offline.cmp(&a.offline).then(a.store_id.cmp(&b.store_id)));
        }
        let kept = stores.len().min(self.store_series_limit);
        self.store_series_dropped.set((stores.len() - kept) as i64);
        self.store_devices.reset();
        for store in &stores[..kept] {
            for (status, count) in [("online", store.online), ("offline", store.offline)] {
                self.store_devices
                    .with_label_values(&[&store.store_id, &store.region, status])
                    .set(count);
            }
        }
        self.origin_copies.reset();
        for (store, copies) in snapshot.origin_copies.iter().take(self.store_series_limit) {
            self.origin_copies.with_label_values(&[store]).set(*copies);
        }

        let mut models = BTreeMap::<&str, i64>::new();
        let mut versions = BTreeMap::<&str, i64>::new();
        for (model, version, n) in &snapshot.models_and_versions {
            *models.entry(model).or_default() += n;
            *versions.entry(version).or_default() += n;
        }
        set_capped(&self.by_hardware, &[], models);
        set_capped(&self.by_agent_version, &[], versions);

        let mut active = BTreeMap::<&str, BTreeMap<&str, i64>>::new();
        let mut phases = BTreeMap::<(&str, &str), i64>::new();
        for (bundle, version, phase, n) in &snapshot.bundles {
            *active
                .entry(bundle)
                .or_default()
                .entry(version)
                .or_default() += n;
            *phases.entry((bundle, phase)).or_default() += n;
        }
        self.bundle_active.reset();
        for (bundle, versions) in active {
            // A device that has not installed the bundle yet reports "".
            let versions = versions
                .into_iter()
                .filter(|(version, _)| !version.is_empty())
                .collect();
            set_capped(&self.bundle_active, &[bundle], versions);
        }
        self.bundle_phase.reset();
        for ((bundle, phase), n) in phases {
            self.bundle_phase.with_label_values(&[bundle, phase]).set(n);
        }

        self.low_disk.set(snapshot.low_disk);
        for kind in PERIPHERAL_KINDS {
            self.peripheral_failed.with_label_values(&[kind]).set(0);
        }
        for (kind, n) in &snapshot.failed_peripherals {
            let kind = match kind {
                1 => "printer",
                2 => "scanner",
                3 => "cash_drawer",
                _ => "other",
            };
            self.peripheral_failed.with_label_values(&[kind]).add(*n);
        }
        self.health_check_failed.set(snapshot.rolled_back);
        self.heartbeat_age.reset();
        if !snapshot.last_seen_ms.is_empty() {
            for q in HEARTBEAT_AGE_QUANTILES {
                // last_seen ascending: the oldest heartbeat is the largest age.
                let ages = &snapshot.last_seen_ms;
                let rank = ((1.0 - q) * (ages.len() - 1) as f64).round() as usize;
                let age_ms = (now_ms - ages[rank]).max(0);
                self.heartbeat_age
                    .with_label_values(&[&q.to_string()])
                    .set(age_ms as f64 / 1000.0);
            }
        }

        for state in ROLLOUT_STATES {
            self.rollouts.with_label_values(&[state]).set(0);
        }
        for (state, n) in &snapshot.rollout_states {
            self.rollouts.with_label_values(&[state]).set(*n);
        }
        for gauges in [
            &self.rollout_info,
            &self.rollout_state,
            &self.rollout_current_wave,
            &self.rollout_waves,
            &self.rollout_devices,
            &self.rollout_wave_devices,
        ] {
            gauges.reset();
        }
        self.rollout_last_progress.reset();
        for rollout in &snapshot.active_rollouts {
            let id = rollout.id.as_str();
            self.rollout_info
                .with_label_values(&[id, &rollout.bundle_name, &rollout.bundle_version])
                .set(1);
            self.rollout_state
                .with_label_values(&[id, &rollout.state])
                .set(1);
            self.rollout_current_wave
                .with_label_values(&[id])
                .set(rollout.current_wave);
            self.rollout_waves
                .with_label_values(&[id])
                .set(rollout.wave_count);
            self.rollout_last_progress
                .with_label_values(&[id])
                .set(rollout.last_progress_ms as f64 / 1000.0);
            for state in ROLLOUT_DEVICE_STATES {
                self.rollout_devices.with_label_values(&[id, state]).set(0);
            }
            for (wave, device_state, n) in &rollout.devices {
                let state = rollout_device_state(device_state);
                self.rollout_devices.with_label_values(&[id, state]).add(*n);
                let wave = wave.to_string();
                for s in ROLLOUT_DEVICE_STATES {
                    self.rollout_wave_devices.with_label_values(&[id, &wave, s]);
                }
                self.rollout_wave_devices
                    .with_label_values(&[id, &wave, state])
                    .add(*n);
            }
        }
        self.webhook_backlog.set(snapshot.webhook_backlog);
    }
}

/// What a device's state in a rollout counts as.
fn rollout_device_state(state: &str) -> &'static str {
    match state {
        "succeeded" => "succeeded",
        "failed" | "rolled_back" | "timed_out" => "failed",
        "pending" => "pending",
        // notified, downloading, installing
        _ => "in_flight",
    }
}

/// Resets `gauges` under the `prefix` labels and sets the largest
/// `MAX_VALUES_PER_LABEL` values, summing the rest under `_other`.
fn set_capped(gauges: &IntGaugeVec, prefix: &[&str], counts: BTreeMap<&str, i64>) {
    if prefix.is_empty() {
        gauges.reset();
    }
    let mut counts: Vec<(&str, i64)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let rest: i64 = counts.iter().skip(MAX_VALUES_PER_LABEL).map(|c| c.1).sum();
    let set = |value: &str, n: i64| {
        let mut labels = prefix.to_vec();
        labels.push(value);
        gauges.with_label_values(&labels).set(n);
    };
    for (value, n) in counts.iter().take(MAX_VALUES_PER_LABEL) {
        set(value, *n);
    }
    if counts.len() > MAX_VALUES_PER_LABEL {
        set(OTHER, rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{ActiveRollout, StoreCounts};

    fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        registry
            .gather()
            .into_iter()
            .find(|family| family.name() == name)?
            .get_metric()
            .iter()
            .find(|metric| {
                labels.iter().all(|(k, v)| {
                    metric
                        .get_label()
                        .iter()
                        .any(|label| label.name() == *k && label.value() == *v)
                })
            })
            .map(|metric| metric.get_gauge().get_value())
    }

    fn store(id: &str, online: i64, offline: i64) -> StoreCounts {
        StoreCounts {
            store_id: id.into(),
            region: "eu".into(),
            online,
            offline,
        }
    }

    #[test]
    fn stores_over_the_limit_keep_the_darkest() {
        let registry = Registry::new();
        let fleet = FleetMetrics::register(&registry, 2);
        let snapshot = FleetSnapshot {
            stores: vec![store("a", 3, 0), store("b", 0, 2), store("c", 1, 1)],
            ..FleetSnapshot::default()
        };
        fleet.apply(&snapshot, 0);
        let dark = [("store", "b"), ("status", "offline")];
        assert_eq!(value(&registry, "posfleet_store_devices", &dark), Some(2.0));
        assert!(value(&registry, "posfleet_store_devices", &[("store", "c")]).is_some());
        assert_eq!(
            value(&registry, "posfleet_store_devices", &[("store", "a")]),
            None
        );
        assert_eq!(
            value(&registry, "posfleet_store_series_dropped", &[]),
            Some(1.0)
        );
        // The totals count every store.
        let online = [("status", "online")];
        assert_eq!(value(&registry, "posfleet_devices", &online), Some(4.0));
    }

    #[test]
    fn reported_values_beyond_the_cap_are_summed_as_other() {
        let registry = Registry::new();
        let fleet = FleetMetrics::register(&registry, 10);
        let versions: Vec<String> = (0..MAX_VALUES_PER_LABEL + 5)
            .map(|i| format!("1.0.{i}"))
            .collect();
        let snapshot = FleetSnapshot {
            models_and_versions: versions
                .iter()
                .map(|v| ("m".to_string(), v.clone(), 1))
                .collect(),
            ..FleetSnapshot::default()
        };
        fleet.apply(&snapshot, 0);
        let family = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "posfleet_devices_by_agent_version")
            .unwrap();
        assert_eq!(family.get_metric().len(), MAX_VALUES_PER_LABEL + 1);
        let other = [("version", OTHER)];
        assert_eq!(
            value(&registry, "posfleet_devices_by_agent_version", &other),
            Some(5.0)
        );
    }

    #[test]
    fn a_rollout_that_ends_leaves_the_gauges() {
        let registry = Registry::new();
        let fleet = FleetMetrics::register(&registry, 10);
        let running = FleetSnapshot {
            active_rollouts: vec![ActiveRollout {
                id: "ro-1".into(),
                bundle_name: "pos".into(),
                bundle_version: "1.1.0".into(),
                state: "running".into(),
                current_wave: 1,
                wave_count: 2,
                devices: vec![
                    (0, "succeeded".into(), 2),
                    (1, "downloading".into(), 1),
                    (1, "rolled_back".into(), 1),
                ],
                last_progress_ms: 5_000,
            }],
            ..FleetSnapshot::default()
        };
        fleet.apply(&running, 10_000);
        let in_flight = [("rollout", "ro-1"), ("state", "in_flight")];
        assert_eq!(
            value(&registry, "posfleet_rollout_devices", &in_flight),
            Some(1.0)
        );
        let failed_wave_1 = [("rollout", "ro-1"), ("wave", "1"), ("state", "failed")];
        assert_eq!(
            value(&registry, "posfleet_rollout_wave_devices", &failed_wave_1),
            Some(1.0)
        );
        let progress = [("rollout", "ro-1")];
        assert_eq!(
            value(
                &registry,
                "posfleet_rollout_last_progress_timestamp_seconds",
                &progress
            ),
            Some(5.0)
        );
        fleet.apply(&FleetSnapshot::default(), 20_000);
        assert_eq!(
            value(&registry, "posfleet_rollout_devices", &in_flight),
            None
        );
        assert_eq!(value(&registry, "posfleet_rollout_info", &[]), None);
    }

    #[test]
    fn heartbeat_age_quantiles_rank_the_fleet() {
        let registry = Registry::new();
        let fleet = FleetMetrics::register(&registry, 10);
        // 100 devices seen 1 s … 100 s ago.
        let now = 1_000_000;
        let snapshot = FleetSnapshot {
            last_seen_ms: (1..=100).rev().map(|age| now - age * 1000).collect(),
            ..FleetSnapshot::default()
        };
        fleet.apply(&snapshot, now);
        let age = |q: &str| {
            value(
                &registry,
                "posfleet_device_heartbeat_age_seconds",
                &[("quantile", q)],
            )
        };
        assert_eq!(age("1"), Some(100.0));
        assert_eq!(age("0.5"), Some(50.0));
        assert_eq!(age("0.99"), Some(99.0));
    }

    #[test]
    fn store_byte_series_stop_at_the_limit() {
        let registry = Registry::new();
        let fleet = FleetMetrics::register(&registry, 2);
        for store in ["s1", "s2", "s3", "s1"] {
            fleet.add_store_bytes(store, "origin", 10);
        }
        let bytes = |store: &str| {
            registry
                .gather()
                .into_iter()
                .find(|f| f.name() == "posfleet_store_bundle_bytes_total")
                .and_then(|f| {
                    f.get_metric()
                        .iter()
                        .find(|m| m.get_label().iter().any(|l| l.value() == store))
                        .map(|m| m.get_counter().get_value())
                })
        };
        assert_eq!(bytes("s1"), Some(20.0));
        assert_eq!(bytes("s3"), None);
        assert_eq!(bytes(OTHER), Some(10.0));
    }
}
