//! Helpers for end-to-end tests and benchmarks: they start the real
//! `posfleet-control-plane`, `posfleet-agent` and `posfleet` binaries and
//! read what they print, as an operator would.

pub mod backup;
pub mod dashboards;
pub mod fleet;
pub mod kill9;
pub mod link;
pub mod moto;
pub mod prometheus;
pub mod replicas;
pub mod selfupdate;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Builds the workspace's binaries once per test process (a no-op when they
/// are up to date) and returns the folder holding them.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut args = vec![
            "build",
            "--quiet",
            "--bins",
            "-p",
            "posfleet-control-plane",
            "-p",
            "posfleet-agent",
            "-p",
            "posfleet",
        ];
        if !cfg!(debug_assertions) {
            args.push("--release");
        }
        // The cargo that runs us (`cargo test`, `cargo run`), else the one on
        // PATH; not the compile-time path, which bypasses rustup's choice of
        // toolchain for the nested build.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        // What cargo set for this program (`cargo run`, `cargo test`) is not
        // the nested build's: build scripts that watch these variables (ring
        // watches CARGO_MANIFEST_DIR and CARGO_PKG_*) would otherwise be
        // rerun, and everything above them rebuilt, by this build and again
        // by the next ordinary one.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref())
            {
                command.env_remove(name.as_ref());
            }
        }
        let status = command
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        // Test binaries live in target/<profile>/deps/, other binaries
        // (fleet-sim) in target/<profile>/.
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("the executable's folder").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir
    })
    .clone()
}

pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The command line a benchmark was run with, for its figures file: the
/// program by name (not where it was built) and its arguments.
pub fn command_line() -> String {
    let mut args = std::env::args();
    let program = args.next().map(PathBuf::from);
    let name = program
        .as_deref()
        .and_then(Path::file_name)
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::iter::once(name)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes a benchmark's figures to `path` as pretty JSON (making its
/// folder) and returns the JSON.
pub fn write_figures(path: &Path, figures: &impl serde::Serialize) -> anyhow::Result<String> {
    let json = serde_json::to_string_pretty(figures)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, format!("{json}\n"))?;
    Ok(json)
}

/// A line a process printed on stderr, with the moment it arrived.
pub struct LogLine {
    pub at: Instant,
    pub text: String,
    /// The line parsed as JSON; a JSON string of the text when it is not.
    pub value: serde_json::Value,
}

/// A process whose stderr lines are collected as they come. Killed on drop.
pub struct Process {
    pub child: Child,
    log: Arc<Mutex<Vec<LogLine>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    pub fn spawn(command: Command) -> Process {
        Process::try_spawn(command).expect("spawn process")
    }

    pub fn try_spawn(mut command: Command) -> std::io::Result<Process> {
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = command.spawn()?;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for text in BufReader::new(stderr).lines().map_while(Result::ok) {
                let at = Instant::now();
                let value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| serde_json::Value::String(text.clone()));
                sink.lock()
                    .expect("log lock")
                    .push(LogLine { at, text, value });
            }
        });
        Ok(Process {
            child,
            log,
            reader: Some(reader),
        })
    }

    /// Runs `f` on the lines printed so far.
    pub fn with_log<R>(&self, f: impl FnOnce(&[LogLine]) -> R) -> R {
        f(&self.log.lock().expect("log lock"))
    }

    pub fn lines(&self) -> Vec<String> {
        self.with_log(|log| log.iter().map(|line| line.text.clone()).collect())
    }

    /// The first JSON log line with this message, and when it arrived.
    pub fn first(&self, message: &str) -> Option<(Instant, serde_json::Value)> {
        self.with_log(|log| {
            log.iter()
                .find(|line| line.value["message"] == message)
                .map(|line| (line.at, line.value.clone()))
        })
    }

    /// When the first log line with this message arrived at or after `since`.
    pub fn first_since(&self, message: &str, since: Instant) -> Option<Instant> {
        self.with_log(|log| {
            log.iter()
                .find(|line| line.at >= since && line.value["message"] == message)
                .map(|line| line.at)
        })
    }

    /// Waits for a JSON log line with this message; returns it parsed.
    pub fn wait_for_log(&self, message: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, value)) = self.first(message) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "no log line `{message}` within {timeout:?}; log:\n{}",
                self.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Err` naming the exit status and the last lines of the log once the
    /// process has exited.
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let tail = self.with_log(|log| {
                    let start = log.len().saturating_sub(10);
                    log[start..]
                        .iter()
                        .map(|line| line.text.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                });
                Err(format!("exited ({status}); its last log lines:\n{tail}"))
            }
            _ => Ok(()),
        }
    }

    /// Waits for the process to exit and for all it printed to be read.
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.child.wait().expect("wait for process");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        status
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = kill(self.pid(), Signal::SIGTERM);
        self.wait()
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = kill(self.pid(), Signal::SIGKILL);
        self.child.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill9();
        }
    }
}

/// The password the first admin sets at the first start.
pub const ADMIN_PASSWORD: &str = "first admin's password";

/// Sets the first admin up through the real flow (`setup_code`, then
/// [`ADMIN_PASSWORD`] and a TOTP code from `posfleet_proto::totp`) against
/// the control plane at `url` (trusting `ca_file` over TLS), from inside
/// network namespace `netns` when given; returns their session token.
pub fn first_admin_session(
    url: &str,
    ca_file: Option<&Path>,
    setup_code: &str,
    netns: Option<&str>,
) -> anyhow::Result<String> {
    person_session(url, ca_file, "admin", setup_code, netns)
}

/// Sets user `user` up through the real flow (their `setup_code`, then
/// [`ADMIN_PASSWORD`] and a TOTP code) as [`first_admin_session`] does;
/// returns their session token.
pub fn person_session(
    url: &str,
    ca_file: Option<&Path>,
    user: &str,
    setup_code: &str,
    netns: Option<&str>,
) -> anyhow::Result<String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?;
    let tls = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)?;
            let ca = posfleet_pki::certificates_from_pem(&pem, "the trust bundle")?;
            Some(Arc::new(posfleet_pki::client_config(&ca, None)?))
        }
        None => None,
    };
    let code = setup_code.to_string();
    let user = user.to_string();
    let netns = netns.map(|n| format!("/run/netns/{n}"));
    // On a thread of its own: the caller may be inside a runtime, and a
    // namespace is entered by one thread only.
    std::thread::spawn(move || -> anyhow::Result<String> {
        if let Some(path) = netns {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The channel is made inside the runtime: making one needs its
        // reactor.
        let done = runtime.block_on(async {
            posfleet_proto::setup::complete_setup(
                posfleet_pki::grpc_channel(&endpoint, tls),
                &user,
                &code,
                ADMIN_PASSWORD,
            )
            .await
        })?;
        Ok(done.session.token)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the setup thread panicked"))?
}

/// Writes `text` to a file only its owner may read.
pub fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(text.as_bytes()).expect("write the file");
}

/// A `posfleet-control-plane` process.
pub struct ControlPlane {
    pub process: Process,
    pub grpc_address: String,
    pub http_address: String,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    /// Whether its listeners serve TLS (`--tls-server-name`).
    pub tls: bool,
}

impl ControlPlane {
    /// Starts on the given addresses (`127.0.0.1:0` for any free port) and
    /// waits until both listeners are up.
    pub fn start(
        data_dir: &Path,
        database_url: Option<&str>,
        grpc: &str,
        http: &str,
        extra: &[&str],
    ) -> ControlPlane {
        let mut command = Command::new(binary("posfleet-control-plane"));
        command
            .args(["--data-dir", data_dir.to_str().expect("utf-8 path")])
            .args(["--grpc-listen-address", grpc, "--http-listen-address", http])
            .args(["--log-format", "json"])
            .args(extra);
        if let Some(url) = database_url {
            command.args(["--database-url", url]);
        }
        let process = Process::spawn(command);
        let listening = process.wait_for_log("gRPC listening.", Duration::from_secs(30));
        let grpc_address = listening["address"]
            .as_str()
            .expect("address field")
            .to_string();
        let tls = listening["tls"].as_bool().unwrap_or(false);
        let http_address =
            process.wait_for_log("HTTP listening.", Duration::from_secs(30))["address"]
                .as_str()
                .expect("address field")
                .to_string();
        let control_plane = ControlPlane {
            process,
            grpc_address,
            http_address,
            data_dir: data_dir.to_path_buf(),
            database_url: database_url.map(str::to_string),
            tls,
        };
        control_plane.set_up_first_admin();
        control_plane
    }

    /// At the first start on a data dir: sets the first admin up through
    /// the real flow (their setup code, [`ADMIN_PASSWORD`], a TOTP code)
    /// and keeps their session in [`ControlPlane::admin_token_file`]. A
    /// later start on the same data dir keeps that session.
    fn set_up_first_admin(&self) {
        let session_file = self.admin_token_file();
        if session_file.exists() {
            return;
        }
        let Ok(code) = std::fs::read_to_string(self.data_dir.join("admin-setup-code")) else {
            // A replica on a database another control plane set up.
            return;
        };
        let ca_file = self.tls.then(|| self.ca_file());
        let token = first_admin_session(&self.url(), ca_file.as_deref(), &code, None)
            .expect("set up the first admin");
        write_private(&session_file, &format!("{token}\n"));
    }

    /// A control plane on SQLite in `data_dir`, on any free ports.
    pub fn start_sqlite(data_dir: &Path) -> ControlPlane {
        ControlPlane::start(data_dir, None, "127.0.0.1:0", "127.0.0.1:0", &[])
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc_address)
    }

    /// The fleet CA's certificate, which tills and the CLI trust when the
    /// control plane serves TLS.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("tls").join("trust-bundle.pem")
    }

    /// A session token of the first admin, for `--token-file`: written by
    /// the harness at the first start, beside the data dir.
    pub fn admin_token_file(&self) -> PathBuf {
        let mut name = self.data_dir.as_os_str().to_owned();
        name.push(".admin-session");
        name.into()
    }

    /// `posfleet-control-plane backup --to DIR` with this control plane's
    /// data dir and database, while it serves; asserts success.
    pub fn backup(&self, to: &Path) -> String {
        check_ok(
            control_plane_command(
                &self.data_dir,
                self.database_url.as_deref(),
                "backup",
                "--to",
                to,
            )
            .output()
            .expect("run posfleet-control-plane backup"),
        )
    }

    /// Runs the `posfleet` CLI against this control plane.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run posfleet")
    }

    /// The `posfleet` CLI against this control plane, to run as the test
    /// needs (in the background, say).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        self.cli_command_as(&self.admin_token_file(), args)
    }

    /// Creates user `name` with `role` (as the first admin), sets them up
    /// as a person would, and returns the file holding their session: a
    /// second person, for four-eyes approvals ([`ControlPlane::cli_as`]).
    pub fn second_person(&self, name: &str, role: &str) -> PathBuf {
        let created = self.cli_json(&["user", "create", name, "--role", role]);
        let code = created["setup_code"].as_str().expect("a setup code");
        let ca_file = self.tls.then(|| self.ca_file());
        let token = person_session(&self.url(), ca_file.as_deref(), name, code, None)
            .unwrap_or_else(|e| panic!("set up user {name}: {e:#}"));
        let mut file = self.data_dir.as_os_str().to_owned();
        file.push(format!(".{name}-session"));
        let file = PathBuf::from(file);
        write_private(&file, &format!("{token}\n"));
        file
    }

    /// Runs the `posfleet` CLI with the session or token in `token_file`.
    pub fn cli_as(&self, token_file: &Path, args: &[&str]) -> Output {
        self.cli_command_as(token_file, args)
            .output()
            .expect("run posfleet")
    }

    fn cli_command_as(&self, token_file: &Path, args: &[&str]) -> Command {
        let ca_file = self.tls.then(|| self.ca_file());
        let mut command = cli_command_at(&self.url(), token_file, ca_file.as_deref());
        command.args(args);
        command
    }

    /// `posfleet store create`, named after its id.
    pub fn create_store(&self, store: &str, time_zone: &str) {
        self.cli_json(&create_store_args(store, time_zone));
    }

    /// Runs the CLI with `--output json`, asserting success, and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        cli_json(self.cli_command(&[]), args)
    }
}

/// `posfleet store create` of a store named after its id, in `time_zone`.
pub fn create_store_args<'a>(store: &'a str, time_zone: &'a str) -> [&'a str; 7] {
    [
        "store",
        "create",
        store,
        "--name",
        store,
        "--time-zone",
        time_zone,
    ]
}

/// The `posfleet` CLI against the control plane at `url` (trusting
/// `ca_file` over TLS), with the session in `token_file`.
pub fn cli_command_at(url: &str, token_file: &Path, ca_file: Option<&Path>) -> Command {
    let mut command = Command::new(binary("posfleet"));
    command
        .args(["--server", url])
        .arg("--token-file")
        .arg(token_file);
    if let Some(ca_file) = ca_file {
        command.arg("--ca-file").arg(ca_file);
    }
    command
}

/// Runs `command` (the CLI, see [`cli_command_at`]) with `--output json`
/// and `args`, asserting success, and parses stdout.
pub fn cli_json(mut command: Command, args: &[&str]) -> serde_json::Value {
    let output = command
        .args(["--output", "json"])
        .args(args)
        .output()
        .expect("run posfleet");
    assert!(
        output.status.success(),
        "posfleet {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

/// `posfleet-control-plane restore --from DIR` into `data_dir` and the
/// database at `database_url` (SQLite in `data_dir` if `None`); asserts
/// success.
pub fn restore(data_dir: &Path, database_url: Option<&str>, from: &Path) -> String {
    check_ok(
        control_plane_command(data_dir, database_url, "restore", "--from", from)
            .output()
            .expect("run posfleet-control-plane restore"),
    )
}

/// `posfleet-control-plane` on `data_dir` and `database_url`, running
/// `command` with `flag` `path`.
fn control_plane_command(
    data_dir: &Path,
    database_url: Option<&str>,
    command: &str,
    flag: &str,
    path: &Path,
) -> Command {
    let mut cp = Command::new(binary("posfleet-control-plane"));
    cp.arg("--data-dir").arg(data_dir);
    if let Some(url) = database_url {
        cp.args(["--database-url", url]);
    }
    cp.args(["--log-level", "warn", command, flag]).arg(path);
    cp
}

/// Starts a `posfleet-agent` process.
pub fn start_agent(server_url: &str, data_dir: &Path, token: &str, extra: &[&str]) -> Process {
    let mut command = Command::new(binary("posfleet-agent"));
    command
        .args(["--server-url", server_url])
        .args(["--data-dir", data_dir.to_str().expect("utf-8 path")])
        .args(["--enrollment-token", token])
        .args(["--log-format", "json", "--max-backoff-seconds", "2"])
        .args(extra);
    // Tills of a test share one machine: loopback, a free port each, peers
    // from the control plane's list, unless the test says otherwise.
    if !extra.contains(&"--p2p-listen-addrs") {
        command.args(["--p2p-listen-addrs", "/ip4/127.0.0.1/tcp/0"]);
    }
    if !extra.contains(&"--p2p-mdns") {
        command.args(["--p2p-mdns", "false"]);
    }
    Process::spawn(command)
}

/// CPU time a process has used, in seconds: its own, and that of its
/// children it has waited for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
    pub children_user: f64,
    pub children_system: f64,
}

impl CpuTimes {
    /// Of process `pid` (or `"self"`); `None` once it is gone.
    pub fn of(pid: impl std::fmt::Display) -> Option<CpuTimes> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name (which may hold
        // spaces): utime, stime, cutime and cstime are the 14th to 17th of
        // the line, in clock ticks.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let seconds =
            |i: usize| -> Option<f64> { Some(fields.get(i)?.parse::<u64>().ok()? as f64 / hz) };
        Some(CpuTimes {
            user: seconds(11)?,
            system: seconds(12)?,
            children_user: seconds(13)?,
            children_system: seconds(14)?,
        })
    }

    /// What was used between `before` and `self`.
    pub fn since(&self, before: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user - before.user,
            system: self.system - before.system,
            children_user: self.children_user - before.children_user,
            children_system: self.children_system - before.children_system,
        }
    }
}

/// CPU time (user + system) process `pid` has used so far, in seconds;
/// `None` once it is gone.
pub fn cpu_seconds(pid: impl std::fmt::Display) -> Option<f64> {
    CpuTimes::of(pid).map(|times| times.user + times.system)
}

/// The most memory process `pid` (or `"self"`) has held at once, in bytes;
/// `None` once it is gone.
pub fn peak_rss_bytes(pid: impl std::fmt::Display) -> Option<u64> {
    status_kib(pid, "VmHWM:").map(|kib| kib * 1024)
}

/// A field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in KiB; `None` once
/// the process is gone.
pub fn status_kib(pid: impl std::fmt::Display, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The median of `values` (0 for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A PostgreSQL database created for one test on the server named by
/// `POSFLEET_TEST_POSTGRES_URL`, dropped on `Drop`.
pub struct PostgresDb {
    server: String,
    name: String,
    pub url: String,
}

pub const POSTGRES_ENV: &str = "POSFLEET_TEST_POSTGRES_URL";

impl PostgresDb {
    pub fn create() -> PostgresDb {
        let server = std::env::var(POSTGRES_ENV)
            .unwrap_or_else(|_| panic!("{POSTGRES_ENV} must name a PostgreSQL server"));
        PostgresDb::create_on(&server)
    }

    /// Creates the database on the server at `server` (a URL naming any
    /// existing database there).
    pub fn create_on(server: &str) -> PostgresDb {
        let server = server.to_string();
        let name = format!(
            "posfleet_e2e_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        psql(&server, &format!("CREATE DATABASE {name}"));
        let (base, _) = server.rsplit_once('/').expect("URL names a database");
        PostgresDb {
            url: format!("{base}/{name}"),
            server,
            name,
        }
    }
}

impl PostgresDb {
    /// Drops everything in the database, leaving it empty (as lost data
    /// would).
    pub fn wipe(&self) {
        psql(
            &self.url,
            "DROP SCHEMA public CASCADE; CREATE SCHEMA public",
        );
    }
}

impl Drop for PostgresDb {
    fn drop(&mut self) {
        psql(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) {
    let status = Command::new("psql")
        .args([url, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdout(Stdio::null())
        .status()
        .expect("run psql");
    assert!(status.success(), "psql {sql} failed");
}

/// The rows `sql` returns from the database at `url`, each a list of
/// its columns as text (read with `psql`, as an operator would).
pub fn psql_rows(url: &str, sql: &str) -> Vec<Vec<String>> {
    let out = check_ok(
        Command::new("psql")
            .args([
                url,
                "-q",
                "-A",
                "-t",
                "-F",
                "\t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql"),
    );
    out.lines()
        .filter(|line| !line.is_empty())
        .map(|line| line.split('\t').map(str::to_string).collect())
        .collect()
}

/// Asserts a command succeeded and returns its stdout.
pub fn check_ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Runs `future` to completion on a runtime of its own (a test calling
/// the agent's async client from a plain `#[test]`).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

/// `len` incompressible bytes, the same for the same `seed` (xorshift64).
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The device id an agent saved in `data` when it enrolled, once it has.
pub fn enrolled_device_id(data: &Path) -> Option<String> {
    std::fs::read_to_string(data.join("enrollment.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["device_id"].as_str().map(str::to_string))
}

/// The example POS program shipped in `examples/pos-app`.
pub fn pos_app_example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pos-app")
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// A copy of `examples/pos-app` in `dest` at `version`; `healthy = false`
/// makes its health check fail. `payload` extra bytes (deterministic per
/// version, incompressible) make the bundle span several pieces, with
/// their SHA-256 in `payload.sha256` so a slot can be checked whole.
pub fn pos_app_source(dest: &Path, version: &str, healthy: bool, payload: usize) -> PathBuf {
    copy_tree(&pos_app_example(), dest);
    let manifest = dest.join("posfleet-bundle.toml");
    let text = std::fs::read_to_string(&manifest).expect("read manifest");
    let text = text.replace("version = \"1.0.0\"", &format!("version = \"{version}\""));
    std::fs::write(&manifest, text).expect("write manifest");
    if !healthy {
        std::fs::write(dest.join("pos-app.conf"), "healthy=no\n").expect("write conf");
    }
    if payload > 0 {
        use sha2::Digest;
        let seed = version.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |s, b| {
            s.rotate_left(5) ^ u64::from(b)
        });
        let data = pseudo_random_bytes(seed, payload);
        std::fs::write(
            dest.join("payload.sha256"),
            hex::encode(sha2::Sha256::digest(&data)),
        )
        .expect("write sum");
        std::fs::write(dest.join("payload.bin"), data).expect("write payload");
    }
    dest.to_path_buf()
}

impl ControlPlane {
    /// `posfleet keys init KEYS`: one key per role, the repository live.
    pub fn init_repository(&self, keys: &Path) {
        check_ok(self.cli(&["keys", "init", keys.to_str().expect("utf-8 path")]));
    }

    /// Builds the bundle source `src` into `file` with `posfleet bundle
    /// build`; returns `file`.
    pub fn build_bundle(&self, src: &Path, file: &Path) -> PathBuf {
        check_ok(self.cli(&[
            "bundle",
            "build",
            src.to_str().expect("utf-8 path"),
            "-o",
            file.to_str().expect("utf-8 path"),
        ]));
        file.to_path_buf()
    }

    /// Builds `src` with `posfleet bundle build` and publishes it signed
    /// with `keys`, without deltas (tests of deltas make them themselves);
    /// returns the bundle file.
    pub fn publish(&self, src: &Path, keys: &Path) -> PathBuf {
        let file = self.build_bundle(src, &src.with_extension("bundle"));
        check_ok(self.cli(&[
            "bundle",
            "publish",
            file.to_str().expect("utf-8 path"),
            "--keys",
            keys.to_str().expect("utf-8 path"),
            "--no-deltas",
        ]));
        file
    }

    /// What `device` last reported of bundle `name` (`posfleet device show`):
    /// `target_version`, `active_version`, `phase`, `error`…; null if nothing.
    pub fn bundle_status(&self, device: &str, name: &str) -> serde_json::Value {
        let shown = self.cli_json(&["device", "show", device]);
        shown["bundles"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["name"] == name))
            .map(|b| b["status"].clone())
            .unwrap_or_default()
    }

    /// The value of one sample of the control plane's `/metrics`, named as
    /// Prometheus prints it (`name` or `name{label="value"}`); 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.http_address).expect("connect");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        response
            .lines()
            .filter_map(|line| line.rsplit_once(' '))
            .find(|(name, _)| *name == sample)
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0.0)
    }

    /// Arguments that point an agent at this control plane's repository.
    /// The agent flags for this control plane's repository, and (when it
    /// serves TLS) the fleet CA to trust until enrolled.
    pub fn repository_args(&self, keys: &Path) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        let mut args = vec![
            "--root-json-path".into(),
            keys.join("root.json").to_str().expect("utf-8 path").into(),
            "--repository-url".into(),
            format!("{scheme}://{}/repo/", self.http_address),
        ];
        if self.tls {
            args.push("--ca-cert-path".into());
            args.push(self.ca_file().to_str().expect("utf-8 path").into());
        }
        args
    }
}

/// The commit a benchmark measures (`git describe --always --dirty` of the
/// checkout it was built from), for its figures file; `None` outside a
/// checkout.
pub fn measured_commit() -> Option<String> {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let out = Command::new("git")
        .arg("-C")
        .arg(checkout)
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !commit.is_empty()).then_some(commit)
}
