//! The bundle slots of one data dir, and installing into them.
//!
//! ```text
//! <data_dir>/slots/<name>/<version>/     one unpacked bundle, always whole
//! <data_dir>/slots/<name>/current        symlink to `<version>`: the active one
//! <data_dir>/slots/<name>/journal.json   what is in flight for <name>
//! ```
//!
//! A slot directory is whole or absent: a bundle is unpacked into
//! `.staging-<version>`, synced and renamed into place, and a slot is
//! removed by renaming it to `.trash-<version>` first. `current` is switched
//! by renaming a new link over it. The journal is written (atomically)
//! before `current` changes, so after a crash [`Slots::recover`] knows
//! whether the version `current` names was confirmed healthy, and puts back
//! the one before it if not. What it does is a pure function of the journal
//! and of what is on disk ([`decide`]), so a crash during recovery is
//! recovered the same way.

use posfleet_bundle::archive::{UnpackLimits, unpack};
use posfleet_bundle::manifest::{Kind, Manifest};
use semver::Version;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;
use crate::files;
use crate::hooks;

/// The slots' directory in the data dir.
pub const SLOTS_DIR: &str = "slots";
/// The link naming a bundle's active version.
pub const CURRENT_LINK: &str = "current";
/// A bundle's install journal.
pub const JOURNAL_FILE: &str = "journal.json";
/// The temporary name of the next `current` link.
const CURRENT_TMP: &str = ".current.tmp";
/// The temporary name `files::write_private` gives the journal.
const JOURNAL_TMP: &str = "journal.tmp";
const STAGING_PREFIX: &str = ".staging-";
const TRASH_PREFIX: &str = ".trash-";

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

/// What [`Slots::recover`] did to one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub name: String,
    pub action: RecoveryAction,
    /// The version active now, if any.
    pub active: Option<Version>,
    /// Why, in words for the report.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryAction {
    /// `version` had been activated but was not confirmed healthy: `current`
    /// went back to the version before it (or was removed, if none).
    RolledBack { version: Version },
    /// An install of `version` stopped before `current` was switched to it;
    /// its slot was removed.
    Abandoned { version: Version },
    /// `current` was missing or broken with no install in flight; it was set
    /// back to the last confirmed version (or removed).
    Repaired,
}

/// A bundle's journal: what is in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Journal {
    /// Nothing in flight; `active`, if any, was confirmed healthy.
    Stable { active: Option<Version> },
    /// `version` is whole in its slot and passed `pre_activate`; `current`
    /// is being (or was) switched to it from `previous`, and it is not
    /// confirmed healthy.
    Activating {
        version: Version,
        previous: Option<Version>,
    },
    /// `version` was found unhealthy; `current` is going back to `previous`.
    RollingBack {
        version: Version,
        previous: Option<Version>,
        reason: String,
    },
}

/// Where `current` points.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Missing,
    To(Version),
    /// Not a symbolic link, or not to a version.
    Broken(String),
}

/// What there is of one bundle on disk (temporary entries aside).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Disk {
    current: Link,
    slots: BTreeSet<Version>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkChange {
    Keep,
    Point(Version),
    Remove,
}

/// The changes that make one bundle consistent, in the order they are made.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    /// Written before anything else, so that a crash while the plan is
    /// carried out leads to the same plan again.
    journal_first: Option<Journal>,
    link: LinkChange,
    /// Slots to remove; never the one left active.
    remove: Vec<Version>,
    /// Written last.
    journal: Journal,
    recovery: Option<Recovery>,
}

/// The recovery decision: from a bundle's journal and what is on disk, what
/// to change so that exactly one whole, confirmed version is active (or
/// none, when none was ever confirmed).
fn decide(name: &str, journal: &Journal, disk: &Disk) -> Plan {
    let points_to = |v: &Version| disk.current == Link::To(v.clone()) && disk.slots.contains(v);
    let is_current = |target: Option<&Version>| match target {
        Some(v) => points_to(v),
        None => disk.current == Link::Missing,
    };
    // Makes `target` active if its slot is whole, else leaves none active.
    let restore = |target: Option<&Version>| match target {
        Some(v) if disk.slots.contains(v) => {
            let change = if points_to(v) {
                LinkChange::Keep
            } else {
                LinkChange::Point(v.clone())
            };
            (change, Some(v.clone()))
        }
        _ => {
            let change = if disk.current == Link::Missing {
                LinkChange::Keep
            } else {
                LinkChange::Remove
            };
            (change, None)
        }
    };
    let plan = |journal_first: Option<Journal>,
                (link, active): (LinkChange, Option<Version>),
                remove: &Version,
                recovery: Option<(RecoveryAction, String)>| {
        let remove = Some(remove)
            .filter(|v| disk.slots.contains(v) && Some(*v) != active.as_ref())
            .cloned()
            .into_iter()
            .collect();
        Plan {
            journal_first,
            link,
            remove,
            recovery: recovery.map(|(action, reason)| Recovery {
                name: name.to_string(),
                action,
                active: active.clone(),
                reason,
            }),
            journal: Journal::Stable { active },
        }
    };
    let nothing = |active: Option<Version>| Plan {
        journal_first: None,
        link: LinkChange::Keep,
        remove: Vec::new(),
        journal: Journal::Stable { active },
        recovery: None,
    };

    match journal {
        Journal::Stable { active } => match &disk.current {
            // What runs is what was confirmed last (or, with no journal,
            // what was installed before journals).
            Link::To(v) if disk.slots.contains(v) => nothing(Some(v.clone())),
            Link::Missing if active.is_none() => nothing(None),
            broken => {
                let (link, now) = restore(active.as_ref());
                let reason = format!(
                    "the `current` link {}; {}",
                    match broken {
                        Link::Missing => "was missing".to_string(),
                        Link::To(v) => format!("named {v}, which has no slot"),
                        Link::Broken(what) => what.clone(),
                    },
                    match &now {
                        Some(v) => format!("set back to {v}"),
                        None => "removed".to_string(),
                    }
                );
                Plan {
                    journal_first: None,
                    link,
                    remove: Vec::new(),
                    recovery: Some(Recovery {
                        name: name.to_string(),
                        action: RecoveryAction::Repaired,
                        active: now.clone(),
                        reason,
                    }),
                    journal: Journal::Stable { active: now },
                }
            }
        },
        Journal::Activating { version, previous } if is_current(previous.as_ref()) => plan(
            None,
            restore(previous.as_ref()),
            version,
            Some((
                RecoveryAction::Abandoned {
                    version: version.clone(),
                },
                format!("the agent stopped before activating {version}"),
            )),
        ),
        Journal::Activating { version, previous } => {
            let reason = format!("the agent stopped before {version} was confirmed healthy");
            plan(
                Some(Journal::RollingBack {
                    version: version.clone(),
                    previous: previous.clone(),
                    reason: reason.clone(),
                }),
                restore(previous.as_ref()),
                version,
                Some((
                    RecoveryAction::RolledBack {
                        version: version.clone(),
                    },
                    reason,
                )),
            )
        }
        Journal::RollingBack {
            version,
            previous,
            reason,
        } => plan(
            None,
            restore(previous.as_ref()),
            version,
            Some((
                RecoveryAction::RolledBack {
                    version: version.clone(),
                },
                reason.clone(),
            )),
        ),
    }
}

/// Points in an install after which a test can stop it, leaving on disk
/// exactly what a crash there would (every step before is synced).
#[doc(hidden)]
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

/// `text` as a version, if it is one written the way slots are named.
fn parse_version(text: &str) -> Option<Version> {
    Version::parse(text).ok().filter(|v| v.to_string() == text)
}

fn write_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn is_disk_full(error: &Error) -> bool {
    matches!(
        error,
        Error::Write { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
    )
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_error(dir))
}

/// Removes a file, link or directory tree; absent is fine.
fn remove_any(path: &Path) -> Result<(), Error> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(write_error(path))
}

fn read_current(dir: &Path) -> Result<Link, Error> {
    let path = dir.join(CURRENT_LINK);
    match std::fs::read_link(&path) {
        Ok(target) => Ok(match target.to_str().and_then(parse_version) {
            Some(v) => Link::To(v),
            None => Link::Broken(format!("pointed to `{}`", target.display())),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Link::Missing),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            Ok(Link::Broken("was not a symbolic link".into()))
        }
        Err(source) => Err(Error::Read { path, source }),
    }
}

/// What is in a bundle's directory, and the temporary entries a crash left.
fn scan(dir: &Path) -> Result<(Disk, Vec<PathBuf>), Error> {
    let read_error = |source| Error::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut slots = BTreeSet::new();
    let mut leftovers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(STAGING_PREFIX)
            || name.starts_with(TRASH_PREFIX)
            || name == CURRENT_TMP
            || name == JOURNAL_TMP
        {
            leftovers.push(entry.path());
        } else if let Some(version) = parse_version(name)
            && entry.file_type().map_err(read_error)?.is_dir()
        {
            slots.insert(version);
        }
    }
    let current = read_current(dir)?;
    Ok((Disk { current, slots }, leftovers))
}

fn load_journal(dir: &Path) -> Result<Journal, Error> {
    let path = dir.join(JOURNAL_FILE);
    Ok(match files::read_optional(&path)? {
        None => Journal::Stable { active: None },
        Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            // Written atomically, so only a damaged disk gets here; the
            // `current` link is then the best guide.
            tracing::warn!(path = %path.display(), %error, "Install journal unreadable; trusting the current link.");
            Journal::Stable { active: None }
        }),
    })
}

fn write_journal(dir: &Path, journal: &Journal) -> Result<(), Error> {
    // Versions and strings only: serializing cannot fail.
    let bytes = serde_json::to_vec_pretty(journal).expect("plain data serializes");
    files::write_private(&dir.join(JOURNAL_FILE), &bytes)
}

/// Points `current` at `version`: a new link renamed over the old one.
fn switch_link(dir: &Path, version: &Version) -> Result<(), Error> {
    let tmp = dir.join(CURRENT_TMP);
    remove_any(&tmp)?;
    std::os::unix::fs::symlink(version.to_string(), &tmp).map_err(write_error(&tmp))?;
    let current = dir.join(CURRENT_LINK);
    std::fs::rename(&tmp, &current).map_err(write_error(&current))?;
    sync_dir(dir)
}

fn remove_link(dir: &Path) -> Result<(), Error> {
    remove_any(&dir.join(CURRENT_LINK))?;
    sync_dir(dir)
}

/// Removes a slot: renamed away first, so it is never seen half removed.
fn remove_slot(dir: &Path, version: &Version) -> Result<(), Error> {
    let slot = dir.join(version.to_string());
    if std::fs::symlink_metadata(&slot).is_err() {
        return Ok(());
    }
    let trash = dir.join(format!("{TRASH_PREFIX}{version}"));
    remove_any(&trash)?;
    std::fs::rename(&slot, &trash).map_err(write_error(&slot))?;
    sync_dir(dir)?;
    if let Err(error) = remove_any(&trash) {
        // Out of the way already; `recover` finishes the job.
        tracing::warn!(path = %trash.display(), %error, "Cannot remove an old slot.");
    }
    Ok(())
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Software => "software",
        Kind::Catalog => "catalog",
    }
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
        kind_name(manifest.kind),
        kind_name(kind)
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
            crash_after: None,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Limits on what one archive may unpack to.
    pub fn with_unpack_limits(mut self, limits: UnpackLimits) -> Slots {
        self.limits = limits;
        self
    }

    /// The pause between attempts of a health check ([`hooks::RETRY_PAUSE`]).
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
    #[doc(hidden)]
    pub fn with_crash_after(mut self, point: CrashPoint) -> Slots {
        self.crash_after = Some(point);
        self
    }

    fn checkpoint(&self, name: &str, point: CrashPoint) -> Result<(), Error> {
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
    /// unhealthy install, which crash tests may stop.
    fn apply(
        &self,
        name: &str,
        dir: &Path,
        journal: &Journal,
        plan: &Plan,
        rolling_back: bool,
    ) -> Result<(), Error> {
        let checkpoint = |point| {
            if rolling_back {
                self.checkpoint(name, point)
            } else {
                Ok(())
            }
        };
        if let Some(first) = &plan.journal_first {
            write_journal(dir, first)?;
        }
        match &plan.link {
            LinkChange::Keep => {}
            LinkChange::Point(version) => switch_link(dir, version)?,
            LinkChange::Remove => remove_link(dir)?,
        }
        checkpoint(CrashPoint::SwitchedBack)?;
        for version in &plan.remove {
            remove_slot(dir, version)?;
        }
        checkpoint(CrashPoint::BadSlotRemoved)?;
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
        let manifest = match self.unpack(name, version, archive, &staging).await {
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
        self.checkpoint(name, CrashPoint::Unpacked)?;

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
        self.checkpoint(name, CrashPoint::SlotInPlace)?;

        let env = hook_env(name, version, previous.as_ref(), &slot);
        if let Some(hook) = &manifest.pre_activate
            && let Err(error) = hooks::run_hook(hook, &slot, &env, self.hook_user.as_ref()).await
        {
            remove_slot(&dir, version)?;
            return failed(format!("pre_activate failed: {error}"));
        }
        self.checkpoint(name, CrashPoint::PreActivated)?;

        // Journal, then switch.
        let activating = Journal::Activating {
            version: version.clone(),
            previous: previous.clone(),
        };
        if let Err(error) = write_journal(&dir, &activating) {
            remove_slot(&dir, version)?;
            return stop(error);
        }
        self.checkpoint(name, CrashPoint::Journaled)?;
        switch_link(&dir, version)?;
        self.checkpoint(name, CrashPoint::Switched)?;
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
                self.checkpoint(name, CrashPoint::Healthy)?;
                write_journal(
                    &dir,
                    &Journal::Stable {
                        active: Some(version.clone()),
                    },
                )?;
                self.checkpoint(name, CrashPoint::Confirmed)?;
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
                self.checkpoint(name, CrashPoint::RollbackJournaled)?;
                // The way back is the recovery's.
                let (disk, _) = scan(&dir)?;
                let plan = decide(name, &rolling_back, &disk);
                self.apply(name, &dir, &rolling_back, &plan, true)?;
                Ok(Outcome::RolledBack { reason })
            }
        }
    }

    /// Unpacks `archive` into a new `staging` dir; a failure is the reason.
    async fn unpack(
        &self,
        name: &str,
        version: &Version,
        archive: &Path,
        staging: &Path,
    ) -> Result<Manifest, (String, bool)> {
        let made = remove_any(staging).and_then(|()| {
            std::fs::create_dir(staging).map_err(write_error(staging))?;
            Ok(())
        });
        if let Err(error) = made {
            return Err(if is_disk_full(&error) {
                (format!("the disk is full: {error}"), true)
            } else {
                (error.to_string(), false)
            });
        }
        let (archive, staging, limits) =
            (archive.to_path_buf(), staging.to_path_buf(), self.limits);
        let unpacked = tokio::task::spawn_blocking(move || {
            let file =
                std::fs::File::open(&archive).map_err(|source| posfleet_bundle::Error::Read {
                    path: archive.clone(),
                    source,
                })?;
            unpack(file, &staging, &limits)
        })
        .await;
        match unpacked {
            Ok(Ok(manifest)) => Ok(manifest),
            Ok(Err(error)) if error.is_disk_full() => Err((
                format!("the disk is full: cannot unpack {name} {version} ({error})"),
                true,
            )),
            Ok(Err(error)) => Err((format!("cannot unpack {name} {version}: {error}"), false)),
            Err(error) => Err((
                format!("unpacking {name} {version} stopped: {error}"),
                false,
            )),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn disk(current: Link, slots: &[&str]) -> Disk {
        Disk {
            current,
            slots: slots.iter().map(|s| v(s)).collect(),
        }
    }

    fn to(text: &str) -> Link {
        Link::To(v(text))
    }

    fn stable(active: Option<&str>) -> Journal {
        Journal::Stable {
            active: active.map(v),
        }
    }

    fn activating(version: &str, previous: Option<&str>) -> Journal {
        Journal::Activating {
            version: v(version),
            previous: previous.map(v),
        }
    }

    fn rolling_back(version: &str, previous: Option<&str>) -> Journal {
        Journal::RollingBack {
            version: v(version),
            previous: previous.map(v),
            reason: "unhealthy".into(),
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Report {
        None,
        RolledBack,
        Abandoned,
        Repaired,
    }

    /// Checks what `decide` does: the link change, the slots removed, the
    /// version left active and what is reported.
    #[track_caller]
    fn check(
        journal: Journal,
        disk: Disk,
        link: LinkChange,
        removed: &[&str],
        active: Option<&str>,
        report: Report,
    ) {
        let plan = decide("pos-app", &journal, &disk);
        assert_eq!(plan.link, link, "link for {journal:?} {disk:?}");
        let removed: Vec<Version> = removed.iter().map(|s| v(s)).collect();
        assert_eq!(plan.remove, removed, "removed for {journal:?} {disk:?}");
        assert_eq!(
            plan.journal,
            stable(active),
            "journal for {journal:?} {disk:?}"
        );
        let got = match plan.recovery.as_ref().map(|r| &r.action) {
            None => Report::None,
            Some(RecoveryAction::RolledBack { .. }) => Report::RolledBack,
            Some(RecoveryAction::Abandoned { .. }) => Report::Abandoned,
            Some(RecoveryAction::Repaired) => Report::Repaired,
        };
        assert_eq!(got, report, "report for {journal:?} {disk:?}");
        if let Some(recovery) = &plan.recovery {
            assert_eq!(recovery.active, active.map(v));
        }
    }

    use LinkChange::{Keep, Point, Remove};

    #[test]
    fn nothing_in_flight() {
        check(
            stable(None),
            disk(Link::Missing, &[]),
            Keep,
            &[],
            None,
            Report::None,
        );
        check(
            stable(Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::None,
        );
        // An older slot stays for the next install's clean-up.
        check(
            stable(Some("1.1.0")),
            disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            Keep,
            &[],
            Some("1.1.0"),
            Report::None,
        );
        // No journal (or an unreadable one): the link is the truth.
        check(
            stable(None),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::None,
        );
    }

    #[test]
    fn a_broken_link_goes_back_to_the_confirmed_version() {
        for current in [
            Link::Missing,
            Link::Broken("was not a symbolic link".into()),
            to("1.1.0"),
        ] {
            check(
                stable(Some("1.0.0")),
                disk(current.clone(), &["1.0.0"]),
                Point(v("1.0.0")),
                &[],
                Some("1.0.0"),
                Report::Repaired,
            );
            // Nothing confirmed to go back to.
            let link = if current == Link::Missing {
                Keep
            } else {
                Remove
            };
            check(
                stable(Some("0.9.0")),
                disk(current, &["1.0.0"]),
                link,
                &[],
                None,
                Report::Repaired,
            );
        }
    }

    #[test]
    fn stopped_before_the_switch() {
        // The journal was written, `current` not switched yet.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0", "1.1.0"]),
            Keep,
            &["1.1.0"],
            Some("1.0.0"),
            Report::Abandoned,
        );
        check(
            activating("1.0.0", None),
            disk(Link::Missing, &["1.0.0"]),
            Keep,
            &["1.0.0"],
            None,
            Report::Abandoned,
        );
        // A second recovery: the slot is already gone.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::Abandoned,
        );
    }

    #[test]
    fn stopped_before_the_confirmation() {
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
            Point(v("1.0.0")),
            &["1.1.0"],
            Some("1.0.0"),
            Report::RolledBack,
        );
        // The first install of the bundle: nothing to go back to.
        check(
            activating("1.0.0", None),
            disk(to("1.0.0"), &["1.0.0"]),
            Remove,
            &["1.0.0"],
            None,
            Report::RolledBack,
        );
        // `current` broken: the previous version, whatever it names.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(Link::Broken("pointed to `x`".into()), &["1.0.0", "1.1.0"]),
            Point(v("1.0.0")),
            &["1.1.0"],
            Some("1.0.0"),
            Report::RolledBack,
        );
        // The previous slot is gone (not something installs do): no
        // unconfirmed version stays active.
        check(
            activating("1.1.0", Some("1.0.0")),
            disk(to("1.1.0"), &["1.1.0"]),
            Remove,
            &["1.1.0"],
            None,
            Report::RolledBack,
        );
        // The way back is journaled first, with its reason.
        let plan = decide(
            "pos-app",
            &activating("1.1.0", Some("1.0.0")),
            &disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
        );
        let reason = "the agent stopped before 1.1.0 was confirmed healthy";
        assert_eq!(
            plan.journal_first,
            Some(Journal::RollingBack {
                version: v("1.1.0"),
                previous: Some(v("1.0.0")),
                reason: reason.into(),
            })
        );
        assert_eq!(plan.recovery.unwrap().reason, reason);
    }

    #[test]
    fn stopped_while_rolling_back() {
        for (current, slots, link, removed) in [
            (
                to("1.1.0"),
                &["1.0.0", "1.1.0"][..],
                Point(v("1.0.0")),
                &["1.1.0"][..],
            ),
            (to("1.0.0"), &["1.0.0", "1.1.0"], Keep, &["1.1.0"]),
            (to("1.0.0"), &["1.0.0"], Keep, &[]),
        ] {
            check(
                rolling_back("1.1.0", Some("1.0.0")),
                disk(current, slots),
                link,
                removed,
                Some("1.0.0"),
                Report::RolledBack,
            );
        }
        check(
            rolling_back("1.0.0", None),
            disk(Link::Missing, &["1.0.0"]),
            Keep,
            &["1.0.0"],
            None,
            Report::RolledBack,
        );
        let plan = decide(
            "pos-app",
            &rolling_back("1.1.0", Some("1.0.0")),
            &disk(to("1.1.0"), &["1.0.0", "1.1.0"]),
        );
        assert_eq!(plan.journal_first, None);
        assert_eq!(plan.recovery.unwrap().reason, "unhealthy");
    }

    #[test]
    fn the_active_slot_is_never_removed() {
        // A journal no install writes (a version "replacing" itself).
        check(
            activating("1.0.0", Some("1.0.0")),
            disk(to("1.0.0"), &["1.0.0"]),
            Keep,
            &[],
            Some("1.0.0"),
            Report::Abandoned,
        );
    }

    /// `plan` carried out on the model, stopping after `steps` of its
    /// changes (journal first, link, removals, journal last): the journal
    /// and disk a crash there leaves.
    fn carry_out(journal: &Journal, disk: &Disk, plan: &Plan, steps: usize) -> (Journal, Disk) {
        let (mut journal, mut disk) = (journal.clone(), disk.clone());
        if steps >= 1
            && let Some(first) = &plan.journal_first
        {
            journal = first.clone();
        }
        if steps >= 2 {
            match &plan.link {
                Keep => {}
                Point(v) => disk.current = Link::To(v.clone()),
                Remove => disk.current = Link::Missing,
            }
        }
        if steps >= 3 {
            for v in &plan.remove {
                disk.slots.remove(v);
            }
        }
        if steps >= 4 {
            journal = plan.journal.clone();
        }
        (journal, disk)
    }

    #[test]
    fn recovery_is_consistent_and_survives_crashes_of_its_own() {
        let journals = [
            stable(None),
            stable(Some("1.0.0")),
            activating("1.1.0", None),
            activating("1.1.0", Some("1.0.0")),
            rolling_back("1.1.0", None),
            rolling_back("1.1.0", Some("1.0.0")),
        ];
        let currents = [
            Link::Missing,
            to("1.0.0"),
            to("1.1.0"),
            to("2.0.0"),
            Link::Broken("was not a symbolic link".into()),
        ];
        let slot_sets: [&[&str]; 4] = [&[], &["1.0.0"], &["1.1.0"], &["1.0.0", "1.1.0"]];
        for journal in &journals {
            for current in &currents {
                for slots in slot_sets {
                    let start = disk(current.clone(), slots);
                    let plan = decide("pos-app", journal, &start);
                    let Journal::Stable { active } = &plan.journal else {
                        panic!("{journal:?} {start:?} does not end stable");
                    };
                    let (_, end) = carry_out(journal, &start, &plan, 4);
                    // One whole version active, or none.
                    match active {
                        Some(v) => {
                            assert_eq!(end.current, Link::To(v.clone()));
                            assert!(end.slots.contains(v));
                        }
                        None => assert_eq!(end.current, Link::Missing),
                    }
                    // An unconfirmed version never stays active.
                    if let Journal::Activating { version, .. }
                    | Journal::RollingBack { version, .. } = journal
                    {
                        assert_ne!(active.as_ref(), Some(version), "{journal:?} {start:?}");
                    }
                    // A crash at any point of the recovery is recovered to
                    // the same end, and a finished recovery has nothing
                    // left to do.
                    for steps in 0..=4 {
                        let (journal, disk) = carry_out(journal, &start, &plan, steps);
                        let again = decide("pos-app", &journal, &disk);
                        assert_eq!(again.journal, plan.journal, "{journal:?} {disk:?}");
                        // Until the end is journaled, an interrupted install
                        // is reported the same way (a repaired link needs no
                        // report once repaired).
                        let repaired = plan.recovery.as_ref().map(|r| &r.action)
                            == Some(&RecoveryAction::Repaired);
                        if steps < 4 && !repaired {
                            assert_eq!(again.recovery, plan.recovery, "{journal:?} {disk:?}");
                        }
                        let (_, end_again) = carry_out(&journal, &disk, &again, 4);
                        assert_eq!(end_again, end, "{journal:?} {disk:?}");
                    }
                    let done = decide("pos-app", &plan.journal, &end);
                    assert_eq!(
                        (done.link, done.remove, done.recovery),
                        (Keep, vec![], None),
                        "{journal:?} {start:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_journal_format_is_tagged() {
        let json = serde_json::to_string(&activating("1.1.0", Some("1.0.0"))).unwrap();
        assert_eq!(
            json,
            r#"{"state":"activating","version":"1.1.0","previous":"1.0.0"}"#
        );
    }
}
