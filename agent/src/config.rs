//! Agent configuration: defaults, then a TOML file, then `POSFLEET_*`
//! environment variables, then flags. Validated before anything starts.

use clap::Parser;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::PathBuf;

use crate::hooks::HookUser;
pub use posfleet_runtime::{ConfigError, LogFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeripheralsDriver {
    /// No peripherals are attached (or none is watched).
    None,
    /// A simulated printer, scanner and cash drawer, for tests and demos.
    Fake,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FakeFault {
    Printer,
    Scanner,
    CashDrawer,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The control plane's gRPC address, e.g. `https://cp.example:7400`
    /// (TLS: set `ca_cert_path` or `ca_fingerprint`), or
    /// `http://127.0.0.1:7400` (plaintext).
    pub server_url: String,
    /// With an `https://` server: a PEM file of the CA certificates that
    /// vouch for the control plane until the till is enrolled (then the
    /// trust bundle the control plane hands out is used). Empty: none.
    pub ca_cert_path: PathBuf,
    /// With an `https://` server, instead of `ca_cert_path`: the fleet CA's
    /// fingerprint, SHA-256 of its certificate (64 hex digits), given with
    /// the enrollment token. Empty: none.
    pub ca_fingerprint: String,
    /// Device key, enrollment and state; survives restarts.
    pub data_dir: PathBuf,
    /// One-time token from ops; only read until the device is enrolled.
    /// Prefer `enrollment_token_file` or `POSFLEET_ENROLLMENT_TOKEN`: a
    /// flag shows in `ps`.
    pub enrollment_token: String,
    /// A file holding the enrollment token (a trailing newline is trimmed),
    /// read at start; it must not be readable by every user. Empty: none.
    pub enrollment_token_file: PathBuf,
    /// The user bundle hooks run as (its uid and primary group). Empty:
    /// the agent's own user.
    pub hook_user: String,
    pub hardware_model: String,
    /// Empty means the machine id (`/etc/machine-id`), else the host name.
    pub serial_number: String,
    pub peripherals: PeripheralsDriver,
    /// With `peripherals = "fake"`: which peripherals report a failure.
    pub fake_peripheral_faults: Vec<FakeFault>,
    /// Longest wait between retries while the control plane is unreachable.
    pub max_backoff_seconds: u64,
    pub request_timeout_seconds: u64,
    pub log_format: LogFormat,
    pub log_level: String,
    /// The pinned TUF root shipped with the agent; empty: no bundle
    /// repository is used.
    pub root_json_path: PathBuf,
    /// The control plane's bundle repository, e.g. `http://cp:7401/repo/`.
    pub repository_url: String,
    /// How often the repository metadata is refreshed.
    pub repository_refresh_seconds: u64,
    /// How often pending bundle work is looked at again: a closed
    /// maintenance window, a failed download to retry.
    pub install_check_interval_seconds: u64,
    /// Disk space kept free: a download or install that would leave less
    /// is refused before it starts.
    pub min_free_disk_bytes: u64,
    /// For tests only: read the current time (RFC 3339) from this file
    /// instead of the system clock, for maintenance windows and the
    /// minutes of signals. Empty: the system clock.
    pub clock_file: PathBuf,
    /// Talk plaintext gRPC to a control plane beyond loopback. Until TLS is
    /// configured the device credential crosses the network in clear, so
    /// this is for development networks only.
    pub insecure_dev: bool,
    /// Share bundles with the store's other tills, so each bundle crosses
    /// the store's WAN link once.
    pub p2p_enabled: bool,
    /// Where to accept the store's tills (libp2p multiaddrs, TCP and QUIC).
    pub p2p_listen_addrs: Vec<String>,
    /// Also find the store's tills by mDNS (a flat LAN); the control plane's
    /// list works everywhere.
    pub p2p_mdns: bool,
    /// Upload cap towards each peer; 0: unlimited.
    pub p2p_upload_limit_bytes_per_second: u64,
    /// Pieces in flight at once, in each direction.
    pub p2p_max_concurrent_transfers: usize,
    /// Open P2P connections at most.
    pub p2p_max_connections: u32,
    /// With no store peer reachable for this long, download from the
    /// control plane alone.
    pub p2p_origin_fallback_delay_seconds: u64,
    /// The till downloading for the store made no progress for this long:
    /// the next one takes over.
    pub p2p_stall_timeout_seconds: u64,
    /// Application log files to keep in the log store (followed like
    /// `tail -F`, across rotation), for `posfleet device logs`.
    pub log_paths: Vec<PathBuf>,
    /// Size of the log store (`data_dir/logs`); the oldest lines go first.
    pub log_store_max_bytes: u64,
    /// Upload cap of log lines sent to the control plane; 0: unlimited.
    pub log_upload_limit_bytes_per_second: u64,
    /// Regular expressions of secrets redacted from log lines before they
    /// are uploaded (a group named `secret`: only that part). Replaces the
    /// defaults: card numbers, `password=…`-like pairs, bearer tokens.
    pub log_redact_patterns: Vec<String>,
    /// How long a new agent version has, from its switch on, to reach the
    /// control plane and report healthy before its launcher switches back
    /// to the version before it.
    pub agent_update_confirm_seconds: u64,
    /// The local API's Unix datagram socket, where the point-of-sale
    /// program reports its signals. Empty: `signals.sock` in the data dir.
    pub signal_socket_path: PathBuf,
}

/// Every key but the enrollment token, which enrolls a till into its store
/// and must not reach the logs: it shows as `<redacted>` when set.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured, so that a new key cannot be left out unnoticed.
        let AgentConfig {
            server_url,
            ca_cert_path,
            ca_fingerprint,
            data_dir,
            enrollment_token,
            enrollment_token_file,
            hook_user,
            hardware_model,
            serial_number,
            peripherals,
            fake_peripheral_faults,
            max_backoff_seconds,
            request_timeout_seconds,
            log_format,
            log_level,
            root_json_path,
            repository_url,
            repository_refresh_seconds,
            install_check_interval_seconds,
            min_free_disk_bytes,
            clock_file,
            insecure_dev,
            p2p_enabled,
            p2p_listen_addrs,
            p2p_mdns,
            p2p_upload_limit_bytes_per_second,
            p2p_max_concurrent_transfers,
            p2p_max_connections,
            p2p_origin_fallback_delay_seconds,
            p2p_stall_timeout_seconds,
            log_paths,
            log_store_max_bytes,
            log_upload_limit_bytes_per_second,
            log_redact_patterns,
            agent_update_confirm_seconds,
            signal_socket_path,
        } = self;
        f.debug_struct("AgentConfig")
            .field("server_url", server_url)
            .field("ca_cert_path", ca_cert_path)
            .field("ca_fingerprint", ca_fingerprint)
            .field("data_dir", data_dir)
            .field("enrollment_token", &redacted(enrollment_token))
            .field("enrollment_token_file", enrollment_token_file)
            .field("hook_user", hook_user)
            .field("hardware_model", hardware_model)
            .field("serial_number", serial_number)
            .field("peripherals", peripherals)
            .field("fake_peripheral_faults", fake_peripheral_faults)
            .field("max_backoff_seconds", max_backoff_seconds)
            .field("request_timeout_seconds", request_timeout_seconds)
            .field("log_format", log_format)
            .field("log_level", log_level)
            .field("root_json_path", root_json_path)
            .field("repository_url", repository_url)
            .field("repository_refresh_seconds", repository_refresh_seconds)
            .field(
                "install_check_interval_seconds",
                install_check_interval_seconds,
            )
            .field("min_free_disk_bytes", min_free_disk_bytes)
            .field("clock_file", clock_file)
            .field("insecure_dev", insecure_dev)
            .field("p2p_enabled", p2p_enabled)
            .field("p2p_listen_addrs", p2p_listen_addrs)
            .field("p2p_mdns", p2p_mdns)
            .field(
                "p2p_upload_limit_bytes_per_second",
                p2p_upload_limit_bytes_per_second,
            )
            .field("p2p_max_concurrent_transfers", p2p_max_concurrent_transfers)
            .field("p2p_max_connections", p2p_max_connections)
            .field(
                "p2p_origin_fallback_delay_seconds",
                p2p_origin_fallback_delay_seconds,
            )
            .field("p2p_stall_timeout_seconds", p2p_stall_timeout_seconds)
            .field("log_paths", log_paths)
            .field("log_store_max_bytes", log_store_max_bytes)
            .field(
                "log_upload_limit_bytes_per_second",
                log_upload_limit_bytes_per_second,
            )
            .field("log_redact_patterns", log_redact_patterns)
            .field("agent_update_confirm_seconds", agent_update_confirm_seconds)
            .field("signal_socket_path", signal_socket_path)
            .finish()
    }
}

/// The range of `agent_update_confirm_seconds`, checked by the agent and
/// by its launcher alike.
pub fn check_confirm_seconds(seconds: u64) -> Result<(), ConfigError> {
    if !(5..=86_400).contains(&seconds) {
        return Err(ConfigError::new(
            "agent_update_confirm_seconds",
            "must be 5 to 86400",
        ));
    }
    Ok(())
}

/// A secret as `Debug` shows it: whether it is set, never what it is.
fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { "<redacted>" }
}

/// What vouches for an `https://` control plane before the till holds the
/// trust bundle enrollment hands out.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// The CA certificates of `ca_cert_path`.
    Ca(Vec<posfleet_pki::rustls::pki_types::CertificateDer<'static>>),
    /// The fleet CA's SHA-256 fingerprint, `ca_fingerprint`.
    Pinned([u8; 32]),
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            server_url: "http://127.0.0.1:7400".into(),
            ca_cert_path: PathBuf::new(),
            ca_fingerprint: String::new(),
            data_dir: PathBuf::from("posfleet-agent-data"),
            enrollment_token: String::new(),
            enrollment_token_file: PathBuf::new(),
            hook_user: String::new(),
            hardware_model: "generic-pos".into(),
            serial_number: String::new(),
            peripherals: PeripheralsDriver::None,
            fake_peripheral_faults: Vec::new(),
            max_backoff_seconds: 300,
            request_timeout_seconds: 10,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            insecure_dev: false,
            root_json_path: PathBuf::new(),
            repository_url: String::new(),
            repository_refresh_seconds: 300,
            install_check_interval_seconds: 30,
            min_free_disk_bytes: 64 * 1024 * 1024,
            clock_file: PathBuf::new(),
            p2p_enabled: true,
            p2p_listen_addrs: vec![
                "/ip4/0.0.0.0/tcp/7410".into(),
                "/ip4/0.0.0.0/udp/7410/quic-v1".into(),
            ],
            p2p_mdns: true,
            p2p_upload_limit_bytes_per_second: 0,
            p2p_max_concurrent_transfers: 16,
            p2p_max_connections: 64,
            p2p_origin_fallback_delay_seconds: 10,
            p2p_stall_timeout_seconds: 10,
            log_paths: Vec::new(),
            log_store_max_bytes: 50 * 1024 * 1024,
            log_upload_limit_bytes_per_second: 64 * 1024,
            log_redact_patterns: crate::logs::DEFAULT_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            agent_update_confirm_seconds: 300,
            signal_socket_path: PathBuf::new(),
        }
    }
}

#[derive(Debug, Parser, Serialize)]
#[command(
    name = "posfleet-agent",
    version,
    about = "The posfleet point-of-sale agent.",
    after_help = "Also: `posfleet-agent signal LINE...` reports signals to the running agent (see `posfleet-agent signal --help`)."
)]
pub struct Args {
    /// TOML configuration file.
    #[arg(long, env = "POSFLEET_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_url: Option<String>,
    /// PEM file of the CA(s) vouching for an https:// control plane.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert_path: Option<PathBuf>,
    /// SHA-256 fingerprint of the fleet CA, instead of --ca-cert-path.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Shows in `ps`: prefer --enrollment-token-file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    /// A file holding the enrollment token (mode 0600 or 0640).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_token_file: Option<PathBuf>,
    /// Run bundle hooks as this user instead of the agent's.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_user: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_model: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    /// `none` or `fake`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peripherals: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_backoff_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout_seconds: Option<u64>,
    /// `text` or `json`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_json_path: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_url: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_check_interval_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free_disk_bytes: Option<u64>,
    /// Tests only: read the time from this file (RFC 3339).
    #[arg(long, hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_file: Option<PathBuf>,
    /// Talk plaintext gRPC to a non-loopback control plane (development only).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_dev: bool,
    /// `true` or `false`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_enabled: Option<bool>,
    /// Comma-separated multiaddrs.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_listen_addrs: Option<Vec<String>>,
    /// `true` or `false`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_mdns: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_upload_limit_bytes_per_second: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_max_concurrent_transfers: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_max_connections: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_origin_fallback_delay_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p2p_stall_timeout_seconds: Option<u64>,
    /// Comma-separated application log files to follow.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_paths: Option<Vec<PathBuf>>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_store_max_bytes: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_upload_limit_bytes_per_second: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_update_confirm_seconds: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal_socket_path: Option<PathBuf>,
}

impl AgentConfig {
    /// Layers defaults, the file named by `--config`, the `POSFLEET_*`
    /// environment and the flags, then validates the result.
    pub fn load(args: &Args) -> Result<AgentConfig, ConfigError> {
        AgentConfig::load_from(args, std::env::vars_os())
    }

    /// As [`AgentConfig::load`], with the environment given.
    pub fn load_from(
        args: &Args,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<AgentConfig, ConfigError> {
        let mut config: AgentConfig =
            posfleet_runtime::config::load(args.config.as_deref(), env, args)?;
        config.read_enrollment_token_file()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `enrollment_token_file` into `enrollment_token`. A file every
    /// user may read is refused: the token enrolls a till into its store.
    fn read_enrollment_token_file(&mut self) -> Result<(), ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        const KEY: &str = "enrollment_token_file";
        /// Far above any token; a larger file is not one.
        const MAX_BYTES: u64 = 4096;
        let path = &self.enrollment_token_file;
        if path.as_os_str().is_empty() {
            return Ok(());
        }
        if !self.enrollment_token.is_empty() {
            return Err(ConfigError::new(
                KEY,
                "set enrollment_token or enrollment_token_file, not both",
            ));
        }
        let cannot_read = |e: std::io::Error| {
            ConfigError::new(KEY, format!("cannot read {}: {e}", path.display()))
        };
        let file = std::fs::File::open(path).map_err(cannot_read)?;
        let mode = file.metadata().map_err(cannot_read)?.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(ConfigError::new(
                KEY,
                format!(
                    "{} is readable by every user (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                ),
            ));
        }
        let mut text = String::new();
        file.take(MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(cannot_read)?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.is_empty() || text.len() as u64 > MAX_BYTES || token.contains(['\n', '\r']) {
            return Err(ConfigError::new(
                KEY,
                format!("{} must hold the token on one line", path.display()),
            ));
        }
        self.enrollment_token = token.to_string();
        Ok(())
    }

    /// The user hooks run as, looked up in the system's user database;
    /// `None`: the agent's own.
    pub fn hook_user(&self) -> Result<Option<HookUser>, ConfigError> {
        if self.hook_user.is_empty() {
            return Ok(None);
        }
        match HookUser::lookup(&self.hook_user) {
            Ok(Some(user)) => Ok(Some(user)),
            Ok(None) => Err(ConfigError::new(
                "hook_user",
                format!("no user `{}` on this system", self.hook_user),
            )),
            Err(e) => Err(ConfigError::new(
                "hook_user",
                format!("cannot look up `{}`: {e}", self.hook_user),
            )),
        }
    }

    /// The local API's socket: `signal_socket_path`, else `signals.sock`
    /// in the data dir; absolute, since programs get it from any folder.
    pub fn signal_socket(&self) -> PathBuf {
        let path = if self.signal_socket_path.as_os_str().is_empty() {
            self.data_dir.join(crate::signals::socket::SOCKET_FILE)
        } else {
            self.signal_socket_path.clone()
        };
        std::path::absolute(&path).unwrap_or(path)
    }

    /// Whether the control plane is reached over TLS (`https://`).
    pub fn tls(&self) -> bool {
        self.server_url.starts_with("https://")
    }

    /// The CAs that vouch for the control plane before enrollment, from
    /// `ca_cert_path` or `ca_fingerprint`; `None` over plaintext.
    pub fn server_trust(&self) -> Result<Option<ServerTrust>, ConfigError> {
        if !self.tls() {
            return Ok(None);
        }
        match (
            self.ca_cert_path.as_os_str().is_empty(),
            self.ca_fingerprint.is_empty(),
        ) {
            (false, false) => Err(ConfigError::new(
                "ca_fingerprint",
                "set ca_cert_path or ca_fingerprint, not both",
            )),
            (true, true) => Err(ConfigError::new(
                "ca_cert_path",
                format!(
                    "`{}` is TLS: set ca_cert_path to the fleet CA certificate \
                     (or ca_fingerprint to its SHA-256)",
                    self.server_url
                ),
            )),
            (false, true) => {
                let path = &self.ca_cert_path;
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::new(
                        "ca_cert_path",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                posfleet_pki::certificates_from_pem(&pem, &path.display().to_string())
                    .map(|certificates| Some(ServerTrust::Ca(certificates)))
                    .map_err(|e| ConfigError::new("ca_cert_path", e.to_string()))
            }
            (true, false) => posfleet_pki::parse_fingerprint(&self.ca_fingerprint)
                .map(|pin| Some(ServerTrust::Pinned(pin)))
                .map_err(|e| ConfigError::new("ca_fingerprint", e.to_string())),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let uri: tonic::transport::Uri = self.server_url.parse().map_err(|_| {
            ConfigError::new("server_url", format!("`{}` is not a URL", self.server_url))
        })?;
        let scheme = uri.scheme_str().filter(|s| matches!(*s, "http" | "https"));
        let (Some(scheme), Some(host)) = (scheme, uri.host()) else {
            return Err(ConfigError::new(
                "server_url",
                format!(
                    "`{}` must look like https://host:7400 (or http:// for plaintext)",
                    self.server_url
                ),
            ));
        };
        let loopback = posfleet_runtime::plaintext::is_loopback_host(host);
        if scheme == "http" && !loopback && !self.insecure_dev {
            return Err(ConfigError::new(
                "server_url",
                format!(
                    "`{host}` is not this machine, and http:// is plaintext; use https:// \
                     with ca_cert_path, or set insecure_dev = true (--insecure-dev) to use it anyway"
                ),
            ));
        }
        self.server_trust()?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        if !self.root_json_path.as_os_str().is_empty() {
            if !self.root_json_path.is_file() {
                return Err(ConfigError::new(
                    "root_json_path",
                    format!("{} is not a readable file", self.root_json_path.display()),
                ));
            }
            // The repository is reached as the control plane is: over TLS
            // with the same trust, or plaintext.
            let url: Result<tonic::transport::Uri, _> = self.repository_url.parse();
            if !url.is_ok_and(|u| u.scheme_str() == Some(scheme) && u.host().is_some()) {
                return Err(ConfigError::new(
                    "repository_url",
                    format!(
                        "must be set, like {scheme}://host:7401/repo/ ({scheme}:// as \
                         server_url), when root_json_path is"
                    ),
                ));
            }
            if !(10..=86_400).contains(&self.repository_refresh_seconds) {
                return Err(ConfigError::new(
                    "repository_refresh_seconds",
                    "must be 10 to 86400",
                ));
            }
        }
        if !(1..=3600).contains(&self.install_check_interval_seconds) {
            return Err(ConfigError::new(
                "install_check_interval_seconds",
                "must be 1 to 3600",
            ));
        }
        if self.hardware_model.trim().is_empty() || self.hardware_model.len() > 64 {
            return Err(ConfigError::new("hardware_model", "must be 1 to 64 bytes"));
        }
        if self.serial_number.len() > 128 {
            return Err(ConfigError::new(
                "serial_number",
                "must be at most 128 bytes",
            ));
        }
        if !(1024 * 1024..=64 * 1024 * 1024 * 1024).contains(&self.log_store_max_bytes) {
            return Err(ConfigError::new(
                "log_store_max_bytes",
                "must be 1048576 (1 MiB) to 68719476736 (64 GiB)",
            ));
        }
        if self
            .log_paths
            .iter()
            .any(|p| p.as_os_str().is_empty() || p.is_relative())
        {
            return Err(ConfigError::new(
                "log_paths",
                "each path must be absolute, like /var/log/pos/app.log",
            ));
        }
        crate::logs::Redactor::new(&self.log_redact_patterns)
            .map_err(|e| ConfigError::new("log_redact_patterns", e))?;
        if !(1..=86_400).contains(&self.max_backoff_seconds) {
            return Err(ConfigError::new(
                "max_backoff_seconds",
                "must be 1 to 86400",
            ));
        }
        if !(1..=600).contains(&self.request_timeout_seconds) {
            return Err(ConfigError::new(
                "request_timeout_seconds",
                "must be 1 to 600",
            ));
        }
        posfleet_runtime::logging::check_log_level(&self.log_level)?;
        check_confirm_seconds(self.agent_update_confirm_seconds)?;
        self.hook_user()?;
        if self.p2p_enabled {
            self.p2p_config()?;
        }
        Ok(())
    }

    /// The P2P settings as `posfleet-p2p` takes them.
    pub fn p2p_config(&self) -> Result<posfleet_p2p::Config, ConfigError> {
        if self.p2p_listen_addrs.is_empty() || self.p2p_listen_addrs.len() > 8 {
            return Err(ConfigError::new(
                "p2p_listen_addrs",
                "must list 1 to 8 addresses",
            ));
        }
        let listen_addrs = self
            .p2p_listen_addrs
            .iter()
            .map(|a| {
                a.parse::<posfleet_p2p::Multiaddr>().map_err(|e| {
                    ConfigError::new(
                        "p2p_listen_addrs",
                        format!("`{a}` is not a multiaddr like /ip4/0.0.0.0/tcp/7410: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(1..=256).contains(&self.p2p_max_concurrent_transfers) {
            return Err(ConfigError::new(
                "p2p_max_concurrent_transfers",
                "must be 1 to 256",
            ));
        }
        if !(2..=1024).contains(&self.p2p_max_connections) {
            return Err(ConfigError::new("p2p_max_connections", "must be 2 to 1024"));
        }
        if !(1..=3600).contains(&self.p2p_origin_fallback_delay_seconds) {
            return Err(ConfigError::new(
                "p2p_origin_fallback_delay_seconds",
                "must be 1 to 3600",
            ));
        }
        if !(1..=3600).contains(&self.p2p_stall_timeout_seconds) {
            return Err(ConfigError::new(
                "p2p_stall_timeout_seconds",
                "must be 1 to 3600",
            ));
        }
        Ok(posfleet_p2p::Config {
            listen_addrs,
            mdns: self.p2p_mdns,
            upload_limit_bytes_per_second_per_peer: self.p2p_upload_limit_bytes_per_second,
            max_concurrent_transfers: self.p2p_max_concurrent_transfers,
            max_connections: self.p2p_max_connections,
            origin_fallback_delay: std::time::Duration::from_secs(
                self.p2p_origin_fallback_delay_seconds,
            ),
            stall_timeout: std::time::Duration::from_secs(self.p2p_stall_timeout_seconds),
            ..posfleet_p2p::Config::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &[&str]) -> Result<AgentConfig, ConfigError> {
        let mut argv = vec!["posfleet-agent"];
        argv.extend_from_slice(extra);
        AgentConfig::load(&Args::parse_from(argv))
    }

    #[test]
    fn bad_values_name_their_key() {
        for (args, key) in [
            (&["--server-url", "not a url"][..], "server_url"),
            (&["--server-url", "ftp://x:1"][..], "server_url"),
            (&["--peripherals", "real"][..], "peripherals"),
            (&["--max-backoff-seconds", "0"][..], "max_backoff_seconds"),
            (
                &["--server-url", "http://cp.example:7400"][..],
                "server_url",
            ),
            (&["--hardware-model", ""][..], "hardware_model"),
            (&["--log-paths", "relative/app.log"][..], "log_paths"),
            (
                &["--log-store-max-bytes", "1000"][..],
                "log_store_max_bytes",
            ),
            (
                &["--agent-update-confirm-seconds", "4"][..],
                "agent_update_confirm_seconds",
            ),
        ] {
            let err = load(args).expect_err("should be refused");
            assert_eq!(err.key, key, "{err}");
        }
        assert!(load(&[]).is_ok());
        assert!(load(&["--server-url", "http://[::1]:7400"]).is_ok());
        assert!(load(&["--server-url", "http://cp.example:7400", "--insecure-dev"]).is_ok());
    }

    #[test]
    fn an_https_server_needs_a_ca_to_trust_and_the_repository_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) =
            posfleet_pki::FleetCa::create("test fleet CA", std::time::SystemTime::now()).unwrap();
        let ca_file = dir.path().join("fleet-ca.crt");
        std::fs::write(&ca_file, ca.certificates_pem()).unwrap();
        let ca_path = ca_file.to_str().unwrap();
        let root = dir.path().join("root.json");
        std::fs::write(&root, "{}").unwrap();
        let root = root.to_str().unwrap();
        let https = ["--server-url", "https://cp.example:7400"];

        // Neither: the error names the key to set.
        let err = load(&https).unwrap_err();
        assert_eq!(err.key, "ca_cert_path", "{err}");
        assert!(err.to_string().contains("ca_fingerprint"), "{err}");
        // Either one; beyond loopback too, with no insecure_dev.
        let config = load(&[&https[..], &["--ca-cert-path", ca_path]].concat()).unwrap();
        assert!(matches!(
            config.server_trust().unwrap(),
            Some(ServerTrust::Ca(certificates)) if certificates.len() == 1
        ));
        let config =
            load(&[&https[..], &["--ca-fingerprint", &ca.fingerprint()]].concat()).unwrap();
        assert!(matches!(
            config.server_trust().unwrap(),
            Some(ServerTrust::Pinned(pin)) if hex::encode(pin) == ca.fingerprint()
        ));
        // Bad values name their key.
        for (args, key) in [
            (&["--ca-fingerprint", "abcd"][..], "ca_fingerprint"),
            (
                &[
                    "--ca-cert-path",
                    ca_path,
                    "--ca-fingerprint",
                    &ca.fingerprint(),
                ][..],
                "ca_fingerprint",
            ),
            (&["--ca-cert-path", root][..], "ca_cert_path"),
            (&["--ca-cert-path", "/no/such/ca.crt"][..], "ca_cert_path"),
            (
                &[
                    "--ca-cert-path",
                    ca_path,
                    "--root-json-path",
                    root,
                    "--repository-url",
                    "http://cp.example:7401/repo/",
                ][..],
                "repository_url",
            ),
        ] {
            let err = load(&[&https[..], args].concat()).unwrap_err();
            assert_eq!(err.key, key, "{args:?}: {err}");
        }
        let config = load(
            &[
                &https[..],
                &[
                    "--ca-cert-path",
                    ca_path,
                    "--root-json-path",
                    root,
                    "--repository-url",
                    "https://cp.example:7401/repo/",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert!(config.tls());
        // Plaintext is as before: no CA, and an http:// repository.
        let err = load(&[
            "--root-json-path",
            root,
            "--repository-url",
            "https://x/repo/",
        ])
        .unwrap_err();
        assert_eq!(err.key, "repository_url", "{err}");
        assert!(load(&[]).unwrap().server_trust().unwrap().is_none());
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn documented_env_variables_set_their_keys() {
        let args = Args::parse_from(["posfleet-agent"]);
        let config = AgentConfig::load_from(
            &args,
            env(&[
                ("POSFLEET_SERVER_URL", "http://[::1]:7400"),
                ("POSFLEET_P2P_ENABLED", "false"),
                ("POSFLEET_MIN_FREE_DISK_BYTES", "1048576"),
                ("POSFLEET_LOG_FORMAT", "json"),
                ("POSFLEET_PERIPHERALS", "fake"),
                ("POSFLEET_FAKE_PERIPHERAL_FAULTS", "[printer, cash_drawer]"),
                ("POSFLEET_P2P_LISTEN_ADDRS", "[\"/ip4/127.0.0.1/tcp/0\"]"),
                // The CLI's, not the agent's.
                ("POSFLEET_TOKEN", "pft_x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server_url, "http://[::1]:7400");
        assert!(!config.p2p_enabled);
        assert_eq!(config.min_free_disk_bytes, 1_048_576);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(
            config.fake_peripheral_faults,
            [FakeFault::Printer, FakeFault::CashDrawer]
        );
        assert_eq!(config.p2p_listen_addrs, ["/ip4/127.0.0.1/tcp/0"]);
        // A flag wins over the environment.
        let args = Args::parse_from(["posfleet-agent", "--min-free-disk-bytes", "7"]);
        let config =
            AgentConfig::load_from(&args, env(&[("POSFLEET_MIN_FREE_DISK_BYTES", "9")])).unwrap();
        assert_eq!(config.min_free_disk_bytes, 7);
        // A bad value names its key and the variable it came from.
        let args = Args::parse_from(["posfleet-agent"]);
        let err =
            AgentConfig::load_from(&args, env(&[("POSFLEET_P2P_MDNS", "sometimes")])).unwrap_err();
        assert_eq!(err.key, "p2p_mdns", "{err}");
        assert!(err.to_string().contains("POSFLEET_P2P_MDNS"), "{err}");
    }

    #[test]
    fn an_unknown_hook_user_is_refused_at_start() {
        let err = load(&["--hook-user", "no-such-user-here"]).unwrap_err();
        assert_eq!(err.key, "hook_user", "{err}");
        assert!(err.to_string().contains("no-such-user-here"), "{err}");
        let config = load(&["--hook-user", "nobody"]).unwrap();
        assert_eq!(config.hook_user().unwrap().unwrap().name, "nobody");
        assert_eq!(load(&[]).unwrap().hook_user().unwrap(), None);
    }

    #[test]
    fn the_enrollment_token_comes_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let file = path.to_str().unwrap();
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("pfe_secret\n", 0o600);
        let config = load(&["--enrollment-token-file", file]).unwrap();
        assert_eq!(config.enrollment_token, "pfe_secret");
        // Through the environment too.
        let args = Args::parse_from(["posfleet-agent"]);
        let from_env =
            AgentConfig::load_from(&args, env(&[("POSFLEET_ENROLLMENT_TOKEN_FILE", file)]));
        assert_eq!(from_env.unwrap().enrollment_token, "pfe_secret");
        write("pfe_secret\r\n", 0o640);
        assert_eq!(
            load(&["--enrollment-token-file", file])
                .unwrap()
                .enrollment_token,
            "pfe_secret"
        );
        // Refusals name the key: a file anyone can read, an empty one, one
        // of several lines, a missing one, and both ways at once.
        for (text, mode) in [
            ("pfe_secret\n", 0o644),
            ("\n", 0o600),
            ("pfe_a\npfe_b\n", 0o600),
        ] {
            write(text, mode);
            let err = load(&["--enrollment-token-file", file]).unwrap_err();
            assert_eq!(err.key, "enrollment_token_file", "{err}");
        }
        write("pfe_secret\n", 0o644);
        let err = load(&["--enrollment-token-file", file]).unwrap_err();
        assert!(err.to_string().contains("readable by every user"), "{err}");
        write("pfe_secret\n", 0o600);
        let err = load(&["--enrollment-token-file", file, "--enrollment-token", "x"]).unwrap_err();
        assert_eq!(err.key, "enrollment_token_file", "{err}");
        let missing = dir.path().join("missing");
        let err = load(&["--enrollment-token-file", missing.to_str().unwrap()]).unwrap_err();
        assert_eq!(err.key, "enrollment_token_file", "{err}");
    }

    #[test]
    fn debug_output_hides_the_enrollment_token() {
        let config = AgentConfig {
            enrollment_token: "pfe_secret".into(),
            ..AgentConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("pfe_secret"), "{shown}");
        assert!(
            shown.contains(r#"enrollment_token: "<redacted>""#),
            "{shown}"
        );
        // The other keys still show, and an unset token shows as unset.
        assert!(
            shown.contains(r#"hardware_model: "generic-pos""#),
            "{shown}"
        );
        let unset = format!("{:#?}", AgentConfig::default());
        assert!(unset.contains(r#"enrollment_token: "","#), "{unset}");
    }

    #[test]
    fn file_sets_fake_faults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "peripherals = \"fake\"\nfake_peripheral_faults = [\"printer\"]\n",
        )
        .unwrap();
        let config = load(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.peripherals, PeripheralsDriver::Fake);
        assert_eq!(config.fake_peripheral_faults, vec![FakeFault::Printer]);
    }

    #[test]
    fn redaction_patterns_come_from_the_file_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let config = load(&[]).unwrap();
        assert_eq!(
            config.log_redact_patterns.len(),
            crate::logs::DEFAULT_PATTERNS.len()
        );
        std::fs::write(&path, "log_redact_patterns = ['loyalty-\\d+']\n").unwrap();
        let config = load(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.log_redact_patterns, [r"loyalty-\d+"]);
        std::fs::write(&path, "log_redact_patterns = ['(unclosed']\n").unwrap();
        let err = load(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert_eq!(err.key, "log_redact_patterns", "{err}");
        assert!(
            err.to_string()
                .contains("`(unclosed` is not a valid pattern"),
            "{err}"
        );
    }
}
