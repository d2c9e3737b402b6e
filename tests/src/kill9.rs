//! The kill -9 campaign: an agent installing release after release is
//! killed with SIGKILL at a random moment of its download, unpack,
//! pre-activate, switch or health check. After every kill the till must
//! run exactly one whole version (the old or the new one, never a mix),
//! and once restarted the agent must converge to the desired version.

use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::Digest;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{
    ControlPlane, Process, check_ok, enrolled_device_id, eventually, pos_app_source, start_agent,
};

pub struct Options {
    pub trials: usize,
    /// Incompressible bytes in each release, so downloads and unpacks
    /// take long enough to be hit.
    pub payload_bytes: usize,
    /// How long each release's health check takes.
    pub health_seconds: f64,
    pub seed: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub trials: usize,
    pub seed: u64,
    pub payload_bytes: usize,
    /// Where each kill landed, as seen on disk right after it.
    pub killed_while: std::collections::BTreeMap<String, usize>,
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

pub fn run(options: &Options, work: &Path) -> Report {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let cp = ControlPlane::start(
        &work.join("cp"),
        None,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--heartbeat-interval-seconds", "1"],
    );
    let keys = work.join("keys");
    cp.init_repository(&keys);
    cp.cli_json(&[
        "store",
        "create",
        "kill-01",
        "--name",
        "Kill",
        "--time-zone",
        "UTC",
    ]);
    let token = cp.cli_json(&["enroll-token", "create", "--store", "kill-01"]);
    let secret = token["secret"].as_str().expect("secret").to_string();
    let data = work.join("till");
    let mut args = cp.repository_args(&keys);
    args.extend(["--install-check-interval-seconds".into(), "1".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = || start_agent(&cp.url(), &data, &secret, &args);
    let publish = |i: usize| {
        let src = work.join(format!("src-{i}"));
        pos_app_source(&src, &version(i), true, options.payload_bytes);
        std::fs::write(
            src.join("pos-app.conf"),
            format!("healthy=yes\nhealth_seconds={}\n", options.health_seconds),
        )
        .expect("write conf");
        cp.publish(&src, &keys);
        let _ = std::fs::remove_dir_all(&src);
    };
    let assign = |i: usize| {
        check_ok(cp.cli(&[
            "device",
            "assign",
            "--store",
            "kill-01",
            &format!("pos-app@{}", version(i)),
        ]));
    };
    let device_phase = |device: &str| -> (String, String) {
        let status = cp.bundle_status(device, "pos-app");
        let field = |k: &str| status[k].as_str().unwrap_or("").to_string();
        (field("target_version"), field("phase"))
    };

    // 1.0.0 installed undisturbed, then one release the way trials go
    // (assigned while the agent is stopped, then the agent started), timed
    // from the start to the new version confirmed healthy on disk: kills
    // fall in that span.
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
    let started = Instant::now();
    let mut agent = start();
    eventually(
        "the calibration release confirmed",
        Duration::from_secs(60),
        || (killed_while(&data, &version(calibration)) == "after the install").then_some(()),
    );
    let install_time = started.elapsed();
    agent.terminate();

    let mut report = Report {
        trials: options.trials,
        seed: options.seed,
        payload_bytes: options.payload_bytes,
        ..Report::default()
    };
    let mut converge_times = Vec::new();
    report.calibrated_install_seconds = install_time.as_secs_f64();
    // Trials go on from the calibration release, upwards.
    for trial in calibration + 1..=calibration + options.trials {
        publish(trial);
        assign(trial);
        let mut agent: Process = start();
        // Anywhere from start-up to the end of a calm install.
        let delay = rng.gen_range(0.0..install_time.as_secs_f64());
        std::thread::sleep(Duration::from_secs_f64(delay));
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
