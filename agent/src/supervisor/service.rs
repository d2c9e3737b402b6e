//! One active version's programs: its `[service]`, restarted whenever it
//! exits, and its periodic health check, both until told to stop.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use posfleet_bundle::manifest::{Hook, Service};
use posfleet_proto::signals::{
    HEALTH_CHECK_FAILURES, HEALTH_CHECK_SECONDS, SERVICE_CRASHES, SERVICE_RESTARTS,
};
use semver::Version;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Context;
use super::decide::{QUICK_CRASH, restart_delay};
use crate::hooks::{self, HOOK_PATH};

/// What runs for one bundle's active version.
#[derive(Debug, Clone)]
pub struct Unit {
    pub name: String,
    pub version: Version,
    pub slot: PathBuf,
    pub service: Option<Service>,
    /// The health check, when it has an `interval_seconds`.
    pub health_check: Option<Hook>,
}

impl Unit {
    /// The environment of the service and the periodic health check: the
    /// bundle's variables, the signal socket and a fixed PATH, none of the
    /// agent's own.
    fn env(&self, context: &Context) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PATH", HOOK_PATH.to_string()),
            ("POSFLEET_BUNDLE_NAME", self.name.clone()),
            ("POSFLEET_BUNDLE_VERSION", self.version.to_string()),
            ("POSFLEET_SLOT_DIR", self.slot.display().to_string()),
            (
                crate::signals::socket::SOCKET_ENV,
                context.socket.display().to_string(),
            ),
        ];
        if let Some(agent) = &context.agent_executable {
            env.push(("POSFLEET_AGENT", agent.display().to_string()));
        }
        env
    }
}

/// A service's process group, killed when this is dropped (the agent
/// stopped, or the task running it was dropped).
struct Group(Option<Pid>);

impl Group {
    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.0 {
            // ESRCH: nothing left in the group.
            let _ = killpg(pid, signal);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

fn spawn(
    unit: &Unit,
    service: &Service,
    context: &Context,
) -> std::io::Result<tokio::process::Child> {
    let program = unit.slot.join(&service.command[0]);
    let mut command = tokio::process::Command::new(program);
    command
        .args(&service.command[1..])
        .current_dir(&unit.slot)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .env_clear()
        .envs(unit.env(context));
    if let Some(user) = &context.hook_user {
        command.gid(user.gid).uid(user.uid);
    }
    command.spawn()
}

/// Runs `unit` until `stop` turns true.
pub async fn run(unit: Unit, context: std::sync::Arc<Context>, stop: watch::Receiver<bool>) {
    let service = async {
        if let Some(service) = &unit.service {
            supervise(&unit, service, &context, stop.clone()).await;
        }
    };
    let health = async {
        if let Some(hook) = &unit.health_check {
            check_health(&unit, hook, &context, stop.clone()).await;
        }
    };
    tokio::join!(service, health);
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    // A dropped sender means the supervisor is gone: stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Keeps `service` running: started again after each exit (counted in
/// `service_crashes` when it failed), after a delay that grows while it
/// keeps crashing quickly. Stopped with SIGTERM, then SIGKILL after the
/// stop timeout; that is not a crash.
async fn supervise(unit: &Unit, service: &Service, context: &Context, stop: watch::Receiver<bool>) {
    let base = Duration::from_secs(service.restart_delay_seconds);
    let mut quick_crashes = 0;
    let mut first = true;
    loop {
        if !first {
            context.signals.count(SERVICE_RESTARTS, 1);
        }
        first = false;
        let started = Instant::now();
        let crashed = match spawn(unit, service, context) {
            Ok(mut child) => {
                let pid = child.id().and_then(|id| i32::try_from(id).ok());
                let group = Group(pid.map(Pid::from_raw));
                if let Some(pid) = pid {
                    context.notes.started(&unit.name, pid);
                }
                tracing::info!(bundle = %unit.name, version = %unit.version, pid = ?child.id(), "Service started.");
                tokio::select! {
                    status = child.wait() => {
                        // Whatever it left behind goes with it.
                        group.signal(Signal::SIGKILL);
                        context.notes.stopped(&unit.name);
                        match status {
                            Ok(status) if status.success() => {
                                tracing::info!(bundle = %unit.name, version = %unit.version, "Service exited.");
                                false
                            }
                            Ok(status) => {
                                tracing::warn!(bundle = %unit.name, version = %unit.version, status = %hooks::describe(&status), "Service crashed.");
                                true
                            }
                            Err(error) => {
                                tracing::error!(bundle = %unit.name, %error, "Cannot wait for the service.");
                                true
                            }
                        }
                    }
                    () = stopped(stop.clone()) => {
                        terminate(unit, child, group, context.stop_timeout).await;
                        context.notes.stopped(&unit.name);
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::error!(bundle = %unit.name, version = %unit.version, %error, "Cannot start the service.");
                true
            }
        };
        if crashed {
            context.signals.count(SERVICE_CRASHES, 1);
        }
        let delay = restart_delay(base, quick_crashes);
        quick_crashes = if crashed && started.elapsed() < QUICK_CRASH {
            quick_crashes.saturating_add(1)
        } else {
            0
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(stop.clone()) => return,
        }
    }
}

/// SIGTERM to the service's group, SIGKILL after `timeout`.
async fn terminate(unit: &Unit, mut child: tokio::process::Child, group: Group, timeout: Duration) {
    group.signal(Signal::SIGTERM);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(_) => {
            tracing::info!(bundle = %unit.name, version = %unit.version, "Service stopped.")
        }
        Err(_) => {
            tracing::warn!(bundle = %unit.name, version = %unit.version, timeout_seconds = timeout.as_secs(), "Service did not stop on SIGTERM; killed.");
            group.signal(Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
    // `group` drops here: anything left in it is killed.
}

/// Runs `hook` every `interval_seconds` while the version is active,
/// reporting how long each run took (`health_check_seconds`) and each
/// failure (`health_check_failures`). It decides nothing: the install's
/// own health check is what rolls back.
async fn check_health(unit: &Unit, hook: &Hook, context: &Context, stop: watch::Receiver<bool>) {
    let Some(seconds) = hook.interval_seconds else {
        return;
    };
    let env = unit.env(context);
    let env: Vec<(&str, String)> = env.into_iter().collect();
    let mut interval = tokio::time::interval(Duration::from_secs(seconds));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the install just ran one.
    interval.tick().await;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stopped(stop.clone()) => return,
        }
        let started = Instant::now();
        let result = tokio::select! {
            result = hooks::run_hook(hook, &unit.slot, &env, context.hook_user.as_ref()) => result,
            () = stopped(stop.clone()) => return,
        };
        context
            .signals
            .value(HEALTH_CHECK_SECONDS, started.elapsed().as_secs_f64());
        if let Err(error) = result {
            tracing::warn!(bundle = %unit.name, version = %unit.version, %error, "Periodic health check failed.");
            context.signals.count(HEALTH_CHECK_FAILURES, 1);
        }
    }
}
