//! Prometheus metrics of the control plane. Label sets are small and fixed,
//! or capped where a value comes from the fleet (see `fleet`); no label
//! names a device.
//!
//! - `grpc`: every gRPC call by service, method and code (a tower layer);
//! - `fleet`: the gauges read from the database at a scrape;
//! - here: the counters the request handlers and background tasks keep.

pub mod fleet;
pub mod grpc;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Per-store series at most, unless configured (`metrics_store_series_limit`).
pub const DEFAULT_STORE_SERIES_LIMIT: usize = 10_000;

/// Every value of the `route` label of the HTTP metrics.
pub const HTTP_ROUTES: [&str; 6] = [
    "repo_metadata",
    "repo_target",
    "metrics",
    "healthz",
    "readyz",
    "other",
];

/// Every value of the `reason` label of `posfleet_rollout_pauses_total`.
pub const PAUSE_REASONS: [&str; 4] = [
    "failure_threshold",
    "analysis_fail",
    "analysis_inconclusive",
    "operator",
];

/// Every value of the `result` label of `posfleet_signal_reports_total`.
pub const SIGNAL_REPORT_RESULTS: [&str; 3] = ["stored", "unobserved", "out_of_range"];

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
    /// Bundle bytes tills did not download because they rebuilt the bundle
    /// from a delta, as they reported them.
    pub delta_bytes_saved: prometheus::IntCounter,
    /// Deltas tills could not use (they fetched the whole bundle instead).
    pub delta_fallbacks: prometheus::IntCounter,
    /// Enrollments by result (`ENROLLMENT_RESULTS`).
    pub enrollments: IntCounterVec,
    /// Login attempts by result (`crate::session_api::LOGIN_RESULTS`).
    pub logins: IntCounterVec,
    /// Admin calls refused for a missing or unknown API token.
    pub admin_auth_failures: prometheus::IntCounter,
    /// Admin calls refused because they are beyond the caller's role or
    /// scope.
    pub admin_permission_denied: prometheus::IntCounter,
    pub heartbeat_queue_depth: IntGauge,
    pub heartbeat_flush_seconds: Histogram,
    pub heartbeat_flush_rows: Histogram,
    /// Heartbeat batches given up after repeated write failures.
    pub heartbeat_batches_dropped: prometheus::IntCounter,
    /// The gauges read from the database at a scrape, at most every
    /// `FLEET_GAUGES_MAX_AGE`, and the per-store byte counters.
    pub fleet: fleet::FleetMetrics,
    /// Every gRPC call, by service, method and code.
    pub grpc: grpc::GrpcMetrics,
    /// HTTP requests answered, by `route` (`HTTP_ROUTES`) and status code.
    pub http_requests: IntCounterVec,
    /// Time to an HTTP answer's headers, by `route`.
    pub http_duration: HistogramVec,
    pub http_in_flight: IntGaugeVec,
    /// Peers tills banned for serving bad data, as their heartbeats report.
    pub p2p_bans: prometheus::IntCounter,
    /// Tills' per-minute signal reports, by `result` (`SIGNAL_REPORT_RESULTS`).
    pub signal_reports: IntCounterVec,
    /// Signal reports tills dropped (malformed, over a cap), as their
    /// heartbeats report.
    pub signals_dropped: prometheus::IntCounter,
    /// Pooled database connections by `state` (`in_use`, `idle`).
    pub database_connections: IntGaugeVec,
    pub database_connections_max: IntGauge,
    /// How long the fleet gauges' refresh waited for a pooled connection:
    /// a sample of the pool's wait at every refresh.
    pub database_acquire_seconds: Histogram,
    /// When each certificate of the control plane's expires (`server`,
    /// `fleet_ca`, `previous_fleet_ca`: `Tls::expiries`), as Unix time;
    /// absent without TLS.
    pub certificate_expiry: GaugeVec,
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
    /// Logs on demand.
    pub logs: crate::log_requests::LogMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::with_store_series_limit(DEFAULT_STORE_SERIES_LIMIT)
    }

    /// Per-store series for at most `store_series_limit` stores.
    pub fn with_store_series_limit(store_series_limit: usize) -> Metrics {
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
        let delta_bytes_saved = prometheus::IntCounter::new(
            "posfleet_delta_bytes_saved_total",
            "Bundle bytes tills did not download because they rebuilt the bundle from a delta \
             against the version they had, as they reported them.",
        )
        .expect("static metric definition is valid");
        let delta_fallbacks = prometheus::IntCounter::new(
            "posfleet_delta_fallbacks_total",
            "Deltas tills were offered but could not use (changed base, bad delta), \
             after which they fetched the whole bundle.",
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
        let logins = IntCounterVec::new(
            Opts::new(
                "posfleet_logins_total",
                "SessionService calls (logins, setups, logouts), by result.",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let admin_auth_failures = prometheus::IntCounter::new(
            "posfleet_admin_auth_failures_total",
            "Admin API calls refused for a missing or unknown API token.",
        )
        .expect("static metric definition is valid");
        let admin_permission_denied = prometheus::IntCounter::new(
            "posfleet_admin_permission_denied_total",
            "Admin API calls refused as beyond the caller's role or store scope.",
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
        let http_requests = IntCounterVec::new(
            Opts::new(
                "posfleet_http_requests_total",
                "HTTP requests answered, by route and status code.",
            ),
            &["route", "code"],
        )
        .expect("static metric definition is valid");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "posfleet_http_request_duration_seconds",
                "Time from an HTTP request's arrival to its answer's headers, by route.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["route"],
        )
        .expect("static metric definition is valid");
        let http_in_flight = IntGaugeVec::new(
            Opts::new(
                "posfleet_http_requests_in_flight",
                "HTTP requests being answered, by route.",
            ),
            &["route"],
        )
        .expect("static metric definition is valid");
        let p2p_bans = prometheus::IntCounter::new(
            "posfleet_p2p_peers_banned_total",
            "Store peers tills banned for serving bad data, as their heartbeats report.",
        )
        .expect("static metric definition is valid");
        let signal_reports = IntCounterVec::new(
            Opts::new(
                "posfleet_signal_reports_total",
                "Per-minute signal reports of tills (one per till and minute), by result: stored \
                 (the store is under canary analysis), unobserved (it is not), out_of_range (too \
                 old or in the future).",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let signals_dropped = prometheus::IntCounter::new(
            "posfleet_signals_dropped_total",
            "Signal reports tills dropped (malformed or over a cap), as their heartbeats report.",
        )
        .expect("static metric definition is valid");
        let database_connections = IntGaugeVec::new(
            Opts::new(
                "posfleet_database_connections",
                "Open database connections of the pool, by state: in_use or idle.",
            ),
            &["state"],
        )
        .expect("static metric definition is valid");
        let database_connections_max = IntGauge::new(
            "posfleet_database_connections_max",
            "Database connections the pool may open (database_max_connections).",
        )
        .expect("static metric definition is valid");
        let database_acquire_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "posfleet_database_acquire_duration_seconds",
                "Time the fleet gauges' refresh waited for a pooled database connection \
                 (a sample of the pool's wait, taken at every refresh).",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 4.0, 9).expect("valid buckets")),
        )
        .expect("static metric definition is valid");
        let certificate_expiry = GaugeVec::new(
            Opts::new(
                "posfleet_tls_certificate_expiry_timestamp_seconds",
                "When a certificate of the control plane's expires (Unix time): the listeners' \
                 certificate (server), the fleet CA and a CA being rotated out.",
            ),
            &["certificate"],
        )
        .expect("static metric definition is valid");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "posfleet_build_info",
                "1, labelled with the control plane's version.",
            ),
            &["version"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
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
            Box::new(delta_bytes_saved.clone()),
            Box::new(delta_fallbacks.clone()),
            Box::new(enrollments.clone()),
            Box::new(logins.clone()),
            Box::new(admin_auth_failures.clone()),
            Box::new(admin_permission_denied.clone()),
            Box::new(heartbeat_queue_depth.clone()),
            Box::new(heartbeat_flush_seconds.clone()),
            Box::new(heartbeat_flush_rows.clone()),
            Box::new(heartbeat_batches_dropped.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
            Box::new(http_in_flight.clone()),
            Box::new(p2p_bans.clone()),
            Box::new(signal_reports.clone()),
            Box::new(signals_dropped.clone()),
            Box::new(database_connections.clone()),
            Box::new(database_connections_max.clone()),
            Box::new(database_acquire_seconds.clone()),
            Box::new(certificate_expiry.clone()),
            Box::new(build_info),
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
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("the process collector is registered once");
        let rollout = crate::rollout::RolloutMetrics::register(&registry);
        let fleet = fleet::FleetMetrics::register(&registry, store_series_limit);
        let grpc = grpc::GrpcMetrics::register(
            &registry,
            &[
                posfleet_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
        );
        let logs = crate::log_requests::LogMetrics::register(&registry);
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
        for result in SIGNAL_REPORT_RESULTS {
            signal_reports.with_label_values(&[result]);
        }
        for result in crate::session_api::LOGIN_RESULTS {
            logins.with_label_values(&[result]);
        }
        for route in HTTP_ROUTES {
            http_requests.with_label_values(&[route, "200"]);
            http_duration.with_label_values(&[route]);
            http_in_flight.with_label_values(&[route]);
        }
        for state in ["in_use", "idle"] {
            database_connections.with_label_values(&[state]);
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
            delta_bytes_saved,
            delta_fallbacks,
            enrollments,
            logins,
            admin_auth_failures,
            admin_permission_denied,
            heartbeat_queue_depth,
            heartbeat_flush_seconds,
            heartbeat_flush_rows,
            heartbeat_batches_dropped,
            fleet,
            grpc,
            http_requests,
            http_duration,
            http_in_flight,
            p2p_bans,
            signal_reports,
            signals_dropped,
            database_connections,
            database_connections_max,
            database_acquire_seconds,
            certificate_expiry,
            audit_write_failures,
            audit_suppressed,
            webhook_attempts,
            webhook_deliveries,
            webhook_dispatch_errors,
            rollout,
            logs,
        }
    }

    /// Adds the database's own counters (connection uses, rollout events).
    pub fn register_storage(&self, storage: &crate::storage::Storage) {
        // A second registration of the same storage is refused and harmless.
        let _ = self
            .registry
            .register(Box::new(storage.connection_uses().clone()));
        let _ = self
            .registry
            .register(Box::new(storage.rollout_events().clone()));
    }

    /// Sets the pool gauges from the pool as it is now.
    pub fn observe_pool(&self, storage: &crate::storage::Storage) {
        let (open, idle, max) = storage.pool_connections();
        let idle = idle.min(open);
        self.database_connections
            .with_label_values(&["in_use"])
            .set(i64::from(open - idle));
        self.database_connections
            .with_label_values(&["idle"])
            .set(i64::from(idle));
        self.database_connections_max.set(i64::from(max));
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
