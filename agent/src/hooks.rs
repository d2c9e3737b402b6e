//! Running a bundle's hooks (`pre_activate`, `health_check`).
//!
//! A hook runs in the slot it belongs to (`command[0]` is relative to it,
//! unless absolute), in a process group of its own, with stdin closed and
//! stdout and stderr sharing one pipe, of which the last 4 KiB are kept for
//! the error message. A hook's processes do not outlive it: when it exits,
//! times out or is abandoned, the whole group is killed with SIGKILL, so a
//! backgrounded grandchild that keeps the output pipe open cannot hang the
//! agent.
//!
//! A hook gets exactly the environment its bundle is documented to get (the
//! variables the installer passes, plus [`HOOK_PATH`]), none of the
//! agent's: the agent's environment can hold secrets (its enrollment
//! token, a proxy's credentials). It runs as the agent's user, or as
//! `hook_user` ([`HookUser`]) when one is configured.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use posfleet_bundle::manifest::Hook;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::time::Instant;

/// Bytes of output (stdout and stderr together) kept for error messages.
pub const OUTPUT_TAIL_BYTES: usize = 4096;
/// Pause between two attempts of a hook with retries.
pub const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long output is still read once the hook's processes are gone (a
/// process that left the group may hold the pipe).
const DRAIN: Duration = Duration::from_millis(500);
/// How long a killed hook is waited for.
const REAP: Duration = Duration::from_secs(5);
/// Attempts to start a program that another process still has open for
/// writing (ETXTBSY: a fork elsewhere in the agent inherited the descriptor
/// the program was unpacked through, until that child's exec).
const SPAWN_ATTEMPTS: u32 = 10;

/// `PATH` of every hook: the system's directories, whatever the agent's is.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The user hooks run as instead of the agent's: that user's uid and
/// primary group, with no supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl HookUser {
    /// The user named `name` in the system's user database; `None` when
    /// there is none.
    pub fn lookup(name: &str) -> std::io::Result<Option<HookUser>> {
        let user = nix::unistd::User::from_name(name).map_err(std::io::Error::from)?;
        Ok(user.map(|user| HookUser {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{program}` timed out after {seconds} s{}", output_suffix(.output))]
    TimedOut {
        program: String,
        seconds: u64,
        output: String,
    },
    #[error("`{program}` {}{}", describe(.status), output_suffix(.output))]
    Failed {
        program: String,
        status: ExitStatus,
        output: String,
    },
    #[error("cannot wait for `{program}`: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
}

/// How a process ended, in words: `exited with code 1`, `was killed by SIGKILL`.
pub(crate) fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(signal) => format!("was killed by {signal}"),
            Err(_) => format!("was killed by signal {signal}"),
        },
        (None, None) => format!("ended with {status}"),
    }
}

fn output_suffix(output: &str) -> String {
    if output.is_empty() {
        ", with no output".into()
    } else {
        format!("; output: {output}")
    }
}

/// The last [`OUTPUT_TAIL_BYTES`] of a stream.
#[derive(Default)]
struct Tail {
    bytes: VecDeque<u8>,
    cut: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        if self.bytes.len() > OUTPUT_TAIL_BYTES {
            let excess = self.bytes.len() - OUTPUT_TAIL_BYTES;
            self.bytes.drain(..excess);
            self.cut = true;
        }
    }

    fn text(&self) -> String {
        let bytes: Vec<u8> = self.bytes.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        if self.cut {
            format!("…{text}")
        } else {
            text.to_string()
        }
    }
}

/// The hook's process group, killed when this is dropped (the hook finished,
/// timed out, or the future running it was dropped).
struct ProcessGroup(Pid);

impl ProcessGroup {
    fn kill(&self) {
        // ESRCH: nothing left in the group.
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(
    program: &Path,
    hook: &Hook,
    slot_dir: &Path,
    env: &[(&str, String)],
    user: Option<&HookUser>,
) -> std::io::Result<(tokio::process::Child, pipe::Receiver)> {
    let (reader, writer) = std::io::pipe()?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(&hook.command[1..])
        .current_dir(slot_dir)
        .stdin(Stdio::null())
        .stderr(writer.try_clone()?)
        .stdout(writer)
        .process_group(0)
        .kill_on_drop(true);
    // The agent's environment (its settings, secrets) is not the bundle's
    // business: the hook gets its documented variables and a fixed PATH.
    command
        .env_clear()
        .env("PATH", HOOK_PATH)
        .envs(env.iter().map(|(key, value)| (key, value)));
    if let Some(user) = user {
        // The group first, while the process may still change it; without
        // supplementary groups (the standard library drops them).
        command.gid(user.gid).uid(user.uid);
    }
    let child = command.spawn()?;
    // Close this process's copies of the pipe's write end, so that the
    // reader sees the end once the hook's processes are gone.
    drop(command);
    let output = pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    Ok((child, output))
}

/// Runs `hook` once in `slot_dir` with the environment `env` and
/// [`HOOK_PATH`], as `user` (`None`: the agent's), within the hook's
/// `timeout_seconds`.
pub async fn run_hook(
    hook: &Hook,
    slot_dir: &Path,
    env: &[(&str, String)],
    user: Option<&HookUser>,
) -> Result<(), HookError> {
    let program = hook.command.first().cloned().unwrap_or_default();
    let path = slot_dir.join(&program);
    let seconds = hook.timeout_seconds;
    let deadline = Instant::now() + Duration::from_secs(seconds);

    let mut attempt = 1;
    let (mut child, mut output) = loop {
        match spawn(&path, hook, slot_dir, env, user) {
            Ok(spawned) => break spawned,
            Err(e)
                if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
                    && attempt < SPAWN_ATTEMPTS =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(source) => return Err(HookError::Spawn { program, source }),
        }
    };
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw);
    // `id` is only `None` once the child has been waited for.
    let group = group.map(ProcessGroup);
    tracing::debug!(program = %program, slot = %slot_dir.display(), user = ?user.map(|u| &u.name), "Running hook.");

    let mut tail = Tail::default();
    let mut buf = [0u8; 4096];
    let mut open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break Some(status),
            read = output.read(&mut buf), if open => match read {
                Ok(0) | Err(_) => open = false,
                Ok(n) => tail.push(&buf[..n]),
            },
            () = tokio::time::sleep_until(deadline) => break None,
        }
    };
    // Whatever the hook left behind goes now, so the pipe ends.
    if let Some(group) = &group {
        group.kill();
    }
    let status = match status {
        Some(status) => Some(status),
        None => {
            // Reap the killed hook; bounded in case it is stuck in the kernel.
            let _ = tokio::time::timeout(REAP, child.wait()).await;
            None
        }
    };
    if open {
        let _ = tokio::time::timeout(DRAIN, async {
            while let Ok(n @ 1..) = output.read(&mut buf).await {
                tail.push(&buf[..n]);
            }
        })
        .await;
    }
    let output = tail.text();
    match status {
        None => {
            tracing::warn!(program = %program, timeout_seconds = seconds, "Hook timed out.");
            Err(HookError::TimedOut {
                program,
                seconds,
                output,
            })
        }
        Some(Err(source)) => Err(HookError::Wait { program, source }),
        Some(Ok(status)) if status.success() => Ok(()),
        Some(Ok(status)) => Err(HookError::Failed {
            program,
            status,
            output,
        }),
    }
}

/// Runs `hook` until it succeeds, at most `retries + 1` times, `pause`
/// apart ([`RETRY_PAUSE`] outside tests). The error is the last attempt's.
pub async fn run_with_retries(
    hook: &Hook,
    slot_dir: &Path,
    env: &[(&str, String)],
    user: Option<&HookUser>,
    pause: Duration,
) -> Result<(), HookError> {
    let attempts = hook.retries.saturating_add(1);
    let mut attempt = 1;
    loop {
        match run_hook(hook, slot_dir, env, user).await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < attempts => {
                tracing::info!(
                    program = %hook.command.first().map(String::as_str).unwrap_or(""),
                    attempt,
                    attempts,
                    error = %error,
                    "Hook failed; trying again."
                );
                attempt += 1;
                tokio::time::sleep(pause).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl HookError {
        /// The hook's exit code, when it exited by itself with one.
        fn exit_code(&self) -> Option<i32> {
            match self {
                HookError::Failed { status, .. } => status.code(),
                _ => None,
            }
        }

        /// The last bytes the hook wrote to stdout and stderr.
        fn output(&self) -> &str {
            match self {
                HookError::TimedOut { output, .. } | HookError::Failed { output, .. } => output,
                HookError::Spawn { .. } | HookError::Wait { .. } => "",
            }
        }
    }
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn hook(command: &[&str], timeout_seconds: u64, retries: u32) -> Hook {
        Hook {
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout_seconds,
            retries,
            interval_seconds: None,
        }
    }

    #[tokio::test]
    async fn a_hook_runs_in_its_slot_with_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "check",
            "test \"$1\" = --now && test \"$POSFLEET_X\" = y && test -f check",
        );
        let env = [("POSFLEET_X", "y".to_string())];
        run_hook(&hook(&["check", "--now"], 5, 0), dir.path(), &env, None)
            .await
            .unwrap();
        let err = run_hook(&hook(&["check", "--later"], 5, 0), dir.path(), &env, None)
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Some(1), "{err}");
    }

    #[tokio::test]
    async fn failures_carry_the_code_and_the_tail_of_the_output() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "fail",
            "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; echo boom >&2; exit 3",
        );
        let err = run_hook(&hook(&["fail"], 5, 0), dir.path(), &[], None)
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), Some(3));
        assert!(err.output().ends_with("line 1999\nboom"), "{err}");
        assert!(err.output().len() <= OUTPUT_TAIL_BYTES + "…".len());
        assert!(err.to_string().contains("exited with code 3"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_program_cannot_start() {
        let dir = tempfile::tempdir().unwrap();
        let err = run_hook(&hook(&["bin/nothing"], 5, 0), dir.path(), &[], None)
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::Spawn { .. }), "{err}");
    }

    /// The variables a hook's shell sets for itself.
    const SHELL_OWN: [&str; 4] = ["PWD", "OLDPWD", "SHLVL", "_"];

    /// `NAME=value` lines a hook wrote with `env`, without the shell's own.
    fn env_lines(path: &Path) -> Vec<(String, String)> {
        let mut lines: Vec<(String, String)> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| !SHELL_OWN.contains(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        lines.sort();
        lines
    }

    #[tokio::test]
    async fn a_hook_gets_none_of_the_agents_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env.txt");
        script(dir.path(), "dump", &format!("env > {}", out.display()));
        let env = [("POSFLEET_BUNDLE_NAME", "pos-app".to_string())];
        run_hook(&hook(&["dump"], 5, 0), dir.path(), &env, None)
            .await
            .unwrap();
        assert_eq!(
            env_lines(&out),
            [
                ("PATH".to_string(), HOOK_PATH.to_string()),
                ("POSFLEET_BUNDLE_NAME".to_string(), "pos-app".to_string()),
            ]
        );
        // The test process has an environment (cargo's, HOME…) the hook
        // would inherit if it were passed on.
        assert!(std::env::vars_os().any(|(k, _)| k != "PATH"));
    }

    #[tokio::test]
    async fn hook_user_runs_the_hook_as_that_user() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: only root can run a hook as another user");
            return;
        }
        let nobody = HookUser::lookup("nobody")
            .unwrap()
            .expect("a `nobody` user");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
        let ids = out.join("ids");
        script(
            dir.path(),
            "whoami",
            &format!("echo $(id -u) $(id -g) $(id -G) > {}", ids.display()),
        );
        run_hook(&hook(&["whoami"], 5, 0), dir.path(), &[], Some(&nobody))
            .await
            .unwrap();
        let expected = format!("{} {} {}", nobody.uid, nobody.gid, nobody.gid);
        assert_eq!(std::fs::read_to_string(&ids).unwrap().trim(), expected);
        // Without it, the agent's user (root here).
        run_hook(&hook(&["whoami"], 5, 0), dir.path(), &[], None)
            .await
            .unwrap();
        assert!(std::fs::read_to_string(&ids).unwrap().starts_with("0 0"));
        assert_eq!(HookUser::lookup("no-such-user-here").unwrap(), None);
    }
}
