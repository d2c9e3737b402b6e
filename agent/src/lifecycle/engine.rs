//! The lifecycle task: recovers the slots at start, then takes each
//! desired bundle as far as [`decide`] allows (download, verify, wait for
//! the window, install) and publishes the statuses. It owns the statuses
//! and the staged downloads (`downloads/<sha256>.{part,bundle}`).

use chrono::{DateTime, Utc};
use posfleet_bundle::client::{VerifiedDelta, VerifiedTarget};
use posfleet_bundle::manifest::{AGENT_BUNDLE_NAME, Kind};
use semver::Version;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use crate::error::Error;
use crate::fetch::{Download, Fetcher, Received};
use crate::files;
use crate::install::{Outcome, RecoveryAction, Slots};
use crate::repository::{RepoError, RepositoryClient};
use crate::selfupdate::{self, AgentRoot, SelfUpdate};

use super::decide::{Step, decide};
use super::model::{Desired, DesiredState, Phase, Report, Status};

const DESIRED_FILE: &str = "desired.json";
const STATUS_FILE: &str = "bundles.json";
const DOWNLOADS_DIR: &str = "downloads";
/// Installs of one version cut short before confirmation after which it
/// is given up (it may be what kills the terminal).
const MAX_INTERRUPTED_INSTALLS: u32 = 3;

/// Where the time comes from.
#[derive(Debug, Clone)]
pub enum Clock {
    System,
    /// Tests: an RFC 3339 time in a file, re-read at every use.
    File(PathBuf),
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::File(path) => std::fs::read_to_string(path)
                .ok()
                .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|| {
                    tracing::warn!(path = %path.display(), "Cannot read the clock file; using the system clock.");
                    Utc::now()
                }),
        }
    }
}

/// Everything the lifecycle task needs.
pub struct Lifecycle {
    pub data_dir: PathBuf,
    pub hardware_model: String,
    pub repository: RepositoryClient,
    pub fetcher: Arc<dyn Fetcher>,
    pub clock: Clock,
    pub check_interval: Duration,
    pub refresh_interval: Duration,
    pub min_free_disk_bytes: u64,
    /// The user bundle hooks run as; `None`: the agent's.
    pub hook_user: Option<crate::hooks::HookUser>,
    /// Agent bundles: what the launcher said and the confirm window.
    pub self_update: SelfUpdate,
}

/// What the report says when the trusted repository metadata has expired
/// and no fresh metadata could be had: nothing new starts.
const EXPIRED_TRUST: &str =
    "trust metadata expired; not starting a download until the repository is reachable";

/// A failure and whether trying the same version again may help.
struct Failure {
    message: String,
    permanent: bool,
    /// Not the release's fault: the bundle waits (`pending`), with the
    /// message as the reason, instead of failing.
    waiting: bool,
}

impl Failure {
    fn retry(message: impl ToString) -> Failure {
        Failure {
            message: message.to_string(),
            permanent: false,
            waiting: false,
        }
    }
    fn permanent(message: impl ToString) -> Failure {
        Failure {
            message: message.to_string(),
            permanent: true,
            waiting: false,
        }
    }
    fn waiting(message: impl ToString) -> Failure {
        Failure {
            message: message.to_string(),
            permanent: false,
            waiting: true,
        }
    }
}

/// Why a delta was not used: the download stops with this failure (the
/// network is down: it waits and resumes; the rebuilt bundle could not be
/// staged: it is retried), or the till fetches the whole bundle instead
/// (anything about the base or the delta).
enum DeltaFailure {
    Stop(Failure),
    Fallback(String),
}

/// What applying a delta writes beside the downloads and removes when it
/// is done: a base bundle packed from its slot, its tar, the bundle being
/// rebuilt. Left by a stop in the middle, they are only disk used: every
/// attempt writes them anew.
const DELTA_SCRATCH: [&str; 3] = ["base", "tar", "rebuilt"];

/// Removes the scratch files of delta applies a stop cut short.
fn remove_delta_scratch(downloads: &Path) {
    let Ok(entries) = std::fs::read_dir(downloads) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let scratch = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| DELTA_SCRATCH.contains(&e));
        if scratch && let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), %error, "Cannot remove a delta's scratch file.");
        }
    }
}

/// Runs `work` on a blocking thread (packing, hashing, applying deltas).
async fn blocking(
    work: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(format!("stopped: {e}")))
}

/// A download cut off because neither the control plane nor the store's
/// peers answered (a control-plane replica killed under it, the WAN down)
/// waits and is tried again from where it stopped: that is not the
/// release's fault, and a rollout must not count it as a failure. Any
/// other error (a piece that does not verify, a refusal) fails it.
fn download_failure(target: &str, error: RepoError) -> Failure {
    let message = format!("download of {target} failed: {error}");
    if error.is_unreachable() {
        Failure::waiting(message)
    } else {
        Failure::retry(message)
    }
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(path)
        .ok()
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
}

fn load<T: serde::de::DeserializeOwned + Default>(path: &Path) -> T {
    match files::read_optional(path) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(path = %path.display(), %error, "Ignoring an unreadable state file.");
            T::default()
        }),
        Ok(None) => T::default(),
        Err(error) => {
            tracing::warn!(%error, "Ignoring an unreadable state file.");
            T::default()
        }
    }
}

/// The desired state saved by the last run (empty if none).
pub fn load_desired(data_dir: &Path) -> DesiredState {
    load(&data_dir.join(DESIRED_FILE))
}

pub fn save_desired(data_dir: &Path, desired: &DesiredState) -> Result<(), Error> {
    let bytes = serde_json::to_vec_pretty(desired).expect("plain data serializes");
    files::write_private(&data_dir.join(DESIRED_FILE), &bytes)
}

struct Run {
    lifecycle: Lifecycle,
    slots: Slots,
    statuses: BTreeMap<String, Status>,
    report: watch::Sender<Report>,
    next_refresh: Instant,
    agent: AgentRoot,
    /// Set once a new agent version is switched on: the task ends so that
    /// the agent exits and its launcher starts that version.
    switched: Option<Version>,
}

impl Lifecycle {
    /// Recovers the slots from whatever a crash left, then works towards
    /// the desired state until `shutdown`. Never returns an error for a
    /// failed bundle: that is reported; only an unusable data dir stops it.
    pub async fn run(
        self,
        mut desired: watch::Receiver<DesiredState>,
        report: watch::Sender<Report>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let slots = match &self.hook_user {
            Some(user) => Slots::open(&self.data_dir)?.with_hook_user(user.clone())?,
            None => Slots::open(&self.data_dir)?,
        };
        let mut statuses: BTreeMap<String, Status> = load(&self.data_dir.join(STATUS_FILE));
        for recovery in slots.recover()? {
            tracing::warn!(bundle = %recovery.name, reason = %recovery.reason, "Recovered an interrupted install.");
            let RecoveryAction::RolledBack { version } = &recovery.action else {
                continue;
            };
            if let Some(status) = statuses.get_mut(&recovery.name)
                && status.target_version.as_ref() == Some(version)
            {
                // The agent (or the terminal) died before the new version
                // was confirmed healthy. That may be the new version's
                // doing: after a few such deaths it is given up.
                status.interrupted += 1;
                status.phase = Phase::RolledBack;
                status.given_up = status.interrupted >= MAX_INTERRUPTED_INSTALLS;
                status.error = if status.given_up {
                    format!(
                        "{} ({} interrupted installs; not retried)",
                        recovery.reason, status.interrupted
                    )
                } else {
                    format!("{} (retrying)", recovery.reason)
                };
                status.updated_at_ms = Utc::now().timestamp_millis();
            }
        }
        let agent = AgentRoot::new(&self.data_dir);
        note_agent_revert(&agent, &mut statuses);
        for (name, status) in statuses.iter_mut() {
            status.active_version = match status.kind {
                Kind::Agent => agent.confirmed(),
                Kind::Software | Kind::Catalog => slots.confirmed(name)?,
            };
        }
        let downloads = self.data_dir.join(DOWNLOADS_DIR);
        std::fs::create_dir_all(&downloads).map_err(|source| Error::DataDir {
            path: downloads.clone(),
            source,
        })?;
        remove_delta_scratch(&downloads);
        let mut run = Run {
            lifecycle: self,
            slots,
            statuses,
            report,
            next_refresh: Instant::now(),
            agent,
            switched: None,
        };
        run.publish(true);
        loop {
            let state = desired.borrow_and_update().clone();
            let pause = tokio::select! {
                pause = run.pass(&state) => pause,
                _ = &mut shutdown => return Ok(()),
            };
            if let Some(version) = run.switched.take() {
                return Err(Error::AgentSwitched { version });
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = &mut shutdown => return Ok(()),
            }
        }
    }
}

impl Run {
    fn publish(&mut self, persist: bool) {
        let report: Report = self
            .statuses
            .iter()
            .map(|(name, s)| (name.clone(), s.to_proto()))
            .collect();
        self.report.send_replace(report);
        if persist {
            let bytes = serde_json::to_vec_pretty(&self.statuses).expect("plain data serializes");
            if let Err(error) =
                files::write_private(&self.lifecycle.data_dir.join(STATUS_FILE), &bytes)
            {
                tracing::error!(%error, "Cannot save bundle statuses.");
            }
        }
    }

    fn set(&mut self, desired: &Desired, phase: Phase, error: String) {
        // Reports carry real time (the control plane orders them by it),
        // whatever clock windows are judged by.
        let now = Utc::now().timestamp_millis();
        let active = match desired.kind {
            Kind::Agent => self.agent.confirmed(),
            Kind::Software | Kind::Catalog => self.slots.confirmed(&desired.name).ok().flatten(),
        };
        let status = self
            .statuses
            .entry(desired.name.clone())
            .or_insert_with(|| Status::new(&desired.name, desired.kind, phase, now));
        let changed = status.phase != phase
            || status.error != error
            || status.target_version.as_ref() != Some(&desired.version)
            || status.active_version != active;
        if status.target_version.as_ref() != Some(&desired.version) {
            status.bytes_done = 0;
            status.bytes_total = 0;
            status.given_up = false;
            status.interrupted = 0;
            status.bytes_from_origin = 0;
            status.bytes_from_peers = 0;
            status.bytes_saved_by_delta = 0;
            status.delta_error = String::new();
        }
        status.kind = desired.kind;
        status.active_version = active;
        status.target_version = Some(desired.version.clone());
        status.phase = phase;
        status.error = error;
        if changed {
            status.updated_at_ms = now;
            self.publish(true);
        }
    }

    fn give_up(&mut self, name: &str) {
        if let Some(status) = self.statuses.get_mut(name) {
            status.given_up = true;
        }
        self.publish(true);
    }

    /// One look at every desired bundle; returns how long to wait before
    /// the next look (unless the desired state changes first).
    async fn pass(&mut self, state: &DesiredState) -> Duration {
        if Instant::now() >= self.next_refresh {
            self.refresh().await;
        }
        let mut pause = self.lifecycle.check_interval;
        for desired in &state.bundles {
            self.advance(state, desired).await;
            if self.switched.is_some() {
                return Duration::ZERO;
            }
        }
        let now = self.lifecycle.clock.now();
        if let Some(window) = &state.window
            && let Some(opens) = window.next_open(now)
            && let Ok(until) = (opens - now).to_std()
            && until > Duration::ZERO
        {
            pause = pause.min(until);
        }
        pause
    }

    /// Takes one bundle as far as it may go now: download, then install
    /// if the window allows.
    async fn advance(&mut self, state: &DesiredState, desired: &Desired) {
        loop {
            let now = self.lifecycle.clock.now();
            let (active, kept) = match desired.kind {
                // The new agent on trial confirms itself (`agent.rs`).
                Kind::Agent if self.agent.on_trial().as_ref() == Some(&desired.version) => {
                    return self.set(desired, Phase::Installing, String::new());
                }
                Kind::Agent => (
                    self.agent.confirmed(),
                    self.agent.has_version(&desired.version),
                ),
                Kind::Software | Kind::Catalog => match self.slots.active(&desired.name) {
                    Ok(active) => (active, self.slots.has_slot(&desired.name, &desired.version)),
                    Err(error) => {
                        self.set(desired, Phase::Failed, error.to_string());
                        return;
                    }
                },
            };
            let window_open = state.window_open(now);
            // What can be decided without the signed target (offline).
            match decide(
                desired,
                active.as_ref(),
                self.statuses.get(&desired.name),
                kept,
                false,
                window_open,
            ) {
                Step::Done => {
                    let phase = self.statuses.get(&desired.name).map(|s| s.phase);
                    if phase != Some(Phase::Installed) {
                        self.set(desired, Phase::Installed, String::new());
                    }
                    return;
                }
                Step::GivenUp => return,
                Step::RefuseDowngrade { active } => {
                    return self.fail(
                        desired,
                        Failure::permanent(format!(
                            "refusing to downgrade {} from {active} to {} (only a rollback to a version this till kept may go lower)",
                            desired.name, desired.version
                        )),
                    );
                }
                _ => {}
            }
            let target = match self.target(desired).await {
                Ok(target) => target,
                Err(failure) => return self.fail(desired, failure),
            };
            let staged = self.staged_path(&target);
            let step = decide(
                desired,
                active.as_ref(),
                self.statuses.get(&desired.name),
                kept,
                staged.is_file(),
                window_open,
            );
            tracing::debug!(bundle = %desired.name, version = %desired.version, ?step, "Bundle step.");
            let result = match step {
                // Handled above, before the target was needed.
                Step::Done | Step::GivenUp | Step::RefuseDowngrade { .. } => return,
                Step::WaitToDownload => return self.wait(desired, Phase::Pending, state, now),
                Step::WaitToInstall => return self.wait(desired, Phase::Downloaded, state, now),
                Step::Download => self.download(desired, &target, &staged).await,
                Step::Install => {
                    let result = self.install(desired, &target, &staged).await;
                    if result.is_ok() {
                        return;
                    }
                    result
                }
            };
            if let Err(failure) = result {
                return self.fail(desired, failure);
            }
        }
    }

    /// Waiting for the window is a phase, not an error: `pending` (may not
    /// download yet) or `downloaded` (may not install yet).
    fn wait(&mut self, desired: &Desired, phase: Phase, state: &DesiredState, now: DateTime<Utc>) {
        let current = self.statuses.get(&desired.name);
        let already = current.is_some_and(|s| {
            s.phase == phase && s.target_version.as_ref() == Some(&desired.version)
        });
        if !already {
            let what = if phase == Phase::Pending {
                "download"
            } else {
                "install"
            };
            tracing::info!(bundle = %desired.name, version = %desired.version, "{}", waiting_message(state, now, what));
        }
        self.set(desired, phase, String::new());
    }

    fn fail(&mut self, desired: &Desired, failure: Failure) {
        if failure.waiting {
            let current = self.statuses.get(&desired.name);
            if current.is_none_or(|s| s.error != failure.message || s.phase != Phase::Pending) {
                tracing::warn!(bundle = %desired.name, version = %desired.version, reason = %failure.message, "Bundle update waiting.");
            }
            self.set(desired, Phase::Pending, failure.message);
            return;
        }
        tracing::warn!(bundle = %desired.name, version = %desired.version, error = %failure.message, "Bundle update failed.");
        self.set(desired, Phase::Failed, failure.message);
        if failure.permanent {
            self.give_up(&desired.name);
        }
    }

    async fn refresh(&mut self) {
        match self.lifecycle.repository.refresh().await {
            Ok(()) => {
                self.next_refresh = Instant::now() + self.lifecycle.refresh_interval;
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot refresh the bundle repository; keeping what was trusted.");
                self.next_refresh = Instant::now()
                    + self
                        .lifecycle
                        .refresh_interval
                        .min(self.lifecycle.check_interval);
            }
        }
    }

    /// The signed target for `desired`; refreshes the metadata once if the
    /// target is not known yet (just published).
    async fn target(&mut self, desired: &Desired) -> Result<VerifiedTarget, Failure> {
        let name = format!("{}/{}", desired.name, desired.version);
        let model = self.lifecycle.hardware_model.clone();
        let mut found = self.lifecycle.repository.target(&name, &model);
        if found.is_err() {
            self.refresh().await;
            found = self.lifecycle.repository.target(&name, &model);
        }
        let target = found.map_err(|error| match error {
            // Signed for other hardware: no retry will change that.
            RepoError::Refused(posfleet_bundle::Error::WrongHardware { .. }) => {
                Failure::permanent(error)
            }
            // The refresh above failed too: what is installed keeps
            // running, and nothing starts on stale trust (freeze attack).
            RepoError::Refused(ref expired @ posfleet_bundle::Error::ExpiredMetadata { .. }) => {
                Failure::waiting(format!("{EXPIRED_TRUST} ({expired})"))
            }
            error => Failure::retry(error),
        })?;
        if target.kind() != desired.kind {
            return Err(Failure::permanent(format!(
                "{name} is signed as a {:?} bundle, not {:?}",
                target.kind(),
                desired.kind
            )));
        }
        if Version::parse(target.version()).ok().as_ref() != Some(&desired.version) {
            return Err(Failure::permanent(format!(
                "{name} is signed with version {}",
                target.version()
            )));
        }
        Ok(target)
    }

    fn staged_path(&self, target: &VerifiedTarget) -> PathBuf {
        self.lifecycle
            .data_dir
            .join(DOWNLOADS_DIR)
            .join(format!("{}.bundle", target.sha256_hex()))
    }

    /// Refuses to start when `need` bytes would leave less than the
    /// configured reserve free.
    fn check_space(&self, desired: &Desired, need: u64) -> Result<(), Failure> {
        let free = free_bytes(&self.lifecycle.data_dir).unwrap_or(u64::MAX);
        let want = need.saturating_add(self.lifecycle.min_free_disk_bytes);
        if free < want {
            return Err(Failure::retry(format!(
                "not enough disk space for {} {}: needs {} MiB, {} MiB free",
                desired.name,
                desired.version,
                want.div_ceil(1 << 20),
                free >> 20
            )));
        }
        Ok(())
    }

    /// Fetches the target into `<sha256>.part`, resuming, then checks the
    /// whole file against its signed hash and renames it to `staged`.
    /// Before a whole download starts, a delta from the version this till
    /// has is tried ([`Run::download_delta`]); if it cannot be used, the
    /// reason is reported and the whole bundle is fetched.
    async fn download(
        &mut self,
        desired: &Desired,
        target: &VerifiedTarget,
        staged: &Path,
    ) -> Result<(), Failure> {
        let part = staged.with_extension("part");
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        // Room for the rest of the download and for unpacking it.
        let length = target.length();
        self.check_space(desired, length.saturating_sub(have) + length)?;
        self.set(desired, Phase::Downloading, String::new());
        if have == 0 {
            match self.download_delta(desired, target, staged).await {
                Ok(true) => {
                    self.set(desired, Phase::Downloaded, String::new());
                    return Ok(());
                }
                Ok(false) => {}
                Err(DeltaFailure::Stop(failure)) => return Err(failure),
                Err(DeltaFailure::Fallback(reason)) => {
                    tracing::warn!(bundle = %desired.name, version = %desired.version, %reason, "Cannot use the delta; fetching the whole bundle.");
                    if let Some(status) = self.statuses.get_mut(&desired.name) {
                        status.delta_error = reason;
                    }
                    self.publish(true);
                }
            }
        }
        let received = self
            .fetch(desired, target, &part)
            .await
            .map_err(|e| download_failure(target.name(), e))?;
        if let Some(status) = self.statuses.get_mut(&desired.name) {
            status.bytes_from_origin += received.from_origin;
            status.bytes_from_peers += received.from_peers;
        }
        // Every byte is verified already: each piece was checked against the
        // signed chunk list before it was written, or when a resumed file was
        // opened (the `Fetcher` contract). Only the length is checked here;
        // the whole file is hashed again against its signed SHA-256 before it
        // is installed.
        check_length(target, &part)?;
        std::fs::rename(&part, staged)
            .map_err(|e| Failure::retry(format!("cannot stage {}: {e}", staged.display())))?;
        tracing::info!(
            bundle = %desired.name,
            version = %desired.version,
            bytes = length,
            from_origin = received.from_origin,
            from_peers = received.from_peers,
            "Bundle downloaded and verified."
        );
        self.set(desired, Phase::Downloaded, String::new());
        Ok(())
    }

    /// Brings `dest` to the whole `target` (from the store's peers or the
    /// origin, resuming what is there), publishing the progress as
    /// `bytes_done` of `bytes_total`.
    async fn fetch(
        &mut self,
        desired: &Desired,
        target: &VerifiedTarget,
        dest: &Path,
    ) -> Result<Received, RepoError> {
        let have = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        if let Some(status) = self.statuses.get_mut(&desired.name) {
            status.bytes_total = target.length();
            status.bytes_done = have.min(target.length());
        }
        self.publish(false);
        let fetcher = self.lifecycle.fetcher.clone();
        let list = fetcher.chunk_list(target).await?;
        let done = Arc::new(AtomicU64::new(0));
        let progress = {
            let done = done.clone();
            move |n: u64| done.store(n, Ordering::Relaxed)
        };
        let fetch = fetcher.fetch(Download {
            target,
            list: &list,
            dest,
            progress: &progress,
        });
        tokio::pin!(fetch);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            tokio::select! {
                result = &mut fetch => break result,
                _ = tick.tick() => {
                    if let Some(status) = self.statuses.get_mut(&desired.name) {
                        status.bytes_done = done.load(Ordering::Relaxed);
                    }
                    self.publish(false);
                }
            }
        };
        if let Some(status) = self.statuses.get_mut(&desired.name) {
            status.bytes_done = done.load(Ordering::Relaxed);
        }
        result
    }

    /// Rebuilds `target` into `staged` from a delta, when the repository
    /// signed one from the exact bundle this till has confirmed: that
    /// bundle is packed again from its slot (a bundle packed from what it
    /// unpacked to is the same bytes) and must match its signed hash, the
    /// delta is fetched like any target (from the store's peers when they
    /// have it), and the rebuilt bundle must match the target's signed
    /// hash. `Ok(false)` when there is no delta to try (none published, no
    /// base, already failed for this version, no room for it).
    async fn download_delta(
        &mut self,
        desired: &Desired,
        target: &VerifiedTarget,
        staged: &Path,
    ) -> Result<bool, DeltaFailure> {
        let failed_before = self
            .statuses
            .get(&desired.name)
            .is_some_and(|s| !s.delta_error.is_empty());
        if failed_before {
            return Ok(false);
        }
        let Some((base, base_dir, delta)) = self.offered_delta(desired, target) else {
            return Ok(false);
        };
        let file = delta.file().clone();
        // The base bundle, its tar, the delta and the rebuilt bundle side
        // by side, and room to unpack the result.
        let need = base.length() + 2 * target.length() + file.length() + target.length();
        if self.check_space(desired, need).is_err() {
            return Ok(false);
        }
        let downloads = self.lifecycle.data_dir.join(DOWNLOADS_DIR);
        let base_file = downloads.join(format!("{}.base", base.sha256_hex()));
        let scratch = downloads.join(format!("{}.tar", target.sha256_hex()));
        let rebuilt = downloads.join(format!("{}.rebuilt", target.sha256_hex()));
        let delta_part = downloads.join(format!("{}.part", file.sha256_hex()));
        let started = Instant::now();
        let packed = {
            let (base, base_dir, base_file) = (base.clone(), base_dir, base_file.clone());
            blocking(move || {
                posfleet_bundle::archive::build(&base_dir, &base_file)
                    .map_err(|e| e.to_string())?;
                base.verify_file(&base_file).map_err(|e| e.to_string())
            })
            .await
        };
        if let Err(error) = packed {
            let _ = std::fs::remove_file(&base_file);
            return Err(DeltaFailure::Fallback(format!(
                "{} as installed does not pack into its signed bundle, so the delta {} cannot apply ({error})",
                base.name(),
                file.name()
            )));
        }
        let received = match self.fetch(desired, &file, &delta_part).await {
            Ok(received) => received,
            Err(error) => {
                let _ = std::fs::remove_file(&base_file);
                let failure = download_failure(file.name(), error);
                if failure.waiting {
                    // Resumed from where it stopped next time.
                    return Err(DeltaFailure::Stop(failure));
                }
                let _ = std::fs::remove_file(&delta_part);
                return Err(DeltaFailure::Fallback(failure.message));
            }
        };
        if let Some(status) = self.statuses.get_mut(&desired.name) {
            status.bytes_from_origin += received.from_origin;
            status.bytes_from_peers += received.from_peers;
        }
        let applied = {
            let (target, base_file, delta_part) =
                (target.clone(), base_file.clone(), delta_part.clone());
            let (scratch, rebuilt) = (scratch.clone(), rebuilt.clone());
            blocking(move || {
                check_length(&file, &delta_part).map_err(|f| f.message)?;
                posfleet_bundle::delta::rebuild_bundle(&base_file, &delta_part, &scratch, &rebuilt)
                    .map_err(|e| e.to_string())?;
                target.verify_file(&rebuilt).map_err(|e| e.to_string())
            })
            .await
        };
        for path in [&base_file, &scratch, &delta_part] {
            let _ = std::fs::remove_file(path);
        }
        if let Err(error) = applied {
            let _ = std::fs::remove_file(&rebuilt);
            return Err(DeltaFailure::Fallback(format!(
                "the delta {} does not rebuild {} ({error})",
                delta.file().name(),
                target.name()
            )));
        }
        std::fs::rename(&rebuilt, staged).map_err(|e| {
            DeltaFailure::Stop(Failure::retry(format!(
                "cannot stage {}: {e}",
                staged.display()
            )))
        })?;
        let saved = target.length().saturating_sub(delta.file().length());
        if let Some(status) = self.statuses.get_mut(&desired.name) {
            status.bytes_saved_by_delta = saved;
            status.bytes_done = status.bytes_total;
        }
        tracing::info!(
            bundle = %desired.name,
            version = %desired.version,
            base = %delta.base(),
            delta_bytes = delta.file().length(),
            saved_bytes = saved,
            from_origin = received.from_origin,
            from_peers = received.from_peers,
            seconds = started.elapsed().as_secs_f64(),
            "Bundle rebuilt from a delta and verified."
        );
        Ok(true)
    }

    /// The delta the repository offers from the version of `desired` this
    /// till has confirmed to `target`: that version's signed target, its
    /// slot and the delta.
    fn offered_delta(
        &self,
        desired: &Desired,
        target: &VerifiedTarget,
    ) -> Option<(VerifiedTarget, PathBuf, VerifiedDelta)> {
        let active = self.slots.confirmed(&desired.name).ok().flatten()?;
        if active >= desired.version {
            return None;
        }
        let base_dir = self.slots.slot_dir(&desired.name, &active)?;
        let (repository, model) = (&self.lifecycle.repository, &self.lifecycle.hardware_model);
        let base = repository
            .target(&format!("{}/{active}", desired.name), model)
            .ok()?;
        let delta = repository.delta(target, base.sha256(), model).ok()??;
        Some((base, base_dir, delta))
    }

    /// Installs the staged target, after checking it again: bytes on disk
    /// are not trusted either.
    async fn install(
        &mut self,
        desired: &Desired,
        target: &VerifiedTarget,
        staged: &Path,
    ) -> Result<(), Failure> {
        if let Err(failure) = verify_whole(target, staged).await {
            let _ = std::fs::remove_file(staged);
            return Err(failure);
        }
        self.check_space(desired, target.length())?;
        self.set(desired, Phase::Installing, String::new());
        tracing::info!(bundle = %desired.name, version = %desired.version, "Installing.");
        if desired.kind == Kind::Agent {
            return self.install_agent(desired, staged).await;
        }
        let outcome = self
            .slots
            .install(&desired.name, &desired.version, desired.kind, staged)
            .await
            .map_err(Failure::retry)?;
        match outcome {
            Outcome::Installed => {
                let _ = std::fs::remove_file(staged);
                tracing::info!(bundle = %desired.name, version = %desired.version, "Bundle installed.");
                self.set(desired, Phase::Installed, String::new());
                Ok(())
            }
            Outcome::Failed { reason } => Err(Failure::permanent(reason)),
            Outcome::NoSpace { reason } => Err(Failure::retry(reason)),
            Outcome::RolledBack { reason } => {
                let _ = std::fs::remove_file(staged);
                tracing::warn!(bundle = %desired.name, version = %desired.version, %reason, "Bundle rolled back.");
                self.set(desired, Phase::RolledBack, reason);
                self.give_up(&desired.name);
                Ok(())
            }
        }
    }
}

impl Run {
    /// Installs a new agent beside the one running and switches to it; the
    /// task then ends, the agent exits and its launcher starts the new one
    /// on trial. The phase stays `installing` until the new agent confirms
    /// itself and reports `installed`, or the launcher reverts it and the
    /// agent before it reports `rolled_back`.
    async fn install_agent(&mut self, desired: &Desired, staged: &Path) -> Result<(), Failure> {
        let self_update = &self.lifecycle.self_update;
        let Some(launched) = &self_update.launched else {
            return Err(Failure::permanent(
                "this agent was not started by posfleet-agent-launcher, so nothing would start a new version; run it under the launcher to update it",
            ));
        };
        let outcome = self
            .agent
            .install(
                launched.version.as_ref(),
                &desired.version,
                staged,
                self_update.confirm,
            )
            .await
            .map_err(Failure::retry)?;
        match outcome {
            selfupdate::Outcome::Switched => {
                let _ = std::fs::remove_file(staged);
                tracing::info!(bundle = %desired.name, version = %desired.version, confirm_seconds = self_update.confirm.as_secs(), "New agent switched on; restarting into it.");
                self.switched = Some(desired.version.clone());
                Ok(())
            }
            selfupdate::Outcome::Failed { reason } => Err(Failure::permanent(reason)),
        }
    }
}

/// The agent that runs after its launcher reverted a new version reports
/// that version rolled back, with the launcher's reason, and never tries it
/// again.
fn note_agent_revert(agent: &AgentRoot, statuses: &mut BTreeMap<String, Status>) {
    let Some((version, reason)) = agent.reverted() else {
        return;
    };
    let name = AGENT_BUNDLE_NAME;
    let now = Utc::now().timestamp_millis();
    let status = statuses
        .entry(name.to_string())
        .or_insert_with(|| Status::new(name, Kind::Agent, Phase::RolledBack, now));
    if status.target_version.as_ref() == Some(&version)
        && status.phase == Phase::RolledBack
        && status.given_up
    {
        return;
    }
    tracing::warn!(bundle = %name, version = %version, %reason, "The launcher reverted a new agent version.");
    status.target_version = Some(version);
    status.phase = Phase::RolledBack;
    status.error = format!("{reason}; reverted by the launcher, not retried");
    status.given_up = true;
    status.updated_at_ms = now;
}

/// The file at `path` has the signed target's length.
fn check_length(target: &VerifiedTarget, path: &Path) -> Result<(), Failure> {
    let length = std::fs::metadata(path)
        .map_err(|e| Failure::retry(format!("cannot read {}: {e}", path.display())))?
        .len();
    if length != target.length() {
        let _ = std::fs::remove_file(path);
        return Err(Failure::retry(format!(
            "{} on disk is {length} bytes, signed as {}; discarded",
            target.name(),
            target.length()
        )));
    }
    Ok(())
}

/// Checks the whole file at `path` against the signed target
/// (`posfleet-bundle` hashes it); a file that is not the bundle is removed.
async fn verify_whole(target: &VerifiedTarget, path: &Path) -> Result<(), Failure> {
    let path = path.to_path_buf();
    let target = target.clone();
    tokio::task::spawn_blocking(move || match target.verify_file(&path) {
        Ok(()) => Ok(()),
        Err(error) if error.is_bad_digest() => {
            let _ = std::fs::remove_file(&path);
            Err(Failure::retry(format!(
                "{} on disk does not match its signed length and SHA-256; discarded",
                target.name()
            )))
        }
        Err(error) => Err(Failure::retry(error)),
    })
    .await
    .unwrap_or_else(|e| Err(Failure::retry(format!("verification stopped: {e}"))))
}

fn waiting_message(state: &DesiredState, now: DateTime<Utc>, what: &str) -> String {
    match state
        .window
        .as_ref()
        .and_then(|w| w.next_open(now).map(|t| (w, t)))
    {
        Some((w, opens)) => format!(
            "Waiting for the maintenance window to {what} (opens {} {}, in {}).",
            crate::window::clock(w.start_minute),
            w.time_zone,
            humanize(opens - now)
        ),
        None => format!("Waiting for the maintenance window to {what}."),
    }
}

fn humanize(d: chrono::TimeDelta) -> String {
    let minutes = d.num_minutes().max(0);
    if minutes >= 60 {
        format!("{}h{:02}m", minutes / 60, minutes % 60)
    } else {
        format!("{minutes}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_cut_short_leaves_nothing_behind_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["aa.base", "bb.tar", "bb.rebuilt", "bb.bundle", "cc.part"];
        for name in names {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_delta_scratch(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // Staged bundles and resumable downloads are kept.
        assert_eq!(left, ["bb.bundle", "cc.part"]);
    }

    #[test]
    fn an_unreachable_origin_makes_a_download_wait_and_anything_else_fail_it() {
        let url = || "https://cp.example:7401/repo/chunks/ab".to_string();
        for (error, waiting) in [
            (
                RepoError::Unreachable {
                    url: url(),
                    message: "connection reset".into(),
                },
                true,
            ),
            (
                RepoError::Timeout {
                    url: url(),
                    seconds: 30,
                },
                true,
            ),
            (
                RepoError::Fetch {
                    url: url(),
                    message: "HTTP 404".into(),
                },
                false,
            ),
            (
                RepoError::Refused(posfleet_bundle::Error::ChunkListMismatch),
                false,
            ),
        ] {
            let text = error.to_string();
            let failure = download_failure("pos-app/1.1.0", error);
            assert_eq!(failure.waiting, waiting, "{text}");
            assert!(!failure.permanent, "{text}");
            assert!(failure.message.contains(&text), "{}", failure.message);
        }
    }
}
