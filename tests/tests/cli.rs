//! What an operator sees at the command line: configuration mistakes and
//! refused calls are one clear line and a non-zero exit code.

use posfleet_e2e::link::PacedLink;
use posfleet_e2e::{ControlPlane, binary, check_ok, pos_app_source};
use std::process::Command;
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
    let cli = |args: &[&str]| {
        Command::new(binary("posfleet"))
            .args(["--server", &cp.url()])
            .args(args)
            .env_remove("POSFLEET_TOKEN")
            .env_remove("POSFLEET_TOKEN_FILE")
            .output()
            .unwrap()
    };
    assert_one_line_error(&cli(&["store", "list"]), 1, "no admin API token");
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
fn the_demo_rolls_out_in_waves_and_a_bad_release_pauses_itself() {
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
            "pos-app/1.2.0"
        ])
    );
    assert_eq!(summary["devices_on_1_1_0"], 6);
    assert_eq!(summary["rollout_1_1_0"], "completed");
    assert_eq!(summary["rollout_1_1_0_approved_by"], "release-manager");
    // The bad release pauses itself in its canary store: the till it
    // reached rolled back, the other store never got it.
    assert_eq!(summary["rollout_1_2_0"], "paused");
    assert!(summary["devices_rolled_back_1_2_0"].as_u64() >= Some(1));
    assert_eq!(summary["devices_never_offered_1_2_0"], 3);
    assert_eq!(summary["devices_with_own_catalog"], 6);
    // Each store reports what its tills took from the origin and from
    // each other, next to the bundle's size.
    let transfers = summary["transfers_1_1_0"].as_object().unwrap();
    assert_eq!(transfers.len(), 2, "{transfers:?}");
    for (store, t) in transfers {
        let field = |name: &str| t[name].as_u64().unwrap();
        let size = field("size_bytes");
        assert!(size > 0, "{store}: {t}");
        assert_eq!(field("tills"), 3, "{store}: {t}");
        assert!(
            field("bytes_from_origin") + field("bytes_from_peers") >= 3 * size,
            "{store}: {t}"
        );
        // Once per store, give or take a piece.
        assert!(
            field("bytes_from_origin") <= size + (1 << 20),
            "{store}: {t}"
        );
    }
    let reasons = summary["rollback_reasons"].to_string();
    assert!(reasons.contains("cash drawer does not answer"), "{reasons}");
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
        table.contains("ci-deploy") && table.contains("deployer") && table.contains("region=eu"),
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
    let methods: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["method"].as_str().unwrap())
        .collect();
    // The first admin's setup (the harness's), then the CLI's calls.
    assert_eq!(
        methods,
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
