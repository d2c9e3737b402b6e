//! What an operator sees at the command line: configuration mistakes and
//! refused calls are one clear line and a non-zero exit code.

use posfleet_e2e::{ControlPlane, binary};
use std::process::Command;

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
