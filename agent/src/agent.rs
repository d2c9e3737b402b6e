//! The agent's main loop: enroll once, then heartbeat at the interval the
//! control plane hands out, backing off while it is unreachable. Nothing
//! here can stop the till from selling: failures are logged and retried.

use ed25519_dalek::{Signer, SigningKey};
use posfleet_pki::rustls::ClientConfig;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use posfleet_proto::v1::{EnrollRequest, HeartbeatRequest, ReportProgressRequest};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::backoff::{Backoff, jittered};
use crate::config::{AgentConfig, PeripheralsDriver};
use crate::error::Error;
use crate::health::{self, FakePeripherals, NoPeripherals, Peripherals};
use crate::install::Slots;
use crate::lifecycle::{self, Clock, DesiredState, Lifecycle, Report};
use crate::repository::{RepositoryClient, Timeouts};
use crate::selfupdate::{AgentRoot, Launched, SelfUpdate};
use crate::sharing::{StoreFetcher, StorePeers};
use crate::state::{Enrollment, StateDir};
use crate::tls::{DeviceCertificate, TlsFailure};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest heartbeat interval the agent accepts from the server.
const MAX_HEARTBEAT_INTERVAL_SECONDS: u32 = 4 * 3600;

/// The control plane keeps at most this many P2P addresses per till.
const MAX_REPORTED_P2P_ADDRS: usize = 16;

/// Where the signals not yet sent wait from a stop to the next start.
const SIGNALS_FILE: &str = "signals.pb";

/// First retry delay after a failed call.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

pub struct Agent {
    config: AgentConfig,
    /// Bundle sharing with the store's other tills, once started.
    p2p: Option<posfleet_p2p::P2p>,
    /// Where `p2p` listens, as reported to the control plane.
    p2p_addrs: Vec<String>,
    /// Peers banned (`posfleet_p2p::Stats::banned_peers`) as of the last
    /// acknowledged heartbeat: the next one reports the bans since.
    bans_reported: u64,
    store_peers: StorePeers,
    repository: Option<RepositoryClient>,
    key: SigningKey,
    state: StateDir,
    slots: Slots,
    /// The user bundle hooks run as (`hook_user`), for the installs.
    hook_user: Option<crate::hooks::HookUser>,
    peripherals: Box<dyn Peripherals>,
    client: AgentServiceClient<Channel>,
    /// Over TLS once enrolled: what new connections to the control plane
    /// and the repository present, replaced when the certificate is renewed.
    device_tls: Option<DeviceTls>,
    /// For `UploadLogs`, which lasts as long as a follow: no call deadline.
    upload_client: AgentServiceClient<Channel>,
    /// The agent's own log lines, for its log store.
    captured: Option<crate::logs::Captured>,
    /// Log requests from heartbeats go there, once the till runs.
    log_requests: Option<tokio::sync::mpsc::Sender<Vec<posfleet_proto::v1::LogRequest>>>,
    started: Instant,
    /// What its launcher told the agent, when one started it.
    launched: Option<Launched>,
    /// This till's signals, carried by the heartbeats.
    signals: crate::signals::Signals,
    /// The program whose `signal` subcommand supervised programs run to
    /// report (`POSFLEET_AGENT`), when the agent runs inside another one.
    signal_executable: Option<std::path::PathBuf>,
}

/// The till's mutual TLS, shared with the channel and the repository.
struct DeviceTls {
    certificate: DeviceCertificate,
    channel: posfleet_pki::ClientTls,
    origin: Option<crate::fetch::Origin>,
    /// The control plane asked for a renewal now (its CA is being rotated
    /// out).
    renew_now: bool,
}

/// Codes that mean the request itself was refused: retrying the same
/// request cannot succeed.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::AlreadyExists
    )
}

impl Agent {
    /// Prepares the data dir and the device key. Makes no network call.
    pub fn open(config: AgentConfig) -> Result<Agent, Error> {
        // One crypto provider for every TLS the agent makes.
        posfleet_pki::install_crypto_provider();
        let peripherals: Box<dyn Peripherals> = match config.peripherals {
            PeripheralsDriver::None => Box::new(NoPeripherals),
            PeripheralsDriver::Fake => {
                Box::new(FakePeripherals::new(config.fake_peripheral_faults.clone()))
            }
        };
        Agent::with_peripherals(config, peripherals)
    }

    /// As `open`, with a given peripherals driver.
    fn with_peripherals(
        config: AgentConfig,
        peripherals: Box<dyn Peripherals>,
    ) -> Result<Agent, Error> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(|source| Error::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
        let key = crate::identity::load_or_create(&config.data_dir)?;
        // Until enrolled, the control plane is vouched for by the configured
        // CA (or pin) and the till presents nothing.
        let enrollment_tls = config
            .server_trust()?
            .map(|trust| crate::tls::enrollment_config(&trust))
            .transpose()?;
        let upload_channel = untimed_channel(
            &config,
            enrollment_tls.clone().map(posfleet_pki::ClientTls::new),
        )?;
        let channel = grpc_channel(&config, enrollment_tls)?;
        let repository = if config.root_json_path.as_os_str().is_empty() {
            None
        } else {
            Some(
                RepositoryClient::open(
                    &config.root_json_path,
                    &config.data_dir,
                    &config.repository_url,
                    posfleet_bundle::client::Limits::default(),
                    Timeouts::default(),
                )
                .map_err(|e| Error::Repository(e.to_string()))?,
            )
        };
        let signals = if config.clock_file.as_os_str().is_empty() {
            crate::signals::Signals::new()
        } else {
            let clock = Clock::File(config.clock_file.clone());
            crate::signals::Signals::with_clock(move || clock.now().timestamp().div_euclid(60))
        };
        Ok(Agent {
            p2p: None,
            p2p_addrs: Vec::new(),
            bans_reported: 0,
            store_peers: StorePeers::load(&config.data_dir),
            repository,
            state: StateDir::new(&config.data_dir),
            slots: match config.hook_user()? {
                Some(user) => Slots::open(&config.data_dir)?.with_hook_user(user)?,
                None => Slots::open(&config.data_dir)?,
            },
            hook_user: config.hook_user()?,
            client: AgentServiceClient::new(channel),
            upload_client: AgentServiceClient::new(upload_channel),
            captured: None,
            log_requests: None,
            device_tls: None,
            config,
            key,
            peripherals,
            started: Instant::now(),
            launched: None,
            signals,
            signal_executable: None,
        })
    }

    /// Runs inside `program`, which answers `program signal LINE...` as
    /// `posfleet-agent signal` does: supervised programs report through it.
    pub fn with_signal_executable(mut self, program: std::path::PathBuf) -> Agent {
        self.signal_executable = Some(program);
        self
    }

    /// Keeps the agent's own log lines (from `logs::capture`'s layer) in
    /// its log store.
    pub fn with_log_capture(mut self, captured: crate::logs::Captured) -> Agent {
        self.captured = Some(captured);
        self
    }

    /// Started by `posfleet-agent-launcher` (see `selfupdate`): the agent
    /// may install agent bundles, and confirms itself when on trial.
    pub fn with_launcher(mut self, launched: Option<Launched>) -> Agent {
        self.launched = launched;
        self
    }

    /// Runs until `shutdown` completes. Returns an error only when the agent
    /// cannot go on at all (no enrollment possible, unusable data dir).
    ///
    /// Whatever the network does, from the start: the minutes of signals,
    /// the local API, and the bundles' supervised programs, stopped last.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let supervisor = self.supervisor()?;
        let kept = self.config.data_dir.join(SIGNALS_FILE);
        self.signals.restore(&kept);
        let signal_tasks = self.start_signals();
        let (stop_supervisor, stopped) = watch::channel(false);
        let supervisor = tokio::spawn(supervisor.run(stopped));
        let result = self.serve(shutdown).await;
        let _ = stop_supervisor.send(true);
        if let Err(error) = supervisor.await {
            tracing::error!(%error, "The supervisor task failed.");
        }
        for task in signal_tasks {
            task.abort();
        }
        if let Err(error) = self.signals.save(&kept) {
            tracing::warn!(%error, "Cannot keep the signals not yet sent.");
        }
        result
    }

    /// The supervisor of the bundles' programs.
    fn supervisor(&self) -> Result<crate::supervisor::Supervisor, Error> {
        // `POSFLEET_AGENT`: the program the agent runs in, when that one said
        // it answers `signal` (`posfleet demo`); else this executable when it
        // is the agent; else a `posfleet-agent` beside it; else nothing.
        let agent_executable = self.signal_executable.clone().or_else(|| {
            let exe = std::env::current_exe().ok()?;
            if exe.file_name().is_some_and(|name| name == "posfleet-agent") {
                Some(exe)
            } else {
                Some(exe.with_file_name("posfleet-agent")).filter(|sibling| sibling.is_file())
            }
        });
        Ok(crate::supervisor::Supervisor::new(
            Slots::open(&self.config.data_dir)?,
            crate::supervisor::Context {
                agent_executable,
                hook_user: self.hook_user.clone(),
                ..crate::supervisor::Context::new(
                    &self.config.data_dir,
                    self.signals.clone(),
                    self.config.signal_socket(),
                )
            },
        ))
    }

    async fn serve(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        // Kept from the start, enrolled or not; a store that cannot be
        // opened turns logs on demand off, nothing else.
        let log_store = crate::logs::spawn_store(
            &self.config.data_dir.join("logs"),
            self.config.log_store_max_bytes,
            &self.config.log_paths,
            self.captured.take(),
        )
        .inspect_err(
            |error| tracing::error!(%error, "Cannot open the log store; logs on demand are off."),
        )
        .ok();
        if self.config.insecure_dev && !self.config.tls() {
            tracing::warn!(
                server_url = %self.config.server_url,
                "INSECURE (insecure_dev): talking to the control plane in plaintext. The till's \
                 credential and its desired state cross the network in clear, and nothing proves \
                 the server is the fleet's. For a development network only."
            );
        }
        let enrollment = tokio::select! {
            result = self.ensure_enrolled() => result?,
            _ = &mut shutdown => return Ok(()),
        };
        if self.needs_first_certificate(&enrollment)? {
            tokio::select! {
                () = self.obtain_first_certificate(&enrollment) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
        self.connect_as_device(&enrollment)?;
        tracing::info!(device_id = %enrollment.device_id, store_id = %enrollment.store_id, tls = self.config.tls(), "Agent running.");
        let data_dir = self.config.data_dir.clone();
        let (desired_tx, desired_rx) = watch::channel(lifecycle::load_desired(&data_dir));
        let (report_tx, report_rx) = watch::channel(Report::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        if self.config.p2p_enabled && self.repository.is_some() {
            self.start_p2p().await;
        }
        // Peers serve each other the metadata they verified, and the
        // repository asks them when the origin is unreachable.
        if let (Some(repository), Some(p2p)) = (self.repository.as_mut(), &self.p2p) {
            repository.share_with_store(p2p.clone()).await;
        }
        let lifecycle = match self.repository.take() {
            Some(repository) => {
                let fetcher: Arc<dyn crate::fetch::Fetcher> = match &self.p2p {
                    Some(p2p) => Arc::new(StoreFetcher::new(repository.origin(), p2p.clone())),
                    None => Arc::new(repository.origin()),
                };
                let lifecycle = Lifecycle {
                    data_dir: data_dir.clone(),
                    hardware_model: self.config.hardware_model.clone(),
                    fetcher,
                    repository,
                    clock: if self.config.clock_file.as_os_str().is_empty() {
                        Clock::System
                    } else {
                        Clock::File(self.config.clock_file.clone())
                    },
                    check_interval: Duration::from_secs(self.config.install_check_interval_seconds),
                    refresh_interval: Duration::from_secs(self.config.repository_refresh_seconds),
                    min_free_disk_bytes: self.config.min_free_disk_bytes,
                    hook_user: self.hook_user.clone(),
                    self_update: SelfUpdate {
                        launched: self.launched.clone(),
                        confirm: Duration::from_secs(self.config.agent_update_confirm_seconds),
                    },
                };
                Some(tokio::spawn(lifecycle.run(
                    desired_rx,
                    report_tx,
                    stopped(stop_rx.clone()),
                )))
            }
            None => {
                tracing::warn!(
                    "No root_json_path configured: bundles assigned to this device are not installed."
                );
                None
            }
        };
        let device_authorization = authorization(&enrollment).map_err(|_| Error::Corrupt {
            path: data_dir.join(crate::state::ENROLLMENT_FILE),
            detail: "the device credential is not ASCII".into(),
        })?;
        if let Some(store) = log_store {
            // Validated with the configuration.
            match crate::logs::Redactor::new(&self.config.log_redact_patterns) {
                Ok(redactor) => {
                    self.log_requests = Some(crate::logs::spawn_uploads(
                        store,
                        crate::logs::UploadSettings {
                            client: self.upload_client.clone(),
                            authorization: device_authorization.clone(),
                            redactor: Arc::new(redactor),
                            bytes_per_second: self.config.log_upload_limit_bytes_per_second,
                        },
                    ))
                }
                Err(error) => tracing::error!(%error, "Logs on demand are off."),
            }
        }
        let latest_report = report_rx.clone();
        let report_authorization = device_authorization.clone();
        let reporter = tokio::spawn(report_progress(
            self.client.clone(),
            device_authorization,
            report_rx,
            Duration::from_secs(self.config.max_backoff_seconds),
        ));
        let mut backoff = Backoff::new(
            BACKOFF_BASE,
            Duration::from_secs(self.config.max_backoff_seconds),
        );
        let mut online = true;
        loop {
            let wait = match self.heartbeat(&enrollment).await {
                Ok((interval, desired)) => {
                    if !online {
                        tracing::info!("Control plane reachable again.");
                        online = true;
                    }
                    backoff.reset();
                    let lifecycle_running =
                        lifecycle.as_ref().is_none_or(|task| !task.is_finished());
                    if self.confirm_if_on_trial(lifecycle_running) {
                        // The lifecycle reports the new version installed.
                        desired_tx.send_modify(|_| ());
                    }
                    self.renew_certificate_if_due(&enrollment).await;
                    if *desired_tx.borrow() != desired {
                        tracing::info!(bundles = desired.bundles.len(), "New desired state.");
                        if let Err(error) = lifecycle::save_desired(&data_dir, &desired) {
                            tracing::error!(%error, "Cannot save the desired state.");
                        }
                        desired_tx.send_replace(desired);
                    }
                    jittered(interval)
                }
                Err(status) => {
                    let delay = backoff.next_delay();
                    let retry_in_seconds = delay.as_secs_f64();
                    match crate::tls::tls_failure(&status) {
                        Some(TlsFailure::Revoked) => {
                            tracing::error!(
                                retry_in_seconds,
                                "This till's certificate is revoked: the control plane refuses it. Retrying with backoff."
                            );
                            online = false;
                        }
                        Some(failure) => {
                            tracing::error!(error = %failure, retry_in_seconds, "Cannot reach the control plane over TLS.");
                            online = false;
                            // An ended certificate opens no connection: renew it
                            // by proving the key.
                            self.renew_certificate_if_due(&enrollment).await;
                        }
                        None if is_refusal(status.code()) => {
                            tracing::error!(code = ?status.code(), error = %status.message(), "Heartbeat refused.");
                        }
                        None if online => {
                            tracing::warn!(code = ?status.code(), error = %crate::tls::describe(&status), "Control plane unreachable; the till keeps working, retrying with backoff.");
                            online = false;
                        }
                        None => {}
                    }
                    delay
                }
            };
            let lifecycle_ended = async {
                match &lifecycle {
                    Some(task) if task.is_finished() => {}
                    _ => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = lifecycle_ended => {}
                _ = &mut shutdown => break,
            }
            if let Some(task) = &lifecycle
                && task.is_finished()
            {
                break;
            }
        }
        let _ = stop_tx.send(true);
        reporter.abort();
        if let Some(p2p) = &self.p2p {
            p2p.shutdown().await;
        }
        if let Some(task) = lifecycle {
            match task.await {
                Ok(Err(switched @ Error::AgentSwitched { .. })) => {
                    // `installing` reaches the control plane before the new
                    // agent starts on trial: it may never report itself.
                    let request =
                        progress_request(&latest_report.borrow(), report_authorization.as_ref());
                    if let Err(status) = self.client.report_progress(request).await {
                        tracing::warn!(code = ?status.code(), error = %crate::tls::describe(&status), "Cannot report the switch; the next agent reports it.");
                    }
                    return Err(switched);
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "Bundle lifecycle stopped.");
                    return Err(error);
                }
                Err(error) => tracing::error!(%error, "Bundle lifecycle task failed."),
                Ok(Ok(())) => {}
            }
        }
        tracing::info!("Agent stopped.");
        Ok(())
    }

    /// Starts the minute ticker and the local API (when its socket can be
    /// bound: without it the till sells on, reporting the agent's own
    /// signals only).
    fn start_signals(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![self.signals.spawn_ticker()];
        let path = self.config.signal_socket();
        match crate::signals::socket::bind(&path) {
            Ok(socket) => {
                tracing::info!(socket = %path.display(), "Listening for signals.");
                if let Some(user) = &self.hook_user
                    && let Err(error) = crate::signals::socket::allow(&path, user)
                {
                    tracing::error!(%error, user = %user.name, "The supervised program cannot report signals.");
                }
                tasks.push(crate::signals::socket::spawn_server(
                    socket,
                    self.signals.clone(),
                ));
            }
            Err(error) => {
                tracing::error!(%error, "The local signal API is off.");
            }
        }
        tasks
    }

    /// A new agent version on trial confirms itself once the control plane
    /// answered its heartbeat and its own work (the bundle lifecycle) runs,
    /// so its launcher keeps it. Returns whether it confirmed now.
    fn confirm_if_on_trial(&self, lifecycle_running: bool) -> bool {
        let Some(version) = self.launched.as_ref().and_then(|l| l.version.as_ref()) else {
            return false;
        };
        let root = AgentRoot::new(&self.config.data_dir);
        if root.on_trial().as_ref() != Some(version) {
            return false;
        }
        if !lifecycle_running {
            tracing::warn!(version = %version, "Not confirming this agent version: its bundle lifecycle stopped.");
            return false;
        }
        match root.confirm(version) {
            Ok(confirmed) => {
                if confirmed {
                    tracing::info!(version = %version, "Agent version confirmed: the control plane answered and the agent is healthy.");
                }
                confirmed
            }
            Err(error) => {
                tracing::error!(%error, "Cannot confirm this agent version.");
                false
            }
        }
    }

    /// Starts sharing bundles with the store's tills. A till that cannot
    /// (its port is taken, say) downloads from the origin alone.
    async fn start_p2p(&mut self) {
        let config = match self.config.p2p_config() {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "P2P not started.");
                return;
            }
        };
        match posfleet_p2p::spawn(self.key.to_bytes(), config).await {
            Ok((p2p, _task)) => {
                self.p2p_addrs = p2p
                    .listen_addrs()
                    .await
                    .iter()
                    .map(ToString::to_string)
                    .take(MAX_REPORTED_P2P_ADDRS)
                    .collect();
                p2p.set_members(self.store_peers.members(p2p.peer_id()))
                    .await;
                tracing::info!(peer_id = %p2p.peer_id(), addrs = ?self.p2p_addrs, members = self.store_peers.peers.len(), "Sharing bundles with the store.");
                self.p2p = Some(p2p);
            }
            Err(error) => {
                tracing::error!(%error, "P2P not started; bundles come from the control plane alone.");
            }
        }
    }

    /// Takes a new membership list: kept on disk for offline starts, and
    /// handed to P2P, which drops peers no longer on it.
    async fn set_store_peers(&mut self, peers: StorePeers) {
        if let Err(error) = peers.save(&self.config.data_dir) {
            tracing::error!(%error, "Cannot save the store peer list.");
        }
        if let Some(p2p) = &self.p2p {
            p2p.set_members(peers.members(p2p.peer_id())).await;
        }
        tracing::info!(
            members = peers.peers.len(),
            "Store membership list updated."
        );
        self.store_peers = peers;
    }

    /// Over TLS, from enrollment on: every call and every `/repo/` request
    /// presents the device certificate (mutual TLS), trusting the CAs
    /// enrollment handed out.
    fn connect_as_device(&mut self, enrollment: &Enrollment) -> Result<(), Error> {
        if !self.config.tls() {
            return Ok(());
        }
        let (tls, certificate) = match DeviceCertificate::load(&self.config.data_dir)? {
            Some(certificate) => (certificate.client_config(&self.key)?, Some(certificate)),
            // Saved before the enrollment: only a hand-removed file leaves this.
            None if enrollment.device_credential.is_empty() => {
                return Err(Error::Corrupt {
                    path: self.config.data_dir.join(crate::tls::CERTIFICATE_FILE),
                    detail: "missing: this till enrolled over TLS and has no other credential; \
                             restore the file, or clear the data dir and enroll it again"
                        .into(),
                });
            }
            // Enrolled with a credential: server-authenticated TLS only.
            None => match self.config.server_trust()? {
                Some(trust) => (crate::tls::enrollment_config(&trust)?, None),
                None => return Ok(()),
            },
        };
        let channel = posfleet_pki::ClientTls::new(tls.clone());
        self.client =
            AgentServiceClient::new(grpc_channel_with(&self.config, Some(channel.clone()))?);
        self.upload_client =
            AgentServiceClient::new(untimed_channel(&self.config, Some(channel.clone()))?);
        let mut origin = None;
        if let Some(repository) = self.repository.as_mut() {
            repository
                .use_tls(tls)
                .map_err(|e| Error::Repository(e.to_string()))?;
            origin = Some(repository.origin());
        }
        self.device_tls = certificate.map(|certificate| DeviceTls {
            certificate,
            channel,
            origin,
            renew_now: false,
        });
        Ok(())
    }

    /// Renews the device certificate once two thirds of its lifetime have
    /// passed (over mutual TLS with it), or after it ended (proving the
    /// device key over server-authenticated TLS). New connections use the
    /// new one at once. A failure is logged and tried again at the next
    /// heartbeat.
    async fn renew_certificate_if_due(&mut self, enrollment: &Enrollment) {
        let Some(device_tls) = &self.device_tls else {
            return;
        };
        let now = chrono::Utc::now().timestamp();
        let Some(identity) = device_tls.certificate.identity() else {
            return;
        };
        let lifetime = identity.not_after - identity.not_before;
        if now < identity.not_before + lifetime * 2 / 3 && !device_tls.renew_now {
            return;
        }
        let expired = now >= identity.not_after;
        match self.renew_certificate(enrollment, expired).await {
            Ok(not_after) => tracing::info!(
                expired,
                not_after = %chrono::DateTime::from_timestamp(not_after, 0).map(|t| t.to_rfc3339()).unwrap_or_default(),
                "Device certificate renewed."
            ),
            Err(error) => {
                tracing::warn!(expired, %error, "Cannot renew the device certificate yet; trying again at the next heartbeat.")
            }
        }
    }

    async fn renew_certificate(
        &mut self,
        enrollment: &Enrollment,
        expired: bool,
    ) -> Result<i64, String> {
        let request = posfleet_pki::certificate_request(&self.key).map_err(|e| e.to_string())?;
        let answer = if expired {
            // The certificate cannot open a connection any more: prove the
            // key over server-authenticated TLS, trusting the saved CAs.
            let device_tls = self.device_tls.as_ref().ok_or("no device certificate")?;
            let trust = device_tls
                .certificate
                .server_config()
                .map_err(|e| e.to_string())?;
            self.prove_key(enrollment, trust, request).await
        } else {
            self.client
                .renew_certificate(posfleet_proto::v1::RenewCertificateRequest {
                    certificate_request: request,
                    ..Default::default()
                })
                .await
        }
        .map_err(|status| crate::tls::describe(&status))?
        .into_inner();
        let certificate = self.save_issued(&answer, enrollment)?;
        let not_after = certificate.identity().map_or(0, |i| i.not_after);
        self.use_certificate(certificate)?;
        if let Some(tls) = self.device_tls.as_mut() {
            tls.renew_now = false;
        }
        Ok(not_after)
    }

    /// `RenewCertificate` over server-authenticated TLS (trusting `trust`),
    /// the device proving its key with a signed, timed proof.
    async fn prove_key(
        &self,
        enrollment: &Enrollment,
        trust: ClientConfig,
        request: Vec<u8>,
    ) -> Result<tonic::Response<posfleet_proto::v1::RenewCertificateResponse>, tonic::Status> {
        let channel = grpc_channel(&self.config, Some(trust))
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let signed_at = chrono::Utc::now().timestamp_millis();
        let payload =
            posfleet_proto::renew_signing_payload(&enrollment.device_id, signed_at, &request);
        AgentServiceClient::new(channel)
            .renew_certificate(posfleet_proto::v1::RenewCertificateRequest {
                certificate_request: request,
                device_id: enrollment.device_id.clone(),
                signed_at_unix_ms: signed_at,
                signature: self.key.sign(&payload).to_bytes().to_vec(),
            })
            .await
    }

    /// A till enrolled over plaintext (it holds a credential and no
    /// certificate) that is now configured for TLS.
    fn needs_first_certificate(&self, enrollment: &Enrollment) -> Result<bool, Error> {
        Ok(self.config.tls()
            && !enrollment.device_credential.is_empty()
            && DeviceCertificate::load(&self.config.data_dir)?.is_none())
    }

    /// Its first certificate, for the key it enrolled with, by proving that
    /// key (the move from plaintext to TLS needs no new enrollment).
    /// Retried with backoff until it is issued; the till's installed
    /// programs keep running meanwhile.
    async fn obtain_first_certificate(&mut self, enrollment: &Enrollment) {
        let mut backoff = Backoff::new(
            BACKOFF_BASE,
            Duration::from_secs(self.config.max_backoff_seconds),
        );
        loop {
            match self.try_first_certificate(enrollment).await {
                Ok(()) => {
                    tracing::info!(
                        "Device certificate obtained: this till, enrolled over plaintext, calls with mutual TLS from now on."
                    );
                    return;
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::error!(%error, retry_in_seconds = delay.as_secs_f64(), "Cannot obtain a device certificate yet.");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn try_first_certificate(&mut self, enrollment: &Enrollment) -> Result<(), String> {
        let trust = self
            .config
            .server_trust()
            .map_err(|e| e.to_string())?
            .ok_or("no CA to trust the control plane by: set ca_cert_path or ca_fingerprint")?;
        let trust = crate::tls::enrollment_config(&trust).map_err(|e| e.to_string())?;
        let request = posfleet_pki::certificate_request(&self.key).map_err(|e| e.to_string())?;
        let answer = self
            .prove_key(enrollment, trust, request)
            .await
            .map_err(|status| crate::tls::describe(&status))?
            .into_inner();
        self.save_issued(&answer, enrollment).map(|_| ())
    }

    /// Saves the certificate a renewal answered with, and its trust bundle,
    /// if they are usable with the device key.
    fn save_issued(
        &self,
        answer: &posfleet_proto::v1::RenewCertificateResponse,
        enrollment: &Enrollment,
    ) -> Result<DeviceCertificate, String> {
        let certificate = DeviceCertificate::from_enrollment(
            &answer.device_certificate_pem,
            &answer.trust_bundle_pem,
            &enrollment.device_id,
        )
        .map_err(|e| e.to_string())?
        .ok_or("the answer holds no certificate")?;
        certificate
            .client_config(&self.key)
            .map_err(|e| e.to_string())?;
        certificate
            .save(&self.config.data_dir)
            .map_err(|e| e.to_string())?;
        Ok(certificate)
    }

    /// Makes new connections (gRPC and `/repo/`) use `certificate` and its
    /// trust bundle.
    fn use_certificate(&mut self, certificate: DeviceCertificate) -> Result<(), String> {
        let tls = certificate
            .client_config(&self.key)
            .map_err(|e| e.to_string())?;
        let device_tls = self.device_tls.as_mut().ok_or("no device certificate")?;
        device_tls.channel.replace(tls.clone());
        if let Some(origin) = &device_tls.origin {
            origin.use_tls(tls).map_err(|e| e.to_string())?;
        }
        device_tls.certificate = certificate;
        Ok(())
    }

    /// Saves and uses a trust bundle the control plane sent.
    fn update_trust(&mut self, trust_pem: &str) -> Result<(), String> {
        let device_tls = self.device_tls.as_ref().ok_or("no device certificate")?;
        let certificate = device_tls
            .certificate
            .with_trust(trust_pem)
            .map_err(|e| e.to_string())?;
        certificate
            .save(&self.config.data_dir)
            .map_err(|e| e.to_string())?;
        self.use_certificate(certificate)
    }

    /// The saved enrollment, or a new one. Retries while the control plane
    /// is unreachable; gives up when it refuses. Over TLS the enrollment
    /// asks for a certificate for the device key, saved (`device.crt`,
    /// `trust.pem`) before the enrollment itself: a till that stops in
    /// between finds no enrollment at its next start and enrolls again,
    /// which the control plane allows until the first heartbeat.
    async fn ensure_enrolled(&mut self) -> Result<Enrollment, Error> {
        if let Some(enrollment) = self.state.enrollment()? {
            return Ok(enrollment);
        }
        if self.config.enrollment_token.is_empty() {
            return Err(Error::NoEnrollmentToken);
        }
        let serial_number = if self.config.serial_number.is_empty() {
            default_serial_number()
        } else {
            self.config.serial_number.clone()
        };
        let public_key = self.key.verifying_key().to_bytes().to_vec();
        let payload = posfleet_proto::enroll_signing_payload(
            &self.config.enrollment_token,
            &public_key,
            &self.config.hardware_model,
            &serial_number,
        );
        let certificate_request = if self.config.tls() {
            posfleet_pki::certificate_request(&self.key)?
        } else {
            Vec::new()
        };
        let request = EnrollRequest {
            enrollment_token: self.config.enrollment_token.clone(),
            signature: self.key.sign(&payload).to_bytes().to_vec(),
            public_key,
            hardware_model: self.config.hardware_model.clone(),
            serial_number,
            agent_version: AGENT_VERSION.into(),
            certificate_request,
        };
        let mut backoff = Backoff::new(
            BACKOFF_BASE,
            Duration::from_secs(self.config.max_backoff_seconds),
        );
        loop {
            let answer = match self.client.enroll(request.clone()).await {
                Ok(response) => self.save_enrollment(response.into_inner()),
                Err(status) if is_refusal(status.code()) => {
                    return Err(Error::EnrollmentRefused(status.message().to_string()));
                }
                Err(status) => Err(status),
            };
            let status = match answer {
                Ok(enrollment) => {
                    tracing::info!(device_id = %enrollment.device_id, store_id = %enrollment.store_id, "Enrolled.");
                    return Ok(enrollment);
                }
                Err(status) => status,
            };
            let delay = backoff.next_delay();
            let retry_in_seconds = delay.as_secs_f64();
            match crate::tls::tls_failure(&status) {
                Some(failure) => {
                    tracing::error!(error = %failure, retry_in_seconds, "Cannot enroll over TLS.")
                }
                None => {
                    tracing::warn!(code = ?status.code(), error = %crate::tls::describe(&status), retry_in_seconds, "Cannot enroll yet.")
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Saves what an enrollment answered: the certificate and trust bundle
    /// first, then the enrollment. An answer that cannot be used is a
    /// status to retry on (the control plane answers a retry again).
    fn save_enrollment(
        &self,
        response: posfleet_proto::v1::EnrollResponse,
    ) -> Result<Enrollment, tonic::Status> {
        let unusable = |error: Error| {
            tracing::error!(%error, "Enrollment answer not saved.");
            tonic::Status::internal(error.to_string())
        };
        if self.config.tls() {
            let certificate = DeviceCertificate::from_enrollment(
                &response.device_certificate_pem,
                &response.trust_bundle_pem,
                &response.device_id,
            )
            .map_err(unusable)?;
            match certificate {
                Some(certificate) => certificate.save(&self.config.data_dir).map_err(unusable)?,
                None if response.device_credential.is_empty() => {
                    return Err(unusable(Error::EnrollmentAnswer(
                        "it holds neither a certificate nor a credential".into(),
                    )));
                }
                None => {}
            }
        }
        let enrollment = Enrollment {
            device_id: response.device_id,
            device_credential: response.device_credential,
            store_id: response.store_id,
        };
        self.state.save_enrollment(&enrollment).map_err(unusable)?;
        Ok(enrollment)
    }

    /// Sends one heartbeat; returns the interval before the next one and
    /// the desired state.
    async fn heartbeat(
        &mut self,
        enrollment: &Enrollment,
    ) -> Result<(Duration, DesiredState), tonic::Status> {
        let installed_bundles: std::collections::HashMap<String, String> = self
            .slots
            .confirmed_versions()
            .map(|m| {
                m.into_iter()
                    .map(|(name, version)| (name, version.to_string()))
                    .collect()
            })
            .unwrap_or_else(|error| {
                tracing::error!(%error, "Cannot read installed bundles; reporting none.");
                Default::default()
            });
        let mut installed_bundles = installed_bundles;
        if let Some(version) = AgentRoot::new(&self.config.data_dir).confirmed() {
            installed_bundles.insert(
                posfleet_bundle::manifest::AGENT_BUNDLE_NAME.to_string(),
                version.to_string(),
            );
        }
        let banned = match &self.p2p {
            Some(p2p) => p2p.stats().await.banned_peers,
            None => self.bans_reported,
        };
        // What this heartbeat tells, logged (at debug) once acknowledged.
        let told: std::collections::BTreeMap<String, String> = installed_bundles
            .iter()
            .map(|(name, version)| (name.clone(), version.clone()))
            .collect();
        let mut signals = self.signals.batch();
        let mut request = Request::new(HeartbeatRequest {
            p2p_peers_banned: u32::try_from(banned.saturating_sub(self.bans_reported))
                .unwrap_or(u32::MAX),
            agent_version: AGENT_VERSION.into(),
            installed_bundles,
            health: Some(health::collect(
                &self.config.data_dir,
                self.peripherals.as_ref(),
            )),
            agent_uptime_seconds: self.started.elapsed().as_secs(),
            p2p_listen_addrs: self.p2p_addrs.clone(),
            store_peers_digest: hex::decode(&self.store_peers.digest).unwrap_or_default(),
            trust_bundle_sha256: self
                .device_tls
                .as_ref()
                .map(|tls| tls.certificate.trust_digest())
                .unwrap_or_default(),
            signal_minutes: std::mem::take(&mut signals.minutes),
            signals_dropped: signals.dropped,
        });
        if let Some(authorization) = authorization(enrollment)? {
            request
                .metadata_mut()
                .insert(posfleet_proto::AUTHORIZATION, authorization);
        }
        let mut response = self.client.heartbeat(request).await?.into_inner();
        tracing::debug!(installed = ?told, "Heartbeat acknowledged.");
        self.bans_reported = banned;
        self.signals.ack(&signals);
        if let Some(peers) = response.store_peers.take() {
            self.set_store_peers(StorePeers::from_proto(peers)).await;
        }
        if !response.trust_bundle_pem.is_empty() {
            match self.update_trust(&response.trust_bundle_pem) {
                Ok(()) => tracing::info!(
                    "New trust bundle from the control plane (a fleet CA was rotated or retired); new connections use it."
                ),
                Err(error) => {
                    tracing::error!(%error, "Cannot take the new trust bundle; keeping the one held.")
                }
            }
        }
        if response.renew_certificate
            && let Some(tls) = self.device_tls.as_mut()
        {
            tls.renew_now = true;
        }
        if let Some(uploads) = &self.log_requests
            && !response.log_requests.is_empty()
        {
            // Full: the uploader is busy; the next heartbeat names them again.
            let _ = uploads.try_send(std::mem::take(&mut response.log_requests));
        }
        // The server configures at most 1 h and quadruples it under load.
        let interval = Duration::from_secs(
            response
                .next_heartbeat_interval_seconds
                .clamp(1, MAX_HEARTBEAT_INTERVAL_SECONDS)
                .into(),
        );
        Ok((interval, DesiredState::from_response(&response)))
    }
}

/// The `authorization` metadata value of the device's calls; none for a
/// till enrolled over TLS, whose certificate is its identity.
fn authorization(
    enrollment: &Enrollment,
) -> Result<Option<tonic::metadata::AsciiMetadataValue>, tonic::Status> {
    if enrollment.device_credential.is_empty() {
        return Ok(None);
    }
    format!("Device {}", enrollment.device_credential)
        .parse()
        .map(Some)
        .map_err(|_| tonic::Status::internal("the saved device credential is not ASCII"))
}

/// The control plane's gRPC channel: over TLS with `tls` (an `https://`
/// server), else plaintext. Connects lazily.
fn grpc_channel(config: &AgentConfig, tls: Option<ClientConfig>) -> Result<Channel, Error> {
    grpc_channel_with(config, tls.map(posfleet_pki::ClientTls::new))
}

/// As [`grpc_channel`], with TLS the agent may replace (a renewed
/// certificate) while the channel lives.
fn grpc_channel_with(
    config: &AgentConfig,
    tls: Option<posfleet_pki::ClientTls>,
) -> Result<Channel, Error> {
    let timeout = Duration::from_secs(config.request_timeout_seconds);
    Ok(lazy_channel(endpoint(config)?.timeout(timeout), tls))
}

/// As [`grpc_channel_with`], with no deadline per call: for `UploadLogs`,
/// which lasts as long as the lines take at the bandwidth cap, and a
/// follow. The control plane ends an idle one.
fn untimed_channel(
    config: &AgentConfig,
    tls: Option<posfleet_pki::ClientTls>,
) -> Result<Channel, Error> {
    Ok(lazy_channel(endpoint(config)?, tls))
}

fn endpoint(config: &AgentConfig) -> Result<Endpoint, Error> {
    Ok(Endpoint::from_shared(config.server_url.clone())
        .map_err(|e| Error::ServerUrl(e.to_string()))?
        .connect_timeout(Duration::from_secs(config.request_timeout_seconds))
        .http2_keep_alive_interval(Duration::from_secs(60))
        .keep_alive_while_idle(false))
}

fn lazy_channel(endpoint: Endpoint, tls: Option<posfleet_pki::ClientTls>) -> Channel {
    match tls {
        Some(tls) => posfleet_pki::grpc_channel_with(&endpoint, Some(tls)),
        None => endpoint.connect_lazy(),
    }
}

/// Sends the bundle statuses whenever they change, at most once a second,
/// retrying with backoff while the control plane is unreachable. Only the
/// latest statuses matter, so a retry sends whatever is newest.
async fn report_progress(
    mut client: AgentServiceClient<Channel>,
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
    mut statuses: watch::Receiver<Report>,
    max_backoff: Duration,
) {
    let mut backoff = Backoff::new(BACKOFF_BASE, max_backoff);
    while statuses.changed().await.is_ok() {
        loop {
            let request = progress_request(&statuses.borrow_and_update(), authorization.as_ref());
            let sent = request.get_ref().bundles.clone();
            match client.report_progress(request).await {
                Ok(_) => {
                    for bundle in sent {
                        tracing::debug!(
                            bundle = %bundle.name,
                            target_version = %bundle.target_version,
                            phase = ?bundle.phase(),
                            updated_at_unix_ms = bundle.updated_at_unix_ms,
                            "Bundle progress acknowledged."
                        );
                    }
                    backoff.reset();
                    break;
                }
                Err(status) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(code = ?status.code(), error = %crate::tls::describe(&status), "Cannot report bundle progress yet.");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A `ReportProgress` call with every status of `report`.
fn progress_request(
    report: &Report,
    authorization: Option<&tonic::metadata::AsciiMetadataValue>,
) -> Request<ReportProgressRequest> {
    let bundles = report.values().cloned().collect();
    let mut request = Request::new(ReportProgressRequest { bundles });
    if let Some(authorization) = authorization {
        request
            .metadata_mut()
            .insert(posfleet_proto::AUTHORIZATION, authorization.clone());
    }
    request
}

/// The machine id, else the host name, else "unknown".
fn default_serial_number() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
