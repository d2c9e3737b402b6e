//! The supervisor with real processes: slots laid out as installs leave
//! them (`slots/<name>/<version>/`, `current`), programs that are shell
//! scripts writing what they do to files.

use posfleet_agent::install::Slots;
use posfleet_agent::signals::Signals;
use posfleet_agent::supervisor::{Context, Supervisor};
use posfleet_proto::signals::{
    HEALTH_CHECK_FAILURES, HEALTH_CHECK_SECONDS, SERVICE_CRASHES, SERVICE_RESTARTS,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A till's data dir with pos-app slots, and a supervisor over it.
struct Till {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    /// Where the programs write (outside the slots).
    out: PathBuf,
    signals: Signals,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Till {
    fn new() -> Till {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        Till {
            data_dir,
            out,
            _dir: dir,
            // One minute throughout: every count is in it.
            signals: Signals::with_clock(|| 29_000_000),
            stop: watch::channel(false).0,
            task: None,
        }
    }

    /// Lays out pos-app `version` with `manifest_tail` after its first
    /// lines and `bin/svc` running `body`.
    fn slot(&self, version: &str, manifest_tail: &str, body: &str) {
        let slot = self.data_dir.join("slots/pos-app").join(version);
        std::fs::create_dir_all(slot.join("bin")).unwrap();
        std::fs::write(
            slot.join("posfleet-bundle.toml"),
            format!(
                "name = \"pos-app\"\nversion = \"{version}\"\nkind = \"software\"\nhardware = [\"*\"]\n{manifest_tail}"
            ),
        )
        .unwrap();
        let program = slot.join("bin/svc");
        std::fs::write(
            &program,
            format!("#!/bin/sh\nout={}\n{body}\n", self.out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Makes `version` the active one, as an install's switch does.
    fn activate(&self, version: &str) {
        let dir = self.data_dir.join("slots/pos-app");
        let tmp = dir.join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("current")).unwrap();
    }

    fn start(&mut self, stop_timeout: Duration) {
        let supervisor = Supervisor::new(
            Slots::open(&self.data_dir).unwrap(),
            Context {
                stop_timeout,
                ..Context::new(
                    &self.data_dir,
                    self.signals.clone(),
                    self.data_dir.join("signals.sock"),
                )
            },
        );
        let (stop, stopped) = watch::channel(false);
        self.stop = stop;
        self.task = Some(tokio::spawn(supervisor.run(stopped)));
    }

    /// Stops the supervisor and waits until it stopped its programs.
    async fn stop(&mut self) {
        self.stop.send(true).unwrap();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        }
    }

    /// Services noted as running (for the clean-up after a killed agent).
    fn notes(&self) -> usize {
        std::fs::read_dir(self.data_dir.join("services")).map_or(0, |d| d.count())
    }

    fn count(&self, name: &str) -> u64 {
        let (minute, _) = self.signals.current();
        minute
            .and_then(|m| m.counts.get(name).copied())
            .unwrap_or(0)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.out.join(file)).unwrap_or_default()
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&Till) -> bool) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether process `pid` (as a program wrote it) still runs.
fn alive(pid: &str) -> bool {
    let pid: i32 = pid.trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
}

const SERVICE: &str = "[service]\ncommand = [\"bin/svc\"]\n";

#[tokio::test]
async fn a_service_that_exits_1_is_restarted_and_counted() {
    let mut till = Till::new();
    till.slot("1.0.0", SERVICE, "echo run >> $out/runs\nexit 1");
    till.activate("1.0.0");
    till.start(Duration::from_secs(5));
    // Delays of 1 s, then 2 s: three runs within a few seconds.
    till.wait_for("three runs", |t| t.read("runs").lines().count() >= 3)
        .await;
    till.stop().await;
    let runs = till.read("runs").lines().count() as u64;
    assert_eq!(till.count(SERVICE_CRASHES), runs);
    assert_eq!(till.count(SERVICE_RESTARTS), runs - 1);
}

#[tokio::test]
async fn a_service_that_exits_0_is_restarted_and_not_a_crash() {
    let mut till = Till::new();
    till.slot("1.0.0", SERVICE, "echo run >> $out/runs\nexit 0");
    till.activate("1.0.0");
    till.start(Duration::from_secs(5));
    till.wait_for("two runs", |t| t.read("runs").lines().count() >= 2)
        .await;
    till.stop().await;
    assert_eq!(till.count(SERVICE_CRASHES), 0);
    assert!(till.count(SERVICE_RESTARTS) >= 1);
}

#[tokio::test]
async fn a_service_stopped_by_the_agent_is_not_a_crash_even_when_it_must_be_killed() {
    let mut till = Till::new();
    // Ignores SIGTERM, and leaves a child behind in its group.
    till.slot(
        "1.0.0",
        SERVICE,
        "trap '' TERM\nsleep 600 &\necho $! > $out/child\necho $$ > $out/pid\nwhile :; do sleep 1; done",
    );
    till.activate("1.0.0");
    till.start(Duration::from_secs(1));
    till.wait_for("the service", |t| {
        !t.read("child").is_empty() && !t.read("pid").is_empty()
    })
    .await;
    let (pid, child) = (till.read("pid"), till.read("child"));
    assert!(alive(&pid) && alive(&child));
    assert_eq!(till.notes(), 1);
    let started = std::time::Instant::now();
    till.stop().await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "SIGKILL only after the timeout"
    );
    assert!(!alive(&pid), "the service is gone");
    // What it started goes with it (the kill reaches it at once; it is
    // reaped by whoever adopted it).
    till.wait_for("its child to go", |_| !alive(&child)).await;
    assert_eq!(till.notes(), 0, "a stopped service leaves no note");
    assert_eq!(till.count(SERVICE_CRASHES), 0);
    assert_eq!(till.count(SERVICE_RESTARTS), 0);
}

#[tokio::test]
async fn a_version_switch_stops_the_old_program_and_starts_the_new_one() {
    let mut till = Till::new();
    let body = "echo $$ > $out/pid.$POSFLEET_BUNDLE_VERSION\n\
                echo \"$POSFLEET_BUNDLE_NAME $(pwd) $POSFLEET_SIGNAL_SOCKET\" > $out/env.$POSFLEET_BUNDLE_VERSION\n\
                exec sleep 600";
    till.slot("1.0.0", SERVICE, body);
    till.slot("1.1.0", SERVICE, body);
    // A version with no service: nothing runs.
    till.slot("1.2.0", "", body);
    till.activate("1.0.0");
    till.start(Duration::from_secs(5));
    till.wait_for("1.0.0", |t| !t.read("pid.1.0.0").is_empty())
        .await;
    let slots = till.data_dir.join("slots/pos-app");
    let slots = std::path::absolute(&slots).unwrap();
    assert_eq!(
        till.read("env.1.0.0").trim(),
        format!(
            "pos-app {} {}",
            slots.join("1.0.0").display(),
            till.data_dir.join("signals.sock").display()
        )
    );
    let old = till.read("pid.1.0.0");
    till.activate("1.1.0");
    till.wait_for("1.1.0", |t| !t.read("pid.1.1.0").is_empty())
        .await;
    assert!(!alive(&old), "the old version's program is stopped");
    let new = till.read("pid.1.1.0");
    assert!(alive(&new));
    // Back (a rollback), then to a version without a service.
    std::fs::remove_file(till.out.join("pid.1.0.0")).unwrap();
    till.activate("1.0.0");
    till.wait_for("1.0.0 again", |t| !t.read("pid.1.0.0").is_empty())
        .await;
    assert!(!alive(&new));
    let again = till.read("pid.1.0.0");
    till.activate("1.2.0");
    till.wait_for("1.0.0 stopped", |_| !alive(&again)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(till.read("pid.1.2.0").is_empty());
    till.stop().await;
    assert_eq!(till.count(SERVICE_CRASHES), 0);
    assert_eq!(till.count(SERVICE_RESTARTS), 0);
}

#[tokio::test]
async fn the_health_check_runs_periodically_and_reports_its_time_and_failures() {
    let mut till = Till::new();
    let manifest =
        "[health_check]\ncommand = [\"bin/svc\"]\ntimeout_seconds = 5\ninterval_seconds = 5\n";
    till.slot("1.0.0", manifest, "echo check >> $out/checks\nexit 3");
    till.activate("1.0.0");
    till.start(Duration::from_secs(5));
    till.wait_for("a failed check", |t| t.count(HEALTH_CHECK_FAILURES) >= 1)
        .await;
    till.stop().await;
    let checks = till.read("checks").lines().count();
    assert_eq!(checks, 1, "not at once: the install ran one");
    let (minute, _) = till.signals.current();
    let seconds = &minute.unwrap().values[HEALTH_CHECK_SECONDS].values;
    assert_eq!(seconds.len(), 1);
    assert!(seconds[0] > 0.0 && seconds[0] < 5.0, "{seconds:?}");
    assert!(!Path::new(&till.out.join("runs")).exists());
}
