//! The kill -9 campaign: an agent installing release after release is
//! killed with SIGKILL in one phase of its install after another (before
//! the download, downloading, verifying, unpacking, pre-activate, switching
//! or health check). Each trial first picks the phase, then a moment inside
//! it: the campaign watches the till's data dir until the phase shows, then
//! waits a random part of how long that phase took in a calm install. So
//! kills spread over every phase by construction, whatever each phase's
//! share of an install's time. After every kill the till must run exactly
//! one whole version (the old or the new one, never a mix), and once
//! restarted the agent must converge to the desired version.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fleet::Fleet;
use crate::{Process, enrolled_device_id, eventually, pos_app_source};

pub struct Options {
    pub trials: usize,
    /// Incompressible bytes in each release, so downloads and unpacks
    /// take long enough to be hit.
    pub payload_bytes: usize,
    /// How long each release's health check takes.
    pub health_seconds: f64,
    pub seed: u64,
}

/// The phases of an install, in order, as told from the data dir
/// ([`killed_while`]). Kills are aimed at each in turn.
pub const PHASES: [&str; 6] = [
    BEFORE_DOWNLOAD,
    "downloading",
    "verifying the download",
    "unpacking",
    "pre-activate hook",
    "switching or health check",
];
const BEFORE_DOWNLOAD: &str = "before the download";
const AFTER_INSTALL: &str = "after the install";

const STORE: &str = "kill-01";

/// How often the data dir is looked at while aiming a kill.
const POLL: Duration = Duration::from_millis(1);

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub trials: usize,
    pub seed: u64,
    pub payload_bytes: usize,
    pub command: String,
    /// The commit measured (`git describe`).
    pub commit: Option<String>,
    /// The phase each kill was aimed at.
    pub aimed_at: BTreeMap<String, usize>,
    /// Where each kill landed, as seen on disk right after it. A kill lands
    /// in a later phase than aimed when the aimed one ended before it.
    pub killed_while: BTreeMap<String, usize>,
    /// How long each phase took in the calm calibration install, in seconds.
    pub calibrated_phase_seconds: BTreeMap<String, f64>,
    /// After the kill: the old version active / the new one.
    pub active_after_kill_old: usize,
    pub active_after_kill_new: usize,
    /// Kills after which the active slot was not whole (must be 0).
    pub torn: usize,
    /// Restarts that converged to the desired version.
    pub converged: usize,
    pub median_seconds_to_converge: f64,
    /// From the agent's start to the new version confirmed, undisturbed.
    pub calibrated_install_seconds: f64,
    pub failures: Vec<String>,
}

/// The version a slot is, and whether it is whole: its payload matches the
/// digest shipped beside it and its manifest names the slot's version.
fn check_slot(slot: &Path) -> Result<String, String> {
    let name = slot
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("no slot name")?
        .to_string();
    let manifest = std::fs::read_to_string(slot.join("posfleet-bundle.toml"))
        .map_err(|e| format!("{name}: manifest: {e}"))?;
    if !manifest.contains(&format!("version = \"{name}\"")) {
        return Err(format!("{name}: manifest of another version"));
    }
    let payload =
        std::fs::read(slot.join("payload.bin")).map_err(|e| format!("{name}: payload: {e}"))?;
    let expected = std::fs::read_to_string(slot.join("payload.sha256"))
        .map_err(|e| format!("{name}: payload digest: {e}"))?;
    if hex::encode(sha2::Sha256::digest(&payload)) != expected.trim() {
        return Err(format!("{name}: payload does not match its digest"));
    }
    let program =
        std::fs::metadata(slot.join("bin/pos-app")).map_err(|e| format!("{name}: program: {e}"))?;
    if program.len() == 0 {
        return Err(format!("{name}: empty program"));
    }
    Ok(name)
}

/// The version `current` points at, checked whole; `Ok(None)` when no
/// version is installed.
pub fn active_version(data: &Path) -> Result<Option<String>, String> {
    let current = data.join("slots/pos-app/current");
    match std::fs::symlink_metadata(&current) {
        Err(_) => return Ok(None),
        Ok(meta) if !meta.file_type().is_symlink() => {
            return Err("current is not a symbolic link".into());
        }
        Ok(_) => {}
    }
    let target = std::fs::read_link(&current).map_err(|e| e.to_string())?;
    let slot = data.join("slots/pos-app").join(target);
    check_slot(&std::fs::canonicalize(&slot).map_err(|e| format!("current dangles: {e}"))?)
        .map(Some)
}

/// What the agent was doing when killed, judged from what it left in its
/// data dir on the way to `new`.
fn killed_while(data: &Path, new: &str) -> &'static str {
    let slots = data.join("slots/pos-app");
    let journal = std::fs::read_to_string(slots.join("journal.json"))
        .ok()
        .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        .unwrap_or_default();
    match journal["state"].as_str() {
        Some("activating") => return "switching or health check",
        Some("rolling_back") => return "rolling back",
        _ => {}
    }
    if active_version(data) == Ok(Some(new.to_string())) {
        return "after the install";
    }
    if slots.join(format!(".staging-{new}")).exists() {
        return "unpacking";
    }
    if slots.join(new).exists() {
        return "pre-activate hook";
    }
    let downloads: Vec<String> = std::fs::read_dir(data.join("downloads"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    if downloads.iter().any(|n| n.ends_with(".part")) {
        "downloading"
    } else if downloads.iter().any(|n| n.ends_with(".bundle")) {
        "verifying the download"
    } else {
        "before the download"
    }
}

fn version(i: usize) -> String {
    format!("1.0.{i}")
}

pub fn run(options: &Options) -> Report {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let fleet = Fleet::builder().start();
    let (cp, work) = (&fleet.cp, fleet.dir.path());
    fleet.create_store(STORE, "UTC");
    let secret = fleet.enrollment_token(STORE, 1);
    let data = work.join("till");
    // P2P stays on, as on a real till; alone in its store, the till goes to
    // the origin after the shortest fallback delay rather than the default.
    let args = fleet.agent_args(None, &["--p2p-origin-fallback-delay-seconds", "1"]);
    let start = || fleet.spawn_agent(&data, &secret, &args);
    let publish = |i: usize| {
        let src = work.join(format!("src-{i}"));
        pos_app_source(&src, &version(i), true, options.payload_bytes);
        std::fs::write(
            src.join("pos-app.conf"),
            format!("healthy=yes\nhealth_seconds={}\n", options.health_seconds),
        )
        .expect("write conf");
        cp.publish(&src, &fleet.keys);
        let _ = std::fs::remove_dir_all(&src);
    };
    let assign = |i: usize| fleet.assign(STORE, &format!("pos-app@{}", version(i)));
    let device_phase = |device: &str| -> (String, String) {
        let status = cp.bundle_status(device, "pos-app");
        let field = |k: &str| status[k].as_str().unwrap_or("").to_string();
        (field("target_version"), field("phase"))
    };

    // 1.0.0 installed undisturbed, then one release the way trials go
    // (assigned while the agent is stopped, then the agent started), watched
    // from the start to the new version confirmed healthy on disk: how long
    // each phase takes sets where in it kills fall.
    publish(0);
    let mut agent = start();
    let device = eventually("the till enrolls", Duration::from_secs(30), || {
        enrolled_device_id(&data)
    });
    assign(0);
    eventually("1.0.0 installed", Duration::from_secs(60), || {
        (device_phase(&device) == (version(0), "installed".into())).then_some(())
    });
    agent.terminate();
    let calibration = options.trials + 1;
    publish(calibration);
    assign(calibration);
    let mut agent = start();
    let seen = watch_phases(&data, &version(calibration), Duration::from_secs(60));
    agent.terminate();
    let install_time = seen.last().map(|(_, at)| *at).unwrap_or_default();
    let phase_seconds: BTreeMap<&str, f64> = seen
        .windows(2)
        .map(|w| (w[0].0, (w[1].1 - w[0].1).as_secs_f64()))
        .collect();

    let mut report = Report {
        trials: options.trials,
        seed: options.seed,
        payload_bytes: options.payload_bytes,
        command: crate::command_line(),
        commit: crate::measured_commit(),
        calibrated_phase_seconds: phase_seconds
            .iter()
            .map(|(phase, s)| (phase.to_string(), *s))
            .collect(),
        ..Report::default()
    };
    let mut converge_times = Vec::new();
    report.calibrated_install_seconds = install_time.as_secs_f64();
    let mut deck: Vec<&str> = Vec::new();
    // Trials go on from the calibration release, upwards.
    for trial in calibration + 1..=calibration + options.trials {
        // The phase first (every phase once in each round of trials, in a
        // random order), then a moment inside it.
        if deck.is_empty() {
            deck = PHASES.to_vec();
            deck.shuffle(&mut rng);
        }
        let aim = deck.pop().expect("the deck was just filled");
        *report.aimed_at.entry(aim.to_string()).or_default() += 1;
        let span = phase_seconds.get(aim).copied().unwrap_or_default();
        let delay = Duration::from_secs_f64(if span > 0.0 {
            rng.gen_range(0.0..span)
        } else {
            0.0
        });
        publish(trial);
        assign(trial);
        let mut agent: Process = start();
        aim_at(&data, &version(trial), aim, delay);
        agent.kill9();
        let phase = killed_while(&data, &version(trial));
        *report.killed_while.entry(phase.to_string()).or_default() += 1;
        match active_version(&data) {
            Ok(Some(v)) if v == version(trial) => report.active_after_kill_new += 1,
            Ok(Some(v)) if v == version(trial - 1) => report.active_after_kill_old += 1,
            Ok(other) => {
                report.torn += 1;
                report
                    .failures
                    .push(format!("trial {trial} ({phase}): active {other:?}"));
            }
            Err(error) => {
                report.torn += 1;
                report
                    .failures
                    .push(format!("trial {trial} ({phase}): {error}"));
            }
        }
        let restarted = Instant::now();
        let mut agent = start();
        let deadline = restarted + Duration::from_secs(60);
        let converged = loop {
            if device_phase(&device) == (version(trial), "installed".into())
                && active_version(&data) == Ok(Some(version(trial)))
            {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if converged {
            report.converged += 1;
            converge_times.push(restarted.elapsed().as_secs_f64());
        } else {
            report.failures.push(format!(
                "trial {trial} ({phase}): did not converge to {}; reported {:?}, active {:?}",
                version(trial),
                device_phase(&device),
                active_version(&data)
            ));
        }
        agent.terminate();
        // Older slots' blobs are not needed any more.
        let _ = std::fs::remove_file(work.join(format!("src-{trial}.bundle")));
    }
    converge_times.sort_by(f64::total_cmp);
    report.median_seconds_to_converge = converge_times
        .get(converge_times.len() / 2)
        .copied()
        .unwrap_or_default();
    report
}

fn phase_index(phase: &str) -> usize {
    PHASES
        .iter()
        .position(|p| *p == phase)
        .unwrap_or(PHASES.len())
}

/// Watches an install towards `new` from now until it is confirmed (or
/// `limit`), and returns each phase seen with when it was first seen,
/// ending with [`AFTER_INSTALL`].
fn watch_phases(data: &Path, new: &str, limit: Duration) -> Vec<(&'static str, Duration)> {
    let started = Instant::now();
    let mut seen: Vec<(&'static str, Duration)> = Vec::new();
    while started.elapsed() < limit {
        let phase = killed_while(data, new);
        if seen.last().is_none_or(|(last, _)| *last != phase) {
            seen.push((phase, started.elapsed()));
        }
        if phase == AFTER_INSTALL {
            return seen;
        }
        std::thread::sleep(POLL);
    }
    panic!("the calibration install was not confirmed within {limit:?}; phases seen: {seen:?}");
}

/// Waits until the install towards `new` shows phase `aim`, then `delay`
/// more; returns at once if the install is already past `aim` (the phase
/// was too short to see), and after a minute at most.
fn aim_at(data: &Path, new: &str, aim: &str, delay: Duration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let phase = killed_while(data, new);
        if phase == aim {
            std::thread::sleep(delay);
            return;
        }
        if phase_index(phase) > phase_index(aim) {
            return;
        }
        std::thread::sleep(POLL);
    }
}
