//! Control-plane configuration: defaults, then a TOML file, then `POSFLEET_*`
//! environment variables, then command-line flags. Everything is validated
//! before any port is bound.

use clap::Parser;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use posfleet_runtime::{ConfigError, LogFormat};

/// The control plane's settings. Keys carry their unit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Holds the SQLite database (by default) and the first admin's setup
    /// code.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; empty means SQLite in `data_dir`.
    pub database_url: String,
    pub grpc_listen_address: String,
    pub http_listen_address: String,
    /// The interval handed to agents (lengthened under load).
    pub heartbeat_interval_seconds: u32,
    /// A device is `offline` after this many intervals without a heartbeat.
    pub offline_after_missed_heartbeats: u32,
    /// Largest gRPC message accepted from an agent or an operator.
    pub max_message_size_bytes: usize,
    /// Stores with per-store series on `/metrics` at most.
    pub metrics_store_series_limit: usize,
    pub database_max_connections: u32,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Serve plaintext gRPC beyond loopback. Without TLS, gRPC carries API
    /// tokens and device credentials in clear, so this is for development
    /// networks only.
    pub insecure_dev: bool,
    /// Host names and IP addresses the server's certificate is issued for.
    /// Set, both listeners serve TLS: enrollment issues each till a
    /// certificate from the fleet CA and every later agent call is mutual
    /// TLS. Empty: plaintext.
    pub tls_server_names: Vec<String>,
    /// The company's CA (or an intermediate) to issue from, as PEM files:
    /// its certificate (optionally followed by the ones above it) and its
    /// key. Unset: a fleet CA made at first start in `data_dir/tls`.
    pub tls_ca_cert_path: Option<PathBuf>,
    pub tls_ca_key_path: Option<PathBuf>,
    /// During a rotation of a CA supplied as files: the CA rotated out
    /// (certificate and key). Still trusted, and still the issuer of the
    /// listeners' certificate, until these are removed.
    pub tls_previous_ca_cert_path: Option<PathBuf>,
    pub tls_previous_ca_key_path: Option<PathBuf>,
    /// The listeners' certificate (chain, PEM) and key supplied as files,
    /// e.g. by the company's PKI or an ACME client, rather than issued from
    /// the fleet CA. Read again whenever they change.
    pub tls_server_cert_path: Option<PathBuf>,
    pub tls_server_key_path: Option<PathBuf>,
    /// CA certificates (PEM) that issued the supplied server certificate,
    /// when that is not the fleet CA: added to the trust bundle tills get.
    pub tls_server_trust_path: Option<PathBuf>,
    /// Lifetime of the certificate issued to a till.
    pub device_cert_validity_days: u32,
    /// How long after its certificate ended a till may still renew it by
    /// proving its key; later it must enroll again.
    pub device_cert_grace_days: u32,
    /// Limit of one webhook request, connection included.
    pub webhook_timeout_seconds: u64,
    /// Attempts of a webhook delivery before it is given up.
    pub webhook_max_attempts: u32,
    /// Wait before a failed delivery's first retry; doubled after each
    /// failure, with jitter.
    pub webhook_retry_initial_milliseconds: u64,
    /// Longest wait between two attempts.
    pub webhook_retry_max_seconds: u64,
    /// `Enroll` calls one peer may make per minute, sustained; 0 turns the
    /// limit off. A peer is a remote IP address (an IPv6 /64): every till
    /// of a store behind one NAT is one peer. Over the limit a call gets
    /// `RESOURCE_EXHAUSTED`.
    pub peer_enroll_calls_per_minute: u32,
    /// `Enroll` calls one peer may make at once before the per-minute rate
    /// applies (a store's tills enrolling together).
    pub peer_enroll_burst_calls: u32,
    /// Refused calls (a bad enrollment token, an unknown device, a wrong
    /// device credential) one peer may make per minute, sustained; past
    /// them its calls that would read the database get `RESOURCE_EXHAUSTED`
    /// instead. 0 turns the limit off.
    pub peer_failed_calls_per_minute: u32,
    /// Refused calls one peer may make at once before the per-minute rate
    /// applies.
    pub peer_failed_burst_calls: u32,
    /// Peers the rate limits track; once that many are tracked, further
    /// peers share one budget until idle ones are forgotten.
    pub rate_limit_max_peers: u32,
    /// A till's new P2P addresses are stored (and sent to its store) at most
    /// once per this interval; a change within it waits for the next one.
    pub p2p_address_change_interval_seconds: u64,
    /// How long a log request waits for its till (`posfleet device logs`
    /// on an offline till) before it expires.
    pub log_request_expiry_seconds: u64,
    /// How long the lines a till uploaded are kept after its upload ended.
    pub log_retention_seconds: u64,
    /// How long `posfleet device logs --follow` keeps streaming new lines.
    pub log_follow_max_seconds: u64,
    /// Most bytes of lines stored for one log request; the rest of an
    /// upload is dropped, saying so.
    pub log_request_max_bytes: u64,
    /// A rollout selecting more devices than this needs a second caller's
    /// approval (`posfleet rollout approve`) before it starts.
    pub approval_threshold_devices: u64,
    /// How long an emergency assignment (`posfleet device assign
    /// --emergency`) waits for a second person's approval before it lapses.
    pub held_assignment_expiry_seconds: u64,
    /// A file (mode 0600) holding 32 random bytes as hex, the same on every
    /// replica: the repository's online keys are then kept in the database,
    /// sealed with it, for every replica to sign with. Unset: they are files
    /// in `data_dir/repository-keys`.
    pub repository_key_encryption_key_path: Option<PathBuf>,
    /// How long a user's session (from `posfleet login`) lasts; a login may
    /// ask for less.
    pub session_lifetime_seconds: u64,
    /// Failed logins in a row (wrong password or code) that lock a user
    /// out for `login_lockout_seconds`; an admin lifts it with `posfleet
    /// user unlock`.
    pub login_max_failures: u32,
    pub login_lockout_seconds: u64,
    /// `SessionService` calls (logins, setups, logouts) one source address
    /// may make per minute, that many at once at most; over it,
    /// `RESOURCE_EXHAUSTED`. 0 turns the limit off. Per replica.
    pub login_rate_per_minute: u32,
    /// Where bundle blobs are kept: empty for `data_dir/blobs`, or
    /// `s3://bucket/prefix` for any S3-compatible object store (the
    /// bucket must exist).
    pub blob_store_url: String,
    /// The S3 API's address when it is not AWS's (MinIO, Ceph, a test
    /// server), e.g. `https://s3.example:9000`. Empty: AWS, or `AWS_ENDPOINT`.
    pub blob_store_endpoint: String,
    /// Empty: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub blob_store_region: String,
    /// Empty: `AWS_ACCESS_KEY_ID` (or the instance's role).
    pub blob_store_access_key_id: String,
    /// Empty: `AWS_SECRET_ACCESS_KEY`. Kept out of logs.
    pub blob_store_secret_access_key: Secret,
    /// Allow an `http://` endpoint: credentials are signed, not sent, but
    /// bundles cross the network in clear. For a test server.
    pub blob_store_allow_http: bool,
    /// `/repo/` answers a request for a bundle's bytes or chunk list with a
    /// redirect to a short-lived presigned URL of the object store, which
    /// tills must then reach and trust (see the README).
    pub repo_redirect_to_object_store: bool,
    /// How long a presigned URL of a redirect is valid.
    pub repo_redirect_expiry_seconds: u64,
}

/// A setting that is never printed (`Debug` shows whether it is set).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("posfleet-data"),
            database_url: String::new(),
            grpc_listen_address: "127.0.0.1:7400".into(),
            http_listen_address: "127.0.0.1:7401".into(),
            heartbeat_interval_seconds: 30,
            offline_after_missed_heartbeats: 3,
            max_message_size_bytes: 64 * 1024,
            metrics_store_series_limit: crate::metrics::DEFAULT_STORE_SERIES_LIMIT,
            database_max_connections: 8,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            insecure_dev: false,
            tls_server_names: Vec::new(),
            tls_ca_cert_path: None,
            tls_ca_key_path: None,
            tls_previous_ca_cert_path: None,
            tls_previous_ca_key_path: None,
            tls_server_cert_path: None,
            tls_server_key_path: None,
            tls_server_trust_path: None,
            device_cert_validity_days: 30,
            device_cert_grace_days: 90,
            webhook_timeout_seconds: 10,
            webhook_max_attempts: 10,
            webhook_retry_initial_milliseconds: 1000,
            webhook_retry_max_seconds: 600,
            peer_enroll_calls_per_minute: 120,
            peer_enroll_burst_calls: 200,
            peer_failed_calls_per_minute: 60,
            peer_failed_burst_calls: 100,
            rate_limit_max_peers: 100_000,
            p2p_address_change_interval_seconds: 60,
            log_request_expiry_seconds: 24 * 3600,
            log_retention_seconds: 24 * 3600,
            log_follow_max_seconds: 600,
            log_request_max_bytes: 8 * 1024 * 1024,
            approval_threshold_devices: 100,
            held_assignment_expiry_seconds: 24 * 3600,
            repository_key_encryption_key_path: None,
            session_lifetime_seconds: 12 * 3600,
            login_max_failures: 5,
            login_lockout_seconds: 900,
            login_rate_per_minute: 10,
            blob_store_url: String::new(),
            blob_store_endpoint: String::new(),
            blob_store_region: String::new(),
            blob_store_access_key_id: String::new(),
            blob_store_secret_access_key: Secret::default(),
            blob_store_allow_http: false,
            repo_redirect_to_object_store: false,
            repo_redirect_expiry_seconds: 300,
        }
    }
}

/// Command-line flags; each one overrides the file and the environment.
#[derive(Debug, Parser, Serialize)]
#[command(
    name = "posfleet-control-plane",
    version,
    about = "The posfleet control plane."
)]
pub struct Args {
    /// Without a command: serve.
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, env = "POSFLEET_CONFIG", global = true)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen_address: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen_address: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_seconds: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_after_missed_heartbeats: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_size_bytes: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_store_series_limit: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_max_connections: Option<u32>,
    /// `text` or `json`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Serve plaintext gRPC on non-loopback addresses (development only).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_dev: bool,
    /// A name for the server certificate (repeat for several); turns TLS on.
    #[arg(long = "tls-server-name")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_server_names: Vec<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_cert_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_key_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_previous_ca_cert_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_previous_ca_key_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_cert_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_key_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_trust_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_cert_validity_days: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_cert_grace_days: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_timeout_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_max_attempts: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_retry_initial_milliseconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_retry_max_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_enroll_calls_per_minute: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_enroll_burst_calls: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_failed_calls_per_minute: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_failed_burst_calls: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_max_peers: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_address_change_interval_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_request_expiry_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_retention_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_follow_max_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_request_max_bytes: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_threshold_devices: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_assignment_expiry_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_key_encryption_key_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_lifetime_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_max_failures: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_lockout_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_rate_per_minute: Option<u32>,
    /// `s3://bucket/prefix`; the secret key only from the file or
    /// `POSFLEET_BLOB_STORE_SECRET_ACCESS_KEY` / `AWS_SECRET_ACCESS_KEY`.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_store_url: Option<String>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_store_endpoint: Option<String>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_store_region: Option<String>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_store_access_key_id: Option<String>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub blob_store_allow_http: bool,
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub repo_redirect_to_object_store: bool,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_redirect_expiry_seconds: Option<u64>,
}

/// What the program does besides serving; both read the server's
/// configuration (its data dir and database).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Back up the database, the data dir's keys and CA and the local
    /// bundle blobs into a new folder, while the control plane serves.
    Backup {
        /// The new folder the backup is written to.
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        postgres: PostgresTools,
    },
    /// Restore a backup into an empty data dir and an empty database.
    Restore {
        /// The backup's folder.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        postgres: PostgresTools,
    },
}

/// Where PostgreSQL's client tools are, for a PostgreSQL database.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PostgresTools {
    /// The folder holding `pg_dump` and `pg_restore` (the server's major
    /// version or newer, e.g. /usr/lib/postgresql/16/bin); default: PATH.
    #[arg(long, env = "POSFLEET_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
}

impl Config {
    /// Layers defaults, the file named by `--config`, the environment and the
    /// flags, then validates the result.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        Config::load_from(args, std::env::vars_os())
    }

    /// As [`Config::load`], with the environment given.
    pub fn load_from(
        args: &Args,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Config, ConfigError> {
        let config: Config = posfleet_runtime::config::load(args.config.as_deref(), env, args)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that could make the server misbehave later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut addresses = Vec::new();
        for (key, value) in [
            ("grpc_listen_address", &self.grpc_listen_address),
            ("http_listen_address", &self.http_listen_address),
        ] {
            addresses.push(value.parse::<SocketAddr>().map_err(|_| {
                ConfigError::new(
                    key,
                    format!("`{value}` is not an address like 127.0.0.1:7400"),
                )
            })?);
        }
        if !addresses[0].ip().is_loopback() && !self.insecure_dev && !self.tls() {
            return Err(ConfigError::new(
                "grpc_listen_address",
                format!(
                    "`{}` is not a loopback address, and gRPC is plaintext without TLS; \
                     set tls_server_names (--tls-server-name) to the names tills reach it by, \
                     or insecure_dev = true (--insecure-dev) to serve plaintext on the network anyway",
                    self.grpc_listen_address
                ),
            ));
        }
        if self.tls_ca_cert_path.is_some() != self.tls_ca_key_path.is_some() {
            return Err(ConfigError::new(
                if self.tls_ca_cert_path.is_some() {
                    "tls_ca_key_path"
                } else {
                    "tls_ca_cert_path"
                },
                "tls_ca_cert_path and tls_ca_key_path go together: set both or neither",
            ));
        }
        for (first, second, first_key, second_key) in [
            (
                &self.tls_previous_ca_cert_path,
                &self.tls_previous_ca_key_path,
                "tls_previous_ca_cert_path",
                "tls_previous_ca_key_path",
            ),
            (
                &self.tls_server_cert_path,
                &self.tls_server_key_path,
                "tls_server_cert_path",
                "tls_server_key_path",
            ),
        ] {
            if first.is_some() != second.is_some() {
                return Err(ConfigError::new(
                    if first.is_some() {
                        second_key
                    } else {
                        first_key
                    },
                    format!("{first_key} and {second_key} go together: set both or neither"),
                ));
            }
        }
        if self.tls_previous_ca_cert_path.is_some() && self.tls_ca_cert_path.is_none() {
            return Err(ConfigError::new(
                "tls_previous_ca_cert_path",
                "a previous CA is only for rotating a CA supplied as files: set tls_ca_cert_path \
                 and tls_ca_key_path to the new CA",
            ));
        }
        if self.tls_server_trust_path.is_some() && self.tls_server_cert_path.is_none() {
            return Err(ConfigError::new(
                "tls_server_trust_path",
                "only a server certificate supplied as files (tls_server_cert_path) needs it",
            ));
        }
        let tls_files = [
            &self.tls_ca_cert_path,
            &self.tls_server_cert_path,
            &self.tls_server_trust_path,
        ];
        if tls_files.iter().any(|path| path.is_some()) && !self.tls() {
            return Err(ConfigError::new(
                "tls_server_names",
                "TLS files are configured but TLS is off: set the names the server is reached by",
            ));
        }
        for name in &self.tls_server_names {
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':');
            if name.is_empty() || !name.chars().all(plain) {
                return Err(ConfigError::new(
                    "tls_server_names",
                    format!("`{name}` is not a host name or an IP address"),
                ));
            }
        }
        if !(1..=3600).contains(&self.heartbeat_interval_seconds) {
            return Err(ConfigError::new(
                "heartbeat_interval_seconds",
                format!("must be 1 to 3600, got {}", self.heartbeat_interval_seconds),
            ));
        }
        // Agents add ±10 % jitter: one missed interval would make devices flap.
        if !(2..=100).contains(&self.offline_after_missed_heartbeats) {
            return Err(ConfigError::new(
                "offline_after_missed_heartbeats",
                format!(
                    "must be 2 to 100, got {}",
                    self.offline_after_missed_heartbeats
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.metrics_store_series_limit) {
            return Err(ConfigError::new(
                "metrics_store_series_limit",
                format!(
                    "must be 1 to 1000000, got {}",
                    self.metrics_store_series_limit
                ),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_message_size_bytes) {
            return Err(ConfigError::new(
                "max_message_size_bytes",
                format!(
                    "must be 1024 to 16777216, got {}",
                    self.max_message_size_bytes
                ),
            ));
        }
        if !(1..=1000).contains(&self.database_max_connections) {
            return Err(ConfigError::new(
                "database_max_connections",
                format!("must be 1 to 1000, got {}", self.database_max_connections),
            ));
        }
        if !self.database_url.is_empty()
            && crate::storage::Backend::of_url(&self.database_url).is_none()
        {
            return Err(ConfigError::new(
                "database_url",
                "must start with sqlite:// or postgres:// (or be empty for SQLite in data_dir)",
            ));
        }
        for (key, value, range) in [
            (
                "webhook_timeout_seconds",
                self.webhook_timeout_seconds,
                1..=300,
            ),
            (
                "webhook_max_attempts",
                self.webhook_max_attempts.into(),
                1..=100,
            ),
            (
                "webhook_retry_initial_milliseconds",
                self.webhook_retry_initial_milliseconds,
                10..=3_600_000,
            ),
            (
                "webhook_retry_max_seconds",
                self.webhook_retry_max_seconds,
                1..=86_400,
            ),
            (
                "peer_enroll_calls_per_minute",
                self.peer_enroll_calls_per_minute.into(),
                0..=1_000_000,
            ),
            (
                "peer_enroll_burst_calls",
                self.peer_enroll_burst_calls.into(),
                1..=1_000_000,
            ),
            (
                "peer_failed_calls_per_minute",
                self.peer_failed_calls_per_minute.into(),
                0..=1_000_000,
            ),
            (
                "peer_failed_burst_calls",
                self.peer_failed_burst_calls.into(),
                1..=1_000_000,
            ),
            (
                "rate_limit_max_peers",
                self.rate_limit_max_peers.into(),
                100..=10_000_000,
            ),
            (
                "p2p_address_change_interval_seconds",
                self.p2p_address_change_interval_seconds,
                0..=86_400,
            ),
            (
                "log_request_expiry_seconds",
                self.log_request_expiry_seconds,
                1..=30 * 86_400,
            ),
            (
                "log_retention_seconds",
                self.log_retention_seconds,
                1..=30 * 86_400,
            ),
            (
                "log_follow_max_seconds",
                self.log_follow_max_seconds,
                1..=86_400,
            ),
            (
                "log_request_max_bytes",
                self.log_request_max_bytes,
                64 * 1024..=1024 * 1024 * 1024,
            ),
            (
                "approval_threshold_devices",
                self.approval_threshold_devices,
                1..=10_000_000,
            ),
            (
                "held_assignment_expiry_seconds",
                self.held_assignment_expiry_seconds,
                1..=7 * 86_400,
            ),
            (
                "session_lifetime_seconds",
                self.session_lifetime_seconds,
                1..=30 * 86_400,
            ),
            (
                "login_max_failures",
                self.login_max_failures.into(),
                1..=1000,
            ),
            (
                "login_lockout_seconds",
                self.login_lockout_seconds,
                1..=30 * 86_400,
            ),
            (
                "login_rate_per_minute",
                self.login_rate_per_minute.into(),
                0..=1_000_000,
            ),
            (
                "device_cert_validity_days",
                self.device_cert_validity_days.into(),
                1..=397,
            ),
            (
                "device_cert_grace_days",
                self.device_cert_grace_days.into(),
                0..=3650,
            ),
        ] {
            if !range.contains(&value) {
                return Err(ConfigError::new(
                    key,
                    format!("must be {} to {}, got {value}", range.start(), range.end()),
                ));
            }
        }
        self.validate_blob_store()?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        posfleet_runtime::logging::check_log_level(&self.log_level)?;
        Ok(())
    }

    /// `blob_store_url` and the settings that go with it.
    fn validate_blob_store(&self) -> Result<(), ConfigError> {
        let location = crate::blobs::Location::parse(&self.blob_store_url)
            .map_err(|message| ConfigError::new("blob_store_url", message))?;
        let s3 = matches!(location, crate::blobs::Location::S3 { .. });
        let s3_settings = [
            ("blob_store_endpoint", !self.blob_store_endpoint.is_empty()),
            ("blob_store_region", !self.blob_store_region.is_empty()),
            (
                "blob_store_access_key_id",
                !self.blob_store_access_key_id.is_empty(),
            ),
            (
                "blob_store_secret_access_key",
                !self.blob_store_secret_access_key.0.is_empty(),
            ),
            ("blob_store_allow_http", self.blob_store_allow_http),
            (
                "repo_redirect_to_object_store",
                self.repo_redirect_to_object_store,
            ),
        ];
        if let Some((key, _)) = s3_settings.iter().find(|(_, set)| *set && !s3) {
            return Err(ConfigError::new(
                key,
                "is for an object store: set blob_store_url = \"s3://bucket/prefix\" too",
            ));
        }
        let endpoint = &self.blob_store_endpoint;
        if !endpoint.is_empty() {
            let (scheme, host) = endpoint.split_once("://").unwrap_or(("", ""));
            if !matches!(scheme, "http" | "https") || host.is_empty() {
                return Err(ConfigError::new(
                    "blob_store_endpoint",
                    format!("`{endpoint}` is not a URL like https://s3.example:9000"),
                ));
            }
            if scheme == "http" && !self.blob_store_allow_http {
                return Err(ConfigError::new(
                    "blob_store_endpoint",
                    format!(
                        "`{endpoint}` is plain HTTP: bundles would cross the network in clear; \
                         use https, or set blob_store_allow_http = true for a test server"
                    ),
                ));
            }
        }
        if self.blob_store_access_key_id.is_empty()
            != self.blob_store_secret_access_key.0.is_empty()
        {
            return Err(ConfigError::new(
                if self.blob_store_access_key_id.is_empty() {
                    "blob_store_access_key_id"
                } else {
                    "blob_store_secret_access_key"
                },
                "blob_store_access_key_id and blob_store_secret_access_key go together: set \
                 both, or neither to use the AWS_* variables",
            ));
        }
        // S3 presigned URLs are valid for a week at most.
        if !(10..=7 * 86_400).contains(&self.repo_redirect_expiry_seconds) {
            return Err(ConfigError::new(
                "repo_redirect_expiry_seconds",
                format!(
                    "must be 10 to 604800, got {}",
                    self.repo_redirect_expiry_seconds
                ),
            ));
        }
        Ok(())
    }

    /// How long device certificates live, and may be renewed after.
    pub fn certificate_policy(&self) -> crate::tls::CertificatePolicy {
        let days = |n: u32| std::time::Duration::from_secs(u64::from(n) * 86_400);
        crate::tls::CertificatePolicy {
            validity: days(self.device_cert_validity_days),
            grace: days(self.device_cert_grace_days),
        }
    }

    /// Whether the listeners serve TLS.
    pub fn tls(&self) -> bool {
        !self.tls_server_names.is_empty()
    }

    /// The database URL actually used: SQLite in the data dir unless set.
    pub fn effective_database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("posfleet.db").display()
            )
        } else {
            self.database_url.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["posfleet-control-plane"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    fn check_err(extra: &[&str], key: &str) {
        let err = Config::load(&args(extra)).expect_err("config should be refused");
        assert_eq!(err.key, key, "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(&args(&[])).unwrap();
        assert_eq!(config.heartbeat_interval_seconds, 30);
        assert_eq!(config.session_lifetime_seconds, 43_200);
        assert_eq!(
            (config.login_max_failures, config.login_lockout_seconds),
            (5, 900)
        );
        assert_eq!(config.login_rate_per_minute, 10);
        assert!(config.effective_database_url().starts_with("sqlite://"));
    }

    #[test]
    fn bad_values_name_their_key() {
        check_err(
            &["--heartbeat-interval-seconds", "0"],
            "heartbeat_interval_seconds",
        );
        check_err(&["--grpc-listen-address", "nowhere"], "grpc_listen_address");
        check_err(&["--database-url", "mysql://x"], "database_url");
        check_err(&["--log-format", "xml"], "log_format");
        check_err(&["--config", "/nonexistent/posfleet.toml"], "config");
        check_err(&["--webhook-max-attempts", "0"], "webhook_max_attempts");
        check_err(
            &["--webhook-retry-initial-milliseconds", "1"],
            "webhook_retry_initial_milliseconds",
        );
        check_err(
            &["--peer-enroll-burst-calls", "0"],
            "peer_enroll_burst_calls",
        );
        check_err(&["--rate-limit-max-peers", "10"], "rate_limit_max_peers");
        check_err(&["--log-follow-max-seconds", "0"], "log_follow_max_seconds");
        check_err(&["--log-request-max-bytes", "100"], "log_request_max_bytes");
        check_err(
            &["--approval-threshold-devices", "0"],
            "approval_threshold_devices",
        );
        check_err(
            &["--held-assignment-expiry-seconds", "0"],
            "held_assignment_expiry_seconds",
        );
        check_err(
            &["--session-lifetime-seconds", "0"],
            "session_lifetime_seconds",
        );
        check_err(&["--login-max-failures", "0"], "login_max_failures");
        check_err(&["--login-lockout-seconds", "0"], "login_lockout_seconds");
    }

    #[test]
    fn tls_names_serve_beyond_loopback_and_a_ca_needs_both_files() {
        let config = Config::load(&args(&[
            "--grpc-listen-address",
            "0.0.0.0:7400",
            "--tls-server-name",
            "cp.example",
            "--tls-server-name",
            "10.0.0.5",
        ]))
        .unwrap();
        assert!(config.tls());
        assert_eq!(config.tls_server_names, ["cp.example", "10.0.0.5"]);
        check_err(
            &[
                "--tls-server-name",
                "cp.example",
                "--tls-ca-cert-path",
                "ca.crt",
            ],
            "tls_ca_key_path",
        );
        check_err(
            &[
                "--tls-ca-cert-path",
                "ca.crt",
                "--tls-ca-key-path",
                "ca.key",
            ],
            "tls_server_names",
        );
        check_err(&["--tls-server-name", "cp/example"], "tls_server_names");
        check_err(
            &["--device-cert-validity-days", "0"],
            "device_cert_validity_days",
        );
        let from_env = Config::load_from(
            &args(&[]),
            [(
                OsString::from("POSFLEET_TLS_SERVER_NAMES"),
                OsString::from("[cp.example, 10.0.0.5]"),
            )],
        )
        .unwrap();
        assert_eq!(from_env.tls_server_names, ["cp.example", "10.0.0.5"]);
    }

    #[test]
    fn documented_env_variables_set_their_keys() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(OsString, OsString)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        let config = Config::load_from(
            &args(&[]),
            env(&[
                ("POSFLEET_HEARTBEAT_INTERVAL_SECONDS", "5"),
                ("POSFLEET_GRPC_LISTEN_ADDRESS", "0.0.0.0:7400"),
                ("POSFLEET_INSECURE_DEV", "true"),
                ("POSFLEET_LOG_FORMAT", "json"),
                ("POSFLEET_DATABASE_URL", "postgres://db/posfleet"),
                ("POSFLEET_CONFIG_TYPO", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(config.heartbeat_interval_seconds, 5);
        assert!(config.insecure_dev);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.database_url, "postgres://db/posfleet");
        let err = Config::load_from(
            &args(&[]),
            env(&[("POSFLEET_WEBHOOK_MAX_ATTEMPTS", "many")]),
        )
        .unwrap_err();
        assert_eq!(err.key, "webhook_max_attempts", "{err}");
        assert!(
            err.to_string().contains("POSFLEET_WEBHOOK_MAX_ATTEMPTS"),
            "{err}"
        );
    }

    #[test]
    fn blob_store_settings_are_checked() {
        let config = Config::load(&args(&[
            "--blob-store-url",
            "s3://posfleet-blobs/prod",
            "--blob-store-endpoint",
            "http://127.0.0.1:9000",
            "--blob-store-allow-http",
            "--repo-redirect-to-object-store",
        ]))
        .unwrap();
        assert_eq!(config.blob_store_url, "s3://posfleet-blobs/prod");
        assert!(config.repo_redirect_to_object_store);
        check_err(
            &["--blob-store-url", "gs://posfleet-blobs"],
            "blob_store_url",
        );
        check_err(&["--blob-store-url", "s3://"], "blob_store_url");
        check_err(&["--blob-store-url", "s3:///prefix"], "blob_store_url");
        check_err(
            &["--repo-redirect-to-object-store"],
            "repo_redirect_to_object_store",
        );
        check_err(
            &["--blob-store-endpoint", "https://s3.example"],
            "blob_store_endpoint",
        );
        check_err(
            &[
                "--blob-store-url",
                "s3://posfleet-blobs",
                "--blob-store-endpoint",
                "http://127.0.0.1:9000",
            ],
            "blob_store_endpoint",
        );
        check_err(
            &[
                "--blob-store-url",
                "s3://posfleet-blobs",
                "--blob-store-endpoint",
                "s3.example",
            ],
            "blob_store_endpoint",
        );
        check_err(
            &[
                "--blob-store-url",
                "s3://posfleet-blobs",
                "--blob-store-access-key-id",
                "AKIA",
            ],
            "blob_store_secret_access_key",
        );
        check_err(
            &["--repo-redirect-expiry-seconds", "0"],
            "repo_redirect_expiry_seconds",
        );
        let from_env = Config::load_from(
            &args(&["--blob-store-url", "s3://posfleet-blobs"]),
            [
                (
                    OsString::from("POSFLEET_BLOB_STORE_ACCESS_KEY_ID"),
                    OsString::from("AKIA"),
                ),
                (
                    OsString::from("POSFLEET_BLOB_STORE_SECRET_ACCESS_KEY"),
                    OsString::from("s3cr3t"),
                ),
            ],
        )
        .unwrap();
        assert_eq!(from_env.blob_store_secret_access_key.0, "s3cr3t");
        assert!(!format!("{from_env:?}").contains("s3cr3t"));
    }

    #[test]
    fn plaintext_grpc_beyond_loopback_needs_insecure_dev() {
        check_err(
            &["--grpc-listen-address", "0.0.0.0:7400"],
            "grpc_listen_address",
        );
        let config = Config::load(&args(&[
            "--grpc-listen-address",
            "0.0.0.0:7400",
            "--insecure-dev",
        ]));
        assert!(config.unwrap().insecure_dev);
        check_err(
            &["--offline-after-missed-heartbeats", "1"],
            "offline_after_missed_heartbeats",
        );
    }

    #[test]
    fn file_values_apply_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.toml");
        std::fs::write(&path, "heartbeat_interval_seconds = 7\n").unwrap();
        let config = Config::load(&args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(config.heartbeat_interval_seconds, 7);
        // A flag overrides the file.
        let config = Config::load(&args(&[
            "--config",
            path.to_str().unwrap(),
            "--heartbeat-interval-seconds",
            "9",
        ]))
        .unwrap();
        assert_eq!(config.heartbeat_interval_seconds, 9);

        std::fs::write(&path, "heartbeat_interval_secs = 7\n").unwrap();
        let err = Config::load(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("heartbeat_interval_secs"), "{err}");

        std::fs::write(&path, "heartbeat_interval_seconds = \"soon\"\n").unwrap();
        check_err(
            &["--config", path.to_str().unwrap()],
            "heartbeat_interval_seconds",
        );
    }
}
