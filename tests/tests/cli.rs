//! What an operator sees at the command line: configuration mistakes and
//! refused calls are one clear line and a non-zero exit code.

use posfleet_e2e::link::PacedLink;
use posfleet_e2e::{ControlPlane, binary, check_ok, pos_app_source};
use posfleet_proto::totp;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_one_line_error(output: &std::process::Output, code: i32, fragment: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(fragment),
        "`{err}` should mention `{fragment}`"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_key_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    // The port is taken, but the config error is found before binding.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let cp = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(binary("posfleet-control-plane"))
            .args([
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--grpc-listen-address",
                &taken,
            ])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    assert_one_line_error(
        &cp(&["--heartbeat-interval-seconds", "0"], &[]),
        64,
        "heartbeat_interval_seconds",
    );
    assert_one_line_error(
        &cp(&[], &[("POSFLEET_HTTP_LISTEN_ADDRESS", "somewhere")]),
        64,
        "http_listen_address",
    );
    assert_one_line_error(
        &cp(&["--database-url", "mysql://db/x"], &[]),
        64,
        "database_url",
    );
    let file = dir.path().join("cp.toml");
    std::fs::write(&file, "offline_after_missed_heartbeats = \"three\"\n").unwrap();
    assert_one_line_error(
        &cp(&["--config", file.to_str().unwrap()], &[]),
        64,
        "offline_after_missed_heartbeats",
    );
    std::fs::write(&file, "heartbeat_interval = 5\n").unwrap();
    assert_one_line_error(
        &cp(&["--config", file.to_str().unwrap()], &[]),
        64,
        "heartbeat_interval",
    );
    std::fs::write(&file, "this is not toml").unwrap();
    assert_one_line_error(
        &cp(&["--config", file.to_str().unwrap()], &[]),
        64,
        "invalid configuration",
    );
    // With a valid config, the taken port is the error (exit 1, not 64).
    assert_one_line_error(&cp(&[], &[]), 1, "cannot listen on");

    let agent = |args: &[&str]| {
        Command::new(binary("posfleet-agent"))
            .args(["--data-dir", dir.path().join("agent").to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    assert_one_line_error(&agent(&["--server-url", "localhost"]), 64, "server_url");
    assert_one_line_error(&agent(&["--peripherals", "laser"]), 64, "peripherals");
    assert!(
        !dir.path().join("agent").exists(),
        "nothing written on a config error"
    );
}

#[test]
fn refused_calls_are_one_line_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    // No token, and no session: a config folder of its own, empty.
    let cli = |args: &[&str]| {
        as_person(&cp, &dir.path().join("no-session"), args)
            .output()
            .unwrap()
    };
    assert_one_line_error(
        &cli(&["store", "list"]),
        1,
        "no admin API token: run posfleet login --user NAME",
    );
    assert_one_line_error(
        &cli(&["--token", "pfa_wrong", "store", "list"]),
        1,
        "unauthenticated: admin API token is not valid",
    );
    assert_one_line_error(
        &cp.cli(&[
            "store",
            "create",
            "s1",
            "--name",
            "S",
            "--time-zone",
            "Mars/Base",
        ]),
        1,
        "invalid argument: time_zone",
    );
    assert_one_line_error(
        &cp.cli(&["enroll-token", "create", "--store", "ghost"]),
        1,
        "not found: unknown store ghost",
    );
    assert_one_line_error(
        &cp.cli(&["device", "show", "dev-nope"]),
        1,
        "not found: unknown device dev-nope",
    );
    assert_one_line_error(
        &cp.cli(&["device", "label", "dev-nope", "oops"]),
        1,
        "neither key=value",
    );
    let unreachable = Command::new(binary("posfleet"))
        .args([
            "--server",
            "http://127.0.0.1:1",
            "--token",
            "x",
            "store",
            "list",
        ])
        .output()
        .unwrap();
    assert_one_line_error(
        &unreachable,
        1,
        "cannot reach the control plane at http://127.0.0.1:1",
    );
}

#[test]
fn tables_for_people_and_json_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    let output = cp.cli(&[
        "store",
        "create",
        "rome-01",
        "--name",
        "Roma Termini",
        "--time-zone",
        "Europe/Rome",
    ]);
    assert!(output.status.success());
    let table = String::from_utf8(cp.cli(&["store", "list"]).stdout).unwrap();
    assert!(
        table.contains("rome-01")
            && table.contains("Roma Termini")
            && table.contains("Europe/Rome"),
        "{table}"
    );
    let token = cp.cli(&[
        "enroll-token",
        "create",
        "--store",
        "rome-01",
        "--uses",
        "2",
        "--expires-in",
        "2h",
    ]);
    let text = String::from_utf8(token.stdout).unwrap();
    assert!(text.contains("pfe_") && text.contains("2/2"), "{text}");
    let json = cp.cli_json(&["enroll-token", "list"]);
    assert_eq!(json[0]["store_id"], "rome-01");
    assert!(
        json[0].get("secret").is_none(),
        "a listed token never shows its secret"
    );
}

#[test]
fn the_demo_rolls_out_in_waves_and_bad_releases_pause_themselves() {
    let output = Command::new(binary("posfleet"))
        .args(["demo", "--output", "json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last = stdout.trim_end().lines().last().expect("a final line");
    let summary: serde_json::Value = serde_json::from_str(last).expect("the final line is JSON");
    assert_eq!(summary["devices_online"], 6);
    assert_eq!(summary["devices_total"], 6);
    // TLS by default: each till enrolled for a certificate from the demo's
    // own fleet CA and called with it.
    assert_eq!(summary["devices_with_certificate"], 6);
    assert_eq!(summary["stores"], 2);
    assert_eq!(
        summary["bundles_published"],
        serde_json::json!([
            "catalog-nyc-01/2026.11.1",
            "catalog-paris-01/2026.11.1",
            "pos-app/1.0.0",
            "pos-app/1.1.0",
            "pos-app/1.1.0/from-1.0.0.delta",
            "pos-app/1.2.0",
            "pos-app/1.2.1",
            "pos-app/1.3.0"
        ])
    );
    assert_eq!(summary["devices_on_1_1_0"], 6);
    assert_eq!(summary["rollout_1_1_0"], "completed");
    assert_eq!(summary["rollout_1_1_0_approved_by"], "alice");
    // The bad release pauses itself in its canary store: the till it
    // reached rolled back, the other store never got it.
    assert_eq!(summary["rollout_1_2_0"], "paused");
    assert!(summary["devices_rolled_back_1_2_0"].as_u64() >= Some(1));
    assert_eq!(summary["devices_never_offered_1_2_0"], 3);
    assert_eq!(summary["devices_with_own_catalog"], 6);
    // Every till rebuilt 1.1.0 from the delta from 1.0.0 it held.
    let delta = &summary["delta_1_1_0"];
    let (delta_bytes, bundle_bytes) = (
        delta["delta_bytes"].as_u64().unwrap(),
        delta["bundle_bytes"].as_u64().unwrap(),
    );
    assert!(delta_bytes * 20 < bundle_bytes, "{delta}");
    assert_eq!(delta["devices_rebuilt"], 6, "{delta}");
    assert_eq!(
        delta["bytes_saved"],
        6 * (bundle_bytes - delta_bytes),
        "{delta}"
    );
    // Each store reports what its tills took from the origin and from
    // each other (the delta), next to the bundle's size.
    let transfers = summary["transfers_1_1_0"].as_object().unwrap();
    assert_eq!(transfers.len(), 2, "{transfers:?}");
    for (store, t) in transfers {
        let field = |name: &str| t[name].as_u64().unwrap();
        assert_eq!(field("size_bytes"), bundle_bytes, "{store}: {t}");
        assert_eq!(field("tills"), 3, "{store}: {t}");
        assert!(
            field("bytes_from_origin") + field("bytes_from_peers") >= 3 * delta_bytes,
            "{store}: {t}"
        );
        // Once per store, give or take a piece.
        assert!(
            field("bytes_from_origin") <= delta_bytes + (1 << 20),
            "{store}: {t}"
        );
    }
    let reasons = summary["rollback_reasons"].to_string();
    assert!(reasons.contains("cash drawer does not answer"), "{reasons}");
    // Canary analysis: the release whose program keeps crashing (its
    // health check passes) is paused with the evidence, fewer sales on
    // its canary till than on the store's others; the good one passes.
    let analysis = &summary["analysis"];
    assert_eq!(analysis["rollout_1_3_0"], "paused", "{analysis}");
    assert_eq!(analysis["verdict_1_3_0"], "fail", "{analysis}");
    let reason = analysis["reason_1_3_0"].as_str().unwrap();
    assert!(
        reason.starts_with("analysis_fail") && reason.contains("transactions FAIL"),
        "{reason}"
    );
    assert_eq!(analysis["rollout_1_2_1"], "completed", "{analysis}");
    assert_eq!(analysis["verdict_1_2_1"], "pass", "{analysis}");
}

/// A 200 MiB bundle published over a 4 MiB/s link (about 50 s) publishes.
/// Before, the 30 s per-call deadline (on the server and in the CLI, the
/// defaults, unchanged here) covered the whole upload and cut it off;
/// uploads now have an idle timeout instead.
#[test]
fn a_200_mib_bundle_publishes_over_a_4_mib_per_second_link() {
    const MIB: u64 = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    let keys = dir.path().join("keys");
    cp.init_repository(&keys);
    let src = pos_app_source(
        &dir.path().join("pos-app"),
        "1.0.0",
        true,
        200 * MIB as usize,
    );
    let file = dir.path().join("pos-app.bundle");
    check_ok(cp.cli(&[
        "bundle",
        "build",
        src.to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ]));
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size >= 200 * MIB, "{size}");
    let link = PacedLink::start(&cp.grpc_address, 4 * MIB);
    let started = Instant::now();
    let output = Command::new(binary("posfleet"))
        .args(["--server", &format!("http://{}", link.address())])
        .args(["--token-file", cp.admin_token_file().to_str().unwrap()])
        .args(["--output", "json", "bundle", "publish"])
        .arg(&file)
        .args(["--keys", keys.to_str().unwrap()])
        .output()
        .unwrap();
    let took = started.elapsed();
    let published: serde_json::Value = serde_json::from_str(&check_ok(output)).unwrap();
    // It did cross the slow link, for longer than a unary call may take.
    assert!(link.sent_upstream() >= size, "{}", link.sent_upstream());
    assert!(took > Duration::from_secs(35), "took {took:?}");
    let listed = cp.cli_json(&["bundle", "list"]);
    let bundle = &listed.as_array().unwrap()[0];
    assert_eq!(bundle["target"], "pos-app/1.0.0", "{published}");
    assert_eq!(bundle["length"], size);
}

/// `posfleet token`: a new token works at once within its role and is
/// refused once revoked; the audit log names the role of each call.
#[test]
fn admin_tokens_are_created_listed_and_revoked_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    // The first admin is a user; there is no token yet.
    let listed = cp.cli_json(&["token", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    let created = cp.cli_json(&[
        "token",
        "create",
        "--name",
        "ci-deploy",
        "--role",
        "deployer",
        "--expires-in",
        "90d",
        "--scope",
        "region=eu",
    ]);
    assert_eq!(created["role"], "deployer", "{created}");
    assert_eq!(created["scope"], "region=eu", "{created}");
    assert_eq!(created["created_by"], "admin", "{created}");
    assert_ne!(created["expires_at"], "", "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    let as_ci = |args: &[&str]| {
        Command::new(binary("posfleet"))
            .args(["--server", &cp.url(), "--token", &secret])
            .args(args)
            .env_remove("POSFLEET_TOKEN_FILE")
            .output()
            .unwrap()
    };
    // Scoped to region=eu: it sees the stores an admin labelled so.
    for store in ["eu-1", "us-1"] {
        cp.create_store(store, "UTC");
    }
    let labelled = check_ok(cp.cli(&["store", "label", "eu-1", "region=eu"]));
    assert!(labelled.contains("region=eu"), "{labelled}");
    let seen = check_ok(as_ci(&["store", "list"]));
    assert!(seen.contains("eu-1") && !seen.contains("us-1"), "{seen}");
    assert_one_line_error(
        &as_ci(&["token", "list"]),
        1,
        "token ci-deploy has role deployer; ListAdminTokens needs admin",
    );
    // No expiry: refused by the CLI, which names the flag.
    let missing = cp.cli(&[
        "token",
        "create",
        "--name",
        "ci-release",
        "--role",
        "publisher",
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("--expires-in"),
        "{}",
        stderr(&missing)
    );
    let table = check_ok(cp.cli(&["token", "list"]));
    assert!(
        table.contains("ci-deploy")
            && table.contains("admin")
            && table.contains("deployer")
            && table.contains("region=eu"),
        "{table}"
    );
    assert!(!table.contains(&secret), "{table}");
    let revoked = cp.cli_json(&["token", "revoke", &id]);
    assert_ne!(revoked["revoked_at"], "");
    assert_one_line_error(
        &as_ci(&["store", "list"]),
        1,
        "unauthenticated: admin API token is not valid",
    );
    assert_eq!(cp.cli_json(&["token", "list"]).as_array().unwrap().len(), 0);
    assert_eq!(
        cp.cli_json(&["token", "list", "--all"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let audit = cp.cli_json(&["audit", "list"]);
    // The first admin's setup (the harness's), then the CLI's calls.
    assert_eq!(
        methods(&audit),
        [
            "Login",
            "CompleteSetup",
            "CreateAdminToken",
            "CreateStore",
            "CreateStore",
            "SetStoreLabels",
            "ListAdminTokens",
            "RevokeAdminToken",
        ]
    );
    let roles: Vec<(&str, &str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap(),
                e["role"].as_str().unwrap(),
                e["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(roles[6], ("ci-deploy", "deployer", "PERMISSION_DENIED"));
    assert_eq!(roles[2], ("admin", "admin", "OK"));
    let table = check_ok(cp.cli(&["audit", "list"]));
    assert!(
        table.contains("ROLE") && table.contains("deployer"),
        "{table}"
    );
}

#[test]
fn an_https_webhook_is_added_with_its_receivers_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    let (ca, key) =
        posfleet_pki::FleetCa::create("Example Corp Root CA", std::time::SystemTime::now())
            .unwrap();
    let ca_file = dir.path().join("corp-ca.pem");
    std::fs::write(&ca_file, ca.certificates_pem()).unwrap();
    let ca_file = ca_file.to_str().unwrap();
    let add = |url: &str, ca: &str| cp.cli(&["webhook", "add", url, "--receiver-ca-file", ca]);

    let table = check_ok(add("https://hooks.corp.example/posfleet", ca_file));
    assert!(
        table.contains("CN=Example Corp Root CA")
            && table.contains(&format!("sha256 {}", &ca.fingerprint()[..16])),
        "{table}"
    );
    check_ok(cp.cli(&["webhook", "add", "https://hooks.example.net/"]));
    let listed = cp.cli_json(&["webhook", "list"]);
    assert_eq!(
        listed[0]["receiver_cas"][0]["sha256_fingerprint"],
        ca.fingerprint()
    );
    assert_eq!(listed[1]["receiver_cas"], serde_json::json!([]));
    let table = String::from_utf8(cp.cli(&["webhook", "list"]).stdout).unwrap();
    assert!(table.contains("system roots"), "{table}");

    // Refused, each on one line: a CA for a plaintext receiver, a file that
    // is no certificate, a key beside the certificate, a missing file.
    assert_one_line_error(
        &add("http://hooks.corp.example/", ca_file),
        1,
        "invalid argument: ca_pem",
    );
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    assert_one_line_error(
        &add("https://h.example/", not_pem.to_str().unwrap()),
        1,
        "ca_pem: no certificate in it",
    );
    let with_key = dir.path().join("with-key.pem");
    std::fs::write(&with_key, format!("{}{key}", ca.certificates_pem())).unwrap();
    assert_one_line_error(
        &add("https://h.example/", with_key.to_str().unwrap()),
        1,
        "private key",
    );
    assert_one_line_error(
        &add("https://h.example/", "/nonexistent/ca.pem"),
        1,
        "cannot read the CA file /nonexistent/ca.pem",
    );
    assert_eq!(
        cp.cli_json(&["webhook", "list"]).as_array().unwrap().len(),
        2
    );
}

#[test]
fn the_cli_checks_a_tls_control_plane_and_says_how_to_fix_what_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(
        &dir.path().join("cp"),
        None,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--tls-server-name", "127.0.0.1"],
    );
    assert!(cp.tls, "the control plane logs that it serves TLS");
    // Trusting the fleet CA: the calls go through.
    check_ok(cp.cli(&[
        "store",
        "create",
        "s1",
        "--name",
        "S",
        "--time-zone",
        "Europe/Paris",
    ]));
    // An enrollment token comes with the fleet CA's fingerprint, for a till
    // that pins it.
    let created = cp.cli_json(&["enroll-token", "create", "--store", "s1"]);
    let ca_der =
        posfleet_pki::certificates_from_pem(&std::fs::read(cp.ca_file()).unwrap(), "CA").unwrap();
    assert_eq!(
        created["ca_fingerprint"],
        posfleet_pki::ca::fingerprint(&ca_der[0])
    );
    let token = cp.admin_token_file();
    let cli = |args: &[&str]| {
        Command::new(binary("posfleet"))
            .args(["--token-file", token.to_str().unwrap()])
            .args(args)
            .env_remove("POSFLEET_CA_FILE")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap()
    };
    let https = cp.url();
    let ca = cp.ca_file();
    let ca = ca.to_str().unwrap();
    // The system's roots do not know the fleet CA.
    assert_one_line_error(
        &cli(&["--server", &https, "store", "list"]),
        1,
        "cannot reach the control plane",
    );
    // Another CA.
    let other = dir.path().join("other-ca.crt");
    let (other_ca, _) =
        posfleet_pki::FleetCa::create("other", std::time::SystemTime::now()).unwrap();
    std::fs::write(&other, other_ca.certificates_pem()).unwrap();
    assert_one_line_error(
        &cli(&[
            "--server",
            &https,
            "--ca-file",
            other.to_str().unwrap(),
            "store",
            "list",
        ]),
        1,
        "UnknownIssuer",
    );
    // A name the certificate was not issued for.
    let by_name = https.replace("127.0.0.1", "localhost");
    assert_one_line_error(
        &cli(&["--server", &by_name, "--ca-file", ca, "store", "list"]),
        1,
        "not valid for name \"localhost\"",
    );
    // Plaintext to the TLS port.
    let plain = https.replace("https://", "http://");
    assert_one_line_error(
        &cli(&["--server", &plain, "store", "list"]),
        1,
        "this port serves TLS",
    );
    // Plaintext beyond loopback is refused before anything is sent.
    assert_one_line_error(
        &cli(&["--server", "http://192.0.2.7:7400", "store", "list"]),
        1,
        "refusing to send the admin token in clear",
    );
    check_ok(cli(&["--server", &https, "--ca-file", ca, "store", "list"]));
}

/// `posfleet` at a person's workstation: no admin token, their own config
/// folder (where `posfleet login` keeps the session).
fn as_person(cp: &ControlPlane, config: &Path, args: &[&str]) -> Command {
    as_person_calling(&cp.url(), cp, config, args)
}

/// [`as_person`] with `--server URL`, `cp` under another name.
fn as_person_calling(url: &str, cp: &ControlPlane, config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(binary("posfleet"));
    command
        .args(["--server", url])
        .arg("--config-dir")
        .arg(config)
        .args(args)
        .env_remove("POSFLEET_TOKEN")
        .env_remove("POSFLEET_TOKEN_FILE")
        .env_remove("POSFLEET_CONFIG_DIR");
    if cp.tls {
        command.arg("--ca-file").arg(cp.ca_file());
    }
    command
}

/// Runs `command` with `answers` on its stdin, one per line (as a script
/// answers `posfleet login`).
fn answered(mut command: Command, answers: &[&str]) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for answer in answers {
        writeln!(stdin, "{answer}").unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// A user's first `posfleet login`, answered as a person with an
/// authenticator app would: the setup code, a new password twice, then the
/// code the app computes from the secret the CLI prints. Returns the TOTP
/// secret and what the CLI printed.
fn first_login(
    cp: &ControlPlane,
    config: &Path,
    user: &str,
    setup_code: &str,
    password: &str,
) -> (String, String) {
    let mut child = as_person(cp, config, &["login", "--user", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{setup_code}\n{password}\n{password}").unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let secret = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let output = child.wait_with_output().unwrap();
            panic!("no TOTP secret in:\n{printed}\n{}", stderr(&output));
        }
        printed.push_str(&line);
        if let Some(secret) = line.trim_end().strip_prefix("Or type in the secret: ") {
            break secret.replace(' ', "");
        }
    };
    // What the phone shows.
    writeln!(stdin, "{}", totp::code_now(&secret).unwrap()).unwrap();
    drop(stdin);
    stdout.read_to_string(&mut printed).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{printed}\n{}", stderr(&output));
    (secret, printed)
}

/// The TOTP code of the step after the current one: accepted (one step of
/// clock skew) and later than any code used so far in this test.
fn next_code(secret: &str) -> String {
    totp::code_at(secret, totp::unix_now() + totp::STEP_SECONDS).unwrap()
}

/// A 6-digit code that is none of the codes accepted now.
fn wrong_code(secret: &str) -> String {
    let now = totp::unix_now();
    let accepted: Vec<String> = [now - totp::STEP_SECONDS, now, now + totp::STEP_SECONDS]
        .iter()
        .map(|t| totp::code_at(secret, *t).unwrap())
        .collect();
    (0..)
        .map(|n| format!("{:06}", n * 111_111 % 1_000_000))
        .find(|c| !accepted.contains(c))
        .unwrap()
}

/// The setup code `posfleet user create` (or `reset`) printed for `user`.
fn setup_code_in(printed: &str, user: &str) -> String {
    let mut lines = printed.lines();
    lines
        .find(|l| l.to_lowercase().contains(&format!("setup code for {user}")))
        .unwrap_or_else(|| panic!("no setup code in {printed}"));
    lines.next().unwrap().trim().to_string()
}

/// The user named `name` in `user list --output json`.
fn user_named(listed: &serde_json::Value, name: &str) -> serde_json::Value {
    listed
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {listed}"))
}

/// The methods of `audit list --output json`'s entries, in order.
fn methods(audit: &serde_json::Value) -> Vec<&str> {
    audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["method"].as_str().unwrap())
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts a control plane whose login rate limit is off (a test logs in
/// many times from one address), with `extra` flags.
fn start_for_logins(dir: &Path, extra: &[&str]) -> ControlPlane {
    let mut flags = vec!["--login-rate-per-minute", "0"];
    flags.extend_from_slice(extra);
    ControlPlane::start(dir, None, "127.0.0.1:0", "127.0.0.1:0", &flags)
}

/// A person's life at the command line: created by an admin, set up from
/// the setup code (password, authenticator, recovery codes), logged in
/// with password and code, commands run with the stored session alone,
/// logged out, refused after.
#[test]
fn a_user_sets_up_logs_in_works_without_a_token_and_logs_out() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_for_logins(&dir.path().join("cp"), &[]);
    cp.create_store("s1", "Europe/Paris");
    let created = check_ok(cp.cli(&["user", "create", "alice", "--role", "deployer"]));
    assert!(
        created.contains("posfleet login --user alice") && created.contains("shown once"),
        "{created}"
    );
    let setup_code = setup_code_in(&created, "alice");
    let listed = cp.cli_json(&["user", "list"]);
    let alice = |listed: &serde_json::Value| user_named(listed, "alice");
    assert_eq!(alice(&listed)["setup_pending"], true, "{listed}");
    assert_eq!(alice(&listed)["status"], "enabled", "{listed}");
    assert_eq!(alice(&listed)["last_login"], "", "{listed}");

    let config = dir.path().join("home").join(".config").join("posfleet");
    let password = "alice's long password";
    let (secret, printed) = first_login(&cp, &config, "alice", &setup_code, password);
    // The enrolment: a QR code, the otpauth URI with the secret, then the
    // recovery codes once, with what to do with them.
    assert!(printed.contains('\u{2588}'), "a QR code: {printed}");
    assert!(
        printed.contains(&format!("otpauth://totp/posfleet:alice?secret={secret}")),
        "{printed}"
    );
    assert!(printed.contains("store these now"), "{printed}");
    let recovery: Vec<&str> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| l.len() == 24 && l.split('-').count() == 5)
        .collect();
    assert_eq!(recovery.len(), 10, "{printed}");
    assert!(printed.contains("Logged in to"), "{printed}");
    let session_file = config.join("session.json");
    assert_eq!(mode(&session_file), 0o600);
    assert_eq!(mode(&config), 0o700);

    // The session alone: no token anywhere.
    let stores = check_ok(
        as_person(&cp, &config, &["store", "list"])
            .output()
            .unwrap(),
    );
    assert!(stores.contains("s1"), "{stores}");
    let listed = cp.cli_json(&["user", "list"]);
    assert_eq!(alice(&listed)["setup_pending"], false, "{listed}");
    assert_eq!(alice(&listed)["recovery_codes_left"], 10, "{listed}");
    assert_ne!(alice(&listed)["last_login"], "", "{listed}");
    let table = check_ok(cp.cli(&["user", "list"]));
    assert!(
        table.contains("alice") && table.contains("deployer") && table.contains("RECOVERY CODES"),
        "{table}"
    );

    // Logged out: ended on the server, the file gone, the next command
    // refused with what to do.
    let token = std::fs::read_to_string(&session_file).unwrap();
    let out = check_ok(as_person(&cp, &config, &["logout"]).output().unwrap());
    assert!(out.contains("the session is ended"), "{out}");
    assert!(!session_file.exists());
    assert_one_line_error(
        &as_person(&cp, &config, &["store", "list"])
            .output()
            .unwrap(),
        1,
        "no admin API token: run posfleet login",
    );
    // The ended session's token is refused by the server too.
    let token: serde_json::Value = serde_json::from_str(&token).unwrap();
    assert_one_line_error(
        &as_person(
            &cp,
            &config,
            &["--token", token["token"].as_str().unwrap(), "store", "list"],
        )
        .output()
        .unwrap(),
        1,
        "unauthenticated: session ended",
    );

    // Later: password and a code from the app, with a shorter session; the
    // user is remembered from no file now, so named.
    let login = answered(
        as_person(
            &cp,
            &config,
            &[
                "--output",
                "json",
                "login",
                "--user",
                "alice",
                "--session-hours",
                "1",
            ],
        ),
        &[password, &next_code(&secret)],
    );
    assert!(login.status.success(), "{}", stderr(&login));
    let session: serde_json::Value = serde_json::from_slice(&login.stdout).unwrap();
    assert_eq!(session["user"], "alice", "{session}");
    assert_eq!(session["role"], "deployer", "{session}");
    let expires =
        chrono::DateTime::parse_from_rfc3339(session["expires_at"].as_str().unwrap()).unwrap();
    let left = expires.signed_duration_since(chrono::Utc::now());
    assert!(
        left <= chrono::Duration::hours(1) && left > chrono::Duration::minutes(55),
        "{session}"
    );
    assert_eq!(mode(&session_file), 0o600);
    check_ok(
        as_person(&cp, &config, &["rollout", "list"])
            .output()
            .unwrap(),
    );

    // A recovery code stands in for the app's code, once; `login` without
    // --user logs in the stored session's user again.
    let login = answered(
        as_person(&cp, &config, &["login"]),
        &[password, recovery[0]],
    );
    assert!(login.status.success(), "{}", stderr(&login));
    let listed = cp.cli_json(&["user", "list"]);
    assert_eq!(alice(&listed)["recovery_codes_left"], 9, "{listed}");
    assert_one_line_error(
        &answered(
            as_person(&cp, &config, &["login"]),
            &[password, recovery[0]],
        ),
        1,
        "unauthenticated: wrong code",
    );

    // Everything she did, and only that, under her name.
    let audit = cp.cli_json(&["audit", "list", "--user", "alice"]);
    let entries = audit.as_array().unwrap();
    assert_eq!(
        methods(&audit),
        [
            "Login",
            "CompleteSetup",
            "Logout",
            "Login",
            "Login",
            "Login"
        ],
        "{audit}"
    );
    assert!(entries.iter().all(|e| e["actor"] == "alice"), "{audit}");
    assert_eq!(entries[0]["actor_kind"], "session", "{audit}");
    let table = check_ok(cp.cli(&["audit", "list", "--user", "alice"]));
    assert!(
        table.contains("KIND") && table.contains("session") && table.contains("CompleteSetup"),
        "{table}"
    );
}

/// Wrong passwords and codes say so; enough of them in a row lock the
/// user, even with the right ones, until an admin unlocks them.
#[test]
fn wrong_passwords_and_codes_are_refused_and_lock_the_user_until_unlocked() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_for_logins(&dir.path().join("cp"), &["--login-max-failures", "3"]);
    let created = cp.cli_json(&["user", "create", "bob", "--role", "viewer"]);
    let code = created["setup_code"].as_str().unwrap();
    assert_ne!(created["setup_code_expires_at"], "", "{created}");
    let config = dir.path().join("bob");
    let password = "bob's long password";
    let (secret, _) = first_login(&cp, &config, "bob", code, password);

    // The setup code works once.
    assert_one_line_error(
        &answered(
            as_person(&cp, &config, &["login", "--user", "bob"]),
            &[code],
        ),
        1,
        "unauthenticated: wrong user name or password",
    );
    let login = |password: &str, code: &str| {
        answered(
            as_person(&cp, &config, &["login", "--user", "bob"]),
            &[password, code],
        )
    };
    assert_one_line_error(
        &login("not bob's password", &next_code(&secret)),
        1,
        "unauthenticated: wrong user name or password",
    );
    // The third failure in a row (the spent setup code counted) locks him.
    assert_one_line_error(
        &login(password, &wrong_code(&secret)),
        1,
        "unauthenticated: wrong code",
    );
    // Stdin that ends early says which answer is missing.
    assert_one_line_error(
        &answered(
            as_person(&cp, &config, &["login", "--user", "bob"]),
            &[password],
        ),
        1,
        "stdin ended before the answer to `Code from your authenticator app",
    );
    // Locked: even the right password and code are refused, saying how
    // it is lifted.
    assert_one_line_error(
        &login(password, &next_code(&secret)),
        1,
        "posfleet user unlock bob",
    );
    let listed = cp.cli_json(&["user", "list"]);
    assert_ne!(user_named(&listed, "bob")["locked_until"], "", "{listed}");
    let unlocked = cp.cli_json(&["user", "unlock", "bob"]);
    assert_eq!(unlocked["locked_until"], "", "{unlocked}");
    let ok = login(password, &next_code(&secret));
    assert!(ok.status.success(), "{}", stderr(&ok));

    // A lost phone: the admin resets him; his session ends and he sets up
    // again from a new setup code.
    let reset = check_ok(cp.cli(&["user", "reset", "bob"]));
    let new_code = setup_code_in(&reset, "bob");
    assert_one_line_error(
        &as_person(&cp, &config, &["store", "list"])
            .output()
            .unwrap(),
        1,
        "unauthenticated",
    );
    first_login(&cp, &config, "bob", &new_code, "bob's new long password");
    check_ok(
        as_person(&cp, &config, &["store", "list"])
            .output()
            .unwrap(),
    );
}

/// The stored session goes only to the server that issued it, only until
/// it expires, and not once its user is disabled.
#[test]
fn a_stored_session_is_for_its_server_only_until_it_expires_or_its_user_is_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start_for_logins(&dir.path().join("cp"), &[]);
    let code = cp.cli_json(&["user", "create", "carol", "--role", "viewer"])["setup_code"]
        .as_str()
        .unwrap()
        .to_string();
    let config = dir.path().join("carol");
    let password = "carol's long password";
    let (secret, _) = first_login(&cp, &config, "carol", &code, password);
    check_ok(
        as_person(&cp, &config, &["store", "list"])
            .output()
            .unwrap(),
    );

    // The same control plane under another name is another server as far
    // as the session knows: it is not sent (were it sent, the call would
    // succeed).
    let elsewhere = cp.url().replace("127.0.0.1", "localhost");
    assert_one_line_error(
        &as_person_calling(&elsewhere, &cp, &config, &["store", "list"])
            .output()
            .unwrap(),
        1,
        &format!(
            "the stored session is carol's on {}, not {elsewhere}",
            cp.url()
        ),
    );

    // Disabled: the stored session is refused at its next call, and so is
    // a login; enabled again, a login works.
    let disabled = cp.cli_json(&["user", "disable", "carol"]);
    assert_eq!(disabled["status"], "disabled", "{disabled}");
    assert_one_line_error(
        &as_person(&cp, &config, &["store", "list"])
            .output()
            .unwrap(),
        1,
        "unauthenticated: session ended",
    );
    let login = |code: &str| {
        answered(
            as_person(&cp, &config, &["login", "--user", "carol"]),
            &[password, code],
        )
    };
    assert_one_line_error(
        &login(&next_code(&secret)),
        1,
        "unauthenticated: carol was disabled at",
    );
    assert!(
        cp.cli_json(&["user", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["name"] != "carol")
    );
    let all = cp.cli_json(&["user", "list", "--all"]);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "carol" && u["status"] == "disabled"),
        "{all}"
    );
    cp.cli_json(&["user", "enable", "carol"]);
    let ok = login(&next_code(&secret));
    assert!(ok.status.success(), "{}", stderr(&ok));

    // An expired session is not sent; the CLI says when it ended.
    let session_file = config.join("session.json");
    let mut stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&session_file).unwrap()).unwrap();
    stored["expires_at_unix_ms"] = 1_764_000_000_000i64.into();
    std::fs::write(&session_file, stored.to_string()).unwrap();
    assert_one_line_error(
        &as_person(&cp, &config, &["store", "list"])
            .output()
            .unwrap(),
        1,
        "your session expired at 2025-11-24T16:00:00Z; run posfleet login",
    );
    // Logging out of it still removes it, saying why nothing was ended.
    let out = check_ok(as_person(&cp, &config, &["logout"]).output().unwrap());
    assert!(out.contains("the session had expired at"), "{out}");
    assert!(!session_file.exists());
    let out = check_ok(as_person(&cp, &config, &["logout"]).output().unwrap());
    assert!(out.contains("Not logged in"), "{out}");
}

/// `posfleet bundle delta` between two releases of the example POS program
/// that share a 2 MiB library: a small delta, the saving printed; and a
/// delta backwards is refused in one line.
#[test]
fn a_delta_between_two_releases_is_made_offline_and_says_what_it_saves() {
    let dir = tempfile::tempdir().unwrap();
    let library = posfleet_e2e::pseudo_random_bytes(7, 2 << 20);
    let bundle = |version: &str| {
        let src = pos_app_source(&dir.path().join(format!("src-{version}")), version, true, 0);
        std::fs::write(src.join("libpos.so"), &library).unwrap();
        let out = dir.path().join(format!("pos-app-{version}.bundle"));
        check_ok(
            Command::new(binary("posfleet"))
                .args(["bundle", "build"])
                .arg(&src)
                .arg("-o")
                .arg(&out)
                .output()
                .unwrap(),
        );
        out
    };
    let (old, new) = (bundle("1.0.0"), bundle("1.1.0"));
    let delta = dir.path().join("pos-app-1.1.0-from-1.0.0.delta");
    let printed = check_ok(
        Command::new(binary("posfleet"))
            .args(["bundle", "delta"])
            .args([&old, &new])
            .arg("-o")
            .arg(&delta)
            .output()
            .unwrap(),
    );
    assert!(
        printed.contains("from pos-app/1.0.0 to pos-app/1.1.0"),
        "{printed}"
    );
    let (delta_bytes, bundle_bytes) = (
        std::fs::metadata(&delta).unwrap().len(),
        std::fs::metadata(&new).unwrap().len(),
    );
    assert!(
        printed.contains(&format!("{delta_bytes} bytes")),
        "{printed}"
    );
    assert!(
        delta_bytes * 100 < bundle_bytes,
        "{delta_bytes} of {bundle_bytes}"
    );

    let backwards = Command::new(binary("posfleet"))
        .args(["bundle", "delta"])
        .args([&new, &old])
        .arg("-o")
        .arg(dir.path().join("backwards.delta"))
        .output()
        .unwrap();
    assert_one_line_error(
        &backwards,
        1,
        "pos-app/1.1.0 is not older than pos-app/1.0.0",
    );
}

/// `posfleet bundle publish NEW --delta-from OLD`: the new release and a
/// signed delta to it from the published earlier one, listed together; a
/// delta from a file that is not the published earlier release, or one
/// published already, is refused in one line.
#[test]
fn a_release_is_published_with_a_delta_from_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start_sqlite(&dir.path().join("cp"));
    let keys = dir.path().join("keys");
    cp.init_repository(&keys);
    let library = posfleet_e2e::pseudo_random_bytes(11, 2 << 20);
    let bundle = |version: &str, conf: &str| {
        let src = pos_app_source(
            &dir.path().join(format!("src-{version}-{conf}")),
            version,
            true,
            0,
        );
        std::fs::write(src.join("libpos.so"), &library).unwrap();
        std::fs::write(src.join("store.conf"), conf).unwrap();
        cp.build_bundle(
            &src,
            &dir.path().join(format!("pos-app-{version}-{conf}.bundle")),
        )
    };
    let old = bundle("1.0.0", "lanes=4");
    let new = bundle("1.1.0", "lanes=4");
    let keys_arg = keys.to_str().unwrap();
    check_ok(cp.cli(&[
        "bundle",
        "publish",
        old.to_str().unwrap(),
        "--keys",
        keys_arg,
    ]));

    // `bundle publish NEW --delta-from BASE`, with `extra` arguments.
    let publish_from = |base: &std::path::Path, extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend([
            "bundle",
            "publish",
            new.to_str().unwrap(),
            "--keys",
            keys_arg,
        ]);
        args.extend(["--delta-from", base.to_str().unwrap()]);
        cp.cli(&args)
    };
    let published: serde_json::Value =
        serde_json::from_str(&check_ok(publish_from(&old, &["--output", "json"]))).unwrap();
    let targets: Vec<&str> = published
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["pos-app/1.1.0", "pos-app/1.1.0/from-1.0.0.delta"]);
    let listed = cp.cli_json(&["bundle", "list"]);
    let delta = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["target"] == "pos-app/1.1.0/from-1.0.0.delta")
        .expect("the delta is listed");
    assert_eq!(delta["delta_from"], "1.0.0");
    let (delta_bytes, bundle_bytes) = (
        delta["length"].as_u64().unwrap(),
        std::fs::metadata(&new).unwrap().len(),
    );
    assert!(
        delta_bytes * 100 < bundle_bytes,
        "{delta_bytes} of {bundle_bytes}"
    );

    // The delta again: already published.
    let again = publish_from(&old, &[]);
    assert_one_line_error(
        &again,
        1,
        "pos-app/1.1.0/from-1.0.0.delta is already published",
    );
    // A 1.0.0 built from other sources is not the one tills hold.
    let other = bundle("1.0.0", "lanes=6");
    let refused = publish_from(&other, &[]);
    assert_one_line_error(&refused, 1, "is not the published pos-app/1.0.0");
}
