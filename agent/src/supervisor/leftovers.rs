//! Programs a killed agent left running. Each started service's process
//! group is noted in `<data_dir>/services/<bundle>.pid` (its leader's pid
//! and start time, so a pid used again by an unrelated process is never
//! taken for it) and the note removed once it is stopped. At start the
//! supervisor kills the groups of the notes it finds: an agent killed
//! outright (SIGKILL, a crash) leaves its programs running until the next
//! agent starts, never two of them side by side.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};

/// The notes' folder in the data dir.
pub const SERVICES_DIR: &str = "services";

/// A process's start time (clock ticks after boot), from `/proc`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After `pid (comm)`, the start time is the 20th field.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The notes of one data dir.
#[derive(Debug, Clone)]
pub struct Notes {
    dir: PathBuf,
}

impl Notes {
    pub fn new(data_dir: &Path) -> Notes {
        Notes {
            dir: data_dir.join(SERVICES_DIR),
        }
    }

    fn path(&self, bundle: &str) -> PathBuf {
        self.dir.join(format!("{bundle}.pid"))
    }

    /// Notes that `bundle`'s service leads process group `pid`. A note
    /// that cannot be written only costs the clean-up after a kill.
    pub fn started(&self, bundle: &str, pid: i32) {
        let Some(start) = start_time(pid) else {
            return;
        };
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(self.path(bundle), format!("{pid} {start}\n")));
        if let Err(error) = written {
            tracing::warn!(bundle = %bundle, %error, "Cannot note the service's process.");
        }
    }

    /// `bundle`'s service is stopped.
    pub fn stopped(&self, bundle: &str) {
        let _ = std::fs::remove_file(self.path(bundle));
    }

    /// Kills the process groups the notes name that still run, and removes
    /// the notes.
    pub fn kill_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let note = std::fs::read_to_string(&path).unwrap_or_default();
            let mut words = note.split_whitespace().map(str::parse::<u64>);
            if let (Some(Ok(pid)), Some(Ok(start))) = (words.next(), words.next())
                && let Ok(pid) = i32::try_from(pid)
                && start_time(pid) == Some(start)
            {
                tracing::warn!(pid, note = %path.display(), "Killing a program a stopped agent left running.");
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noted_group_that_runs_is_killed_and_a_reused_pid_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let notes = Notes::new(dir.path());
        let spawn = || {
            let mut command = std::process::Command::new("sleep");
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            command.arg("60").spawn().unwrap()
        };
        let mut left = spawn();
        let mut other = spawn();
        notes.started("pos-app", left.id() as i32);
        notes.started("scale", other.id() as i32);
        // `scale`'s pid now names another process (a different start time).
        let path = notes.path("scale");
        let note = std::fs::read_to_string(&path).unwrap();
        let (pid, start) = note.trim().split_once(' ').unwrap();
        std::fs::write(
            &path,
            format!("{pid} {}", start.parse::<u64>().unwrap() + 1),
        )
        .unwrap();
        notes.kill_leftovers();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(left.wait().unwrap().signal(), Some(9));
        assert!(other.try_wait().unwrap().is_none(), "not the same process");
        assert_eq!(
            std::fs::read_dir(dir.path().join(SERVICES_DIR))
                .unwrap()
                .count(),
            0
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
