//! The A/B slot model: each bundle keeps its active version and the one
//! before it, whole, in `slots/<name>/<version>/`; an install unpacks the
//! new one beside them, runs its hooks, journals, switches `current` and
//! checks health, and a rollback switches back. Whatever a crash cuts
//! short is settled by [`Slots::recover`] with the recovery's decision.

use posfleet_bundle::archive::UnpackLimits;
use posfleet_bundle::manifest::{Kind, Manifest};
use semver::Version;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::disk::{
    CURRENT_LINK, SLOTS_DIR, STAGING_PREFIX, is_disk_full, load_journal, read_current, remove_any,
    remove_link, remove_slot, scan, switch_link, sync_dir, unpack_into, write_error, write_journal,
};
use super::recovery::{Journal, Link, LinkChange, Plan, Recovery, decide};
use crate::error::Error;
use crate::hooks;

/// Stops an install right after `point` when a crash test asked for it
/// ([`Slots::with_crash_after`]). Without the `test-hooks` feature it is
/// nothing at all.
macro_rules! crash_point {
    ($slots:expr, $name:expr, $point:ident) => {
        #[cfg(feature = "test-hooks")]
        $slots.stop_if_asked($name, CrashPoint::$point)?;
    };
}

/// How an install ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The version is active and was confirmed healthy.
    Installed,
    /// Nothing was switched: the archive was refused or `pre_activate`
    /// failed. Trying the same version again will not help.
    Failed { reason: String },
    /// Nothing was switched: the disk filled up. Worth retrying once
    /// space is freed.
    NoSpace { reason: String },
    /// The version was activated, found unhealthy and switched back.
    RolledBack { reason: String },
}

/// Points in an install after which a test can stop it, leaving on disk
/// exactly what a crash there would (every step before is synced).
#[cfg(feature = "test-hooks")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The archive is unpacked in the staging dir.
    Unpacked,
    /// The staging dir was renamed to the slot.
    SlotInPlace,
    /// `pre_activate` succeeded.
    PreActivated,
    /// The journal says `activating`.
    Journaled,
    /// `current` names the new version.
    Switched,
    /// The health check passed.
    Healthy,
    /// The journal says the new version is confirmed (GC not done).
    Confirmed,
    /// The health check failed and the journal says `rolling_back`.
    RollbackJournaled,
    /// `current` is back on the previous version.
    SwitchedBack,
    /// The unhealthy slot is removed.
    BadSlotRemoved,
}

/// The bundle slots of one data dir.
#[derive(Debug)]
pub struct Slots {
    root: PathBuf,
    limits: UnpackLimits,
    retry_pause: Duration,
    /// Who hooks run as; `None`: the agent's user.
    hook_user: Option<hooks::HookUser>,
    /// Crash tests: where installs stop.
    #[cfg(feature = "test-hooks")]
    crash_after: Option<CrashPoint>,
    /// One install at a time.
    lock: tokio::sync::Mutex<()>,
}

/// A bundle name as the manifest allows it, so it is safe as a file name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn check_manifest(
    manifest: &Manifest,
    name: &str,
    version: &Version,
    kind: Kind,
) -> Result<(), String> {
    if manifest.name == name && manifest.version == *version && manifest.kind == kind {
        return Ok(());
    }
    Err(format!(
        "the archive holds {} {} ({}), not {name} {version} ({})",
        manifest.name,
        manifest.version,
        manifest.kind.as_str(),
        kind.as_str()
    ))
}

fn hook_env(
    name: &str,
    version: &Version,
    previous: Option<&Version>,
    slot: &Path,
) -> Vec<(&'static str, String)> {
    vec![
        ("POSFLEET_BUNDLE_NAME", name.to_string()),
        ("POSFLEET_BUNDLE_VERSION", version.to_string()),
        (
            "POSFLEET_PREVIOUS_VERSION",
            previous.map(Version::to_string).unwrap_or_default(),
        ),
        ("POSFLEET_SLOT_DIR", slot.display().to_string()),
    ]
}

impl Slots {
    /// The slots of `data_dir` (made if missing).
    pub fn open(data_dir: &Path) -> Result<Slots, Error> {
        let root = data_dir.join(SLOTS_DIR);
        let data_dir_error = |source| Error::DataDir {
            path: root.clone(),
            source,
        };
        // Hooks get absolute slot paths.
        let root = std::path::absolute(&root).map_err(data_dir_error)?;
        std::fs::create_dir_all(&root).map_err(data_dir_error)?;
        Ok(Slots {
            root,
            limits: UnpackLimits::default(),
            retry_pause: hooks::RETRY_PAUSE,
            hook_user: None,
            #[cfg(feature = "test-hooks")]
            crash_after: None,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Limits on what one archive may unpack to.
    pub fn with_unpack_limits(mut self, limits: UnpackLimits) -> Slots {
        self.limits = limits;
        self
    }

    /// The pause between attempts of a health check (by default
    /// `hooks::RETRY_PAUSE`, 1 s).
    pub fn with_retry_pause(mut self, pause: Duration) -> Slots {
        self.retry_pause = pause;
        self
    }

    /// Hooks run as `user`. Its processes must reach the slots, so the
    /// data dir becomes traversable by every user (not listable: its
    /// secrets are 0600 files) and `slots/` readable.
    pub fn with_hook_user(mut self, user: hooks::HookUser) -> Result<Slots, Error> {
        use std::os::unix::fs::PermissionsExt;
        let open_up = |path: &Path, bits: u32| {
            let mode = std::fs::metadata(path)?.permissions().mode();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | bits))
        };
        if let Some(data_dir) = self.root.parent() {
            open_up(data_dir, 0o111).map_err(write_error(data_dir))?;
        }
        open_up(&self.root, 0o555).map_err(write_error(&self.root))?;
        self.hook_user = Some(user);
        Ok(self)
    }

    /// Crash tests: every install stops right after `point`, with an error
    /// and without cleaning up, as if the agent had been killed there.
    #[cfg(feature = "test-hooks")]
    pub fn with_crash_after(mut self, point: CrashPoint) -> Slots {
        self.crash_after = Some(point);
        self
    }

    #[cfg(feature = "test-hooks")]
    fn stop_if_asked(&self, name: &str, point: CrashPoint) -> Result<(), Error> {
        if self.crash_after == Some(point) {
            return Err(Error::Install {
                name: name.to_string(),
                detail: format!("stopped after {point:?} (crash test)"),
            });
        }
        Ok(())
    }

    /// Bundles with a directory under `slots/`.
    fn names(&self) -> Result<Vec<String>, Error> {
        let read_error = |source| Error::Read {
            path: self.root.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            if let Some(name) = entry.file_name().to_str()
                && valid_name(name)
                && entry.file_type().map_err(read_error)?.is_dir()
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Active version per bundle name, read from the `current` links.
    pub fn active_versions(&self) -> Result<BTreeMap<String, Version>, Error> {
        let mut active = BTreeMap::new();
        for name in self.names()? {
            if let Some(version) = self.active(&name)? {
                active.insert(name, version);
            }
        }
        Ok(active)
    }

    /// The version of `name` confirmed healthy: the active one, except
    /// while a new version is being checked or rolled back, when it is the
    /// one before. This is what the till reports, so that a version whose
    /// health check is still running is never taken for installed.
    pub fn confirmed(&self, name: &str) -> Result<Option<Version>, Error> {
        if !valid_name(name) {
            return Ok(None);
        }
        match load_journal(&self.root.join(name))? {
            Journal::Activating { previous, .. } | Journal::RollingBack { previous, .. } => {
                Ok(previous)
            }
            Journal::Stable { .. } => self.active(name),
        }
    }

    /// The confirmed version of every bundle (see [`Slots::confirmed`]).
    pub fn confirmed_versions(&self) -> Result<BTreeMap<String, Version>, Error> {
        let mut confirmed = BTreeMap::new();
        for name in self.names()? {
            if let Some(version) = self.confirmed(&name)? {
                confirmed.insert(name, version);
            }
        }
        Ok(confirmed)
    }

    /// Whether this till keeps a slot of `name` `version` (active or not).
    pub fn has_slot(&self, name: &str, version: &Version) -> bool {
        valid_name(name) && self.root.join(name).join(version.to_string()).is_dir()
    }

    /// The folder of `name` `version`, if this till keeps that slot: the
    /// bundle as it was unpacked (what a delta's base is rebuilt from).
    pub fn slot_dir(&self, name: &str, version: &Version) -> Option<PathBuf> {
        self.has_slot(name, version)
            .then(|| self.root.join(name).join(version.to_string()))
    }

    /// The active version of `name`, if any. A broken `current` link is an
    /// error until [`Slots::recover`] repairs it.
    pub fn active(&self, name: &str) -> Result<Option<Version>, Error> {
        if !valid_name(name) {
            return Ok(None);
        }
        let dir = self.root.join(name);
        let corrupt = |detail: String| Error::Corrupt {
            path: dir.join(CURRENT_LINK),
            detail,
        };
        match read_current(&dir)? {
            Link::Missing => Ok(None),
            Link::To(version) if dir.join(version.to_string()).is_dir() => Ok(Some(version)),
            Link::To(version) => Err(corrupt(format!("names {version}, which has no slot"))),
            Link::Broken(what) => Err(corrupt(what)),
        }
    }

    /// Called once at start, before anything else: finishes or undoes
    /// whatever a crash interrupted, so exactly one whole, confirmed version
    /// is active per bundle (or none, if none was ever confirmed), and
    /// removes what unpacks and removals left half done. Returns what it
    /// did, per bundle where something was interrupted.
    pub fn recover(&self) -> Result<Vec<Recovery>, Error> {
        let Ok(_guard) = self.lock.try_lock() else {
            return Err(Error::Install {
                name: String::new(),
                detail: "cannot recover while an install runs".into(),
            });
        };
        let mut recoveries = Vec::new();
        for name in self.names()? {
            recoveries.extend(self.recover_bundle(&name)?);
        }
        Ok(recoveries)
    }

    fn recover_bundle(&self, name: &str) -> Result<Option<Recovery>, Error> {
        let dir = self.root.join(name);
        let (disk, leftovers) = scan(&dir)?;
        for path in &leftovers {
            tracing::info!(path = %path.display(), "Removing what an interrupted install left.");
            remove_any(path)?;
        }
        if !leftovers.is_empty() {
            sync_dir(&dir)?;
        }
        let journal = load_journal(&dir)?;
        let plan = decide(name, &journal, &disk);
        self.apply(name, &dir, &journal, &plan, false)?;
        if let Some(recovery) = &plan.recovery {
            tracing::warn!(
                bundle = %name,
                action = ?recovery.action,
                active = ?recovery.active.as_ref().map(Version::to_string),
                reason = %recovery.reason,
                "Recovered an interrupted install."
            );
        }
        Ok(plan.recovery)
    }

    /// Carries out `plan`; `rolling_back` marks the way back from an
    /// unhealthy install, which crash tests may stop (`name` is for them).
    #[cfg_attr(not(feature = "test-hooks"), allow(unused_variables))]
    fn apply(
        &self,
        name: &str,
        dir: &Path,
        journal: &Journal,
        plan: &Plan,
        rolling_back: bool,
    ) -> Result<(), Error> {
        if let Some(first) = &plan.journal_first {
            write_journal(dir, first)?;
        }
        match &plan.link {
            LinkChange::Keep => {}
            LinkChange::Point(version) => switch_link(dir, version)?,
            LinkChange::Remove => remove_link(dir)?,
        }
        if rolling_back {
            crash_point!(self, name, SwitchedBack);
        }
        for version in &plan.remove {
            remove_slot(dir, version)?;
        }
        if rolling_back {
            crash_point!(self, name, BadSlotRemoved);
        }
        if plan.journal_first.as_ref().unwrap_or(journal) != &plan.journal {
            write_journal(dir, &plan.journal)?;
        }
        Ok(())
    }

    /// Installs `archive` (already verified by the caller) as `name`
    /// `version`: unpack into a staging dir renamed to
    /// `slots/<name>/<version>/`; check that its manifest names exactly
    /// `name`, `version` and `kind`; run `pre_activate`; journal; switch
    /// `current`; run the health check with its retries. Healthy: confirm
    /// in the journal, remove old slots (keeping the active one and the one
    /// before it), `Installed`. Unhealthy: switch back to the previous
    /// version (or remove `current` if there was none), remove the new
    /// slot, `RolledBack`. Refusals, a full disk and a failing
    /// `pre_activate` switch nothing: `Failed`.
    ///
    /// Installing the active version does nothing. An error is a local
    /// failure (the data dir cannot be written); whatever it interrupted is
    /// recovered by the next `install` or `recover`.
    pub async fn install(
        &self,
        name: &str,
        version: &Version,
        kind: Kind,
        archive: &Path,
    ) -> Result<Outcome, Error> {
        let _guard = self.lock.lock().await;
        if !valid_name(name) {
            return Err(Error::Install {
                name: name.to_string(),
                detail: "not a valid bundle name".into(),
            });
        }
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(write_error(&dir))?;
        // Settle whatever an earlier install of this run left.
        self.recover_bundle(name)?;
        let previous = self.active(name)?;
        if previous.as_ref() == Some(version) {
            tracing::info!(bundle = %name, version = %version, "Already active.");
            return Ok(Outcome::Installed);
        }
        let failed = |reason: String| -> Result<Outcome, Error> {
            tracing::warn!(bundle = %name, version = %version, %reason, "Install failed.");
            Ok(Outcome::Failed { reason })
        };
        let no_space = |reason: String| -> Result<Outcome, Error> {
            tracing::warn!(bundle = %name, version = %version, %reason, "Install stopped: the disk is full.");
            Ok(Outcome::NoSpace { reason })
        };
        // Local errors are an outcome, not an agent failure, when the disk
        // is full.
        let stop = |error: Error| {
            if is_disk_full(&error) {
                no_space(format!("the disk is full: {error}"))
            } else {
                Err(error)
            }
        };

        // Unpack into a staging dir.
        let staging = dir.join(format!("{STAGING_PREFIX}{version}"));
        let manifest = match unpack_into(name, version, archive, &staging, self.limits).await {
            Ok(manifest) => manifest,
            Err((reason, disk_full)) => {
                remove_any(&staging)?;
                return if disk_full {
                    no_space(reason)
                } else {
                    failed(reason)
                };
            }
        };
        if let Err(reason) = check_manifest(&manifest, name, version, kind) {
            remove_any(&staging)?;
            return failed(reason);
        }
        crash_point!(self, name, Unpacked);

        // Into its slot; a slot of the same version (not the active one) is
        // replaced by what was just verified.
        let slot = dir.join(version.to_string());
        let moved = remove_slot(&dir, version).and_then(|()| {
            std::fs::rename(&staging, &slot).map_err(write_error(&slot))?;
            sync_dir(&dir)
        });
        if let Err(error) = moved {
            remove_any(&staging)?;
            return stop(error);
        }
        crash_point!(self, name, SlotInPlace);

        let env = hook_env(name, version, previous.as_ref(), &slot);
        if let Some(hook) = &manifest.pre_activate
            && let Err(error) = hooks::run_hook(hook, &slot, &env, self.hook_user.as_ref()).await
        {
            remove_slot(&dir, version)?;
            return failed(format!("pre_activate failed: {error}"));
        }
        crash_point!(self, name, PreActivated);

        // Journal, then switch.
        let activating = Journal::Activating {
            version: version.clone(),
            previous: previous.clone(),
        };
        if let Err(error) = write_journal(&dir, &activating) {
            remove_slot(&dir, version)?;
            return stop(error);
        }
        crash_point!(self, name, Journaled);
        switch_link(&dir, version)?;
        crash_point!(self, name, Switched);
        tracing::info!(bundle = %name, version = %version, previous = ?previous.as_ref().map(Version::to_string), "Activated; checking health.");

        let health = match &manifest.health_check {
            Some(hook) => hooks::run_with_retries(
                hook,
                &slot,
                &env,
                self.hook_user.as_ref(),
                self.retry_pause,
            )
            .await
            .map_err(|error| {
                let attempts = hook.retries.saturating_add(1);
                let times = if attempts == 1 { "once" } else { "every time" };
                format!("the health check failed {times} ({attempts} attempts): {error}")
            }),
            None => Ok(()),
        };
        match health {
            Ok(()) => {
                crash_point!(self, name, Healthy);
                write_journal(
                    &dir,
                    &Journal::Stable {
                        active: Some(version.clone()),
                    },
                )?;
                crash_point!(self, name, Confirmed);
                self.collect_garbage(&dir, version, previous.as_ref());
                tracing::info!(bundle = %name, version = %version, "Confirmed healthy.");
                Ok(Outcome::Installed)
            }
            Err(reason) => {
                tracing::warn!(bundle = %name, version = %version, %reason, "Unhealthy; rolling back.");
                let rolling_back = Journal::RollingBack {
                    version: version.clone(),
                    previous,
                    reason: reason.clone(),
                };
                write_journal(&dir, &rolling_back)?;
                crash_point!(self, name, RollbackJournaled);
                // The way back is the recovery's.
                let (disk, _) = scan(&dir)?;
                let plan = decide(name, &rolling_back, &disk);
                self.apply(name, &dir, &rolling_back, &plan, true)?;
                Ok(Outcome::RolledBack { reason })
            }
        }
    }

    /// Removes the slots other than `active` and `previous`; a failure only
    /// costs disk space until the next install.
    fn collect_garbage(&self, dir: &Path, active: &Version, previous: Option<&Version>) {
        let slots = match scan(dir) {
            Ok((disk, _)) => disk.slots,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "Cannot list old slots.");
                return;
            }
        };
        for version in slots {
            if &version == active || Some(&version) == previous {
                continue;
            }
            match remove_slot(dir, &version) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), version = %version, "Removed an old slot.")
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), version = %version, %error, "Cannot remove an old slot.")
                }
            }
        }
    }
}
