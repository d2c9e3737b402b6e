//! Logs on demand with real processes: a control plane serving TLS, tills
//! following an application log file, and `posfleet device logs` asking
//! for lines (searched, counted, since a time, followed), redacted on the
//! till, and from a till that was offline when asked.

use posfleet_e2e::eventually;
use posfleet_e2e::fleet::Fleet;
use serde_json::Value;
use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const STORE: &str = "lyon-01";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A TLS control plane (`control_plane_args` more) and one till following
/// `app.log` in the fleet's folder: the fleet, the file and the device id.
fn fleet_with_a_till(control_plane_args: &[&str]) -> (Fleet, PathBuf, String) {
    let mut args = vec!["--tls-server-name", "127.0.0.1"];
    args.extend_from_slice(control_plane_args);
    let mut fleet = Fleet::builder().control_plane_args(&args).start();
    let app_log = fleet.dir.path().join("app.log");
    append(&app_log, "sale 0 before the agent started\n");
    let log_paths = app_log.to_str().unwrap().to_string();
    fleet.store(STORE, 1, &["--log-paths", &log_paths]);
    let device = fleet.tills[0].device_id();
    fleet.tills[0]
        .process
        .wait_for_log("Agent running.", TIMEOUT);
    (fleet, app_log, device)
}

fn append(path: &Path, text: &str) {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// `posfleet --output json device logs ARGS`: its lines (one JSON object
/// each) and what it said on stderr; fails the test if the CLI failed.
fn logs(fleet: &Fleet, args: &[&str]) -> (Vec<Value>, String) {
    let output = logs_output(fleet, args);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "device logs {args:?} failed: {stderr}"
    );
    (json_lines(&output.stdout), stderr)
}

fn logs_output(fleet: &Fleet, args: &[&str]) -> Output {
    let mut all = vec!["--output", "json", "device", "logs"];
    all.extend_from_slice(args);
    fleet.cp.cli(&all)
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn texts(lines: &[Value]) -> Vec<&str> {
    lines.iter().map(|l| l["text"].as_str().unwrap()).collect()
}

/// Waits until the till has stored its file's lines (it reads the file
/// twice a second).
fn let_the_till_store_them() {
    std::thread::sleep(Duration::from_millis(1_500));
}

#[test]
fn an_online_tills_lines_searched_counted_since_a_time_and_redacted() {
    let (fleet, app_log, device) = fleet_with_a_till(&[]);
    // Stored at the till's start; the next ones four seconds later.
    std::thread::sleep(Duration::from_secs(4));
    append(
        &app_log,
        "sale 1 ok\n\
         sale 2 failed: card 4111 1111 1111 1111 declined, user=ann password=hunter2\n\
         sale 3 ok\n\
         payment service up\n\
         sale 4 failed\n",
    );
    let_the_till_store_them();

    let (lines, stderr) = logs(&fleet, &[&device, "--grep", "sale", "--since", "3s"]);
    assert!(stderr.contains("Asked"), "{stderr}");
    assert_eq!(
        texts(&lines),
        [
            "sale 1 ok",
            "sale 2 failed: card [REDACTED] declined, user=ann password=[REDACTED]",
            "sale 3 ok",
            "sale 4 failed",
        ]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["source"] == app_log.to_str().unwrap())
    );

    // The newest lines only, whatever their time.
    let (lines, _) = logs(&fleet, &[&device, "--grep", "sale", "--lines", "2"]);
    assert_eq!(texts(&lines), ["sale 3 ok", "sale 4 failed"]);
    let (lines, _) = logs(&fleet, &[&device, "--grep", "sale", "--lines", "10"]);
    assert_eq!(lines.len(), 5, "sale 0, stored at the start, too");

    // A secret cannot be searched for; the agent's own lines are there.
    let (lines, stderr) = logs(&fleet, &[&device, "--grep", "hunter2"]);
    assert!(lines.is_empty(), "{lines:?}");
    assert!(stderr.contains("No stored line matched"), "{stderr}");
    let (lines, _) = logs(&fleet, &[&device, "--grep", "Agent running."]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["source"], "agent");

    // Asking is recorded in the audit log, naming the search.
    let audit = fleet.cp.cli_json(&["audit", "list"]);
    let asked: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["method"] == "RequestDeviceLogs" && e["target"]["grep"] == "hunter2")
        .collect();
    assert_eq!(asked.len(), 1, "{audit}");
    assert_eq!(asked[0]["target"]["device_id"], device.as_str());
    assert_eq!(asked[0]["result"], "OK");
    // An unknown device.
    let output = logs_output(&fleet, &["dev-nope"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown device dev-nope"), "{stderr}");
}

#[test]
fn follow_prints_a_line_written_after_the_request() {
    let (fleet, app_log, device) = fleet_with_a_till(&["--log-follow-max-seconds", "6"]);
    append(&app_log, "before the request\n");
    let_the_till_store_them();
    let mut cli = fleet
        .cp
        .cli_command(&["--output", "json", "device", "logs", &device, "--follow"]);
    let mut child = cli
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The application's lines (the agent's own come too).
    let source = app_log.to_str().unwrap().to_string();
    let next_app_line = |within: Duration| -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line: Value = serde_json::from_str(&rx.recv_timeout(left).ok()?).unwrap();
            if line["source"] == source.as_str() {
                return Some(line["text"].as_str().unwrap().to_string());
            }
        }
    };
    // The stored lines come first (the upload has started).
    assert_eq!(
        next_app_line(TIMEOUT).as_deref(),
        Some("sale 0 before the agent started")
    );
    assert_eq!(
        next_app_line(TIMEOUT).as_deref(),
        Some("before the request")
    );
    append(&app_log, "after the request\n");
    assert_eq!(
        next_app_line(Duration::from_secs(5)).as_deref(),
        Some("after the request"),
        "the new line within 5 s"
    );
    // The follow ends at the control plane's limit, and the CLI with it.
    let status = eventually("the CLI ends with the follow", TIMEOUT, || {
        child.try_wait().unwrap()
    });
    assert!(status.success());
}

#[test]
fn an_offline_tills_request_is_answered_when_it_comes_back() {
    let (mut fleet, app_log, device) = fleet_with_a_till(&[]);
    fleet.tills[0].process.terminate();
    // Offline after three missed one-second heartbeats.
    eventually("the till offline", TIMEOUT, || {
        let shown = fleet.cp.cli_json(&["device", "show", &device]);
        (shown["status"] == "offline").then_some(())
    });
    let (lines, stderr) = logs(&fleet, &[&device, "--grep", "while offline"]);
    assert!(lines.is_empty());
    assert!(stderr.contains("is offline (last seen"), "{stderr}");
    assert!(stderr.contains("waits for it until"), "{stderr}");
    let id = stderr
        .split_whitespace()
        .find(|w| w.starts_with("log-"))
        .expect("the request id")
        .to_string();
    // Still waiting when asked again.
    let (lines, stderr) = logs(&fleet, &["--request", &id]);
    assert!(lines.is_empty());
    assert!(stderr.contains("has not answered yet"), "{stderr}");

    append(&app_log, "written while offline\n");
    fleet.restart_till(0);
    let (lines, _) = logs(&fleet, &["--request", &id, "--wait", "30s"]);
    assert_eq!(texts(&lines), ["written while offline"]);

    let output = logs_output(&fleet, &["--request", "log-0000"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown log request log-0000"), "{stderr}");
}
