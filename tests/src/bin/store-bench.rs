//! store-bench: one store's tills sharing a bundle over libp2p, with real
//! processes in Linux network namespaces. The control plane (gRPC and the
//! bundle repository) runs in an "origin" namespace; the store is a Linux
//! bridge (unshaped) in a "store" namespace with one namespace per till,
//! each attached to the bridge by a veth pair; the store reaches the origin
//! through one WAN link shaped with `tc tbf`. The same bundle goes to every
//! till with P2P on, then with P2P off (every till from the origin), and
//! the figures go to a JSON file.
//!
//! The control plane serves TLS for its address (`--tls-server-name
//! 10.77.0.1`, no `--insecure-dev` anywhere): each till is given the
//! enrollment token and the fleet CA's fingerprint, enrolls over
//! server-authenticated TLS for a certificate, and from then on makes every
//! call and every `/repo/` download with it (mutual TLS). `--plaintext`
//! runs everything over plaintext with `--insecure-dev` instead, to compare.
//! A run fails unless every till enrolled (with a certificate, over TLS),
//! installed the bundle (as its log, the control plane and its disk say) and,
//! with P2P, the origin sent about one bundle for the whole store.
//!
//!     cargo run --release -p posfleet-e2e --bin store-bench   # --tills 20 --wan-mbit 50 --payload-mib 100
//!
//! Needs root (`ip netns`, veth, bridge, `tc`). Namespaces are named
//! `storebench-*`; a run removes them (and stops what runs in them) when it
//! ends, fails or is interrupted, and removes ones left behind by an
//! earlier run that was killed before it could.

use anyhow::{Context, anyhow, ensure};
use clap::Parser;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use posfleet_e2e::{Process, binary, cpu_seconds, pos_app_source, status_kib};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Every namespace of a run starts with this.
const PREFIX: &str = "storebench-";
const ORIGIN_IP: &str = "10.77.0.1";
const STORE_WAN_IP: &str = "10.77.0.2";
const GATEWAY_IP: &str = "10.77.1.254";
const GRPC_PORT: u16 = 7400;
const HTTP_PORT: u16 = 7401;
const P2P_PORT: u16 = 7410;
const SENT: &str = "posfleet_repository_target_bytes_sent_total";
/// The run's temporary folder (agents' data dirs, the control plane's).
const WORK_DIR_PREFIX: &str = "posfleet-store-bench-";
/// Held while a run is active: two runs would share namespace names.
const LOCK_FILE: &str = "/run/posfleet-store-bench.lock";

#[derive(Debug, Parser)]
#[command(about = "One store's tills sharing a bundle over libp2p behind a shaped WAN link.")]
struct Args {
    /// Tills in the store.
    #[arg(long, default_value_t = 20)]
    tills: usize,
    /// WAN rate, origin to store (and back), in Mbit/s (10^6 bits).
    #[arg(long, default_value_t = 50)]
    wan_mbit: u64,
    /// Incompressible payload in the bundle.
    #[arg(long, default_value_t = 100)]
    payload_mib: u64,
    /// Which runs, in order: `on` (P2P) and/or `off` (every till from the origin).
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    runs: Vec<Mode>,
    /// Also find peers by mDNS (else from the control plane's list alone).
    #[arg(long, default_value_t = false)]
    mdns: bool,
    /// The P2P-off run uses fewer tills if all of them would need longer
    /// than this at the WAN rate.
    #[arg(long, default_value_t = 600)]
    max_off_seconds: u64,
    /// Extra flag for every agent, e.g. `--agent-arg=--p2p-max-concurrent-transfers=4`
    /// (repeatable; recorded in the JSON).
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Plaintext gRPC and HTTP, with `--insecure-dev` on the control plane,
    /// the agents and the CLI (else TLS, and mutual TLS once enrolled).
    #[arg(long, default_value_t = false)]
    plaintext: bool,
    /// After the P2P run installs 1.0.0, publish 1.1.0 (the same program and
    /// payload, its version changed) with a signed delta from 1.0.0 and
    /// give it to the same tills: the origin should send the delta once.
    #[arg(long, default_value_t = false)]
    delta: bool,
    #[arg(long, default_value = "benchmarks/store-bench.json")]
    output: PathBuf,
    /// Internal: print the body of a GET of this URL and exit (run inside
    /// the origin namespace to read the control plane's metrics).
    #[arg(long, hide = true)]
    http_get: Option<String>,
    /// Internal: with `--http-get` of an https:// URL, the CA certificate
    /// file to check the server against.
    #[arg(long, hide = true, requires = "http_get")]
    http_get_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    On,
    Off,
}

// ---------------------------------------------------------------- signals

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupted() -> anyhow::Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// On SIGINT or SIGTERM the main thread is told to stop at its next wait
/// (its guards then clean up); if it has not exited 30 s later, this
/// thread cleans up by name and exits.
fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("Interrupted: stopping the tills and removing the namespaces...");
        std::thread::sleep(Duration::from_secs(30));
        remove_stale_namespaces();
        std::process::exit(130);
    });
}

// ---------------------------------------------------------------- commands

/// Runs a command to its end; its stderr in the error if it fails.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        output.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// SIGKILLs every process in namespace `name`.
fn kill_all_in(name: &str) {
    let Ok(pids) = run("ip", &["netns", "pids", name]) else {
        return;
    };
    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Namespaces of an earlier run that could not clean up (killed with
/// SIGKILL): what runs in them is stopped, then they are deleted.
fn remove_stale_namespaces() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
    {
        kill_all_in(name);
        let _ = run("ip", &["netns", "del", name]);
    }
}

/// Work dirs of an earlier run killed before it could remove its own
/// (the lock is held: no other run is using one).
fn remove_stale_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(WORK_DIR_PREFIX)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A network namespace, deleted (after killing what runs in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn add(suffix: &str) -> anyhow::Result<Netns> {
        let name = format!("{PREFIX}{suffix}");
        run("ip", &["netns", "add", &name])
            .map_err(|e| anyhow!("needs root: ip netns add {name} failed: {e}"))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all).map(|_| ())
    }

    /// Runs a short command inside the namespace to its end.
    fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command for `program` inside the namespace. `ip netns exec`
    /// execs it, so the child's pid is the program's.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: {error}");
        }
    }
}

/// The network: origin, WAN link, store bridge and tills.
///
/// ```text
/// origin ns           store ns                       till ns (× N)
/// wan 10.77.0.1 ──tbf── wan 10.77.0.2  (router)
///                      br0 10.77.1.254 ── tNN ─veth─ eth0 10.77.1.(n+1)
/// ```
struct Lan {
    /// Dropped first: the tills' namespaces go before the bridge's.
    tills: Vec<Netns>,
    store: Netns,
    origin: Netns,
}

impl Lan {
    fn create(tills: usize, wan_mbit: u64) -> anyhow::Result<Lan> {
        let origin = Netns::add("origin")?;
        let store = Netns::add("store")?;
        let mut lan = Lan {
            tills: Vec::new(),
            store,
            origin,
        };
        let (origin, store) = (&lan.origin, &lan.store);
        // The WAN link: a veth pair, shaped at the origin end (downloads)
        // and at the store end (uploads).
        origin.ip(&[
            "link",
            "add",
            "wan",
            "type",
            "veth",
            "peer",
            "name",
            "wan",
            "netns",
            &store.name,
        ])?;
        origin.ip(&["addr", "add", &format!("{ORIGIN_IP}/30"), "dev", "wan"])?;
        store.ip(&["addr", "add", &format!("{STORE_WAN_IP}/30"), "dev", "wan"])?;
        origin.ip(&["link", "set", "wan", "up"])?;
        store.ip(&["link", "set", "wan", "up"])?;
        origin.ip(&["route", "add", "10.77.1.0/24", "via", STORE_WAN_IP])?;
        for ns in [origin, store] {
            let args = tbf_args(wan_mbit);
            ns.exec("tc", &args.split(' ').collect::<Vec<_>>())
                .map_err(|e| anyhow!("tc tbf on the WAN link failed: {e}"))?;
        }
        store.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // The store's LAN: a bridge, unshaped.
        store.ip(&["link", "add", "br0", "type", "bridge"])?;
        store.ip(&["addr", "add", &format!("{GATEWAY_IP}/24"), "dev", "br0"])?;
        store.ip(&["link", "set", "br0", "up"])?;
        for index in 0..tills {
            let till = Netns::add(&format!("till-{:02}", index + 1))?;
            let port = format!("t{:02}", index + 1);
            till.ip(&[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &lan.store.name,
            ])?;
            lan.store
                .ip(&["link", "set", &port, "master", "br0", "up"])?;
            till.ip(&[
                "addr",
                "add",
                &format!("{}/24", till_ip(index)),
                "dev",
                "eth0",
            ])?;
            till.ip(&["link", "set", "eth0", "up"])?;
            till.ip(&["route", "add", "default", "via", GATEWAY_IP])?;
            lan.tills.push(till);
        }
        Ok(lan)
    }
}

fn till_ip(index: usize) -> String {
    format!("10.77.1.{}", index + 1)
}

/// Token bucket at the WAN rate: a burst of 10 ms of it (at least 16 KiB),
/// at most 50 ms of queue.
fn tbf_args(wan_mbit: u64) -> String {
    let burst = (wan_mbit * 1_000_000 / 8 / 100).max(16 * 1024);
    format!("qdisc add dev wan root tbf rate {wan_mbit}mbit burst {burst} latency 50ms")
}

// ---------------------------------------------------------------- processes

/// Fails once the process has exited, with the end of its log.
fn running(process: &mut Process, what: &str) -> anyhow::Result<()> {
    process
        .check_running()
        .map_err(|why| anyhow!("{what} {why}"))
}

/// Polls `check` every 100 ms until it returns `Some`; fails on timeout
/// or interruption.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(value) = check()? {
            return Ok(value);
        }
        ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// GET `url` and return the body: `http://`, or `https://` with the server
/// checked against the CA certificates in `ca_file` (and no client
/// certificate: `/metrics` needs none).
fn http_get(url: &str, ca_file: Option<&Path>) -> anyhow::Result<String> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (
            false,
            url.strip_prefix("http://")
                .context("only http:// and https:// URLs")?,
        ),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let stream = std::net::TcpStream::connect(host).with_context(|| format!("connect {host}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let response = if tls {
        use posfleet_pki::rustls;
        let ca_file = ca_file.context("an https:// URL needs the CA file")?;
        let pem = std::fs::read(ca_file).with_context(|| format!("read {}", ca_file.display()))?;
        let cas = posfleet_pki::certificates_from_pem(&pem, &ca_file.display().to_string())?;
        let config = posfleet_pki::client_config(&cas, None)?;
        let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
        let name = rustls::pki_types::ServerName::try_from(name.to_string())?;
        let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        exchange(rustls::StreamOwned::new(connection, stream), &request)
    } else {
        exchange(stream, &request)
    }
    .with_context(|| format!("GET {url}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET {url}: {}",
        head.lines().next().unwrap_or_default()
    );
    // Over TLS a close without close_notify looks like the end: the
    // length says whether the body is whole.
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    if let Some(length) = length {
        ensure!(
            body.len() == length,
            "GET {url}: {} of {length} bytes",
            body.len()
        );
    }
    Ok(body.to_string())
}

/// Sends `request` and reads the response until the server closes.
fn exchange(mut stream: impl Read + Write, request: &str) -> std::io::Result<Vec<u8>> {
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => Ok(response),
        // A TLS peer that closes without close_notify (checked by length).
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(response),
        Err(error) => Err(error),
    }
}

// ---------------------------------------------------------------- the origin

/// The control plane in the origin namespace, and the CLI run there.
struct Origin {
    process: Process,
    data_dir: PathBuf,
    keys: PathBuf,
    ns_name: String,
    /// Serving TLS for `ORIGIN_IP` (else plaintext with `--insecure-dev`).
    tls: bool,
}

impl Origin {
    fn start(lan: &Lan, work: &Path, tls: bool) -> anyhow::Result<Origin> {
        let data_dir = work.join("control-plane");
        let mut command = lan.origin.command(&binary("posfleet-control-plane"));
        command
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--grpc-listen-address", &format!("{ORIGIN_IP}:{GRPC_PORT}")])
            .args(["--http-listen-address", &format!("{ORIGIN_IP}:{HTTP_PORT}")])
            .args(["--heartbeat-interval-seconds", "1"])
            .args(["--log-format", "json"]);
        if tls {
            command.args(["--tls-server-name", ORIGIN_IP]);
        } else {
            command.arg("--insecure-dev");
        }
        let mut process = Process::try_spawn(command).context("cannot start the control plane")?;
        for message in ["gRPC listening.", "HTTP listening."] {
            let listening = wait_for(
                &format!("the control plane's `{message}`"),
                Duration::from_secs(60),
                || {
                    running(&mut process, "the control plane")?;
                    Ok(process.first(message))
                },
            )?;
            ensure!(
                listening.1["tls"] == tls,
                "the control plane logged {}, TLS was {}",
                listening.1,
                if tls { "asked for" } else { "not asked for" }
            );
        }
        let origin = Origin {
            process,
            data_dir,
            keys: work.join("keys"),
            ns_name: lan.origin.name.clone(),
            tls,
        };
        let code = std::fs::read_to_string(origin.data_dir.join("admin-setup-code"))
            .context("cannot read the first admin's setup code")?;
        let token = posfleet_e2e::first_admin_session(
            &origin.grpc_url(),
            tls.then(|| origin.ca_file()).as_deref(),
            &code,
            Some(&origin.ns_name),
        )
        .context("cannot set up the first admin")?;
        posfleet_e2e::write_private(&origin.session_file(), &format!("{token}\n"));
        origin.cli(&["keys", "init", path_str(&origin.keys)?])?;
        Ok(origin)
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    fn grpc_url(&self) -> String {
        format!("{}://{ORIGIN_IP}:{GRPC_PORT}", self.scheme())
    }

    fn repository_url(&self) -> String {
        format!("{}://{ORIGIN_IP}:{HTTP_PORT}/repo/", self.scheme())
    }

    /// The fleet's trust bundle, which the control plane keeps current:
    /// what an operator's CLI trusts.
    fn ca_file(&self) -> PathBuf {
        self.data_dir.join("tls").join("trust-bundle.pem")
    }

    /// The first admin's session, for the CLI's `--token-file`.
    fn session_file(&self) -> PathBuf {
        self.data_dir.with_file_name("admin-session")
    }

    /// The `posfleet` CLI inside the origin namespace; its stdout.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let token = self.session_file();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns_name])
            .arg(binary("posfleet"))
            .args(["--server", &self.grpc_url()])
            .arg("--token-file")
            .arg(&token);
        if self.tls {
            command.arg("--ca-file").arg(self.ca_file());
        } else {
            command.arg("--insecure-dev");
        }
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run posfleet")?;
        ensure!(
            output.status.success(),
            "posfleet {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn cli_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all)?;
        serde_json::from_str(&out).with_context(|| format!("posfleet {}: not JSON", args.join(" ")))
    }

    /// One sample of the control plane's `/metrics`, read from inside the
    /// origin namespace by this program; 0 if absent.
    fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        let me = std::env::current_exe().context("this program's path")?;
        let url = format!("{}://{ORIGIN_IP}:{HTTP_PORT}/metrics", self.scheme());
        let ca_file = self.ca_file();
        let mut args = vec![
            "netns",
            "exec",
            &self.ns_name,
            path_str(&me)?,
            "--http-get",
            &url,
        ];
        if self.tls {
            args.extend(["--http-get-ca-file", path_str(&ca_file)?]);
        }
        let body = run("ip", &args)?;
        Ok(body
            .lines()
            .filter_map(|line| line.rsplit_once(' '))
            .find(|(name, _)| *name == sample)
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0.0))
    }

    /// Builds pos-app `version` with `payload` bytes and publishes it;
    /// returns the bundle's size. With `keep`, its source and bundle file
    /// stay in `work` (a point release is made from them).
    fn publish(&self, work: &Path, version: &str, payload: u64, keep: bool) -> anyhow::Result<u64> {
        let src = work.join(format!("pos-app-{version}"));
        pos_app_source(&src, version, true, payload as usize);
        let file = self.build_and_publish(&src, &[])?;
        let size = std::fs::metadata(&file)?.len();
        if !keep {
            std::fs::remove_dir_all(&src)?;
            std::fs::remove_file(&file)?;
        }
        Ok(size)
    }

    /// Builds the bundle source `src` into `<src>.bundle` and publishes it
    /// with `extra` flags; returns the bundle file.
    fn build_and_publish(&self, src: &Path, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let file = src.with_extension("bundle");
        self.cli(&["bundle", "build", path_str(src)?, "-o", path_str(&file)?])?;
        check_interrupted()?;
        let mut args = vec![
            "bundle",
            "publish",
            path_str(&file)?,
            "--keys",
            path_str(&self.keys)?,
        ];
        args.extend_from_slice(extra);
        self.cli(&args)?;
        Ok(file)
    }

    /// Publishes pos-app `version`: release `base` (kept by
    /// [`Origin::publish`]) with its version changed, and a delta to it
    /// from `base`. Returns the bundle's size and the delta's.
    fn publish_point_release(
        &self,
        work: &Path,
        version: &str,
        base: &str,
    ) -> anyhow::Result<(u64, u64)> {
        let base_src = work.join(format!("pos-app-{base}"));
        let src = work.join(format!("pos-app-{version}"));
        run("cp", &["-a", path_str(&base_src)?, path_str(&src)?])?;
        let manifest = src.join("posfleet-bundle.toml");
        let text = std::fs::read_to_string(&manifest)?.replace(
            &format!("version = \"{base}\""),
            &format!("version = \"{version}\""),
        );
        std::fs::write(&manifest, text)?;
        let base_file = base_src.with_extension("bundle");
        let file = self.build_and_publish(&src, &["--delta-from", path_str(&base_file)?])?;
        let delta = format!("pos-app/{version}/from-{base}.delta");
        let listed = self.cli_json(&["bundle", "list", "--name", "pos-app"])?;
        let delta_bytes = listed
            .as_array()
            .and_then(|l| l.iter().find(|b| b["target"] == delta.as_str()))
            .and_then(|b| b["length"].as_u64())
            .with_context(|| format!("{delta} is not listed"))?;
        let size = std::fs::metadata(&file)?.len();
        std::fs::remove_dir_all(&src)?;
        std::fs::remove_file(&file)?;
        Ok((size, delta_bytes))
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("not UTF-8: {}", path.display()))
}

// ---------------------------------------------------------------- one run

/// One till's agent in its namespace.
struct Agent {
    ip: String,
    data_dir: PathBuf,
    process: Process,
}

impl Agent {
    fn check_running(&mut self) -> anyhow::Result<()> {
        running(&mut self.process, &format!("the agent of till {}", self.ip))
    }
}

/// Everything a run needs, shared by both runs.
struct Bench<'a> {
    args: &'a Args,
    lan: &'a Lan,
    origin: &'a Origin,
    work: &'a Path,
    bundle_bytes: u64,
}

/// One run: a store, its tills started, the bundle assigned, and the
/// figures read back.
struct Run<'a> {
    bench: &'a Bench<'a>,
    p2p: bool,
    tills: usize,
    store: String,
    agents: Vec<Agent>,
}

#[derive(Debug, Serialize)]
struct TillReport {
    ip: String,
    device_id: String,
    /// The assignment arrived with a heartbeat.
    seconds_to_desired_state: Option<f64>,
    /// The download started (P2P on: "Fetching a bundle.").
    seconds_to_fetch_start: Option<f64>,
    /// This till started fetching from the origin (P2P on).
    seconds_to_origin_fetch: Option<f64>,
    /// Every piece in and verified (P2P on: "Bundle complete."), before
    /// the whole-file check.
    seconds_to_pieces_complete: Option<f64>,
    seconds_to_downloaded: f64,
    seconds_to_installed: f64,
    bytes_from_origin: u64,
    bytes_from_peers: u64,
    /// "Fetching from the origin." lines in the till's log (P2P on).
    origin_fetches: usize,
    /// Pieces those fetches asked the origin for.
    origin_pieces_asked: u64,
    peak_rss_mib: f64,
}

/// A point release rebuilt from a delta by the tills holding the release
/// before it.
#[derive(Debug, Serialize)]
struct DeltaReport {
    bundle_bytes: u64,
    delta_bytes: u64,
    delta_over_bundle: f64,
    /// What the origin sent from the assignment to the last install.
    origin_bytes: u64,
    origin_bytes_over_delta: f64,
    /// What the tills reported they did not download
    /// (`posfleet_delta_bytes_saved_total`).
    bytes_saved_reported: u64,
    seconds_to_last_installed: f64,
    /// The same tills' last install of the whole 1.0.0 in this run.
    full_seconds_to_last_installed: f64,
    /// Per till, from the start of the delta step to the rebuilt bundle
    /// verified (packing the base from its slot, fetching the delta,
    /// applying it, hashing the result): median and largest.
    rebuild_seconds_median: f64,
    rebuild_seconds_max: f64,
    tills_rebuilt: usize,
    tills_with_payload_whole: usize,
    /// The agents' peak RSS (VmHWM) once they rebuilt it: their peak over
    /// both installs, the whole bundle's and the delta's.
    peak_rss_max_mib: f64,
}

#[derive(Debug, Serialize)]
struct RunReport {
    p2p: bool,
    /// With `--delta`, the point release the same tills then rebuilt from
    /// a delta (P2P run only).
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<DeltaReport>,
    tills: usize,
    /// Set when the P2P-off run uses fewer tills than asked for.
    tills_reduced_from: Option<usize>,
    tills_reduced_why: Option<String>,
    origin_bytes: u64,
    origin_bytes_over_size: f64,
    /// Origin bytes over the time from the assignment to the last till
    /// downloaded, in Mbit/s.
    origin_throughput_mbit: f64,
    seconds_to_first_downloaded: f64,
    seconds_to_last_downloaded: f64,
    seconds_to_last_installed: f64,
    /// Time to the last till downloaded over size / WAN rate.
    last_downloaded_over_physical_limit: f64,
    last_installed_over_physical_limit: f64,
    peak_rss_max_mib: f64,
    peak_rss_median_mib: f64,
    /// CPU time (user + system) of all the agents from the assignment to
    /// the last install, and of the control plane, in seconds; the machine
    /// runs every till on its cores.
    agents_cpu_seconds: f64,
    control_plane_cpu_seconds: f64,
    /// Tills that got bytes from the origin or logged fetching from it (P2P
    /// on: the chosen one, and any that took over or fell back; P2P off:
    /// all).
    tills_fetching_from_origin: usize,
    /// Warnings and errors the tills logged during the run, by message.
    warnings: BTreeMap<String, usize>,
    /// The `posfleet store show` transfer row for the bundle.
    store_show_transfer: Value,
    /// What was checked after the installs; the run fails unless each is
    /// the number of tills (certificates: 0 with `--plaintext`).
    checked: Checked,
    per_till: Vec<TillReport>,
}

#[derive(Debug, Serialize)]
struct Checked {
    /// Tills `posfleet device list --store S` shows with pos-app 1.0.0.
    control_plane_lists_installed: usize,
    /// Tills it shows with a valid device certificate.
    control_plane_lists_valid_certificate: usize,
    /// Tills whose `device.crt` names the till's own device id.
    tills_holding_their_certificate: usize,
    /// Tills whose current slot is 1.0.0 and holds the payload whole (its
    /// SHA-256 as published).
    tills_with_payload_whole: usize,
}

impl<'a> Run<'a> {
    fn new(bench: &'a Bench<'a>, p2p: bool, tills: usize) -> Run<'a> {
        Run {
            bench,
            p2p,
            tills,
            store: format!("bench-p2p-{}", if p2p { "on" } else { "off" }),
            agents: Vec::new(),
        }
    }

    fn label(&self) -> &'static str {
        if self.p2p { "P2P on" } else { "P2P off" }
    }

    /// Creates the store and starts its tills, all at once.
    fn start_tills(&mut self) -> anyhow::Result<()> {
        let origin = self.bench.origin;
        origin.cli_json(&[
            "store",
            "create",
            &self.store,
            "--name",
            &self.store,
            "--time-zone",
            "UTC",
        ])?;
        let token = origin.cli_json(&[
            "enroll-token",
            "create",
            "--store",
            &self.store,
            "--uses",
            &self.tills.to_string(),
        ])?;
        let secret = token["secret"].as_str().context("no secret in the token")?;
        // Over TLS a till is given what an operator hands out with the
        // token: the fleet CA's fingerprint, not the CA file.
        let fingerprint = token["ca_fingerprint"].as_str();
        ensure!(
            fingerprint.is_some() == origin.tls,
            "`enroll-token create` gave {:?} as the CA fingerprint, TLS is {}",
            fingerprint,
            if origin.tls { "on" } else { "off" }
        );
        for index in 0..self.tills {
            let ns = &self.bench.lan.tills[index];
            let ip = till_ip(index);
            let data_dir = self
                .bench
                .work
                .join(format!("{}-till-{:02}", self.store, index + 1));
            let mut command = ns.command(&binary("posfleet-agent"));
            command.args(["--server-url", &origin.grpc_url()]);
            match fingerprint {
                Some(fingerprint) => command.args(["--ca-fingerprint", fingerprint]),
                None => command.arg("--insecure-dev"),
            };
            command
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--enrollment-token", secret])
                .arg("--root-json-path")
                .arg(origin.keys.join("root.json"))
                .args(["--repository-url", &origin.repository_url()])
                .args(["--install-check-interval-seconds", "1"])
                .args(["--max-backoff-seconds", "2", "--log-format", "json"])
                .args(["--p2p-enabled", if self.p2p { "true" } else { "false" }])
                .args([
                    "--p2p-listen-addrs",
                    &format!("/ip4/{ip}/tcp/{P2P_PORT},/ip4/{ip}/udp/{P2P_PORT}/quic-v1"),
                ])
                .args([
                    "--p2p-mdns",
                    if self.bench.args.mdns {
                        "true"
                    } else {
                        "false"
                    },
                ])
                .args(&self.bench.args.agent_arg);
            let process = Process::try_spawn(command)
                .with_context(|| format!("cannot start the agent of till {ip}"))?;
            // ip netns exec execs the agent: this pid is the agent's.
            self.agents.push(Agent {
                ip,
                data_dir,
                process,
            });
        }
        Ok(())
    }

    /// Every till enrolled and running; with P2P, each holds the full
    /// membership list and has connected to its peers.
    fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let tills = self.tills;
        let tls = self.bench.origin.tls;
        for agent in &mut self.agents {
            let (_, running) = wait_for(
                &format!("till {} to enroll", agent.ip),
                Duration::from_secs(120),
                || {
                    agent.check_running()?;
                    Ok(agent.process.first("Agent running."))
                },
            )?;
            ensure!(
                running["tls"] == tls,
                "till {} logged {running}, TLS is {}",
                agent.ip,
                if tls { "on" } else { "off" }
            );
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", agent.process.pid()))
                .unwrap_or_default();
            ensure!(
                comm.trim().starts_with("posfleet-agent"),
                "pid {} is `{}`, not the agent: its memory would not be the agent's",
                agent.process.pid(),
                comm.trim()
            );
        }
        if !self.p2p {
            std::thread::sleep(Duration::from_secs(2));
            return Ok(());
        }
        for agent in &mut self.agents {
            wait_for(
                &format!("till {} to list all {tills} members", agent.ip),
                Duration::from_secs(120),
                || {
                    agent.check_running()?;
                    Ok(agent.process.with_log(|log| {
                        log.iter()
                            .rev()
                            .find(|l| l.value["message"] == "Store membership list updated.")
                            .filter(|l| l.value["members"] == tills)
                            .map(|_| ())
                    }))
                },
            )?;
        }
        // Members are dialed as soon as the list arrives; give every till
        // a moment to reach all the others.
        let connected = |agent: &Agent| {
            agent.process.with_log(|log| {
                log.iter()
                    .filter(|l| l.value["message"] == "Store peer connected.")
                    .filter_map(|l| l.value["peer_id"].as_str().map(str::to_string))
                    .collect::<BTreeSet<_>>()
                    .len()
            })
        };
        let all = wait_for(
            "tills connected to their peers",
            Duration::from_secs(20),
            || {
                Ok(self
                    .agents
                    .iter()
                    .all(|a| connected(a) + 1 >= tills)
                    .then_some(()))
            },
        );
        if all.is_err() {
            check_interrupted()?;
            let least = self.agents.iter().map(connected).min().unwrap_or_default();
            eprintln!(
                "  note: after 20 s some till has logged connections to only {least} of its {} peers; going on",
                tills - 1
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    }

    /// CPU seconds of all the agents, and of the control plane.
    fn cpu_seconds(&self) -> anyhow::Result<(f64, f64)> {
        let mut agents = 0.0;
        for agent in &self.agents {
            agents += cpu_seconds(agent.process.pid()).context("the process is gone")?;
        }
        Ok((
            agents,
            cpu_seconds(self.bench.origin.process.pid()).context("the process is gone")?,
        ))
    }

    fn execute(mut self, reduced_from: Option<(usize, String)>) -> anyhow::Result<RunReport> {
        let bench = self.bench;
        let origin = bench.origin;
        eprintln!("{}: starting {} tills...", self.label(), self.tills);
        self.start_tills()?;
        self.wait_until_ready()?;
        check_interrupted()?;
        let before = origin.metric(SENT)?;
        eprintln!(
            "{}: assigning pos-app 1.0.0 to store {}...",
            self.label(),
            self.store
        );
        let cpu_before = self.cpu_seconds()?;
        let assigned = Instant::now();
        origin.cli(&["device", "assign", "--store", &self.store, "pos-app@1.0.0"])?;

        let limit = physical_limit_seconds(bench.bundle_bytes, bench.args.wan_mbit);
        let timeout = Duration::from_secs_f64(2.0 * limit * self.tills as f64 + 180.0);
        let mut last_report = Instant::now();
        wait_for("every till to install the bundle", timeout, || {
            let mut downloaded = 0;
            let mut installed = 0;
            for agent in &mut self.agents {
                agent.check_running()?;
                downloaded += usize::from(
                    agent
                        .process
                        .first("Bundle downloaded and verified.")
                        .is_some(),
                );
                installed += usize::from(agent.process.first("Bundle installed.").is_some());
            }
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = Instant::now();
                eprintln!(
                    "  {:>5.1} s: {downloaded}/{} downloaded, {installed} installed",
                    assigned.elapsed().as_secs_f64(),
                    self.tills
                );
            }
            Ok((installed == self.tills).then_some(()))
        })
        .map_err(|e| {
            let missing: Vec<&str> = self
                .agents
                .iter()
                .filter(|a| a.process.first("Bundle installed.").is_none())
                .map(|a| a.ip.as_str())
                .collect();
            anyhow!("{e}; tills without it: {missing:?}")
        })?;
        let cpu = self.cpu_seconds()?;
        let (agents_cpu_seconds, control_plane_cpu_seconds) =
            (cpu.0 - cpu_before.0, cpu.1 - cpu_before.1);
        let origin_bytes = (origin.metric(SENT)? - before) as u64;

        let mut per_till = Vec::new();
        let mut warnings = BTreeMap::new();
        for agent in &self.agents {
            per_till.push(till_report(agent, assigned)?);
            agent.process.with_log(|log| {
                for line in log.iter().filter(|l| l.at >= assigned) {
                    let level = line.value["level"].as_str().unwrap_or_default();
                    if matches!(level, "WARN" | "ERROR") {
                        let message = line.value["message"].as_str().unwrap_or_default();
                        *warnings.entry(format!("{level} {message}")).or_insert(0) += 1;
                    }
                }
            });
        }
        // The tills report their byte counts with their next heartbeats.
        let transfer = || -> anyhow::Result<Value> {
            let shown = origin.cli_json(&["store", "show", &self.store])?;
            Ok(shown["transfers"]
                .as_array()
                .and_then(|rows| {
                    rows.iter()
                        .find(|r| r["bundle"] == "pos-app" && r["version"] == "1.0.0")
                })
                .cloned()
                .unwrap_or_default())
        };
        let everything = self.tills as u64 * bench.bundle_bytes;
        let store_show_transfer = wait_for(
            "`store show` to count every till's bytes",
            Duration::from_secs(15),
            || {
                let row = transfer()?;
                let counted = row["bytes_from_origin"].as_u64().unwrap_or(0)
                    + row["bytes_from_peers"].as_u64().unwrap_or(0);
                Ok((counted >= everything).then_some(row))
            },
        )
        .or_else(|_| {
            check_interrupted()?;
            transfer()
        })?;
        let checked = self.check_installed()?;
        let delta = if self.p2p && bench.args.delta {
            let full = per_till
                .iter()
                .map(|t| t.seconds_to_installed)
                .fold(0.0, f64::max);
            Some(self.deliver_delta(full)?)
        } else {
            None
        };

        for agent in &mut self.agents {
            agent.process.stop(Duration::from_secs(10));
            let _ = std::fs::remove_dir_all(&agent.data_dir);
        }

        let downloaded: Vec<f64> = per_till.iter().map(|t| t.seconds_to_downloaded).collect();
        let installed: Vec<f64> = per_till.iter().map(|t| t.seconds_to_installed).collect();
        let mut rss: Vec<f64> = per_till.iter().map(|t| t.peak_rss_mib).collect();
        let first = downloaded.iter().copied().fold(f64::INFINITY, f64::min);
        let last = downloaded.iter().copied().fold(0.0, f64::max);
        let last_installed = installed.iter().copied().fold(0.0, f64::max);
        let size = bench.bundle_bytes as f64;
        Ok(RunReport {
            p2p: self.p2p,
            delta,
            tills: self.tills,
            tills_reduced_from: reduced_from.as_ref().map(|r| r.0),
            tills_reduced_why: reduced_from.map(|r| r.1),
            origin_bytes,
            origin_bytes_over_size: origin_bytes as f64 / size,
            origin_throughput_mbit: origin_bytes as f64 * 8.0 / 1e6 / last,
            seconds_to_first_downloaded: first,
            seconds_to_last_downloaded: last,
            seconds_to_last_installed: last_installed,
            last_downloaded_over_physical_limit: last / limit,
            last_installed_over_physical_limit: last_installed / limit,
            peak_rss_max_mib: rss.iter().copied().fold(0.0, f64::max),
            peak_rss_median_mib: median(&mut rss),
            agents_cpu_seconds,
            control_plane_cpu_seconds,
            tills_fetching_from_origin: per_till
                .iter()
                .filter(|t| t.origin_fetches > 0 || t.bytes_from_origin > 0)
                .count(),
            warnings,
            store_show_transfer,
            checked,
            per_till,
        })
    }

    /// Publishes pos-app 1.1.0 with a delta from 1.0.0, which every till
    /// holds, gives it to the store and waits until every till installed
    /// it; fails unless each rebuilt it from the delta and holds its
    /// payload whole. `full` is the last whole install's time, to compare.
    fn deliver_delta(&mut self, full: f64) -> anyhow::Result<DeltaReport> {
        const SAVED: &str = "posfleet_delta_bytes_saved_total";
        const REBUILT: &str = "Bundle rebuilt from a delta and verified.";
        let origin = self.bench.origin;
        eprintln!(
            "{}: publishing pos-app 1.1.0 with a delta from 1.0.0...",
            self.label()
        );
        let (bundle_bytes, delta_bytes) =
            origin.publish_point_release(self.bench.work, "1.1.0", "1.0.0")?;
        let before = origin.metric(SENT)?;
        let saved_before = origin.metric(SAVED)?;
        let assigned = Instant::now();
        origin.cli(&["device", "assign", "--store", &self.store, "pos-app@1.1.0"])?;
        wait_for(
            "every till to install 1.1.0",
            Duration::from_secs(300),
            || {
                let mut installed = 0;
                for agent in &mut self.agents {
                    agent.check_running()?;
                    installed += usize::from(
                        agent
                            .process
                            .first_since("Bundle installed.", assigned)
                            .is_some(),
                    );
                }
                Ok((installed == self.tills).then_some(()))
            },
        )?;
        let last = self
            .agents
            .iter()
            .filter_map(|a| a.process.first_since("Bundle installed.", assigned))
            .map(|at| (at - assigned).as_secs_f64())
            .fold(0.0, f64::max);
        let origin_bytes = (origin.metric(SENT)? - before) as u64;
        let mut rebuild: Vec<f64> = self
            .agents
            .iter()
            .filter_map(|a| {
                a.process.with_log(|log| {
                    log.iter()
                        .filter(|l| l.at >= assigned && l.value["message"] == REBUILT)
                        .find_map(|l| l.value["seconds"].as_f64())
                })
            })
            .collect();
        let tills_rebuilt = rebuild.len();
        let mut peak_rss_max_mib = 0.0f64;
        for agent in &self.agents {
            let kib = status_kib(agent.process.pid(), "VmHWM:").context("the process is gone")?;
            peak_rss_max_mib = peak_rss_max_mib.max(kib as f64 / 1024.0);
        }
        let mut whole = 0;
        for agent in &self.agents {
            let slot = std::fs::canonicalize(agent.data_dir.join("slots/pos-app/current"))?;
            let expected = std::fs::read_to_string(slot.join("payload.sha256"))?;
            if slot.file_name() == Some("1.1.0".as_ref())
                && expected.trim() == sha256_file(&slot.join("payload.bin"))?
            {
                whole += 1;
            }
        }
        let saved = wait_for(
            "the tills to report what the delta saved",
            Duration::from_secs(15),
            || {
                let saved = (origin.metric(SAVED)? - saved_before) as u64;
                let want = self.tills as u64 * bundle_bytes.saturating_sub(delta_bytes);
                Ok((saved >= want).then_some(saved))
            },
        )
        .or_else(|_| Ok::<_, anyhow::Error>((origin.metric(SAVED)? - saved_before) as u64))?;
        let report = DeltaReport {
            bundle_bytes,
            delta_bytes,
            delta_over_bundle: delta_bytes as f64 / bundle_bytes as f64,
            origin_bytes,
            origin_bytes_over_delta: origin_bytes as f64 / delta_bytes.max(1) as f64,
            bytes_saved_reported: saved,
            seconds_to_last_installed: last,
            full_seconds_to_last_installed: full,
            rebuild_seconds_median: median(&mut rebuild),
            rebuild_seconds_max: rebuild.iter().copied().fold(0.0, f64::max),
            tills_rebuilt,
            tills_with_payload_whole: whole,
            peak_rss_max_mib,
        };
        ensure!(
            tills_rebuilt == self.tills && whole == self.tills,
            "{tills_rebuilt} of {} tills rebuilt 1.1.0 from the delta, {whole} hold it whole",
            self.tills
        );
        ensure!(
            report.origin_bytes_over_delta < 1.5,
            "the origin sent {:.2} x the delta for one store",
            report.origin_bytes_over_delta
        );
        Ok(report)
    }

    /// Past every till's `Bundle installed.` line: the control plane lists
    /// pos-app 1.0.0 on each of the store's tills (over TLS, each with a
    /// valid certificate, and the one in the till's data dir names it),
    /// and each till's current slot is 1.0.0 with its payload whole. Fails
    /// otherwise.
    fn check_installed(&self) -> anyhow::Result<Checked> {
        let origin = self.bench.origin;
        let own_ids: Vec<String> = self
            .agents
            .iter()
            .map(|agent| {
                agent
                    .process
                    .first("Agent running.")
                    .and_then(|(_, v)| v["device_id"].as_str().map(str::to_string))
                    .with_context(|| format!("till {} logged no device id", agent.ip))
            })
            .collect::<anyhow::Result<_>>()?;
        let ids: BTreeSet<String> = own_ids.iter().cloned().collect();
        ensure!(
            ids.len() == self.tills,
            "two tills logged the same device id"
        );
        // The tills report the install with their next heartbeats.
        let mut listed = Vec::new();
        let installed = |devices: &[Value]| {
            devices
                .iter()
                .filter(|d| d["installed_bundles"]["pos-app"] == "1.0.0")
                .count()
        };
        wait_for(
            "the control plane to list pos-app 1.0.0 on every till",
            Duration::from_secs(30),
            || {
                let devices = origin.cli_json(&["device", "list", "--store", &self.store])?;
                listed = devices.as_array().cloned().unwrap_or_default();
                Ok((installed(&listed) == self.tills).then_some(()))
            },
        )
        .map_err(|e| {
            anyhow!(
                "{e}: it lists {} of {} with it",
                installed(&listed),
                self.tills
            )
        })?;
        let listed_ids: BTreeSet<String> = listed
            .iter()
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .collect();
        ensure!(
            listed_ids == ids,
            "`device list --store {}` shows {listed_ids:?}, the tills logged {ids:?}",
            self.store
        );
        let valid_certificates = listed
            .iter()
            .filter(|d| d["certificate_status"] == "valid")
            .count();
        let certificates = ids.len() * usize::from(origin.tls);
        ensure!(
            valid_certificates == certificates,
            "the control plane lists {valid_certificates} tills with a valid certificate, expected {certificates}"
        );

        let mut holding_certificate = 0;
        let mut payload_whole = 0;
        for (agent, id) in self.agents.iter().zip(&own_ids) {
            let file = agent.data_dir.join("device.crt");
            if origin.tls {
                let pem = std::fs::read(&file).with_context(|| {
                    format!("till {} has no certificate: {}", agent.ip, file.display())
                })?;
                let chain = posfleet_pki::certificates_from_pem(&pem, "device.crt")?;
                let identity = posfleet_pki::DeviceIdentity::from_certificate(&chain[0])?;
                ensure!(
                    &identity.device_id == id,
                    "till {} is {id}, its certificate names {}",
                    agent.ip,
                    identity.device_id
                );
                holding_certificate += 1;
            } else {
                ensure!(
                    !file.exists(),
                    "till {} holds a certificate in plaintext",
                    agent.ip
                );
            }
            let current = agent.data_dir.join("slots/pos-app/current");
            let slot = std::fs::canonicalize(&current)
                .with_context(|| format!("till {}: {}", agent.ip, current.display()))?;
            ensure!(
                slot.file_name() == Some("1.0.0".as_ref()),
                "till {}: the current slot is {}",
                agent.ip,
                slot.display()
            );
            let expected = std::fs::read_to_string(slot.join("payload.sha256"))?;
            let actual = sha256_file(&slot.join("payload.bin"))?;
            ensure!(
                expected.trim() == actual,
                "till {}: payload.bin in the current slot is not the published one",
                agent.ip
            );
            payload_whole += 1;
        }
        Ok(Checked {
            control_plane_lists_installed: installed(&listed),
            control_plane_lists_valid_certificate: valid_certificates,
            tills_holding_their_certificate: holding_certificate,
            tills_with_payload_whole: payload_whole,
        })
    }
}

/// SHA-256 of a file, as hex, read 1 MiB at a time.
fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0; MIB as usize];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

/// What the origin's byte count must show: with P2P about one bundle for
/// the whole store (a second whole download would make 2), without it at
/// least one bundle per till.
fn check_origin_bytes(run: &RunReport, bundle_bytes: u64) -> anyhow::Result<()> {
    if run.p2p {
        ensure!(
            run.origin_bytes_over_size < 1.5,
            "P2P on: the origin sent {:.3} x the bundle for {} tills: the store did not share it",
            run.origin_bytes_over_size,
            run.tills
        );
    } else {
        ensure!(
            run.origin_bytes >= run.tills as u64 * bundle_bytes,
            "P2P off: the origin sent {:.3} x the bundle for {} tills, each fetching it whole",
            run.origin_bytes_over_size,
            run.tills
        );
    }
    Ok(())
}

fn till_report(agent: &Agent, assigned: Instant) -> anyhow::Result<TillReport> {
    let process = &agent.process;
    let (downloaded_at, line) = process
        .first("Bundle downloaded and verified.")
        .context("no download line")?;
    let (installed_at, _) = process
        .first("Bundle installed.")
        .context("no install line")?;
    let (origin_fetches, origin_pieces_asked) = process.with_log(|log| {
        log.iter()
            .filter(|l| l.value["message"] == "Fetching from the origin.")
            .fold((0, 0), |(n, pieces), l| {
                (n + 1, pieces + l.value["pieces"].as_u64().unwrap_or(0))
            })
    });
    let device_id = process
        .first("Agent running.")
        .and_then(|(_, v)| v["device_id"].as_str().map(str::to_string))
        .unwrap_or_default();
    let since = |message: &str| {
        process
            .first_since(message, assigned)
            .map(|at| (at - assigned).as_secs_f64())
    };
    Ok(TillReport {
        ip: agent.ip.clone(),
        device_id,
        seconds_to_desired_state: since("New desired state."),
        seconds_to_fetch_start: since("Fetching a bundle."),
        seconds_to_origin_fetch: since("Fetching from the origin."),
        seconds_to_pieces_complete: since("Bundle complete."),
        seconds_to_downloaded: (downloaded_at - assigned).as_secs_f64(),
        seconds_to_installed: (installed_at - assigned).as_secs_f64(),
        bytes_from_origin: line["from_origin"].as_u64().unwrap_or(0),
        bytes_from_peers: line["from_peers"].as_u64().unwrap_or(0),
        origin_fetches,
        origin_pieces_asked,
        peak_rss_mib: status_kib(process.pid(), "VmHWM:").context("the process is gone")? as f64
            / 1024.0,
    })
}

fn physical_limit_seconds(bytes: u64, wan_mbit: u64) -> f64 {
    bytes as f64 * 8.0 / (wan_mbit as f64 * 1e6)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------- report

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    command: String,
    /// The commit measured (`git describe`).
    commit: Option<String>,
    cores: usize,
    load_average_before: Vec<f64>,
    load_average_after: Vec<f64>,
    tills: usize,
    /// The control plane served TLS and the tills spoke mutual TLS once
    /// enrolled (else plaintext with `--insecure-dev`).
    tls: bool,
    transport: &'static str,
    wan_mbit_per_second: u64,
    wan: String,
    lan: &'static str,
    peer_discovery: &'static str,
    agent_args: Vec<String>,
    payload_mib: u64,
    bundle_bytes: u64,
    /// Bundle size over the WAN rate.
    physical_limit_seconds: f64,
    runs: Vec<RunReport>,
    targets: Option<Targets>,
}

#[derive(Debug, Serialize)]
struct Targets {
    origin_bytes_over_size_at_most: f64,
    last_downloaded_over_physical_limit_at_most: f64,
    peak_rss_mib_below: f64,
    origin_bytes_met: bool,
    time_met: bool,
    peak_rss_met: bool,
    met: bool,
}

impl Targets {
    fn of(run: &RunReport) -> Targets {
        let origin_bytes_met = run.origin_bytes_over_size <= 1.01;
        let time_met = run.last_downloaded_over_physical_limit <= 1.15;
        let peak_rss_met = run.peak_rss_max_mib < 64.0;
        Targets {
            origin_bytes_over_size_at_most: 1.01,
            last_downloaded_over_physical_limit_at_most: 1.15,
            peak_rss_mib_below: 64.0,
            origin_bytes_met,
            time_met,
            peak_rss_met,
            met: origin_bytes_met && time_met && peak_rss_met,
        }
    }
}

fn print_summary(report: &Report) {
    println!();
    println!(
        "store-bench: {} tills, {}, WAN {} Mbit/s (tc tbf), bundle {:.1} MiB, physical limit {:.1} s",
        report.tills,
        if report.tls {
            "mutual TLS"
        } else {
            "plaintext"
        },
        report.wan_mbit_per_second,
        report.bundle_bytes as f64 / MIB as f64,
        report.physical_limit_seconds
    );
    println!(
        "{:<8} {:>5} {:>12} {:>14} {:>8} {:>14} {:>8} {:>16} {:>8}",
        "run",
        "tills",
        "origin/size",
        "last download",
        "/limit",
        "last install",
        "/limit",
        "peak RSS max/med",
        "origin"
    );
    for run in &report.runs {
        println!(
            "{:<8} {:>5} {:>12.3} {:>12.1} s {:>8.2} {:>12.1} s {:>8.2} {:>9.1}/{:.1} MiB {:>8}",
            if run.p2p { "P2P on" } else { "P2P off" },
            run.tills,
            run.origin_bytes_over_size,
            run.seconds_to_last_downloaded,
            run.last_downloaded_over_physical_limit,
            run.seconds_to_last_installed,
            run.last_installed_over_physical_limit,
            run.peak_rss_max_mib,
            run.peak_rss_median_mib,
            run.tills_fetching_from_origin
        );
        if let (Some(from), Some(why)) = (run.tills_reduced_from, &run.tills_reduced_why) {
            println!("         ({} tills instead of {from}: {why})", run.tills);
        }
        if !run.warnings.is_empty() {
            println!("         warnings: {:?}", run.warnings);
        }
        if let Some(d) = &run.delta {
            println!(
                "         then 1.1.0 as a delta: {} of {} bytes ({:.4}); origin sent {:.2} x the delta; \
                 last install after {:.1} s (whole bundle: {:.1} s); rebuild median {:.2} s, max {:.2} s; \
                 {:.1} MiB saved as reported; peak RSS {:.1} MiB",
                d.delta_bytes,
                d.bundle_bytes,
                d.delta_over_bundle,
                d.origin_bytes_over_delta,
                d.seconds_to_last_installed,
                d.full_seconds_to_last_installed,
                d.rebuild_seconds_median,
                d.rebuild_seconds_max,
                d.bytes_saved_reported as f64 / MIB as f64,
                d.peak_rss_max_mib
            );
        }
    }
    if let Some(t) = &report.targets {
        let mark = |met: bool| if met { "met" } else { "NOT met" };
        println!(
            "Targets with P2P: origin bytes <= 1.01 x size {}; last till within 1.15 x limit {}; peak RSS < 64 MiB {}",
            mark(t.origin_bytes_met),
            mark(t.time_met),
            mark(t.peak_rss_met)
        );
    }
}

// ---------------------------------------------------------------- main

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(url) = &args.http_get {
        return match http_get(url, args.http_get_ca_file.as_deref()) {
            Ok(body) => {
                print!("{body}");
                std::process::ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // Every guard (processes, namespaces, work dir) is dropped when
    // `bench` returns, whatever it returns.
    match bench(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("Interrupted: the tills are stopped and the namespaces removed.");
            std::process::ExitCode::from(130)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn bench(args: &Args) -> anyhow::Result<()> {
    ensure!(
        (1..=250).contains(&args.tills),
        "--tills must be between 1 and 250"
    );
    ensure!(
        args.wan_mbit > 0 && args.payload_mib > 0,
        "--wan-mbit and --payload-mib must be positive"
    );
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(|e| anyhow!("needs root: cannot open {LOCK_FILE}: {e}"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow!("another store-bench is running ({LOCK_FILE}: {e})"))?;
    watch_signals();
    remove_stale_namespaces();
    remove_stale_work_dirs();
    let load_average_before = load_average();

    // The binaries are built (a no-op when up to date) before the clock
    // and the network matter.
    eprintln!("Building the binaries (a no-op when they are up to date)...");
    let _ = binary("posfleet-agent");
    let work = tempfile::Builder::new().prefix(WORK_DIR_PREFIX).tempdir()?;
    eprintln!(
        "Creating the network: origin, WAN link at {} Mbit/s, store bridge, {} tills...",
        args.wan_mbit, args.tills
    );
    let lan = Lan::create(args.tills, args.wan_mbit)?;
    let mut origin = Origin::start(&lan, work.path(), !args.plaintext)?;
    eprintln!(
        "Building and publishing pos-app 1.0.0 with {} MiB of payload...",
        args.payload_mib
    );
    let bundle_bytes = origin.publish(work.path(), "1.0.0", args.payload_mib * MIB, args.delta)?;
    let bench = Bench {
        args,
        lan: &lan,
        origin: &origin,
        work: work.path(),
        bundle_bytes,
    };
    let limit = physical_limit_seconds(bundle_bytes, args.wan_mbit);

    let mut runs = Vec::new();
    for mode in &args.runs {
        check_interrupted()?;
        let report = match mode {
            Mode::On => Run::new(&bench, true, args.tills).execute(None)?,
            Mode::Off => {
                let fit = ((args.max_off_seconds as f64 / limit).floor() as usize).max(1);
                if fit < args.tills {
                    let why = format!(
                        "{} tills x {limit:.1} s at the WAN rate would pass {} s",
                        args.tills, args.max_off_seconds
                    );
                    Run::new(&bench, false, fit).execute(Some((args.tills, why)))?
                } else {
                    Run::new(&bench, false, args.tills).execute(None)?
                }
            }
        };
        eprintln!(
            "  done: last till downloaded after {:.1} s ({:.2} x the limit), installed after {:.1} s; origin sent {:.3} x the size",
            report.seconds_to_last_downloaded,
            report.last_downloaded_over_physical_limit,
            report.seconds_to_last_installed,
            report.origin_bytes_over_size
        );
        runs.push(report);
    }
    origin.process.stop(Duration::from_secs(10));

    let targets = runs.iter().find(|r| r.p2p).map(Targets::of);
    let report = Report {
        benchmark: "store-bench",
        command: posfleet_e2e::command_line(),
        commit: posfleet_e2e::measured_commit(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average_before,
        load_average_after: load_average(),
        tills: args.tills,
        tls: origin.tls,
        transport: if origin.tls {
            "TLS: the control plane serves gRPC and HTTP with `--tls-server-name 10.77.0.1`; each till enrolls over server-authenticated TLS with the token and the fleet CA's fingerprint, then every call and /repo/ download is mutual TLS with its certificate"
        } else {
            "plaintext gRPC and HTTP, `--insecure-dev` on the control plane, the agents and the CLI"
        },
        wan_mbit_per_second: args.wan_mbit,
        wan: format!(
            "veth pair origin-store, `tc {}` on both ends",
            tbf_args(args.wan_mbit)
        ),
        lan: "Linux bridge in the store namespace, unshaped; one veth pair per till",
        peer_discovery: if args.mdns {
            "control plane's membership list and mDNS"
        } else {
            "control plane's membership list (mDNS off)"
        },
        agent_args: args.agent_arg.clone(),
        payload_mib: args.payload_mib,
        bundle_bytes,
        physical_limit_seconds: limit,
        runs,
        targets,
    };
    print_summary(&report);
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, format!("{json}\n"))?;
    println!("Figures written to {}", args.output.display());
    for run in &report.runs {
        check_origin_bytes(run, bundle_bytes)?;
    }
    Ok(())
}
