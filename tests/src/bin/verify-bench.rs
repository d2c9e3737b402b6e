//! verify-bench: how fast a bundle is verified, against `openssl dgst -sha256`
//! on the same file in the same run.
//!
//! Setup, not timed: a file of pseudo-random bytes, its chunk list, and a
//! repository with one Ed25519 key per role (root, targets naming the bundle,
//! snapshot, timestamp), every file written next to the bundle. Timed, in
//! turns with `openssl dgst -sha256 FILE`: what an agent does with those
//! files, namely trust the metadata from the pinned root, look the bundle up
//! for its hardware model, check the chunk list against its signed digest and
//! hash the bundle from disk piece by piece. The file is read once before the
//! timed runs, so both sides read it from the page cache. Figures go to a
//! JSON file.
//!
//!     cargo run --release -p posfleet-e2e --bin verify-bench

use anyhow::{Context, ensure};
use clap::Parser;
use posfleet_bundle::chunks;
use posfleet_bundle::client::{Limits, TrustedMetadata};
use posfleet_bundle::manifest::{Kind, Manifest};
use posfleet_bundle::repo::{self, RootKeys};
use posfleet_bundle::tuf;
use posfleet_e2e::{CpuTimes, peak_rss_bytes};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const MIB: u64 = 1 << 20;
const BUNDLE_NAME: &str = "pos-app";
const BUNDLE_VERSION: &str = "1.0.0";
const HARDWARE_MODEL: &str = "pos-x1";
/// The target: posfleet's throughput as a fraction of OpenSSL's.
const TARGET_RATIO: f64 = 0.9;

#[derive(Debug, Parser)]
#[command(about = "Time bundle verification against `openssl dgst -sha256` on the same file.")]
struct Args {
    /// Size of the bundle file.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Timed runs of each side, taken in turns.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The OpenSSL command-line tool to compare against.
    #[arg(long, default_value = "openssl")]
    openssl: PathBuf,
    #[arg(long, default_value = "benchmarks/verify-bench.json")]
    output: PathBuf,
}

/// Writes `bytes` pseudo-random bytes (xorshift64*) to `path`, 1 MiB at a
/// time, and flushes them to disk so no writeback runs during the timing.
fn write_random_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = bytes;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// A repository publishing the bundle: keys, then root, targets, snapshot and
/// timestamp files in `dir`, and the chunk list in `bundle.chunks`.
fn publish(dir: &Path, digest: &chunks::FileDigest, now: SystemTime) -> anyhow::Result<()> {
    let expires = now + Duration::from_secs(86_400);
    let root_key = repo::generate_key();
    let targets_key = repo::generate_key();
    let snapshot_key = repo::generate_key();
    let timestamp_key = repo::generate_key();
    let keys = RootKeys {
        root: vec![root_key.verifying_key()],
        root_threshold: 1,
        targets: vec![targets_key.verifying_key()],
        targets_threshold: 1,
        snapshot: snapshot_key.verifying_key(),
        timestamp: timestamp_key.verifying_key(),
    };
    let root = tuf::sign(&repo::root(&keys, 1, expires.into()), &[&root_key]);

    let manifest = Manifest {
        name: BUNDLE_NAME.into(),
        version: BUNDLE_VERSION.parse()?,
        kind: Kind::Software,
        hardware: vec![HARDWARE_MODEL.into()],
        pre_activate: None,
        health_check: None,
        service: None,
    };
    let entries = BTreeMap::from([(manifest.target_name(), repo::target_file(&manifest, digest))]);
    let targets = tuf::sign(&repo::targets(1, expires.into(), entries), &[&targets_key]);
    let snapshot = tuf::sign(
        &repo::snapshot(1, expires.into(), 1, &targets),
        &[&snapshot_key],
    );
    let timestamp = tuf::sign(
        &repo::timestamp(1, expires.into(), 1, &snapshot),
        &[&timestamp_key],
    );
    for (name, bytes) in [
        ("root.json", root),
        ("targets.json", targets),
        ("snapshot.json", snapshot),
        ("timestamp.json", timestamp),
        ("bundle.chunks", digest.chunks.encode()),
    ] {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

/// One verification as an agent does it, from the files in `dir`. Returns
/// the time spent on metadata (everything before hashing the bundle).
fn verify(dir: &Path, bundle: &Path, now: SystemTime) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let read = |name: &str| std::fs::read(dir.join(name));
    let mut trusted = TrustedMetadata::from_pinned_root(&read("root.json")?, Limits::default())?;
    trusted.finish_root_updates(now.into())?;
    ensure!(
        trusted.update_timestamp(&read("timestamp.json")?, now.into())?,
        "the timestamp was already trusted"
    );
    trusted.update_snapshot(&read("snapshot.json")?, now.into())?;
    trusted.update_targets(&read("targets.json")?, now.into())?;
    let target = trusted.bundle(
        &format!("{BUNDLE_NAME}/{BUNDLE_VERSION}"),
        HARDWARE_MODEL,
        now.into(),
    )?;
    let list = target.decode_chunk_list(&read("bundle.chunks")?)?;
    let metadata = started.elapsed();
    list.verify_reader(File::open(bundle)?)?;
    Ok(metadata)
}

/// `openssl dgst -sha256 FILE`, checked against the file's known SHA-256.
fn openssl_dgst(openssl: &Path, bundle: &Path, sha256: &str) -> anyhow::Result<()> {
    let output = Command::new(openssl)
        .arg("dgst")
        .arg("-sha256")
        .arg(bundle)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", openssl.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && stdout.trim_end().ends_with(sha256),
        "openssl dgst failed ({}) or printed another digest: {stdout}",
        output.status
    );
    Ok(())
}

fn cpu_now() -> anyhow::Result<CpuTimes> {
    CpuTimes::of("self").context("cannot read /proc/self/stat")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[derive(Debug, Serialize)]
struct Run {
    seconds: f64,
    /// CPU time of the process doing the hashing (10 ms resolution); well
    /// below `seconds` means it waited for a core.
    cpu_user_seconds: f64,
    cpu_system_seconds: f64,
    mb_per_second: f64,
    /// Metadata checks and chunk-list decoding (posfleet only).
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Side {
    command: String,
    runs: Vec<Run>,
    median_seconds: f64,
    median_mb_per_second: f64,
    median_cpu_user_seconds: f64,
    median_cpu_system_seconds: f64,
}

impl Side {
    fn new(command: String, runs: Vec<Run>, bytes: u64) -> Side {
        let median_of = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let median_seconds = median_of(|r| r.seconds);
        Side {
            median_seconds,
            median_mb_per_second: bytes as f64 / 1e6 / median_seconds,
            median_cpu_user_seconds: median_of(|r| r.cpu_user_seconds),
            median_cpu_system_seconds: median_of(|r| r.cpu_system_seconds),
            command,
            runs,
        }
    }
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    bundle_bytes: u64,
    chunk_bytes: u32,
    chunks: usize,
    runs: usize,
    cores: usize,
    cpu_has_sha_extensions: bool,
    openssl_version: String,
    page_cache: &'static str,
    openssl: Side,
    posfleet: Side,
    /// posfleet's median throughput over OpenSSL's.
    ratio: f64,
    /// posfleet over OpenSSL, run by run (each pair ran back to back), and
    /// their median.
    paired_ratios: Vec<f64>,
    median_paired_ratio: f64,
    target_ratio: f64,
    target_met: bool,
    /// Peak resident memory of this process, which did the setup and every
    /// posfleet verification.
    peak_rss_bytes: u64,
    command: String,
    /// The commit measured (`git describe`).
    commit: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let dir = tempfile::tempdir()?;
    let bundle = dir.path().join("bundle");
    let bytes = args.size_mib * MIB;
    let now = SystemTime::now();

    eprintln!(
        "verify-bench: {} MiB bundle in {}",
        args.size_mib,
        dir.path().display()
    );
    write_random_file(&bundle, bytes)?;
    // This read also leaves the whole file in the page cache, which is not
    // dropped: both sides read it from memory, neither from the disk.
    let digest = chunks::digest_reader(File::open(&bundle)?)?;
    ensure!(digest.length == bytes, "read back {} bytes", digest.length);
    publish(dir.path(), &digest, now)?;
    let sha256 = hex::encode(digest.sha256);
    let openssl_version = Command::new(&args.openssl)
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .with_context(|| format!("cannot run {}", args.openssl.display()))?;
    eprintln!("  {openssl_version}; page cache warm (file read once before timing)");

    let mut openssl_runs = Vec::new();
    let mut posfleet_runs = Vec::new();
    for i in 0..args.runs {
        // Alternate which side goes first, so neither always follows the other.
        for openssl_turn in [i % 2 == 0, i % 2 == 1] {
            let cpu_before = cpu_now()?;
            let started = Instant::now();
            let metadata = if openssl_turn {
                openssl_dgst(&args.openssl, &bundle, &sha256)?;
                None
            } else {
                Some(verify(dir.path(), &bundle, now)?)
            };
            let seconds = started.elapsed().as_secs_f64();
            let used = cpu_now()?.since(&cpu_before);
            // openssl runs as a child, waited for.
            let (cpu_user_seconds, cpu_system_seconds) = if openssl_turn {
                (used.children_user, used.children_system)
            } else {
                (used.user, used.system)
            };
            let run = Run {
                seconds,
                cpu_user_seconds,
                cpu_system_seconds,
                mb_per_second: bytes as f64 / 1e6 / seconds,
                metadata_ms: metadata.map(|m| m.as_secs_f64() * 1000.0),
            };
            eprintln!(
                "  run {} {:<8} {:>6.3} s  {:>6.0} MB/s  cpu {:.2} s user + {:.2} s system{}",
                i + 1,
                if openssl_turn { "openssl" } else { "posfleet" },
                run.seconds,
                run.mb_per_second,
                run.cpu_user_seconds,
                run.cpu_system_seconds,
                run.metadata_ms
                    .map(|ms| format!("  metadata {ms:.2} ms"))
                    .unwrap_or_default()
            );
            if openssl_turn {
                openssl_runs.push(run);
            } else {
                posfleet_runs.push(run);
            }
        }
    }
    let peak_rss_bytes = peak_rss_bytes("self").context("cannot read /proc/self/status")?;

    let paired_ratios: Vec<f64> = openssl_runs
        .iter()
        .zip(&posfleet_runs)
        .map(|(o, p)| o.seconds / p.seconds)
        .collect();
    let openssl = Side::new(
        format!("{} dgst -sha256 FILE", args.openssl.display()),
        openssl_runs,
        bytes,
    );
    let posfleet = Side::new(
        "TrustedMetadata root, timestamp, snapshot, targets; bundle(); decode_chunk_list; verify_reader(File)".into(),
        posfleet_runs,
        bytes,
    );
    let ratio = posfleet.median_mb_per_second / openssl.median_mb_per_second;
    for (name, side) in [("openssl", &openssl), ("posfleet", &posfleet)] {
        eprintln!(
            "  median {name:<8} {:>6.3} s  {:>6.0} MB/s  cpu {:.2} s user + {:.2} s system",
            side.median_seconds,
            side.median_mb_per_second,
            side.median_cpu_user_seconds,
            side.median_cpu_system_seconds
        );
    }
    eprintln!(
        "  ratio posfleet/openssl {ratio:.3} (target {TARGET_RATIO}: {}); peak RSS {:.1} MiB for a {} MiB file",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "not met"
        },
        peak_rss_bytes as f64 / MIB as f64,
        args.size_mib
    );

    let report = Report {
        benchmark: "verify-bench",
        bundle_bytes: bytes,
        chunk_bytes: digest.chunks.chunk_size(),
        chunks: digest.chunks.count(),
        runs: args.runs,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_has_sha_extensions: cpu_has_sha_extensions(),
        openssl_version,
        page_cache: "warm: the file is read once before timing and the cache is not dropped",
        openssl,
        posfleet,
        ratio,
        median_paired_ratio: median(&paired_ratios),
        paired_ratios,
        target_ratio: TARGET_RATIO,
        target_met: ratio >= TARGET_RATIO,
        peak_rss_bytes,
        command: posfleet_e2e::command_line(),
        commit: posfleet_e2e::measured_commit(),
    };
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("  figures written to {}", args.output.display());
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_sha_extensions() -> bool {
    std::arch::is_x86_feature_detected!("sha")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_sha_extensions() -> bool {
    false
}
