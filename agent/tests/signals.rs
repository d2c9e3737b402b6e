//! The local signal API over a real Unix datagram socket, and
//! `posfleet-agent signal`.

use posfleet_agent::signals::Signals;
use posfleet_agent::signals::socket::{self, MAX_DATAGRAM_BYTES};
use posfleet_proto::signals::{MAX_NAMES, MAX_VALUES_PER_NAME};
use posfleet_proto::v1::SignalMinute;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// An agent's signals on a clock the test moves, served on `dir/signals.sock`.
struct Api {
    signals: Signals,
    minute: Arc<AtomicI64>,
    path: std::path::PathBuf,
    _server: tokio::task::JoinHandle<()>,
}

impl Api {
    fn start(dir: &Path) -> Api {
        let minute = Arc::new(AtomicI64::new(29_000_000));
        let clock = minute.clone();
        let signals = Signals::with_clock(move || clock.load(Ordering::SeqCst));
        let path = dir.join("signals.sock");
        let server = socket::spawn_server(socket::bind(&path).unwrap(), signals.clone());
        Api {
            signals,
            minute,
            path,
            _server: server,
        }
    }

    fn send(&self, datagram: &[u8]) {
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(datagram, &self.path).unwrap();
    }

    /// The minute being filled and the drops so far, once `done` says
    /// the agent received what was sent.
    async fn wait_for(&self, done: impl Fn(&SignalMinute, u64) -> bool) -> (SignalMinute, u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let (Some(minute), dropped) = self.signals.current()
                && done(&minute, dropped)
            {
                return (minute, dropped);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not receive the datagrams: {:?}",
                self.signals.current()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn good_lines_are_kept_and_bad_ones_counted_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path());
    api.send(b"transactions:2|c\ncheckout_seconds:0.8|v\nfailed_tenders|c\n");
    api.send(b"transactions|c\n\ncheckout_seconds:1.25|v");
    // Malformed, an invalid name, a bad count, a bad value, the agent's own
    // names: five drops and a reserved pair.
    api.send(b"transactions:2\nCard-Reads|c\ntransactions:-1|c\ncheckout_seconds:nan|v");
    api.send(b"service_crashes|c\nhealth_check_seconds:0.1|v");
    // Not UTF-8: one drop for the datagram.
    api.send(b"transactions:1|c\xff");
    api.send(b"end_of_test|c");
    let (minute, dropped) = api
        .wait_for(|m, _| m.counts.contains_key("end_of_test"))
        .await;
    assert_eq!(minute.counts.len(), 3);
    assert_eq!(minute.counts["transactions"], 3);
    assert_eq!(minute.counts["failed_tenders"], 1);
    assert_eq!(minute.values["checkout_seconds"].values, [0.8, 1.25]);
    assert_eq!(dropped, 7);
    // The next minute: the heartbeat carries this one, and the drops.
    api.minute.fetch_add(1, Ordering::SeqCst);
    let batch = api.signals.batch();
    assert_eq!(batch.minutes, [minute]);
    assert_eq!(batch.dropped, 7);
}

#[tokio::test]
async fn caps_hold_names_values_and_datagram_size() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path());
    // A name short of the cap…
    let names: String = (1..MAX_NAMES).map(|i| format!("signal_{i}|c\n")).collect();
    api.send(names.as_bytes());
    // …taken by values, more of them than kept: a sample.
    let values: String = (0..MAX_VALUES_PER_NAME * 2)
        .map(|i| format!("checkout_seconds:{i}|v\n"))
        .collect();
    assert!(values.len() <= MAX_DATAGRAM_BYTES);
    api.send(values.as_bytes());
    // The minute is full: new names are dropped, known ones still count.
    api.send(b"one_too_many|c\nanother_one:1|v\nsignal_1|c");
    // A datagram over the size cap is dropped whole.
    let long = "signal_1|c\n".repeat(MAX_DATAGRAM_BYTES / 11 + 1);
    assert!(long.len() > MAX_DATAGRAM_BYTES);
    api.send(long.as_bytes());
    api.send(b"signal_2|c");
    let (minute, dropped) = api.wait_for(|m, _| m.counts["signal_2"] == 2).await;
    assert_eq!(minute.counts.len() + minute.values.len(), MAX_NAMES);
    assert_eq!(minute.counts["signal_1"], 2);
    let values = &minute.values["checkout_seconds"].values;
    assert_eq!(values.len(), MAX_VALUES_PER_NAME);
    assert!(values.iter().any(|v| *v >= MAX_VALUES_PER_NAME as f64));
    // Two names over the cap and the long datagram; sampling drops nothing.
    assert_eq!(dropped, 3);
}

/// `posfleet-agent signal` with `args`, the socket from the environment.
fn signal_command(socket: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_posfleet-agent"))
        .arg("signal")
        .args(args)
        .env("POSFLEET_SIGNAL_SOCKET", socket)
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_signal_command_reports_lines_and_refuses_bad_ones_whole() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path());
    let sent = signal_command(&api.path, &["transactions:3|c", "checkout_seconds:1.5|v"]);
    assert!(sent.status.success(), "{sent:?}");
    // A bad line: nothing of the call is sent, and the reason is told.
    let refused = signal_command(&api.path, &["transactions|c", "service_restarts|c"]);
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("`service_restarts` is reported by the agent itself"),
        "{stderr}"
    );
    let malformed = signal_command(&api.path, &["transactions:x|c"]);
    assert_eq!(malformed.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&malformed.stderr).contains("`x` is not a count"),
        "{malformed:?}"
    );
    // --socket wins over the environment.
    let flagged = signal_command(
        Path::new("/nonexistent"),
        &["--socket", api.path.to_str().unwrap(), "failed_tenders|c"],
    );
    assert!(flagged.status.success(), "{flagged:?}");
    let (minute, dropped) = api
        .wait_for(|m, _| m.counts.contains_key("failed_tenders"))
        .await;
    assert_eq!(minute.counts["transactions"], 3);
    assert_eq!(minute.values["checkout_seconds"].values, [1.5]);
    assert_eq!(dropped, 0);
    // No agent listening: a clear error.
    let absent = signal_command(&dir.path().join("absent.sock"), &["transactions|c"]);
    assert_eq!(absent.status.code(), Some(69));
    assert!(
        String::from_utf8_lossy(&absent.stderr).contains("is the agent running?"),
        "{absent:?}"
    );
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_file_in_its_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signals.sock");
    drop(socket::bind(&path).unwrap());
    let socket = socket::bind(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    drop(socket);
    let file = dir.path().join("file");
    std::fs::write(&file, "keep me").unwrap();
    let err = socket::bind(&file).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// examples/pos-app copied to `dir` with `conf` as its pos-app.conf.
fn pos_app(dir: &Path, conf: &str) -> std::path::PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pos-app");
    let app = dir.join("pos-app");
    std::fs::create_dir_all(app.join("bin")).unwrap();
    for file in ["bin/pos-app", "posfleet-bundle.toml"] {
        std::fs::copy(example.join(file), app.join(file)).unwrap();
    }
    std::fs::write(app.join("pos-app.conf"), conf).unwrap();
    app
}

#[tokio::test]
async fn the_example_program_reports_its_sales_and_crashes_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path());
    let app = pos_app(
        dir.path(),
        "sale_seconds=1\nfailed_tender_every=2\ncrash_every_seconds=3\n",
    );
    let started = std::time::Instant::now();
    let run = tokio::process::Command::new(app.join("bin/pos-app"))
        .arg("run")
        .env("POSFLEET_SIGNAL_SOCKET", &api.path)
        .env("POSFLEET_AGENT", env!("CARGO_BIN_EXE_posfleet-agent"))
        .output()
        .await
        .unwrap();
    // Three sales a second apart, then the crash it was told to have.
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("crashed after 3 s"),
        "{run:?}"
    );
    let (minute, dropped) = api
        .wait_for(|m, _| m.counts.get("transactions") == Some(&3))
        .await;
    assert_eq!(minute.counts["failed_tenders"], 1);
    let checkouts = &minute.values["checkout_seconds"].values;
    assert_eq!(checkouts.len(), 3);
    assert!(
        checkouts.iter().all(|s| (0.5..2.5).contains(s)),
        "{checkouts:?}"
    );
    assert_eq!(dropped, 0);
    // Its health check passes all the same.
    let health = std::process::Command::new(app.join("bin/pos-app"))
        .arg("health")
        .output()
        .unwrap();
    assert!(health.status.success(), "{health:?}");
}

#[tokio::test]
async fn the_program_running_as_hook_user_may_report() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can give the socket to another user's group");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let nobody = posfleet_agent::HookUser::lookup("nobody")
        .unwrap()
        .expect("a `nobody` user");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let api = Api::start(dir.path());
    let as_nobody = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_posfleet-agent"))
            .args([
                "signal",
                "--socket",
                api.path.to_str().unwrap(),
                "transactions|c",
            ])
            .gid(nobody.gid)
            .uid(nobody.uid)
            .output()
            .unwrap()
    };
    // Not in its group yet: refused by the system.
    let refused = as_nobody();
    assert_eq!(refused.status.code(), Some(69), "{refused:?}");
    socket::allow(&api.path, &nobody).unwrap();
    assert_eq!(std::fs::metadata(&api.path).unwrap().gid(), nobody.gid);
    let sent = as_nobody();
    assert!(sent.status.success(), "{sent:?}");
    let (minute, _) = api
        .wait_for(|m, _| m.counts.contains_key("transactions"))
        .await;
    assert_eq!(minute.counts["transactions"], 1);
}
