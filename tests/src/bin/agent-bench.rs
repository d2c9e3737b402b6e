//! agent-bench: the agent's footprint on a till. A control plane and one
//! enrolled agent (release builds) heartbeating at the default interval:
//! resident memory and CPU time are read from /proc while it idles, then
//! its peak resident memory (VmHWM) while it downloads, verifies, unpacks
//! and installs a large bundle, then (the peak reset) while it rebuilds a
//! point release of that bundle from a delta and installs it. Figures go
//! to a JSON file.
//!
//!     cargo run --release -p posfleet-e2e --bin agent-bench

use anyhow::{Context, ensure};
use clap::Parser;
use posfleet_e2e::{
    ControlPlane, check_ok, command_line, cpu_seconds, enrolled_device_id, eventually,
    pos_app_source, start_agent, status_kib,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(about = "Measure the agent's idle and installing footprint.")]
struct Args {
    /// How long to watch the idle agent.
    #[arg(long, default_value_t = 600)]
    idle_seconds: u64,
    /// Size of the bundle installed afterwards.
    #[arg(long, default_value_t = 500)]
    bundle_mib: u64,
    #[arg(long, default_value = "benchmarks/agent-bench.json")]
    output: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    /// The commit measured (`git describe`).
    commit: Option<String>,
    /// Besides the repository's: P2P as a till runs it by default, the
    /// libp2p task and mDNS on.
    agent_args: Vec<String>,
    heartbeat_interval_seconds: u64,
    idle_seconds: u64,
    idle_rss_median_mib: f64,
    idle_rss_max_mib: f64,
    /// CPU time over the idle period, as a percentage of one core.
    idle_cpu_percent_of_one_core: f64,
    bundle_mib: u64,
    bundle_file_mib: f64,
    /// From the assignment to the install confirmed, as the control plane
    /// sees it (includes waiting for the next heartbeat, up to 30 s).
    install_seconds: f64,
    /// From the agent receiving the assignment to the bundle installed, by
    /// its own log.
    install_agent_seconds: f64,
    /// VmHWM of the agent process after the install.
    peak_rss_mib: f64,
    /// The point release (the same files, its version changed) published
    /// with a delta from the release installed.
    delta_bytes: u64,
    /// From its assignment to it confirmed installed.
    delta_install_seconds: f64,
    /// From the agent receiving the assignment to the bundle installed, by
    /// its own log.
    delta_install_agent_seconds: f64,
    /// What the agent logged for rebuilding it: packing the installed
    /// version, fetching the delta, applying it, hashing the result.
    delta_rebuild_seconds: f64,
    /// VmHWM of the agent process over that install alone (reset before).
    delta_peak_rss_mib: f64,
    targets: Targets,
}

#[derive(Debug, Serialize)]
struct Targets {
    idle_rss_mib_below: f64,
    idle_cpu_percent_below: f64,
    peak_rss_mib_below: f64,
    met: bool,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn device_status(cp: &ControlPlane, device: &str) -> (String, String, String) {
    let status = cp.bundle_status(device, "pos-app");
    let field = |k: &str| status[k].as_str().unwrap_or("").to_string();
    (field("target_version"), field("phase"), field("error"))
}

/// Waits (30 min at most) until `device` reports pos-app `version`
/// installed; fails on a failed install.
fn wait_installed(cp: &ControlPlane, device: &str, version: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let (target, phase, error) = device_status(cp, device);
        if target == version && phase == "installed" {
            return Ok(());
        }
        ensure!(
            !matches!(phase.as_str(), "failed" | "rolled_back"),
            "the install failed: {error}"
        );
        ensure!(
            Instant::now() < deadline,
            "the install did not end in 30 min"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Seconds from the agent's first new desired state after `since` to its
/// first bundle installed after that, by its log.
fn agent_seconds(agent: &posfleet_e2e::Process, since: Instant) -> anyhow::Result<f64> {
    let desired = agent
        .first_since("New desired state.", since)
        .context("no new desired state logged")?;
    let installed = agent
        .first_since("Bundle installed.", desired)
        .context("no install logged")?;
    Ok((installed - desired).as_secs_f64())
}

/// Publishes pos-app `version`: the release built from `src` (kept) with
/// its version changed, and a delta to it from that release (its bundle
/// beside `src`). Returns the delta's size.
fn publish_point_release(
    cp: &ControlPlane,
    keys: &Path,
    src: &Path,
    version: &str,
) -> anyhow::Result<u64> {
    let point = src.with_file_name(format!("pos-app-{version}"));
    check_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .args([src, &point])
            .output()?,
    );
    let manifest = point.join("posfleet-bundle.toml");
    let text = std::fs::read_to_string(&manifest)?;
    let text = text.replace("version = \"2.0.0\"", &format!("version = \"{version}\""));
    std::fs::write(&manifest, text)?;
    let file = cp.build_bundle(&point, &point.with_extension("bundle"));
    let utf8 = |p: &Path| p.to_str().map(str::to_string).context("a UTF-8 path");
    check_ok(cp.cli(&[
        "bundle",
        "publish",
        &utf8(&file)?,
        "--keys",
        &utf8(keys)?,
        "--delta-from",
        &utf8(&src.with_extension("bundle"))?,
    ]));
    std::fs::remove_dir_all(&point)?;
    let listed = cp.cli_json(&["bundle", "list", "--name", "pos-app"]);
    let delta = format!("pos-app/{version}/from-2.0.0.delta");
    listed
        .as_array()
        .and_then(|l| l.iter().find(|b| b["target"] == delta.as_str()))
        .and_then(|b| b["length"].as_u64())
        .with_context(|| format!("{delta} is not listed"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = tempfile::Builder::new()
        .prefix("posfleet-agent-bench-")
        .tempdir()?;
    let dir = work.path();
    let cp = ControlPlane::start(&dir.join("cp"), None, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let keys = dir.join("keys");
    cp.init_repository(&keys);
    cp.cli_json(&[
        "store",
        "create",
        "bench-01",
        "--name",
        "Bench",
        "--time-zone",
        "UTC",
    ]);
    let token = cp.cli_json(&["enroll-token", "create", "--store", "bench-01"]);
    let secret = token["secret"].as_str().context("secret")?.to_string();

    // The big release is built and published first, so that building it
    // does not compete with the idle measurement.
    eprintln!(
        "Building and publishing a {} MiB bundle...",
        args.bundle_mib
    );
    let src = dir.join("pos-app-2.0.0");
    pos_app_source(&src, "2.0.0", true, (args.bundle_mib * MIB) as usize);
    let bundle = cp.publish(&src, &keys);
    let bundle_file_mib = std::fs::metadata(&bundle)?.len() as f64 / MIB as f64;

    let data = dir.join("till");
    // The test harness turns mDNS off unless told; a till has it on.
    let agent_args = ["--p2p-mdns", "true"].map(String::from).to_vec();
    let mut all_args = cp.repository_args(&keys);
    all_args.extend(agent_args.iter().cloned());
    let all_args: Vec<&str> = all_args.iter().map(String::as_str).collect();
    let agent = start_agent(&cp.url(), &data, &secret, &all_args);
    let pid = agent.pid().as_raw();
    let device = eventually("the till enrolls", Duration::from_secs(30), || {
        enrolled_device_id(&data)
    });
    // Let start-up settle (first heartbeat, repository refresh).
    std::thread::sleep(Duration::from_secs(5));

    eprintln!("Watching the idle agent for {} s...", args.idle_seconds);
    let cpu_before = cpu_seconds(pid).context("the process is gone")?;
    let started = Instant::now();
    let mut rss = Vec::new();
    while started.elapsed() < Duration::from_secs(args.idle_seconds) {
        rss.push(status_kib(pid, "VmRSS:").context("the process is gone")? as f64 / 1024.0);
        std::thread::sleep(Duration::from_secs(1));
    }
    let idle_cpu = cpu_seconds(pid).context("the process is gone")? - cpu_before;
    let idle_elapsed = started.elapsed().as_secs_f64();
    let idle_rss_max_mib = rss.iter().copied().fold(0.0, f64::max);
    let idle_rss_median_mib = median(&mut rss);

    eprintln!("Installing the {} MiB bundle...", args.bundle_mib);
    let install_started = Instant::now();
    check_ok(cp.cli(&["device", "assign", &device, "pos-app@2.0.0"]));
    wait_installed(&cp, &device, "2.0.0")?;
    let install_seconds = install_started.elapsed().as_secs_f64();
    let install_agent_seconds = agent_seconds(&agent, install_started)?;
    let peak_rss_mib = status_kib(pid, "VmHWM:").context("the process is gone")? as f64 / 1024.0;
    ensure!(
        Path::new(&data.join("slots/pos-app/current/payload.bin")).is_file(),
        "the bundle is not in place"
    );

    eprintln!("Publishing 2.1.0 with a delta from 2.0.0...");
    let delta_bytes = publish_point_release(&cp, &keys, &src, "2.1.0")?;
    std::fs::remove_dir_all(&src)?;
    // Linux: "5" resets VmHWM to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .context("resetting the peak RSS needs root")?;
    let delta_started = Instant::now();
    check_ok(cp.cli(&["device", "assign", &device, "pos-app@2.1.0"]));
    wait_installed(&cp, &device, "2.1.0")?;
    let delta_install_seconds = delta_started.elapsed().as_secs_f64();
    let delta_install_agent_seconds = agent_seconds(&agent, delta_started)?;
    let delta_peak_rss_mib =
        status_kib(pid, "VmHWM:").context("the process is gone")? as f64 / 1024.0;
    let status = cp.bundle_status(&device, "pos-app");
    ensure!(
        status["bytes_saved_by_delta"].as_u64() > Some(0),
        "2.1.0 was not rebuilt from the delta: {status}"
    );
    let delta_rebuild_seconds = agent
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "Bundle rebuilt from a delta and verified.")
        .and_then(|v| v["seconds"].as_f64())
        .context("no rebuild line")?;

    let idle_cpu_percent_of_one_core = 100.0 * idle_cpu / idle_elapsed;
    let targets = Targets {
        idle_rss_mib_below: 20.0,
        idle_cpu_percent_below: 0.1,
        peak_rss_mib_below: 64.0,
        met: idle_rss_max_mib < 20.0
            && idle_cpu_percent_of_one_core < 0.1
            && peak_rss_mib < 64.0
            && delta_peak_rss_mib < 64.0,
    };
    let report = Report {
        command: command_line(),
        commit: posfleet_e2e::measured_commit(),
        agent_args,
        heartbeat_interval_seconds: 30,
        idle_seconds: args.idle_seconds,
        idle_rss_median_mib,
        idle_rss_max_mib,
        idle_cpu_percent_of_one_core,
        bundle_mib: args.bundle_mib,
        bundle_file_mib,
        install_seconds,
        install_agent_seconds,
        peak_rss_mib,
        delta_bytes,
        delta_install_seconds,
        delta_install_agent_seconds,
        delta_rebuild_seconds,
        delta_peak_rss_mib,
        targets,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, format!("{json}\n"))?;
    println!("{json}");
    drop(agent);
    Ok(())
}
