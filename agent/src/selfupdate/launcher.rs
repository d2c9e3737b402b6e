//! `posfleet-agent-launcher`'s loop: decide which agent runs, start it as
//! a child, and wait for it to exit, for the deadline of an agent on trial,
//! or for SIGTERM/SIGINT (passed on to the child; the launcher exits once
//! the child has). Then decide again: a revert is the decision's, taken
//! only once the child is gone, so nothing writes the journal while an
//! agent runs but that agent.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::decide::{Journal, Run, decide};
use super::root::{AgentRoot, LAUNCHER_LOCK};
use super::{EXIT_SWITCHED, LAUNCHER_PID_ENV, RUNNING_VERSION_ENV};
use crate::config::{AgentConfig, ConfigError, LogFormat};
use crate::error::Error;

/// Where the package installs the agent: it runs while no `current` is set.
pub const DEFAULT_FACTORY_AGENT: &str = "/usr/lib/posfleet/posfleet-agent";
/// How long an agent has to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a second launcher waits for the first one's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// Pause before starting an agent on trial again after it exited.
const TRIAL_RESTART_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause before starting an agent again that keeps exiting.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(30);
/// An agent that ran this long before exiting is started again at once.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// The keys of the agent's configuration file the launcher reads (the
/// others are the agent's); loaded the way the agent loads them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LauncherConfig {
    pub data_dir: PathBuf,
    pub agent_update_confirm_seconds: u64,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl Default for LauncherConfig {
    fn default() -> Self {
        let agent = AgentConfig::default();
        LauncherConfig {
            data_dir: agent.data_dir,
            agent_update_confirm_seconds: agent.agent_update_confirm_seconds,
            log_format: agent.log_format,
            log_level: agent.log_level,
        }
    }
}

/// The launcher takes no setting from its command line.
#[derive(Serialize)]
struct NoFlags {}

impl LauncherConfig {
    /// Defaults, the agent's TOML file, then the `POSFLEET_*` environment,
    /// checked as the agent checks them.
    pub fn load(file: &Path) -> Result<LauncherConfig, ConfigError> {
        let config: LauncherConfig =
            posfleet_runtime::config::load(Some(file), std::env::vars_os(), &NoFlags {})?;
        if config.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("data_dir", "must not be empty"));
        }
        crate::config::check_confirm_seconds(config.agent_update_confirm_seconds)?;
        posfleet_runtime::logging::check_log_level(&config.log_level)?;
        Ok(config)
    }
}

/// Takes an exclusive `flock` on `path`, waiting for it (at most `wait`,
/// if given). `what` names the holder in messages.
pub(super) fn lock(
    path: &Path,
    what: &str,
    wait: Option<Duration>,
) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    use nix::fcntl::{Flock, FlockArg};
    let started = Instant::now();
    let mut told = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| Error::Write {
                path: path.to_path_buf(),
                source,
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
            Err((_, errno)) => {
                return Err(Error::Launcher {
                    detail: format!("cannot lock {}: {errno}", path.display()),
                });
            }
        }
        if wait.is_some_and(|wait| started.elapsed() >= wait) {
            return Err(Error::Launcher {
                detail: format!(
                    "another {what} holds {} (waited {} s)",
                    path.display(),
                    started.elapsed().as_secs()
                ),
            });
        }
        if !told {
            tracing::warn!(path = %path.display(), "Another {what} holds the agent root; waiting for it to end.");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How one run of a child ended.
enum Ended {
    Exited(std::process::ExitStatus),
    /// The agent on trial reached its deadline.
    Deadline,
    /// SIGTERM or SIGINT reached the launcher.
    Signal(nix::sys::signal::Signal),
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    async fn recv(&mut self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal::{SIGINT, SIGTERM};
        tokio::select! {
            _ = self.term.recv() => SIGTERM,
            _ = self.int.recv() => SIGINT,
        }
    }

    /// Sleeps `pause`; `false` if a signal came first.
    async fn pause(&mut self, pause: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = self.recv() => false,
        }
    }
}

/// Runs agents for the configuration file `config` (`--config` is passed
/// on to each) until SIGTERM or SIGINT; `factory` is the agent run while no
/// `current` is set. Returns an error when it cannot go on: another
/// launcher holds the root, the data dir cannot be written, no agent can
/// be started.
pub async fn run_launcher(
    config_path: &Path,
    config: &LauncherConfig,
    factory: &Path,
) -> Result<(), Error> {
    let root = AgentRoot::new(&config.data_dir);
    root.create()?;
    let _lock = lock(&root.dir().join(LAUNCHER_LOCK), "launcher", Some(LOCK_WAIT))?;
    let config_path = std::path::absolute(config_path).map_err(|source| Error::Read {
        path: config_path.to_path_buf(),
        source,
    })?;
    let longest_trial = Duration::from_secs(config.agent_update_confirm_seconds);
    let signal_error = |source| Error::Launcher {
        detail: format!("cannot watch signals: {source}"),
    };
    let mut signals = Signals {
        term: signal(SignalKind::terminate()).map_err(signal_error)?,
        int: signal(SignalKind::interrupt()).map_err(signal_error)?,
    };
    tracing::info!(root = %root.dir().display(), factory = %factory.display(), "Launcher running.");
    // The trial the exits below are counted for, and how many.
    let mut trial: Option<(semver::Version, i64)> = None;
    let mut trial_exits = 0u32;
    let mut restarts = 0u32;
    loop {
        let (journal, disk) = root.scan()?;
        let key = match &journal {
            Some(Journal::Trying {
                to, started_at_ms, ..
            }) => Some((to.clone(), *started_at_ms)),
            _ => None,
        };
        if key != trial {
            trial = key;
            trial_exits = 0;
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let plan = decide(journal.as_ref(), &disk, now_ms, trial_exits);
        if let Some((version, reason)) = &plan.reverted {
            tracing::warn!(version = %version, %reason, "Reverting the agent on trial.");
        }
        root.apply(&plan)?;
        // The agent on trial runs until its deadline, never longer than the
        // confirm window configured here.
        let deadline = match (plan.journal.as_ref().or(journal.as_ref()), &plan.run) {
            (
                Some(Journal::Trying {
                    to, deadline_ms, ..
                }),
                Run::Version(running),
            ) if to == running => {
                let left = u64::try_from(deadline_ms.saturating_sub(now_ms)).unwrap_or(0);
                Some(Duration::from_millis(left).min(longest_trial))
            }
            _ => None,
        };
        let (executable, version) = match &plan.run {
            Run::Factory => (factory.to_path_buf(), String::new()),
            Run::Version(v) => (root.executable(v), v.to_string()),
        };
        let mut command = tokio::process::Command::new(&executable);
        command
            .arg("--config")
            .arg(&config_path)
            .env(LAUNCHER_PID_ENV, std::process::id().to_string())
            .env(RUNNING_VERSION_ENV, &version)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(source) if deadline.is_some() => {
                tracing::error!(executable = %executable.display(), error = %source, "Cannot start the agent on trial.");
                trial_exits += 1;
                if !signals.pause(TRIAL_RESTART_PAUSE).await {
                    return Ok(());
                }
                continue;
            }
            Err(source) => {
                return Err(Error::Launcher {
                    detail: format!("cannot start {}: {source}", executable.display()),
                });
            }
        };
        let pid = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
        tracing::info!(executable = %executable.display(), version = %if version.is_empty() { "factory" } else { &version }, pid = ?pid.map(|p| p.as_raw()), on_trial = deadline.is_some(), "Agent started.");
        let ended = tokio::select! {
            status = child.wait() => match status {
                Ok(status) => Ended::Exited(status),
                Err(source) => return Err(Error::Launcher { detail: format!("cannot wait for the agent: {source}") }),
            },
            _ = tokio::time::sleep(deadline.unwrap_or(Duration::MAX)), if deadline.is_some() => Ended::Deadline,
            sig = signals.recv() => Ended::Signal(sig),
        };
        match ended {
            Ended::Signal(sig) => {
                tracing::info!(signal = %sig, "Stopping the agent.");
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(pid, sig);
                }
                let status = child.wait().await;
                tracing::info!(status = ?status.ok(), "Agent stopped; launcher exiting.");
                return Ok(());
            }
            Ended::Deadline => {
                tracing::warn!(version = %version, "The agent on trial did not confirm itself in time; stopping it.");
                stop(&mut child, pid).await;
            }
            Ended::Exited(status) if status.code() == Some(i32::from(EXIT_SWITCHED)) => {
                tracing::info!("The agent switched to a new version; starting it.");
                restarts = 0;
            }
            Ended::Exited(status) => {
                let on_trial = deadline.is_some();
                if on_trial {
                    trial_exits += 1;
                }
                if started.elapsed() >= STABLE_RUN {
                    restarts = 0;
                }
                let pause = if on_trial {
                    TRIAL_RESTART_PAUSE
                } else {
                    restarts = restarts.saturating_add(1);
                    Duration::from_secs(1u64 << restarts.min(6).saturating_sub(1))
                        .min(MAX_RESTART_PAUSE)
                };
                tracing::warn!(status = %status, version = %version, on_trial, trial_exits, restart_in_seconds = pause.as_secs(), "The agent exited.");
                if !signals.pause(pause).await {
                    return Ok(());
                }
            }
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited after [`STOP_GRACE`].
async fn stop(child: &mut tokio::process::Child, pid: Option<nix::unistd::Pid>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_keys_from_the_agents_file_and_checks_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "server_url = \"http://127.0.0.1:7400\"\ndata_dir = \"/var/lib/posfleet-agent\"\n\
             agent_update_confirm_seconds = 60\np2p_mdns = false\n",
        )
        .unwrap();
        let config = LauncherConfig::load(&file).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/posfleet-agent"));
        assert_eq!(config.agent_update_confirm_seconds, 60);
        std::fs::write(&file, "data_dir = \"d\"\n").unwrap();
        assert_eq!(
            LauncherConfig::load(&file)
                .unwrap()
                .agent_update_confirm_seconds,
            300
        );
        for (text, key) in [
            (
                "agent_update_confirm_seconds = 1\n",
                "agent_update_confirm_seconds",
            ),
            ("data_dir = \"\"\n", "data_dir"),
        ] {
            std::fs::write(&file, text).unwrap();
            assert_eq!(LauncherConfig::load(&file).unwrap_err().key, key, "{text}");
        }
    }
}
