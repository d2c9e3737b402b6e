//! The agent root on disk (`<data_dir>/agent/`): reading it for the
//! decision, carrying a plan out, and the agent's own steps (installing a
//! new version, confirming itself, reading a revert). Every change is made
//! so that a kill between two of them leaves a state the decision handles:
//! a version folder is unpacked beside its place and renamed into it, the
//! journal is written atomically (file and folder synced) before `current`
//! changes, and `current` is replaced by renaming a new link over it.

use posfleet_bundle::archive::UnpackLimits;
use posfleet_bundle::manifest::{AGENT_BUNDLE_NAME, AGENT_EXECUTABLE, Kind};
use semver::Version;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::decide::{Disk, Journal, Link, LinkChange, Plan};
use crate::error::Error;
use crate::files;
use crate::install::disk::{
    CURRENT_LINK, CURRENT_TMP, STAGING_PREFIX, TRASH_PREFIX, parse_version, read_link, remove_any,
    remove_link, remove_slot, replace_link, sync_dir, unpack_into, write_error,
};

/// The agent root's folder in the data dir.
pub const AGENT_DIR: &str = "agent";
const VERSIONS_DIR: &str = "versions";
const JOURNAL_FILE: &str = "journal.json";
/// Held by the launcher while it runs: one launcher per agent root.
pub(super) const LAUNCHER_LOCK: &str = "launcher.lock";
/// Held by the agent while it runs: one agent per agent root, even while a
/// killed launcher's child is still on its way out.
pub(super) const AGENT_LOCK: &str = "agent.lock";
/// How long a new agent may take to answer `--version` before it is
/// installed: one that cannot even start is refused before any switch.
const SMOKE_TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How installing a new agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new version is in place, journaled `trying` and named by
    /// `current`: the agent exits so that its launcher starts it.
    Switched,
    /// Nothing was switched; trying the same bundle again will not help.
    Failed { reason: String },
}

/// `<data_dir>/agent/`.
#[derive(Debug, Clone)]
pub struct AgentRoot {
    dir: PathBuf,
}

impl AgentRoot {
    pub fn new(data_dir: &Path) -> AgentRoot {
        let dir = data_dir.join(AGENT_DIR);
        AgentRoot {
            dir: std::path::absolute(&dir).unwrap_or(dir),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn versions(&self) -> PathBuf {
        self.dir.join(VERSIONS_DIR)
    }

    /// Makes the root and `versions/` (mode 0700, as the data dir).
    pub fn create(&self) -> Result<(), Error> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.versions())
            .map_err(|source| Error::DataDir {
                path: self.versions(),
                source,
            })
    }

    /// The executable of agent `version`.
    pub fn executable(&self, version: &Version) -> PathBuf {
        self.versions()
            .join(version.to_string())
            .join(AGENT_EXECUTABLE)
    }

    pub fn has_version(&self, version: &Version) -> bool {
        is_runnable(&self.executable(version))
    }

    pub fn load_journal(&self) -> Result<Option<Journal>, Error> {
        let path = self.dir.join(JOURNAL_FILE);
        Ok(match files::read_optional(&path)? {
            None => None,
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                // Written atomically, so only a damaged disk gets here;
                // `current` is then the best guide.
                tracing::warn!(path = %path.display(), %error, "Self-update journal unreadable; trusting the current link.");
                None
            }),
        })
    }

    fn write_journal(&self, journal: &Journal) -> Result<(), Error> {
        // Versions and strings only: serializing cannot fail.
        let bytes = serde_json::to_vec_pretty(journal).expect("plain data serializes");
        files::write_private(&self.dir.join(JOURNAL_FILE), &bytes)
    }

    fn read_current(&self) -> Result<Link, Error> {
        read_link(&self.dir.join(CURRENT_LINK), &format!("{VERSIONS_DIR}/"))
    }

    /// The versions whose folder holds a runnable agent.
    fn runnable_versions(&self) -> Result<BTreeSet<Version>, Error> {
        let dir = self.versions();
        let read_error = |source| Error::Read {
            path: dir.clone(),
            source,
        };
        let mut versions = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            if let Some(version) = entry.file_name().to_str().and_then(parse_version)
                && self.has_version(&version)
            {
                versions.insert(version);
            }
        }
        Ok(versions)
    }

    /// The launcher's view, before it starts an agent (none runs): the
    /// journal and what is on disk, once what a killed install or switch
    /// left half done is removed.
    pub(crate) fn scan(&self) -> Result<(Option<Journal>, Disk), Error> {
        self.create()?;
        let versions = self.versions();
        let mut leftovers = vec![
            self.dir.join(CURRENT_TMP),
            files_tmp(&self.dir.join(JOURNAL_FILE)),
        ];
        let read_error = |source| Error::Read {
            path: versions.clone(),
            source,
        };
        for entry in std::fs::read_dir(&versions).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(STAGING_PREFIX) || name.starts_with(TRASH_PREFIX) {
                leftovers.push(entry.path());
            }
        }
        for path in leftovers {
            if std::fs::symlink_metadata(&path).is_ok() {
                tracing::info!(path = %path.display(), "Removing what an interrupted self-update left.");
                remove_any(&path)?;
            }
        }
        let disk = Disk {
            current: self.read_current()?,
            versions: self.runnable_versions()?,
        };
        Ok((self.load_journal()?, disk))
    }

    /// Carries a launcher plan out: journal, link, removals.
    pub(crate) fn apply(&self, plan: &Plan) -> Result<(), Error> {
        if let Some(journal) = &plan.journal {
            self.write_journal(journal)?;
        }
        match &plan.link {
            LinkChange::Keep => {}
            LinkChange::Point(version) => self.point(version)?,
            LinkChange::Remove => remove_link(&self.dir)?,
        }
        for version in &plan.remove {
            remove_slot(&self.versions(), version)?;
        }
        Ok(())
    }

    fn point(&self, version: &Version) -> Result<(), Error> {
        replace_link(&self.dir, &format!("{VERSIONS_DIR}/{version}"))
    }

    /// The agent version confirmed on this till: what it reports. While a
    /// new one is on trial, or after it was reverted, the one before it
    /// (`None`: the factory agent).
    pub fn confirmed(&self) -> Option<Version> {
        match self.load_journal() {
            Ok(Some(Journal::Trying { from, .. } | Journal::Reverted { from, .. })) => from,
            Ok(Some(Journal::Confirmed { version, .. })) => Some(version),
            Ok(None) => match self.read_current() {
                Ok(Link::To(version)) if self.has_version(&version) => Some(version),
                _ => None,
            },
            Err(error) => {
                tracing::warn!(%error, "Cannot read the self-update journal.");
                None
            }
        }
    }

    /// The version on trial, if one is.
    pub fn on_trial(&self) -> Option<Version> {
        match self.load_journal() {
            Ok(Some(Journal::Trying { to, .. })) => Some(to),
            _ => None,
        }
    }

    /// The version reverted last and why, if the journal says so.
    pub fn reverted(&self) -> Option<(Version, String)> {
        match self.load_journal() {
            Ok(Some(Journal::Reverted { to, reason, .. })) => Some((to, reason)),
            _ => None,
        }
    }

    /// The agent on trial confirms itself: `running` is the version on
    /// trial and `current` names it. Then the versions other than it and
    /// the one before it are removed. Returns whether it confirmed now.
    pub fn confirm(&self, running: &Version) -> Result<bool, Error> {
        let Some(Journal::Trying { from, to, .. }) = self.load_journal()? else {
            return Ok(false);
        };
        if &to != running || self.read_current()? != Link::To(to.clone()) {
            return Ok(false);
        }
        self.write_journal(&Journal::Confirmed {
            version: to.clone(),
            previous: from.clone(),
        })?;
        for version in self.runnable_versions()? {
            if version != to
                && Some(&version) != from.as_ref()
                && let Err(error) = remove_slot(&self.versions(), &version)
            {
                tracing::warn!(version = %version, %error, "Cannot remove an old agent version.");
            }
        }
        Ok(true)
    }

    /// Installs agent `version` from `archive` (verified by the caller)
    /// while agent `running` (`None`: the factory one) runs: unpack beside
    /// `versions/`, check it is that agent and that it starts, rename it
    /// into `versions/<version>/`, journal `trying` with a deadline
    /// `confirm` from now, switch `current`. An error is a local failure
    /// (the data dir cannot be written), worth retrying.
    pub async fn install(
        &self,
        running: Option<&Version>,
        version: &Version,
        archive: &Path,
        confirm: Duration,
    ) -> Result<Outcome, Error> {
        self.create()?;
        let versions = self.versions();
        let staging = versions.join(format!("{STAGING_PREFIX}{version}"));
        let failed = |reason: String| -> Result<Outcome, Error> {
            remove_any(&staging)?;
            Ok(Outcome::Failed { reason })
        };
        let manifest = match unpack_into(
            AGENT_BUNDLE_NAME,
            version,
            archive,
            &staging,
            UnpackLimits::default(),
        )
        .await
        {
            Ok(manifest) => manifest,
            Err((reason, _)) => return failed(reason),
        };
        if manifest.name != AGENT_BUNDLE_NAME
            || manifest.version != *version
            || manifest.kind != Kind::Agent
        {
            return failed(format!(
                "the archive holds {} {} ({}), not {AGENT_BUNDLE_NAME} {version} (agent)",
                manifest.name,
                manifest.version,
                manifest.kind.as_str()
            ));
        }
        if let Err(reason) = smoke_test(&staging.join(AGENT_EXECUTABLE)).await {
            return failed(format!("agent {version} cannot start: {reason}"));
        }
        let place = versions.join(version.to_string());
        remove_slot(&versions, version)?;
        std::fs::rename(&staging, &place).map_err(write_error(&place))?;
        sync_dir(&versions)?;
        let now = chrono::Utc::now().timestamp_millis();
        self.write_journal(&Journal::Trying {
            from: running.cloned(),
            to: version.clone(),
            started_at_ms: now,
            deadline_ms: now.saturating_add(i64::try_from(confirm.as_millis()).unwrap_or(i64::MAX)),
        })?;
        self.point(version)?;
        Ok(Outcome::Switched)
    }
}

/// The temporary file `files::write_private` writes first.
fn files_tmp(path: &Path) -> PathBuf {
    posfleet_runtime::files::temporary_path(path)
}

/// A regular file someone may execute.
fn is_runnable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `executable --version` with nothing of the agent's environment:
/// an executable that is missing, not for this machine or that cannot
/// start is refused before anything is switched.
async fn smoke_test(executable: &Path) -> Result<(), String> {
    if !is_runnable(executable) {
        return Err(format!("the bundle holds no executable {AGENT_EXECUTABLE}"));
    }
    let run = tokio::process::Command::new(executable)
        .arg("--version")
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(SMOKE_TEST_TIMEOUT, run).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!(
            "`{AGENT_EXECUTABLE} --version` ended with {status}"
        )),
        Ok(Err(error)) => Err(format!("`{AGENT_EXECUTABLE} --version`: {error}")),
        Err(_) => Err(format!(
            "`{AGENT_EXECUTABLE} --version` did not answer within {} s",
            SMOKE_TEST_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    /// An agent bundle of `version` whose executable is `script` (none if
    /// `None`), built into `dir`.
    fn bundle(dir: &Path, name: &str, version: &str, script: Option<&str>) -> PathBuf {
        let src = dir.join(format!("src-{version}"));
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(
            src.join("posfleet-bundle.toml"),
            format!(
                "name = \"{name}\"\nversion = \"{version}\"\nkind = \"agent\"\nhardware = [\"*\"]\n"
            ),
        )
        .unwrap();
        let exe = src.join(AGENT_EXECUTABLE);
        std::fs::write(&exe, script.unwrap_or("not a program\n")).unwrap();
        let mode = if script.is_some() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = dir.join(format!("{version}.bundle"));
        posfleet_bundle::archive::build(&src, &out).unwrap();
        out
    }

    const STARTS: &str = "#!/bin/sh\necho posfleet-agent\n";

    #[tokio::test]
    async fn an_install_journals_trying_then_switches_and_the_new_agent_confirms_itself() {
        let dir = tempfile::tempdir().unwrap();
        let root = AgentRoot::new(&dir.path().join("data"));
        let confirm = Duration::from_secs(300);
        let before = chrono::Utc::now().timestamp_millis();
        let archive = bundle(dir.path(), AGENT_BUNDLE_NAME, "1.1.0", Some(STARTS));
        let outcome = root.install(None, &v("1.1.0"), &archive, confirm).await;
        assert_eq!(outcome.unwrap(), Outcome::Switched);
        let Some(Journal::Trying {
            from,
            to,
            started_at_ms,
            deadline_ms,
        }) = root.load_journal().unwrap()
        else {
            panic!("not trying: {:?}", root.load_journal());
        };
        assert_eq!((from, to), (None, v("1.1.0")));
        assert!(started_at_ms >= before);
        assert_eq!(deadline_ms - started_at_ms, 300_000);
        assert_eq!(root.read_current().unwrap(), Link::To(v("1.1.0")));
        assert!(root.has_version(&v("1.1.0")));
        // Reported: the one before, until it confirms itself.
        assert_eq!(
            (root.confirmed(), root.on_trial()),
            (None, Some(v("1.1.0")))
        );
        // Only the version on trial confirms itself, and once.
        assert!(!root.confirm(&v("1.0.0")).unwrap());
        assert!(root.confirm(&v("1.1.0")).unwrap());
        assert!(!root.confirm(&v("1.1.0")).unwrap());
        assert_eq!(
            (root.confirmed(), root.on_trial()),
            (Some(v("1.1.0")), None)
        );
        // The next one keeps the one before it; the one before that goes.
        let archive = bundle(dir.path(), AGENT_BUNDLE_NAME, "1.2.0", Some(STARTS));
        let running = v("1.1.0");
        let outcome = root
            .install(Some(&running), &v("1.2.0"), &archive, confirm)
            .await;
        assert_eq!(outcome.unwrap(), Outcome::Switched);
        assert!(root.confirm(&v("1.2.0")).unwrap());
        let archive = bundle(dir.path(), AGENT_BUNDLE_NAME, "1.3.0", Some(STARTS));
        let running = v("1.2.0");
        let outcome = root
            .install(Some(&running), &v("1.3.0"), &archive, confirm)
            .await;
        assert_eq!(outcome.unwrap(), Outcome::Switched);
        assert!(root.confirm(&v("1.3.0")).unwrap());
        let versions: Vec<Version> = root.runnable_versions().unwrap().into_iter().collect();
        assert_eq!(versions, vec![v("1.2.0"), v("1.3.0")]);
    }

    #[tokio::test]
    async fn an_agent_that_is_not_one_or_cannot_start_is_refused_before_any_switch() {
        let dir = tempfile::tempdir().unwrap();
        let root = AgentRoot::new(&dir.path().join("data"));
        for (name, script, says) in [
            (AGENT_BUNDLE_NAME, None, "holds no executable"),
            (AGENT_BUNDLE_NAME, Some("#!/bin/sh\nexit 3\n"), "ended with"),
        ] {
            let archive = bundle(dir.path(), name, "1.1.0", script);
            let outcome = root
                .install(None, &v("1.1.0"), &archive, Duration::from_secs(60))
                .await
                .unwrap();
            let Outcome::Failed { reason } = outcome else {
                panic!("installed");
            };
            assert!(reason.contains(says), "{reason}");
            assert_eq!(root.load_journal().unwrap(), None);
            assert_eq!(root.read_current().unwrap(), Link::Missing);
            assert!(root.runnable_versions().unwrap().is_empty());
            let leftovers = std::fs::read_dir(root.versions()).unwrap().count();
            assert_eq!(leftovers, 0, "{reason}");
        }
    }
}
