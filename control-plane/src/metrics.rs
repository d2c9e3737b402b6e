//! Prometheus metrics of the control plane. Label sets are small and fixed.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every value of the `result` label of `posfleet_enrollments_total`.
pub const ENROLLMENT_RESULTS: [&str; 9] = [
    "ok",
    "rate_limited",
    "invalid",
    "unknown_token",
    "expired",
    "revoked",
    "used_up",
    "key_in_use",
    "error",
];

/// Every value of the `result` label of `posfleet_heartbeats_total`.
pub const HEARTBEAT_RESULTS: [&str; 6] = [
    "ok",
    "unauthenticated",
    "revoked",
    "invalid",
    "unavailable",
    "rate_limited",
];

/// Every value of the `result` label of `posfleet_webhook_delivery_attempts_total`.
pub const WEBHOOK_ATTEMPT_RESULTS: [&str; 4] = ["ok", "http_error", "timeout", "network_error"];

/// Every value of the `result` label of `posfleet_webhook_deliveries_total`:
/// how deliveries ended.
pub const WEBHOOK_DELIVERY_RESULTS: [&str; 2] = ["delivered", "failed"];

/// Every value of the `source` label of `posfleet_bundle_bytes_total`.
pub const BYTE_SOURCES: [&str; 2] = ["origin", "peer"];

/// Every value of the `phase` label of `posfleet_bundle_reports_total`: the
/// `BundlePhase` values an agent may report.
pub const BUNDLE_PHASES: [&str; 7] = [
    "pending",
    "downloading",
    "downloaded",
    "installing",
    "installed",
    "failed",
    "rolled_back",
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Heartbeats by result (`HEARTBEAT_RESULTS`).
    pub heartbeats: IntCounterVec,
    /// Bundle statuses accepted from agents, by phase (`BUNDLE_PHASES`).
    pub bundle_reports: IntCounterVec,
    /// Verified bundle bytes tills received, by `source` (`BYTE_SOURCES`),
    /// from their progress reports.
    pub bundle_bytes: IntCounterVec,
    /// Bundle bytes the repository sent (`/repo/targets/…`), counted as
    /// they are handed to the connection.
    pub target_bytes_sent: prometheus::IntCounter,
    /// Enrollments by result (`ENROLLMENT_RESULTS`).
    pub enrollments: IntCounterVec,
    /// Admin calls refused for a missing or unknown API token.
    pub admin_auth_failures: prometheus::IntCounter,
    pub heartbeat_queue_depth: IntGauge,
    pub heartbeat_flush_seconds: Histogram,
    pub heartbeat_flush_rows: Histogram,
    /// Heartbeat batches given up after repeated write failures.
    pub heartbeat_batches_dropped: prometheus::IntCounter,
    /// Devices by `status` (`online`, `offline`), counted at a scrape at
    /// most every `FLEET_GAUGES_MAX_AGE`.
    pub devices: IntGaugeVec,
    pub stores: IntGauge,
    /// Audit entries that could not be written or completed.
    pub audit_write_failures: prometheus::IntCounter,
    /// Unauthenticated calls over the audit rate limit, counted instead of
    /// written.
    pub audit_suppressed: prometheus::IntCounter,
    /// Webhook delivery attempts by result (`WEBHOOK_ATTEMPT_RESULTS`).
    pub webhook_attempts: IntCounterVec,
    /// Finished webhook deliveries by result (`WEBHOOK_DELIVERY_RESULTS`).
    pub webhook_deliveries: IntCounterVec,
    /// Dispatcher passes that failed (database errors).
    pub webhook_dispatch_errors: prometheus::IntCounter,
    /// The rollout engine's metrics.
    pub rollout: crate::rollout::RolloutMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "posfleet_heartbeats_total",
                "Heartbeats received, by result.",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let bundle_reports = IntCounterVec::new(
            Opts::new(
                "posfleet_bundle_reports_total",
                "Bundle statuses reported by agents, by phase.",
            ),
            &["phase"],
        )
        .expect("static metric definition is valid");
        let bundle_bytes = IntCounterVec::new(
            Opts::new(
                "posfleet_bundle_bytes_total",
                "Verified bundle bytes received by tills, from the origin (this control plane) \
                 or from the store's other tills, as they reported them.",
            ),
            &["source"],
        )
        .expect("static metric definition is valid");
        let target_bytes_sent = prometheus::IntCounter::new(
            "posfleet_repository_target_bytes_sent_total",
            "Bundle bytes sent by the repository to tills: the load on the stores' WAN links.",
        )
        .expect("static metric definition is valid");
        let enrollments = IntCounterVec::new(
            Opts::new(
                "posfleet_enrollments_total",
                "Enrollment attempts, by result.",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let admin_auth_failures = prometheus::IntCounter::new(
            "posfleet_admin_auth_failures_total",
            "Admin API calls refused for a missing or unknown API token.",
        )
        .expect("static metric definition is valid");
        let heartbeat_queue_depth = IntGauge::new(
            "posfleet_heartbeat_queue_depth",
            "Heartbeats received and not yet written to the database.",
        )
        .expect("static metric definition is valid");
        let heartbeat_flush_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "posfleet_heartbeat_flush_seconds",
                "Time to write one batch of heartbeats to the database.",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets")),
        )
        .expect("static metric definition is valid");
        let heartbeat_flush_rows = Histogram::with_opts(
            HistogramOpts::new(
                "posfleet_heartbeat_flush_rows",
                "Devices written per heartbeat batch.",
            )
            .buckets(prometheus::exponential_buckets(1.0, 4.0, 8).expect("valid buckets")),
        )
        .expect("static metric definition is valid");
        let heartbeat_batches_dropped = prometheus::IntCounter::new(
            "posfleet_heartbeat_batches_dropped_total",
            "Heartbeat batches given up after repeated write failures (the devices re-report).",
        )
        .expect("static metric definition is valid");
        let devices = IntGaugeVec::new(
            Opts::new("posfleet_devices", "Enrolled devices, by status."),
            &["status"],
        )
        .expect("static metric definition is valid");
        let stores =
            IntGauge::new("posfleet_stores", "Stores.").expect("static metric definition is valid");
        let audit_write_failures = prometheus::IntCounter::new(
            "posfleet_audit_write_failures_total",
            "Audit entries that could not be written or completed.",
        )
        .expect("static metric definition is valid");
        let audit_suppressed = prometheus::IntCounter::new(
            "posfleet_audit_suppressed_total",
            "Unauthenticated admin calls not written to the audit log (over its rate limit).",
        )
        .expect("static metric definition is valid");
        let webhook_attempts = IntCounterVec::new(
            Opts::new(
                "posfleet_webhook_delivery_attempts_total",
                "Webhook delivery attempts, by result.",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "posfleet_webhook_deliveries_total",
                "Webhook deliveries finished, by result (delivered, or failed after the last retry).",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let webhook_dispatch_errors = prometheus::IntCounter::new(
            "posfleet_webhook_dispatch_errors_total",
            "Webhook dispatcher passes that failed on the database.",
        )
        .expect("static metric definition is valid");
        for collector in [
            Box::new(heartbeats.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bundle_reports.clone()),
            Box::new(bundle_bytes.clone()),
            Box::new(target_bytes_sent.clone()),
            Box::new(enrollments.clone()),
            Box::new(admin_auth_failures.clone()),
            Box::new(heartbeat_queue_depth.clone()),
            Box::new(heartbeat_flush_seconds.clone()),
            Box::new(heartbeat_flush_rows.clone()),
            Box::new(heartbeat_batches_dropped.clone()),
            Box::new(devices.clone()),
            Box::new(stores.clone()),
            Box::new(audit_write_failures.clone()),
            Box::new(audit_suppressed.clone()),
            Box::new(webhook_attempts.clone()),
            Box::new(webhook_deliveries.clone()),
            Box::new(webhook_dispatch_errors.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        let rollout = crate::rollout::RolloutMetrics::register(&registry);
        // Every label value exists from the start, so rates work from zero.
        for result in HEARTBEAT_RESULTS {
            heartbeats.with_label_values(&[result]);
        }
        for phase in BUNDLE_PHASES {
            bundle_reports.with_label_values(&[phase]);
        }
        for source in BYTE_SOURCES {
            bundle_bytes.with_label_values(&[source]);
        }
        for result in ENROLLMENT_RESULTS {
            enrollments.with_label_values(&[result]);
        }
        for status in ["online", "offline"] {
            devices.with_label_values(&[status]);
        }
        for result in WEBHOOK_ATTEMPT_RESULTS {
            webhook_attempts.with_label_values(&[result]);
        }
        for result in WEBHOOK_DELIVERY_RESULTS {
            webhook_deliveries.with_label_values(&[result]);
        }
        Metrics {
            registry,
            heartbeats,
            bundle_reports,
            bundle_bytes,
            target_bytes_sent,
            enrollments,
            admin_auth_failures,
            heartbeat_queue_depth,
            heartbeat_flush_seconds,
            heartbeat_flush_rows,
            heartbeat_batches_dropped,
            devices,
            stores,
            audit_write_failures,
            audit_suppressed,
            webhook_attempts,
            webhook_deliveries,
            webhook_dispatch_errors,
            rollout,
        }
    }

    /// Adds the database's own counters (connection uses).
    pub fn register_storage(&self, storage: &crate::storage::Storage) {
        // A second registration of the same storage is refused and harmless.
        let _ = self
            .registry
            .register(Box::new(storage.connection_uses().clone()));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text encoder writes UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
