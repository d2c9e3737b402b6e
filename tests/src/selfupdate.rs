//! Tills that update their own agent: each runs `posfleet-agent-launcher`
//! on a configuration file, with the agent cargo built as its factory
//! agent, and agent releases are bundles holding that same agent binary.
//! A bad release holds it too, started pointed at a port nothing answers
//! on: a real agent that never reaches the control plane.
//!
//! [`campaign`] is the kill -9 campaign over self-updates: release after
//! release (every fourth one bad), the launcher, the agent or both are
//! killed with SIGKILL at a random moment of the update; after each kill
//! `current` must name a whole agent (or none: the factory one), the
//! launcher started again must run exactly one agent, and the till must
//! settle: the new version confirmed, or reverted to the one before.

use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::fleet::Fleet;
use crate::{Process, binary, enrolled_device_id, eventually};

/// The agent bundle's name, as the bundle crate fixes it.
pub const AGENT: &str = posfleet_bundle::manifest::AGENT_BUNDLE_NAME;

/// The source of agent release `version` in `dir`: the agent cargo built
/// as `bin/posfleet-agent`; a bad one (`good = false`) runs it with
/// `POSFLEET_SERVER_URL` pointing at the discard port, so that it never
/// reaches the control plane.
pub fn agent_source(dir: &Path, version: &str, good: bool) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("create bin");
    std::fs::write(
        dir.join("posfleet-bundle.toml"),
        format!(
            "name = \"{AGENT}\"\nversion = \"{version}\"\nkind = \"agent\"\nhardware = [\"*\"]\n"
        ),
    )
    .expect("write manifest");
    let real = if good {
        "posfleet-agent"
    } else {
        "posfleet-agent.real"
    };
    std::fs::copy(binary("posfleet-agent"), bin.join(real)).expect("copy the agent");
    if !good {
        let script = bin.join("posfleet-agent");
        std::fs::write(
            &script,
            "#!/bin/sh\n# The real agent, pointed where nothing answers.\n\
             POSFLEET_SERVER_URL=http://127.0.0.1:9 exec \"$(dirname \"$0\")/posfleet-agent.real\" \"$@\"\n",
        )
        .expect("write the script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the script");
    }
    dir.to_path_buf()
}

/// Builds and publishes agent release `version` signed with the fleet's
/// keys; the source and bundle files are removed afterwards.
pub fn publish_agent(fleet: &Fleet, version: &str, good: bool) {
    let src = fleet.dir.path().join(format!("agent-{version}"));
    agent_source(&src, version, good);
    let file = fleet.cp.publish(&src, &fleet.keys);
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_file(file);
}

/// One till run by a launcher.
pub struct LaunchedTill {
    pub data: PathBuf,
    pub config: PathBuf,
    pub launcher: Option<Process>,
}

impl LaunchedTill {
    /// Writes the till's configuration (the fleet's control plane and
    /// repository, `token` to enroll with, `confirm_seconds` for new agent
    /// versions) in `data`'s folder, and starts its launcher.
    pub fn start(fleet: &Fleet, data: &Path, token: &str, confirm_seconds: u64) -> LaunchedTill {
        let args = fleet.cp.repository_args(&fleet.keys);
        let value = |flag: &str| {
            let at = args.iter().position(|a| a == flag).expect("flag");
            args[at + 1].clone()
        };
        let config = data.with_extension("toml");
        let text = format!(
            "server_url = {:?}\ndata_dir = {:?}\nenrollment_token = {:?}\n\
             root_json_path = {:?}\nrepository_url = {:?}\nlog_format = \"json\"\n\
             max_backoff_seconds = 2\ninstall_check_interval_seconds = 1\n\
             p2p_listen_addrs = [\"/ip4/127.0.0.1/tcp/0\"]\np2p_mdns = false\n\
             p2p_origin_fallback_delay_seconds = 1\nagent_update_confirm_seconds = {confirm_seconds}\n",
            fleet.cp.url(),
            data.to_str().expect("utf-8 path"),
            token,
            value("--root-json-path"),
            value("--repository-url"),
        );
        crate::write_private(&config, &text);
        let mut till = LaunchedTill {
            data: data.to_path_buf(),
            config,
            launcher: None,
        };
        till.start_launcher();
        till
    }

    /// Starts the launcher (again), with the agent cargo built as its
    /// factory agent.
    pub fn start_launcher(&mut self) {
        let mut command = Command::new(binary("posfleet-agent-launcher"));
        command
            .arg("--config")
            .arg(&self.config)
            .arg("--factory-agent")
            .arg(binary("posfleet-agent"));
        self.launcher = Some(Process::spawn(command));
    }

    pub fn device_id(&self) -> String {
        eventually("the till enrolls", crate::fleet::TIMEOUT, || {
            enrolled_device_id(&self.data)
        })
    }

    /// The running agent processes of this till (not zombies): processes
    /// of the agent's executable (`posfleet-agent`, or the `.real` one a bad
    /// release runs) given this till's configuration.
    pub fn agent_processes(&self) -> Vec<i32> {
        let config = self.config.to_str().expect("utf-8 path");
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let program = args
                .first()
                .and_then(|a| Path::new(a).file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let agent = program == "posfleet-agent" || program == "posfleet-agent.real";
            let ours = args
                .windows(2)
                .any(|w| w[0] == "--config" && w[1] == config);
            let zombie = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            if agent && ours && !zombie {
                pids.push(pid);
            }
        }
        pids
    }

    /// The self-update journal, parsed (null when absent).
    pub fn journal(&self) -> Value {
        std::fs::read(self.data.join("agent/journal.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The agent version `current` names, checked runnable: `Ok(None)`
    /// when there is no `current` (the factory agent runs).
    pub fn current(&self) -> Result<Option<String>, String> {
        current_agent(&self.data)
    }

    /// SIGKILL to the launcher; its agent dies with it.
    pub fn kill_launcher(&mut self) {
        if let Some(mut launcher) = self.launcher.take() {
            launcher.kill9();
        }
    }

    /// SIGKILL to the agent processes, not the launcher.
    pub fn kill_agents(&self) {
        for pid in self.agent_processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The version `<data>/agent/current` names, with its folder whole: its
/// manifest names that version and its executable is runnable.
pub fn current_agent(data: &Path) -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let root = data.join("agent");
    let current = root.join("current");
    match std::fs::symlink_metadata(&current) {
        Err(_) => return Ok(None),
        Ok(meta) if !meta.file_type().is_symlink() => {
            return Err("current is not a symbolic link".into());
        }
        Ok(_) => {}
    }
    let target = std::fs::read_link(&current).map_err(|e| e.to_string())?;
    let version = target
        .strip_prefix("versions")
        .ok()
        .and_then(|v| v.to_str())
        .ok_or(format!("current points at {}", target.display()))?
        .to_string();
    let dir = root.join(&target);
    let manifest = std::fs::read_to_string(dir.join("posfleet-bundle.toml"))
        .map_err(|e| format!("current ({version}) dangles: {e}"))?;
    if !manifest.contains(&format!("version = \"{version}\"")) {
        return Err(format!("{version}: manifest of another version"));
    }
    let exe = std::fs::metadata(dir.join("bin/posfleet-agent"))
        .map_err(|e| format!("{version}: no executable: {e}"))?;
    if !exe.is_file() || exe.permissions().mode() & 0o111 == 0 || exe.len() == 0 {
        return Err(format!("{version}: executable not runnable"));
    }
    Ok(Some(version))
}

pub struct Options {
    pub trials: usize,
    pub seed: u64,
    /// `agent_update_confirm_seconds` of the till.
    pub confirm_seconds: u64,
    /// Every `bad_every`-th release never reaches the control plane.
    pub bad_every: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub trials: usize,
    pub seed: u64,
    pub confirm_seconds: u64,
    pub command: String,
    /// The commit measured (`git describe`).
    pub commit: Option<String>,
    /// What was killed, per trial.
    pub killed: BTreeMap<String, usize>,
    /// The journal's state right after each kill (`none` before any).
    pub killed_while: BTreeMap<String, usize>,
    /// From the assignment to the new version confirmed, undisturbed.
    pub calibrated_update_seconds: f64,
    /// Kills after which `current` named nothing runnable (must be 0).
    pub torn: usize,
    /// Moments at which two agents of the till ran at once (must be 0).
    pub two_agents: usize,
    /// Trials after which one agent did not settle running (must be 0).
    pub not_one_agent: usize,
    /// Good releases confirmed / reverted (a kill may cost one its trial);
    /// bad releases reverted (all of them must be).
    pub good_confirmed: usize,
    pub good_reverted: usize,
    pub bad_reverted: usize,
    /// Trials that settled, and reported what they settled on.
    pub converged: usize,
    pub median_seconds_to_converge: f64,
    pub failures: Vec<String>,
}

fn version(i: usize) -> String {
    format!("1.0.{i}")
}

/// What the till settled on for release `version`: `confirmed` or
/// `reverted` in the journal, agreed by what the control plane shows.
fn settled(
    fleet: &Fleet,
    till: &LaunchedTill,
    device: &str,
    version: &str,
) -> Option<&'static str> {
    let journal = till.journal();
    let status = fleet.cp.bundle_status(device, AGENT);
    let phase = status["phase"].as_str().unwrap_or_default();
    let target = status["target_version"] == version;
    match journal["state"].as_str() {
        Some("confirmed") if journal["version"] == version && target && phase == "installed" => {
            Some("confirmed")
        }
        Some("reverted") if journal["to"] == version && target && phase == "rolled_back" => {
            Some("reverted")
        }
        _ => None,
    }
}

pub fn campaign(options: &Options) -> Report {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let fleet = Fleet::builder().start();
    fleet.create_store("self-01", "UTC");
    let token = fleet.enrollment_token("self-01", 1);
    let data = fleet.dir.path().join("till");
    let mut till = LaunchedTill::start(&fleet, &data, &token, options.confirm_seconds);
    let device = till.device_id();
    let assign = |v: &str| fleet.assign("self-01", &format!("{AGENT}@{v}"));
    let mut report = Report {
        trials: options.trials,
        seed: options.seed,
        confirm_seconds: options.confirm_seconds,
        command: crate::command_line(),
        commit: crate::measured_commit(),
        ..Report::default()
    };

    // The first release from the factory agent, undisturbed: how long an
    // update takes sets the span kills fall in.
    publish_agent(&fleet, &version(0), true);
    let started = Instant::now();
    assign(&version(0));
    eventually(
        "the first agent release confirmed",
        crate::fleet::TIMEOUT,
        || {
            settled(&fleet, &till, &device, &version(0))
                .filter(|s| *s == "confirmed")
                .map(|_| ())
        },
    );
    let span = started.elapsed();
    report.calibrated_update_seconds = span.as_secs_f64();
    let mut running = Some(version(0));
    let mut times = Vec::new();

    for trial in 1..=options.trials {
        let new = version(trial);
        let good = options.bad_every == 0 || trial % options.bad_every != 0;
        publish_agent(&fleet, &new, good);
        assign(&new);
        // A bad release is killed during its trial too: its span is the
        // confirm window longer.
        let longest = if good {
            span
        } else {
            span + Duration::from_secs(options.confirm_seconds)
        };
        std::thread::sleep(longest.mul_f64(rng.gen_range(0.0..1.0)));
        let target = ["launcher", "agent", "both"][rng.gen_range(0..3)];
        match target {
            "launcher" => till.kill_launcher(),
            "agent" => till.kill_agents(),
            _ => {
                till.kill_agents();
                till.kill_launcher();
            }
        }
        *report.killed.entry(target.to_string()).or_default() += 1;
        let state = till.journal()["state"]
            .as_str()
            .unwrap_or("none")
            .to_string();
        *report.killed_while.entry(state.clone()).or_default() += 1;
        if let Err(error) = till.current() {
            report.torn += 1;
            report
                .failures
                .push(format!("trial {trial} ({target}, {state}): {error}"));
        }
        let restarted = Instant::now();
        if till.launcher.is_none() {
            till.start_launcher();
        }
        let deadline =
            restarted + Duration::from_secs(options.confirm_seconds) + crate::fleet::TIMEOUT;
        let mut two = false;
        let outcome = loop {
            if till.agent_processes().len() > 1 {
                two = true;
            }
            if let Some(outcome) = settled(&fleet, &till, &device, &new) {
                break Some(outcome);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if two {
            report.two_agents += 1;
            report.failures.push(format!(
                "trial {trial} ({target}, {state}): two agents at once"
            ));
        }
        let Some(outcome) = outcome else {
            report.failures.push(format!(
                "trial {trial} ({target}, {state}): {new} did not settle; journal {}, reported {}",
                till.journal(),
                fleet.cp.bundle_status(&device, AGENT)
            ));
            continue;
        };
        times.push(restarted.elapsed().as_secs_f64());
        let expected = match (outcome, good) {
            ("confirmed", true) => {
                report.good_confirmed += 1;
                Some(new.clone())
            }
            ("reverted", true) => {
                report.good_reverted += 1;
                running.clone()
            }
            ("reverted", false) => {
                report.bad_reverted += 1;
                running.clone()
            }
            _ => {
                report.failures.push(format!(
                    "trial {trial} ({target}, {state}): a bad release was confirmed"
                ));
                Some(new.clone())
            }
        };
        // Exactly one agent runs, the one `current` names.
        let one = eventually_one(&till, Duration::from_secs(30));
        let current = till.current();
        if !one || current != Ok(expected.clone()) {
            report.not_one_agent += 1;
            report.failures.push(format!(
                "trial {trial} ({target}, {state}): {outcome}; agents {:?}, current {current:?}, expected {expected:?}",
                till.agent_processes()
            ));
        } else {
            report.converged += 1;
        }
        running = expected;
    }
    times.sort_by(f64::total_cmp);
    report.median_seconds_to_converge = times.get(times.len() / 2).copied().unwrap_or_default();
    report
}

/// Waits until exactly one agent of `till` runs; false after `limit`.
fn eventually_one(till: &LaunchedTill, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if till.agent_processes().len() == 1 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
