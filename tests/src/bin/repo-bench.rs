//! repo-bench: `/repo/` throughput for one large target, from the local
//! blob store and from an S3-compatible store (moto in server mode),
//! side by side in one run.
//!
//! Setup, not timed: a moto server, three control planes on SQLite (blobs
//! in the data dir; in the bucket, streamed through the control plane; in
//! the bucket with `repo_redirect_to_object_store`), a pos-app bundle of
//! `--size-mib` built once and published to each (the publish is timed
//! once per store: upload, verification, commit). Each source is then
//! downloaded once and its SHA-256 checked, untimed. Timed, in turns:
//! GETs of the whole target over loopback, the body read and dropped, a
//! redirect followed to the presigned URL. Reported per source: the median
//! seconds and MiB/s, and the CPU time the control plane (and moto) spent
//! per download. Figures go to a JSON file.
//!
//!     POSFLEET_TEST_MOTO=target/moto-venv/bin/moto_server \
//!         cargo run --release -p posfleet-e2e --bin repo-bench

use anyhow::{Context, bail, ensure};
use clap::Parser;
use posfleet_e2e::moto::{MOTO_ENV, Moto};
use posfleet_e2e::{ControlPlane, check_ok, command_line, cpu_seconds, median, pos_app_source};
use serde::Serialize;
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Parser)]
#[command(about = "Time /repo/ downloads of one target from the local blob store and from S3.")]
struct Args {
    /// Size of the bundle's payload.
    #[arg(long, default_value_t = 100)]
    size_mib: usize,
    /// Timed downloads from each source, taken in turns.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// moto's server program; default: $POSFLEET_TEST_MOTO.
    #[arg(long)]
    moto: Option<PathBuf>,
    #[arg(long, default_value = "benchmarks/repo-bench.json")]
    output: PathBuf,
}

#[derive(Debug, Serialize)]
struct SourceFigures {
    /// How `/repo/` serves it.
    how: &'static str,
    publish_seconds: f64,
    download_seconds: Vec<f64>,
    median_seconds: f64,
    median_mib_per_second: f64,
    /// CPU seconds (user + system) per download, median.
    control_plane_cpu_seconds: f64,
    moto_cpu_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Figures {
    benchmark: &'static str,
    command: String,
    /// The commit measured (`git describe`).
    commit: Option<String>,
    /// The build the binaries are (`release` or `debug`).
    profile: &'static str,
    moto_version: Option<String>,
    target_bytes: u64,
    runs: usize,
    sources: BTreeMap<&'static str, SourceFigures>,
}

/// What one GET brought: its status, the `Location` of a redirect, the
/// body's length and, when asked, its SHA-256.
struct Fetched {
    status: u16,
    location: Option<String>,
    length: u64,
    sha256: Option<String>,
}

/// GETs `url` (`http://host:port/path`) over a plain socket and reads the
/// body through a 256 KiB buffer, hashing it when `hash`.
fn fetch(url: &str, hash: bool) -> anyhow::Result<Fetched> {
    let rest = url.strip_prefix("http://").context("an http:// URL")?;
    let (address, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("cannot connect to {address}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP status line: {line:?}"))?;
    let (mut length, mut location) = (None, None);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse::<u64>().ok(),
                "location" => location = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = reader.take(length.unwrap_or(u64::MAX));
    let mut buffer = vec![0u8; 256 * 1024];
    let mut hasher = hash.then(sha2::Sha256::new);
    let mut received = 0u64;
    loop {
        let n = body.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        if let Some(h) = &mut hasher {
            h.update(&buffer[..n]);
        }
        received += n as u64;
    }
    Ok(Fetched {
        status,
        location,
        length: received,
        sha256: hasher.map(|h| hex::encode(h.finalize())),
    })
}

/// Downloads the whole target from `/repo/` at `url`, following one
/// redirect; fails unless it is the whole target.
fn download(url: &str, expected: u64, hash: bool) -> anyhow::Result<Fetched> {
    let mut fetched = fetch(url, hash)?;
    if fetched.status == 307 {
        let location = fetched.location.context("a redirect without Location")?;
        fetched = fetch(&location, hash)?;
    }
    ensure!(
        fetched.status == 200 && fetched.length == expected,
        "{url}: HTTP {}, {} of {expected} bytes",
        fetched.status,
        fetched.length
    );
    Ok(fetched)
}

struct Source {
    name: &'static str,
    how: &'static str,
    cp: ControlPlane,
    url: String,
    publish_seconds: f64,
    seconds: Vec<f64>,
    cp_cpu: Vec<f64>,
    moto_cpu: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let Some(program) = args
        .moto
        .clone()
        .or_else(|| std::env::var_os(MOTO_ENV).map(PathBuf::from))
    else {
        bail!(
            "name moto's server with --moto or {MOTO_ENV} (.ci/run installs it in target/moto-venv)"
        );
    };
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let moto = Moto::start_program(program.clone());
    let moto_pid = moto.process.pid();

    let configs = [
        ("local", "data dir, streamed", None),
        (
            "s3",
            "S3 (moto), streamed through the control plane",
            Some(false),
        ),
        (
            "s3_redirect",
            "S3 (moto), redirect to a presigned URL",
            Some(true),
        ),
    ];
    let mut sources = Vec::new();
    let mut bundle: Option<(PathBuf, u64)> = None;
    for (name, how, s3) in configs {
        let mut extra = Vec::new();
        if let Some(redirect) = s3 {
            let config = d.join(format!("{name}.toml"));
            std::fs::write(&config, moto.config_toml(name, redirect))?;
            extra = vec!["--config".to_string(), config.display().to_string()];
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let cp = ControlPlane::start(&d.join(name), None, "127.0.0.1:0", "127.0.0.1:0", &extra);
        let keys = d.join(format!("{name}-keys"));
        cp.init_repository(&keys);
        let (file, length) = match &bundle {
            Some(b) => b.clone(),
            None => {
                let src = pos_app_source(&d.join("src"), "1.0.0", true, args.size_mib << 20);
                let file = cp.build_bundle(&src, &d.join("pos-app.bundle"));
                let length = std::fs::metadata(&file)?.len();
                bundle = Some((file.clone(), length));
                (file, length)
            }
        };
        let started = Instant::now();
        check_ok(cp.cli(&[
            "bundle",
            "publish",
            path_str(&file)?,
            "--keys",
            path_str(&keys)?,
        ]));
        let publish_seconds = started.elapsed().as_secs_f64();
        let listed = cp.cli_json(&["bundle", "list"]);
        let sha256 = listed[0]["sha256"]
            .as_str()
            .context("a listed bundle")?
            .to_string();
        let url = format!(
            "http://{}/repo/targets/pos-app/{sha256}.1.0.0",
            cp.http_address
        );
        // Untimed: the bytes are the bundle, and caches are warm.
        let fetched = download(&url, length, true)?;
        ensure!(
            fetched.sha256.as_deref() == Some(sha256.as_str()),
            "{name}: the downloaded bytes are not the bundle"
        );
        eprintln!("{name}: published in {publish_seconds:.2}s; downloads verified");
        sources.push(Source {
            name,
            how,
            cp,
            url,
            publish_seconds,
            seconds: Vec::new(),
            cp_cpu: Vec::new(),
            moto_cpu: Vec::new(),
        });
    }
    let (_, length) = bundle.context("a bundle was built")?;

    for run in 0..args.runs {
        for source in &mut sources {
            let cp_pid = source.cp.process.pid();
            let (cp_before, moto_before) = (cpu_seconds(cp_pid), cpu_seconds(moto_pid));
            let started = Instant::now();
            download(&source.url, length, false)?;
            let seconds = started.elapsed().as_secs_f64();
            let cpu = |after: Option<f64>, before: Option<f64>| match (after, before) {
                (Some(a), Some(b)) => a - b,
                _ => f64::NAN,
            };
            source.cp_cpu.push(cpu(cpu_seconds(cp_pid), cp_before));
            source
                .moto_cpu
                .push(cpu(cpu_seconds(moto_pid), moto_before));
            source.seconds.push(seconds);
            eprintln!(
                "run {}: {}: {seconds:.3}s ({:.0} MiB/s)",
                run + 1,
                source.name,
                length as f64 / MIB / seconds
            );
        }
    }

    let figures = Figures {
        benchmark: "repo-bench",
        command: command_line(),
        commit: posfleet_e2e::measured_commit(),
        moto_version: moto_version(&program),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        target_bytes: length,
        runs: args.runs,
        sources: sources
            .iter()
            .map(|s| {
                let median_seconds = median(s.seconds.clone());
                (
                    s.name,
                    SourceFigures {
                        how: s.how,
                        publish_seconds: s.publish_seconds,
                        download_seconds: s.seconds.clone(),
                        median_seconds,
                        median_mib_per_second: length as f64 / MIB / median_seconds,
                        control_plane_cpu_seconds: median(s.cp_cpu.clone()),
                        moto_cpu_seconds: median(s.moto_cpu.clone()),
                    },
                )
            })
            .collect(),
    };
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, serde_json::to_vec_pretty(&figures)?)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("{}", serde_json::to_string_pretty(&figures)?);
    Ok(())
}

/// moto's version, asked of the Python beside `moto_server` (a venv's).
fn moto_version(program: &Path) -> Option<String> {
    let out = std::process::Command::new(program.parent()?.join("python"))
        .args(["-c", "import moto; print(moto.__version__)"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a UTF-8 path")
}
