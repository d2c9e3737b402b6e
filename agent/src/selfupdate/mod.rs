//! The agent updating itself: versions side by side, a journal, and a
//! launcher that runs exactly one of them and takes back a new one that
//! does not confirm itself in time.
//!
//! ```text
//! <data_dir>/agent/versions/<version>/   one unpacked agent bundle, whole
//!                                        (its executable: bin/posfleet-agent)
//! <data_dir>/agent/current               symlink to versions/<version>;
//!                                        absent: the factory agent runs
//! <data_dir>/agent/journal.json          trying | confirmed | reverted
//! <data_dir>/agent/launcher.lock         flock: one launcher
//! <data_dir>/agent/agent.lock            flock: one agent
//! ```
//!
//! The running agent installs a new version (unpacked beside `versions/`,
//! renamed in, journaled `trying` with a deadline, `current` switched) and
//! exits with [`EXIT_SWITCHED`]. `posfleet-agent-launcher` starts whatever
//! [`decide`](decide::decide) says: the new agent, until it confirms
//! itself (a heartbeat answered and its lifecycle running: `confirmed`), or
//! the one before it once the deadline passes or the new one exits
//! [`MAX_TRIAL_EXITS`](decide::MAX_TRIAL_EXITS) times (`reverted`, with
//! the reason). The agent that runs after a revert reports the new
//! version `rolled_back` and never tries it again.
//!
//! - `decide`: the launcher's decision (journal, disk, clock, exits in;
//!   changes and the agent to run out), with no I/O, unit-tested;
//! - `root`: the agent root on disk, and the agent's own steps;
//! - `launcher`: the launcher's loop (child, signals, watchdog).

mod decide;
mod launcher;
mod root;

pub use decide::{Journal, MAX_TRIAL_EXITS};
pub use launcher::{DEFAULT_FACTORY_AGENT, LauncherConfig, run_launcher};
pub use root::{AGENT_DIR, AgentRoot, Outcome};

use semver::Version;

use crate::error::Error;

/// The agent's exit code after switching `current` to a new version: its
/// launcher starts the new one at once.
pub const EXIT_SWITCHED: u8 = 75;

/// Set by the launcher for its child: the launcher's process id.
pub const LAUNCHER_PID_ENV: &str = "POSFLEET_LAUNCHER_PID";
/// Set by the launcher for its child: the agent version it started (empty:
/// the factory agent).
pub const RUNNING_VERSION_ENV: &str = "POSFLEET_AGENT_RUNNING_VERSION";

/// What the lifecycle needs to install an agent bundle.
#[derive(Debug, Clone)]
pub struct SelfUpdate {
    /// `None`: not started by a launcher, so nothing would start a new
    /// version; agent bundles are refused.
    pub launched: Option<Launched>,
    /// `agent_update_confirm_seconds`.
    pub confirm: std::time::Duration,
}

/// What the launcher told the agent it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    pub launcher_pid: i32,
    /// `None`: the factory agent.
    pub version: Option<Version>,
}

impl Launched {
    /// From the environment; `None` when the agent was not started by a
    /// launcher (it cannot update itself then).
    pub fn from_env() -> Option<Launched> {
        let launcher_pid = std::env::var(LAUNCHER_PID_ENV).ok()?.parse().ok()?;
        let version = match std::env::var(RUNNING_VERSION_ENV) {
            Ok(text) if !text.is_empty() => Some(Version::parse(&text).ok()?),
            _ => None,
        };
        Some(Launched {
            launcher_pid,
            version,
        })
    }
}

/// Called first by an agent its launcher started: it dies with its
/// launcher (`PR_SET_PDEATHSIG`), and it waits until no other agent holds
/// the agent root (one killed with its launcher may still be on its way
/// out). The returned lock is held for the agent's life.
pub fn attach_to_launcher(
    launched: &Launched,
    data_dir: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    use nix::sys::signal::Signal;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| Error::Launcher {
        detail: format!("cannot ask to die with the launcher: {e}"),
    })?;
    // The launcher may have died before the line above.
    if nix::unistd::getppid().as_raw() != launched.launcher_pid {
        return Err(Error::Launcher {
            detail: "the launcher that started this agent is gone".into(),
        });
    }
    let root = AgentRoot::new(data_dir);
    root.create()?;
    launcher::lock(&root.dir().join(root::AGENT_LOCK), "agent", None)
}
