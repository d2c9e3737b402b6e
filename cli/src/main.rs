//! `posfleet`, the ops CLI. It talks to the control plane's `AdminService`
//! only. Errors are one line on stderr and a non-zero exit code.

mod assignment_cmd;
mod audit_cmd;
mod ca_cmd;
#[cfg(feature = "demo")]
mod demo;
mod login_cmd;
mod logs_cmd;
mod prompt;
mod repo_cmd;
mod rollout_cmd;
mod session_file;
mod token_cmd;
mod user_cmd;
mod view;
mod webhook_cmd;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use posfleet_proto::v1;
use posfleet_proto::v1::admin_service_client::AdminServiceClient;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::view::{AssignmentView, DeviceView, StoreDetailView, StoreView, TokenView};

#[derive(Debug, Parser)]
#[command(name = "posfleet", version, about = "Drive a posfleet control plane.")]
struct Cli {
    /// The control plane's gRPC address.
    #[arg(
        long,
        global = true,
        env = "POSFLEET_SERVER",
        default_value = "http://127.0.0.1:7400"
    )]
    server: String,
    /// Admin API token (automation). Without it, nor --token-file, the
    /// session of `posfleet login` is used.
    #[arg(long, global = true, env = "POSFLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding an admin API token.
    #[arg(long, global = true, env = "POSFLEET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Folder of the session `posfleet login` stores (session.json); by
    /// default the platform's config folder + posfleet, e.g.
    /// `~/.config/posfleet`.
    #[arg(long, global = true, env = "POSFLEET_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// PEM file of the CA that issued the control plane's certificate (its
    /// fleet CA: `<data_dir>/tls/trust-bundle.pem`). Without it an `https://`
    /// server is checked against the system's roots.
    #[arg(long, global = true, env = "POSFLEET_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Allow `http://` to a server beyond loopback: the admin token would
    /// cross the network in clear. Development networks only.
    #[arg(long, global = true, env = "POSFLEET_INSECURE_DEV")]
    insecure_dev: bool,
    /// `table` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Admin(AdminCommand),
    /// Log in as a person: password and a code from your authenticator app
    /// (the first time: your setup code, a new password and the app's
    /// enrolment). The session is stored for the next commands.
    Login(login_cmd::LoginArgs),
    /// End the stored session, on the control plane and here.
    Logout,
    /// Root and targets keys of the bundle repository.
    #[command(subcommand)]
    Keys(repo_cmd::KeysCommand),
    /// Build, publish and list bundles.
    #[command(subcommand)]
    Bundle(repo_cmd::BundleCommand),
    /// Start a control plane and six tills in two stores, on SQLite in a
    /// temporary directory, and show them come online.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
}

/// Commands that call the control plane's AdminService.
#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Stores (a shop with its tills).
    #[command(subcommand)]
    Store(StoreCommand),
    /// One-time, store-scoped tokens that enroll new devices.
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(TokenCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Staged rollouts of a release: waves, bake times, failure thresholds.
    #[command(subcommand)]
    Rollout(rollout_cmd::RolloutCommand),
    /// Emergency assignments (`device assign --emergency`), held until a
    /// second person approves them.
    #[command(subcommand)]
    Assignment(assignment_cmd::AssignmentCommand),
    /// The audit log: every mutating admin call.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Receivers of events (signed JSON over HTTP) and their deliveries.
    #[command(subcommand)]
    Webhook(webhook_cmd::WebhookCommand),
    /// Admin API tokens: what automation calls the control plane with.
    #[command(subcommand)]
    Token(token_cmd::AdminTokenCommand),
    /// Operators as people, who log in (`posfleet login`).
    #[command(subcommand)]
    User(user_cmd::UserCommand),
    /// The fleet's CAs (over TLS), and their rotation.
    #[command(subcommand)]
    Ca(ca_cmd::CaCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Create a store.
    Create {
        /// Lowercase letters, digits and '-', e.g. `paris-04`.
        id: String,
        #[arg(long)]
        name: String,
        /// IANA time zone, e.g. `Europe/Paris`.
        #[arg(long)]
        time_zone: String,
    },
    /// List stores.
    List,
    /// Show a store, with where its tills' bundle bytes came from: the
    /// origin (this control plane) or the store's other tills.
    Show { id: String },
    /// Set when a store's tills may install, in the store's time zone, or
    /// clear it (any time).
    Window {
        id: String,
        /// Local start time, `HH:MM`, e.g. `02:00`.
        #[arg(long, value_parser = parse_hh_mm, required_unless_present = "clear", requires = "duration")]
        start: Option<u32>,
        /// Length in whole minutes, 1m to 24h, e.g. `3h`, `90m`.
        #[arg(long, value_parser = parse_window_duration, requires = "start")]
        duration: Option<u32>,
        /// Remove the window: installs may happen at any time.
        #[arg(long, conflicts_with_all = ["start", "duration"])]
        clear: bool,
    },
    /// Set store labels (`key=value`) and remove them (`key-`). Rollout
    /// selectors and token scopes (`region=eu`) select stores by them;
    /// admin only.
    Label {
        id: String,
        #[arg(required = true)]
        changes: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an enrollment token; its secret is printed once.
    Create {
        #[arg(long)]
        store: String,
        /// Lifetime, e.g. `30m`, `24h`, `7d`.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires_in: Duration,
        /// How many devices it may enroll.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List enrollment tokens.
    List {
        #[arg(long)]
        store: Option<String>,
    },
    /// Revoke an enrollment token by id.
    Revoke { id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    Online,
    Offline,
}

#[derive(Debug, Args)]
struct DeviceListArgs {
    #[arg(long)]
    store: Option<String>,
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// Only devices with this label, `key=value`; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// List devices, optionally filtered.
    List(DeviceListArgs),
    /// Show one device.
    Show { id: String },
    /// A till's logs (its agent's and its applications'), redacted of
    /// secrets on the till. The till uploads them at its next heartbeat; an
    /// offline till's request waits for it (`--request ID` prints its lines
    /// later).
    Logs(logs_cmd::LogsArgs),
    /// Revoke a device for good (a stolen or retired till): the control
    /// plane refuses it and its store's tills stop talking to it.
    Revoke {
        id: String,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Set labels (`key=value`) and remove them (`key-`).
    Label {
        id: String,
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Set the version of a published bundle a device should have:
    /// `assign ID NAME@VERSION`, or for every device of a store, present and
    /// future, `assign --store STORE NAME@VERSION`. A device's own assignment
    /// beats its store's.
    Assign {
        /// `ID NAME@VERSION`, or `NAME@VERSION` with --store.
        #[arg(value_name = "ID NAME@VERSION", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// Assign to every device of this store instead of one device.
        #[arg(long)]
        store: Option<String>,
        /// Download only inside the maintenance window (by default the
        /// bundle is downloaded at once and installed inside the window).
        #[arg(long)]
        no_download_ahead: bool,
        /// Install at once, ignoring the maintenance window. Held until
        /// another deployer or admin approves it (`posfleet assignment
        /// approve`).
        #[arg(long)]
        emergency: bool,
    },
}

/// `HH:MM` (local time of day) → minutes after midnight.
fn parse_hh_mm(s: &str) -> Result<u32, String> {
    let error = || format!("`{s}` is not a time of day such as 02:00 (HH:MM, 00:00 to 23:59)");
    let (h, m) = s.split_once(':').ok_or_else(error)?;
    let digits = |p: &str| (1..=2).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit());
    if !digits(h) || m.len() != 2 || !digits(m) {
        return Err(error());
    }
    let (h, m): (u32, u32) = (
        h.parse().map_err(|_| error())?,
        m.parse().map_err(|_| error())?,
    );
    if h > 23 || m > 59 {
        return Err(error());
    }
    Ok(h * 60 + m)
}

/// A humantime duration → whole minutes, 1 to 1440.
fn parse_window_duration(s: &str) -> Result<u32, String> {
    let duration = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))?;
    if duration.as_secs() % 60 != 0 || duration.subsec_nanos() != 0 {
        return Err(format!("`{s}` is not a whole number of minutes"));
    }
    let minutes = i64::try_from(duration.as_secs() / 60).unwrap_or(i64::MAX);
    posfleet_runtime::window::check_duration_minutes(minutes)
        .map_err(|_| format!("`{s}` must be 1m to 24h"))
}

/// `pos-app@1.1.0` → ("pos-app", "1.1.0").
fn parse_bundle_ref(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('@') {
        Some((name, version)) if !name.is_empty() && !version.is_empty() => {
            Ok((name.to_string(), version.to_string()))
        }
        _ => bail!("`{s}` is not NAME@VERSION, e.g. pos-app@1.1.0"),
    }
}

/// The assignment's target and bundle from `assign`'s arguments: exactly
/// one of a device id and `--store`.
fn assign_target(
    args: &[String],
    store: Option<String>,
) -> anyhow::Result<(v1::assign_bundle_request::Target, String, String)> {
    use v1::assign_bundle_request::Target;
    let (target, bundle) = match (store, args) {
        (Some(store), [bundle]) => (Target::StoreId(store), bundle),
        (Some(_), [_, _]) => bail!("give a device id or --store, not both"),
        (None, [id, bundle]) => (Target::DeviceId(id.clone()), bundle),
        (None, [_]) => bail!("give a device id (assign ID NAME@VERSION) or --store STORE"),
        _ => bail!("expected ID NAME@VERSION, or --store STORE NAME@VERSION"),
    };
    let (name, version) = parse_bundle_ref(bundle)?;
    Ok((target, name, version))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

/// Splits `k=v` and `k-` arguments into labels to set and keys to remove.
fn parse_label_changes(
    changes: &[String],
) -> anyhow::Result<(HashMap<String, String>, Vec<String>)> {
    let mut set = HashMap::new();
    let mut remove = Vec::new();
    for change in changes {
        if let Some((k, v)) = change.split_once('=') {
            set.insert(k.to_string(), v.to_string());
        } else if let Some(k) = change.strip_suffix('-') {
            remove.push(k.to_string());
        } else {
            bail!("`{change}` is neither key=value (set) nor key- (remove)");
        }
    }
    Ok((set, remove))
}

/// Longest wait for the answer to a unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// An upload fails when the server takes none of it for this long.
const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the server's answer once the whole upload is sent (it
/// verifies the bundle's bytes first).
const UPLOAD_ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the control plane is and how to trust it.
#[derive(Debug, Clone)]
pub struct Server {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub insecure_dev: bool,
}

impl Server {
    /// The TLS configuration for an `https://` address (`None` for
    /// `http://`, which only loopback or `--insecure-dev` may use).
    fn tls(&self) -> anyhow::Result<Option<std::sync::Arc<posfleet_pki::rustls::ClientConfig>>> {
        let uri: tonic::transport::Uri = self
            .url
            .parse()
            .map_err(|_| anyhow!("`{}` is not a valid server URL", self.url))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") => {
                let host = uri.host().unwrap_or_default();
                let loopback = posfleet_runtime::plaintext::is_loopback_host(host);
                if !loopback && !self.insecure_dev {
                    bail!(
                        "refusing to send the admin token in clear to {}: use https:// (with --ca-file for the fleet CA), or --insecure-dev on a development network",
                        self.url
                    );
                }
                return Ok(None);
            }
            _ => bail!("`{}` must start with https:// or http://", self.url),
        }
        let trusted = match &self.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read the CA file {}", path.display()))?;
                posfleet_pki::certificates_from_pem(&pem, &path.display().to_string())?
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    bail!(
                        "no CA to check {} against: pass --ca-file (the control plane's <data_dir>/tls/trust-bundle.pem) or set POSFLEET_CA_FILE",
                        self.url
                    );
                }
                found.certs
            }
        };
        Ok(Some(std::sync::Arc::new(posfleet_pki::client_config(
            &trusted, None,
        )?)))
    }

    /// A channel to the control plane, checked as [`Server::tls`] says.
    fn channel(&self) -> anyhow::Result<Channel> {
        let tls = self.tls()?;
        // No deadline on the channel: each unary call gets CALL_TIMEOUT
        // (`request`), an upload an idle timeout (`publish`). Keepalive
        // pings notice a server that went away during a long upload.
        let endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|_| anyhow!("`{}` is not a valid server URL", self.url))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        Ok(posfleet_pki::grpc_channel(&endpoint, tls))
    }
}

/// An `AdminService` client that adds the API token to every call.
pub struct Admin {
    client: AdminServiceClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
    server: String,
}

impl Admin {
    pub async fn connect(server: &Server, token: &str) -> anyhow::Result<Admin> {
        let channel = server.channel()?;
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow!("the admin API token contains characters that cannot be sent"))?;
        Ok(Admin {
            client: AdminServiceClient::new(channel),
            authorization,
            server: server.url.clone(),
        })
    }

    /// A unary call's request: the token, and a deadline of
    /// [`CALL_TIMEOUT`].
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = self.streaming_request(message);
        request.set_timeout(CALL_TIMEOUT);
        request
    }

    /// A streaming call's request: the token, no deadline.
    fn streaming_request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(posfleet_proto::AUTHORIZATION, self.authorization.clone());
        request
    }

    /// A unary call's answer, or its status turned into an error.
    fn answer<T>(&self, answer: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
        answer
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error(s))
    }

    fn error(&self, status: tonic::Status) -> anyhow::Error {
        call_error(&self.server, status)
    }

    /// The control plane's URL, as given.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    pub async fn create_store(
        &mut self,
        id: &str,
        name: &str,
        time_zone: &str,
    ) -> anyhow::Result<v1::Store> {
        let request = self.request(v1::CreateStoreRequest {
            id: id.into(),
            name: name.into(),
            time_zone: time_zone.into(),
        });
        let answer = self.client.create_store(request).await;
        self.answer(answer)
    }

    pub async fn list_stores(&mut self) -> anyhow::Result<Vec<v1::Store>> {
        let mut stores = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.request(v1::ListStoresRequest {
                page_size: 0,
                page_token,
            });
            let page = self
                .client
                .list_stores(request)
                .await
                .map_err(|s| self.error(s))?
                .into_inner();
            stores.extend(page.stores);
            if page.next_page_token.is_empty() {
                return Ok(stores);
            }
            page_token = page.next_page_token;
        }
    }

    /// One device, with its desired and reported bundles.
    pub async fn get_device(&mut self, id: &str) -> anyhow::Result<v1::Device> {
        let request = self.request(v1::GetDeviceRequest { id: id.into() });
        let answer = self.client.get_device(request).await;
        self.answer(answer)
    }

    /// Sets (or with `None` clears) a store's maintenance window.
    pub async fn set_maintenance_window(
        &mut self,
        store: &str,
        window: Option<(u32, u32)>,
    ) -> anyhow::Result<v1::Store> {
        let request = self.request(v1::SetMaintenanceWindowRequest {
            store_id: store.into(),
            maintenance_window: window.map(|(start_minute, duration_minutes)| {
                v1::MaintenanceWindow {
                    time_zone: String::new(),
                    start_minute,
                    duration_minutes,
                }
            }),
        });
        let answer = self.client.set_maintenance_window(request).await;
        self.answer(answer)
    }

    /// Sets and removes a store's labels.
    pub async fn set_store_labels(
        &mut self,
        store_id: String,
        set: HashMap<String, String>,
        remove: Vec<String>,
    ) -> anyhow::Result<v1::Store> {
        let request = self.request(v1::SetStoreLabelsRequest {
            store_id,
            set,
            remove,
        });
        let answer = self.client.set_store_labels(request).await;
        self.answer(answer)
    }

    /// Assigns a published bundle: how many devices it now applies to, or
    /// the held assignment awaiting approval (an emergency one).
    pub async fn assign_bundle(
        &mut self,
        request: v1::AssignBundleRequest,
    ) -> anyhow::Result<v1::AssignBundleResponse> {
        let request = self.request(request);
        let answer = self.client.assign_bundle(request).await;
        self.answer(answer)
    }

    pub async fn create_token(
        &mut self,
        store: &str,
        expires_in: Duration,
        uses: u32,
    ) -> anyhow::Result<v1::CreateEnrollmentTokenResponse> {
        let request = self.request(v1::CreateEnrollmentTokenRequest {
            store_id: store.into(),
            expires_in_seconds: expires_in.as_secs().max(1),
            uses,
        });
        let answer = self.client.create_enrollment_token(request).await;
        self.answer(answer)
    }

    pub async fn list_devices(
        &mut self,
        filter: v1::ListDevicesRequest,
    ) -> anyhow::Result<Vec<v1::Device>> {
        let mut devices = Vec::new();
        let mut filter = filter;
        loop {
            let request = self.request(filter.clone());
            let page = self
                .client
                .list_devices(request)
                .await
                .map_err(|s| self.error(s))?
                .into_inner();
            devices.extend(page.devices);
            if page.next_page_token.is_empty() {
                return Ok(devices);
            }
            filter.page_token = page.next_page_token;
        }
    }
}

impl Admin {
    pub async fn repository(&mut self) -> anyhow::Result<v1::Repository> {
        let request = self.request(v1::GetRepositoryRequest {});
        let answer = self.client.get_repository(request).await;
        self.answer(answer)
    }

    pub async fn init_repository(
        &mut self,
        root_json: Vec<u8>,
        targets_json: Vec<u8>,
    ) -> anyhow::Result<()> {
        let request = self.request(v1::InitRepositoryRequest {
            root_json,
            targets_json,
        });
        let answer = self.client.init_repository(request).await;
        self.answer(answer).map(|_| ())
    }

    pub async fn update_root(&mut self, root_json: Vec<u8>) -> anyhow::Result<()> {
        let request = self.request(v1::UpdateRootRequest { root_json });
        let answer = self.client.update_root(request).await;
        self.answer(answer).map(|_| ())
    }

    /// Publishes targets metadata, with the bundle file it adds if any.
    pub async fn publish(
        &mut self,
        targets_json: Vec<u8>,
        bundle: Option<(String, PathBuf)>,
    ) -> anyhow::Result<v1::Bundle> {
        let (target, file) = bundle.map(|(t, f)| (t, Some(f))).unwrap_or_default();
        let header = v1::PublishBundleHeader {
            targets_json,
            target,
        };
        let (stream, progress) = repo_cmd::upload_stream(header, file);
        let request = self.streaming_request(stream);
        let call = self.client.publish_bundle(request);
        tokio::select! {
            answer = call => self.answer(answer),
            stalled = progress.stalled(UPLOAD_IDLE_TIMEOUT, UPLOAD_ANSWER_TIMEOUT) => Err(stalled),
        }
    }

    /// Writes the published `target`'s bytes into `dest` (a new file).
    pub async fn download_bundle(&mut self, target: &str, dest: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        let request = self.streaming_request(v1::DownloadBundleRequest {
            target: target.to_string(),
        });
        let answer = self.client.download_bundle(request).await;
        let mut stream = self.answer(answer)?;
        let mut file = std::io::BufWriter::new(
            std::fs::File::create_new(dest)
                .with_context(|| format!("cannot create {}", dest.display()))?,
        );
        while let Some(chunk) = stream.message().await.map_err(|s| self.error(s))? {
            file.write_all(&chunk.data)
                .with_context(|| format!("cannot write {}", dest.display()))?;
        }
        file.flush()
            .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(())
    }

    pub async fn list_bundles(&mut self, name: String) -> anyhow::Result<Vec<v1::Bundle>> {
        let request = self.request(v1::ListBundlesRequest { name });
        let answer = self.client.list_bundles(request).await;
        self.answer(answer).map(|r| r.bundles)
    }
}

pub fn code_name(code: tonic::Code) -> String {
    // "NotFound" → "not found"
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Prints `value` as JSON for scripts, or `human()` for people.
fn show<T: Serialize>(
    output: Output,
    value: &T,
    human: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => print!("{}", human()),
    }
    Ok(())
}

/// How a call proves who makes it.
struct Credentials {
    token: Option<String>,
    token_file: Option<PathBuf>,
    config_dir: Option<PathBuf>,
}

impl Credentials {
    /// The bearer token for `server`: --token (POSFLEET_TOKEN), else
    /// --token-file (POSFLEET_TOKEN_FILE), else the stored session, but
    /// only one the same server issued and only until it expires.
    fn token_for(self, server: &str) -> anyhow::Result<String> {
        if let Some(token) = self.token {
            return Ok(token.trim().to_string());
        }
        if let Some(path) = self.token_file {
            let token = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            return Ok(token.trim().to_string());
        }
        let now = chrono::Utc::now().timestamp_millis();
        // No config folder at all (no home): no session either.
        let Ok(config_dir) = session_file::config_dir(self.config_dir) else {
            return session_token(None, server, now);
        };
        session_token(session_file::load(&config_dir)?, server, now)
    }
}

/// The stored session's token, if it may be sent to `server` now.
fn session_token(
    stored: Option<session_file::StoredSession>,
    server: &str,
    now_unix_ms: i64,
) -> anyhow::Result<String> {
    const NONE: &str = "no admin API token: run posfleet login --user NAME, or pass --token or \
                        --token-file, or set POSFLEET_TOKEN";
    let Some(stored) = stored else {
        bail!("{NONE}");
    };
    if !stored.is_for(server) {
        bail!(
            "{NONE} (the stored session is {}'s on {}, not {server})",
            stored.user,
            stored.server
        );
    }
    if stored.expired(now_unix_ms) {
        bail!(
            "your session expired at {}; run posfleet login",
            view::time(stored.expires_at_unix_ms)
        );
    }
    Ok(stored.token)
}

/// A failed call's status as one line: why the control plane at `server`
/// could not be reached, or what it answered (an `UNAUTHENTICATED` answer
/// says what to do: log in again, use another token).
pub fn call_error(server: &str, status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    // A refused connection or TLS handshake: its cause is at the end of
    // the error's chain ("transport error" says nothing).
    let cause = root_cause(&status);
    match (status.code(), cause) {
        (_, Some(cause)) => {
            anyhow!("cannot reach the control plane at {server}: {cause}")
        }
        // Said by the server itself (draining, or something it depends on
        // is down): it was reached.
        (Code::Unavailable, None) => anyhow!(
            "the control plane at {server} is unavailable: {}",
            status.message()
        ),
        (code, _) => anyhow!("{}: {}", code_name(code), status.message()),
    }
}

/// The innermost error under a status that came from the connection
/// rather than from the server; `None` for an answer of the server's.
fn root_cause(status: &tonic::Status) -> Option<String> {
    let mut source = std::error::Error::source(status)?;
    while let Some(next) = source.source() {
        source = next;
    }
    Some(source.to_string())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        server,
        token,
        token_file,
        config_dir,
        ca_file,
        insecure_dev,
        output,
        command,
    } = cli;
    let server = Server {
        url: server,
        ca_file,
        insecure_dev,
    };
    let credentials = Credentials {
        token,
        token_file,
        config_dir,
    };
    let command = match command {
        #[cfg(feature = "demo")]
        Command::Demo(args) => return demo::run(&args, output).await,
        Command::Login(args) => {
            let dir = session_file::config_dir(credentials.config_dir)?;
            return login_cmd::login(&server, &dir, args, output).await;
        }
        Command::Logout => {
            let dir = session_file::config_dir(credentials.config_dir)?;
            return login_cmd::logout(&server, &dir).await;
        }
        Command::Bundle(
            offline @ (repo_cmd::BundleCommand::Build { .. }
            | repo_cmd::BundleCommand::Delta { .. }),
        ) => {
            return repo_cmd::bundle(None, offline, output).await;
        }
        Command::Bundle(command) => {
            let mut admin = Admin::connect(&server, &credentials.token_for(&server.url)?).await?;
            return repo_cmd::bundle(Some(&mut admin), command, output).await;
        }
        Command::Keys(command) => {
            let mut admin = Admin::connect(&server, &credentials.token_for(&server.url)?).await?;
            return repo_cmd::keys(&mut admin, command).await;
        }
        Command::Admin(command) => command,
    };
    let mut admin = Admin::connect(&server, &credentials.token_for(&server.url)?).await?;
    match command {
        AdminCommand::Rollout(command) => rollout_cmd::run(&mut admin, command, output).await?,
        AdminCommand::Assignment(command) => {
            assignment_cmd::run(&mut admin, command, output).await?
        }
        AdminCommand::Audit(command) => audit_cmd::run(&mut admin, command, output).await?,
        AdminCommand::Webhook(command) => webhook_cmd::run(&mut admin, command, output).await?,
        AdminCommand::Token(command) => token_cmd::run(&mut admin, command, output).await?,
        AdminCommand::User(command) => user_cmd::run(&mut admin, command, output).await?,
        AdminCommand::Ca(command) => ca_cmd::run(&mut admin, command, output).await?,
        AdminCommand::Store(StoreCommand::Create {
            id,
            name,
            time_zone,
        }) => {
            let store = StoreView::from(admin.create_store(&id, &name, &time_zone).await?);
            show(output, &store, || {
                format!("{}\n", view::stores_table(std::slice::from_ref(&store)))
            })?;
        }
        AdminCommand::Store(StoreCommand::List) => {
            let stores: Vec<StoreView> = admin
                .list_stores()
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            show(output, &stores, || {
                format!("{}\n", view::stores_table(&stores))
            })?;
        }
        AdminCommand::Store(StoreCommand::Show { id }) => {
            let request = admin.request(v1::GetStoreRequest { id });
            let store = StoreDetailView::from(
                admin
                    .client
                    .get_store(request)
                    .await
                    .map_err(|s| admin.error(s))?
                    .into_inner(),
            );
            show(output, &store, || view::store_details(&store))?;
        }
        AdminCommand::Store(StoreCommand::Label { id, changes }) => {
            let (set, remove) = parse_label_changes(&changes)?;
            let store = StoreView::from(admin.set_store_labels(id, set, remove).await?);
            show(output, &store, || {
                format!("{}\n", view::stores_table(std::slice::from_ref(&store)))
            })?;
        }
        AdminCommand::Store(StoreCommand::Window {
            id,
            start,
            duration,
            clear: _,
        }) => {
            // clap lets --start come only with --duration, and neither with --clear.
            let window = start.zip(duration);
            let store = StoreView::from(admin.set_maintenance_window(&id, window).await?);
            show(output, &store, || {
                format!("{}\n", view::stores_table(std::slice::from_ref(&store)))
            })?;
        }
        AdminCommand::EnrollToken(TokenCommand::Create {
            store,
            expires_in,
            uses,
        }) => {
            let created = admin.create_token(&store, expires_in, uses).await?;
            let mut token = TokenView::from(created.token.unwrap_or_default());
            token.secret = Some(created.secret.clone());
            token.ca_fingerprint = Some(created.ca_fingerprint.clone()).filter(|f| !f.is_empty());
            show(output, &token, || {
                let mut text = format!(
                    "{}\nSecret (shown once; give it to the agent as enrollment_token):\n{}\n",
                    view::tokens_table(std::slice::from_ref(&token)),
                    created.secret
                );
                if let Some(fingerprint) = &token.ca_fingerprint {
                    text.push_str(&format!(
                        "Fleet CA fingerprint (give it with the token, as ca_fingerprint):\n{fingerprint}\n"
                    ));
                }
                text
            })?;
        }
        AdminCommand::EnrollToken(TokenCommand::List { store }) => {
            let request = admin.request(v1::ListEnrollmentTokensRequest {
                store_id: store.unwrap_or_default(),
            });
            let tokens: Vec<TokenView> = admin
                .client
                .list_enrollment_tokens(request)
                .await
                .map_err(|s| admin.error(s))?
                .into_inner()
                .tokens
                .into_iter()
                .map(Into::into)
                .collect();
            show(output, &tokens, || {
                format!("{}\n", view::tokens_table(&tokens))
            })?;
        }
        AdminCommand::EnrollToken(TokenCommand::Revoke { id }) => {
            let request = admin.request(v1::RevokeEnrollmentTokenRequest { id });
            let token = TokenView::from(
                admin
                    .client
                    .revoke_enrollment_token(request)
                    .await
                    .map_err(|s| admin.error(s))?
                    .into_inner(),
            );
            show(output, &token, || {
                format!("{}\n", view::tokens_table(std::slice::from_ref(&token)))
            })?;
        }
        AdminCommand::Device(DeviceCommand::List(args)) => {
            let status = match args.status {
                None => v1::DeviceStatus::Unspecified,
                Some(StatusArg::Online) => v1::DeviceStatus::Online,
                Some(StatusArg::Offline) => v1::DeviceStatus::Offline,
            };
            let devices: Vec<DeviceView> = admin
                .list_devices(v1::ListDevicesRequest {
                    store_id: args.store.unwrap_or_default(),
                    status: status as i32,
                    labels: args.labels.into_iter().collect(),
                    page_size: 0,
                    page_token: String::new(),
                })
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
            show(output, &devices, || {
                format!("{}\n", view::devices_table(&devices))
            })?;
        }
        AdminCommand::Device(DeviceCommand::Logs(args)) => {
            logs_cmd::run(&mut admin, args, output).await?;
        }
        AdminCommand::Device(DeviceCommand::Show { id }) => {
            let device = DeviceView::with_bundles(admin.get_device(&id).await?);
            show(output, &device, || view::device_details(&device))?;
        }
        AdminCommand::Device(DeviceCommand::Assign {
            args,
            store,
            no_download_ahead,
            emergency,
        }) => {
            let (target, name, version) = assign_target(&args, store)?;
            let request = v1::AssignBundleRequest {
                target: Some(target.clone()),
                name,
                version,
                download_ahead: Some(!no_download_ahead),
                emergency,
            };
            let answer = admin.assign_bundle(request.clone()).await?;
            if let Some(held) = answer.held {
                let held = assignment_cmd::HeldAssignmentView::from(held);
                show(output, &held, || assignment_cmd::held_summary(&held))?;
            } else {
                let assignment = AssignmentView::new(request, answer.devices_assigned);
                show(output, &assignment, || {
                    view::assignment_summary(&assignment)
                })?;
            }
        }
        AdminCommand::Device(DeviceCommand::Revoke { id, reason }) => {
            let request = admin.request(v1::RevokeDeviceRequest {
                device_id: id,
                reason,
            });
            let device = DeviceView::from(
                admin
                    .client
                    .revoke_device(request)
                    .await
                    .map_err(|s| admin.error(s))?
                    .into_inner(),
            );
            show(output, &device, || view::device_details(&device))?;
        }
        AdminCommand::Device(DeviceCommand::Label { id, changes }) => {
            let (set, remove) = parse_label_changes(&changes)?;
            let request = admin.request(v1::SetDeviceLabelsRequest {
                device_id: id,
                set,
                remove,
            });
            let device = DeviceView::from(
                admin
                    .client
                    .set_device_labels(request)
                    .await
                    .map_err(|s| admin.error(s))?
                    .into_inner(),
            );
            show(output, &device, || view::device_details(&device))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // `posfleet signal LINE...`: the demo's tills run inside this program,
    // so the POS programs they supervise report through it, as they do
    // through `posfleet-agent signal` on a real till.
    #[cfg(feature = "demo")]
    {
        let mut argv = std::env::args_os().skip(1);
        if argv.next().is_some_and(|first| first == "signal") {
            return posfleet_agent::signals::command::main(argv);
        }
    }
    let cli = Cli::parse();
    posfleet_pki::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("posfleet: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("posfleet: {}", format!("{error:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Asserts that each line of `ok` parses and each of `bad` does not.
#[cfg(test)]
pub fn check_command_lines(ok: &[&str], bad: &[&str]) {
    let parse = |line: &str| Cli::try_parse_from(line.split_whitespace());
    for line in ok {
        assert!(parse(line).is_ok(), "{line}: {:?}", parse(line).err());
    }
    for line in bad {
        assert!(parse(line).is_err(), "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_changes_split_into_set_and_remove() {
        let (set, remove) = parse_label_changes(&["ring=canary".into(), "old-".into()]).unwrap();
        assert_eq!(set.get("ring").map(String::as_str), Some("canary"));
        assert_eq!(remove, vec!["old".to_string()]);
        assert!(parse_label_changes(&["oops".into()]).is_err());
    }

    #[test]
    fn times_of_day_and_window_lengths() {
        for (input, expected) in [
            ("02:00", Some(120)),
            ("0:05", Some(5)),
            ("23:59", Some(1439)),
            ("24:00", None),
            ("12:60", None),
            ("2", None),
            ("02:5", None),
            ("-1:00", None),
        ] {
            assert_eq!(parse_hh_mm(input).ok(), expected, "{input}");
        }
        for (input, expected) in [
            ("3h", Some(180)),
            ("90m", Some(90)),
            ("1m", Some(1)),
            ("24h", Some(1440)),
            ("1h 30m", Some(90)),
            ("25h", None),
            ("0m", None),
            ("90s", None),
            ("soon", None),
        ] {
            assert_eq!(parse_window_duration(input).ok(), expected, "{input}");
        }
    }

    #[test]
    fn assign_takes_a_device_or_a_store() {
        use v1::assign_bundle_request::Target;
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (target, name, version) =
            assign_target(&args(&["dev-1", "pos-app@1.1.0"]), None).unwrap();
        assert_eq!(target, Target::DeviceId("dev-1".into()));
        assert_eq!((name.as_str(), version.as_str()), ("pos-app", "1.1.0"));
        let (target, _, _) = assign_target(&args(&["pos-app@1.1.0"]), Some("s1".into())).unwrap();
        assert_eq!(target, Target::StoreId("s1".into()));
        for (a, store) in [
            (&["dev-1", "pos-app@1.1.0"][..], Some("s1")),
            (&["pos-app@1.1.0"][..], None),
            (&["dev-1", "pos-app"][..], None),
            (&["dev-1", "@1.1.0"][..], None),
        ] {
            let error = assign_target(&args(a), store.map(str::to_string)).unwrap_err();
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let parse = |line: &str| Cli::try_parse_from(line.split_whitespace());
        assert!(parse("posfleet store window s1 --start 02:00 --duration 3h").is_ok());
        assert!(parse("posfleet store window s1 --clear").is_ok());
        assert!(parse("posfleet store label s1 region=eu tier-").is_ok());
        assert!(parse("posfleet store label s1").is_err());
        assert!(parse("posfleet store window s1").is_err());
        assert!(parse("posfleet store window s1 --start 02:00").is_err());
        assert!(parse("posfleet store window s1 --clear --start 02:00 --duration 1h").is_err());
        assert!(parse("posfleet device assign dev-1 pos-app@1.1.0 --emergency").is_ok());
        assert!(
            parse("posfleet device assign --store s1 pos-app@1.1.0 --no-download-ahead").is_ok()
        );
        assert!(parse("posfleet device assign").is_err());
        assert!(
            parse("posfleet device logs dev-1 --since 2h --lines 50 --grep x --follow").is_ok()
        );
        assert!(parse("posfleet device logs --request log-1 --wait 30s").is_ok());
        assert!(parse("posfleet device logs").is_err());
        assert!(parse("posfleet device logs dev-1 --request log-1").is_err());
        assert!(parse("posfleet device logs --request log-1 --grep x").is_err());
        assert!(parse("posfleet device logs dev-1 --since soon").is_err());
    }

    #[test]
    fn a_stored_session_goes_only_to_its_server_and_only_until_it_expires() {
        let stored = session_file::StoredSession {
            server: "https://cp.example:7400".into(),
            user: "alice".into(),
            role: "deployer".into(),
            token: "pfs_secret".into(),
            expires_at_unix_ms: 1_764_000_000_000,
        };
        let token = |server: &str, now| {
            session_token(Some(stored.clone()), server, now).map_err(|e| e.to_string())
        };
        assert_eq!(
            token("https://cp.example:7400", 1_000).as_deref(),
            Ok("pfs_secret")
        );
        let other = token("https://other.example:7400", 1_000).unwrap_err();
        assert!(other.contains("no admin API token"), "{other}");
        assert!(
            other.contains("alice's on https://cp.example:7400, not https://other.example:7400"),
            "{other}"
        );
        assert!(!other.contains("pfs_secret"), "{other}");
        assert_eq!(
            token("https://cp.example:7400", 1_764_000_000_000).unwrap_err(),
            "your session expired at 2025-11-24T16:00:00Z; run posfleet login"
        );
        let none = session_token(None, "https://cp.example:7400", 0).unwrap_err();
        assert!(none.to_string().contains("run posfleet login --user NAME"));
    }

    #[test]
    fn status_codes_read_as_words() {
        assert_eq!(code_name(tonic::Code::NotFound), "not found");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "unauthenticated");
    }
}
