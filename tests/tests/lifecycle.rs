//! The agent's update lifecycle with real processes: a control plane, a
//! store of tills running `posfleet-agent`, the example POS program
//! published as signed bundles, and the `posfleet` CLI driving it.

use posfleet_e2e::fleet::{Fleet, StoreSpec};
use posfleet_e2e::{Process, binary, check_ok, enrolled_device_id, eventually};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

const STORE: &str = "lyon-02";

/// A control plane with one store of `tills` agents run with `agent_args`.
fn lyon(tills: usize, agent_args: &[&str]) -> Fleet {
    let mut fleet = Fleet::builder().start();
    fleet.store(STORE, tills, agent_args);
    fleet
}

/// The store's pos-app as its tills report it.
trait Lifecycle {
    fn device_ids(&self) -> Vec<String>;
    fn pos_app_statuses(&self) -> Vec<Value>;
    fn wait_for_all(&self, phase: &str, version: &str) -> Vec<Value>;
}

impl Lifecycle for Fleet {
    fn device_ids(&self) -> Vec<String> {
        self.cp
            .cli_json(&["device", "list", "--store", STORE])
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Each device's reported status of pos-app, from `posfleet device show`.
    fn pos_app_statuses(&self) -> Vec<Value> {
        self.device_ids()
            .iter()
            .map(|id| self.cp.bundle_status(id, "pos-app"))
            .collect()
    }

    /// Waits until every till reports `phase` for `version` of pos-app.
    fn wait_for_all(&self, phase: &str, version: &str) -> Vec<Value> {
        eventually(
            &format!("every till reporting pos-app {version} {phase}"),
            TIMEOUT,
            || {
                let statuses = self.pos_app_statuses();
                (statuses.len() == self.tills.len()
                    && statuses
                        .iter()
                        .all(|s| s["phase"] == phase && s["target_version"] == version))
                .then_some(statuses)
            },
        )
    }
}

/// The version the till's `current` slot runs, asked of the program itself.
fn running_version(data: &Path) -> String {
    let output = std::process::Command::new(data.join("slots/pos-app/current/bin/pos-app"))
        .arg("version")
        .output()
        .unwrap();
    String::from_utf8(check_ok(output).into_bytes())
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_store_moves_to_a_new_version_and_a_bad_release_rolls_back_on_every_till() {
    let store = lyon(3, &[]);
    store.publish("1.0.0", true, 0);
    store.publish("1.1.0", true, 0);
    store.publish("1.2.0", false, 0);

    store.assign(STORE, "pos-app@1.0.0");
    store.wait_for_all("installed", "1.0.0");
    store.assign(STORE, "pos-app@1.1.0");
    let statuses = store.wait_for_all("installed", "1.1.0");
    for status in &statuses {
        assert_eq!(status["active_version"], "1.1.0", "{status}");
    }
    for till in &store.tills {
        let data = &till.data;
        assert_eq!(running_version(data), "1.1.0");
        // The previous version stays for an instant rollback.
        assert!(data.join("slots/pos-app/1.0.0/bin/pos-app").is_file());
    }
    // The control plane's fleet view shows the versions the tills run (from
    // their next heartbeat; the progress report may come first).
    eventually("the fleet view showing 1.1.0", TIMEOUT, || {
        let devices = store.cp.cli_json(&["device", "list", "--store", "lyon-02"]);
        devices
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["installed_bundles"]["pos-app"] == "1.1.0")
            .then_some(())
    });

    // 1.2.0's health check fails: every till switches back to 1.1.0 and
    // says why.
    store.assign(STORE, "pos-app@1.2.0");
    let statuses = store.wait_for_all("rolled_back", "1.2.0");
    for status in &statuses {
        assert_eq!(status["active_version"], "1.1.0", "{status}");
        let error = status["error"].as_str().unwrap();
        assert!(error.contains("cash drawer does not answer"), "{error}");
    }
    for till in &store.tills {
        let data = &till.data;
        assert_eq!(running_version(data), "1.1.0");
        assert!(!data.join("slots/pos-app/1.2.0").exists());
    }
    // And the tills do not try the bad release again.
    std::thread::sleep(Duration::from_secs(3));
    for status in store.pos_app_statuses() {
        assert_eq!(status["phase"], "rolled_back", "{status}");
    }
}

#[test]
fn an_install_outside_the_window_waits_for_the_clock_to_enter_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock");
    // 10:00 UTC; the store's window is 02:00–03:00 UTC.
    std::fs::write(&clock, "2026-06-01T10:00:00Z").unwrap();
    let store = lyon(1, &["--clock-file", clock.to_str().unwrap()]);
    check_ok(store.cp.cli(&[
        "store",
        "window",
        "lyon-02",
        "--start",
        "02:00",
        "--duration",
        "1h",
    ]));
    store.publish("1.0.0", true, 0);
    store.assign(STORE, "pos-app@1.0.0");
    // Downloaded ahead, not installed.
    let statuses = store.wait_for_all("downloaded", "1.0.0");
    assert_eq!(statuses[0]["active_version"], "", "{}", statuses[0]);
    assert_eq!(statuses[0]["error"], "", "{}", statuses[0]);
    let shown = store
        .cp
        .cli(&["device", "show", store.device_ids()[0].as_str()]);
    assert!(
        check_ok(shown).contains("waiting for the window"),
        "device show explains the wait"
    );
    std::thread::sleep(Duration::from_secs(3));
    let data = &store.tills[0].data;
    assert!(!data.join("slots/pos-app/current").exists());
    assert_eq!(store.pos_app_statuses()[0]["phase"], "downloaded");

    // The clock enters the window (next day, 02:05 UTC).
    std::fs::write(&clock, "2026-06-02T02:05:00Z").unwrap();
    store.wait_for_all("installed", "1.0.0");
    assert_eq!(running_version(data), "1.0.0");

    // An emergency release ignores the window: out of it again, 1.0.1
    // marked emergency installs at once, once a second person approved it.
    std::fs::write(&clock, "2026-06-02T12:00:00Z").unwrap();
    store.publish("1.0.1", true, 0);
    let held = store.cp.cli_json(&[
        "device",
        "assign",
        "--store",
        "lyon-02",
        "pos-app@1.0.1",
        "--emergency",
    ]);
    assert_eq!(held["state"], "awaiting-approval", "{held}");
    let id = held["id"].as_str().unwrap();
    let listed = store.cp.cli(&["assignment", "list"]);
    assert!(check_ok(listed).contains(id), "assignment list shows {id}");
    // Nothing moves while it waits, and its requester cannot approve it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(store.pos_app_statuses()[0]["target_version"], "1.0.0");
    let refused = store.cp.cli(&["assignment", "approve", id]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("another person"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let bob = store.cp.second_person("bob", "deployer");
    let approved = check_ok(store.cp.cli_as(&bob, &["assignment", "approve", id]));
    assert!(
        approved.contains("Approved emergency assignment"),
        "{approved}"
    );
    store.wait_for_all("installed", "1.0.1");
    assert_eq!(running_version(data), "1.0.1");
}

#[test]
fn a_till_offline_keeps_selling_and_resumes_when_the_network_returns() {
    let mut store = lyon(1, &[]);
    store.publish("1.0.0", true, 0);
    store.assign(STORE, "pos-app@1.0.0");
    store.wait_for_all("installed", "1.0.0");
    store.publish("1.1.0", true, 0);
    store.assign(STORE, "pos-app@1.1.0");
    store.wait_for_all("installed", "1.1.0");
    let data = store.tills[0].data.clone();
    // The control plane goes away; the till keeps its version and its
    // desired state on disk.
    store.cp.process.kill9();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(running_version(&data), "1.1.0");
    let desired = std::fs::read_to_string(data.join("desired.json")).unwrap();
    assert!(desired.contains("1.1.0"), "{desired}");
    store.restart_control_plane();
    store.publish("1.2.0", true, 0);
    store.assign(STORE, "pos-app@1.2.0");
    store.wait_for_all("installed", "1.2.0");
    assert_eq!(running_version(&data), "1.2.0");
}

#[test]
fn a_till_without_disk_space_says_so_and_keeps_selling() {
    // A reserve larger than any disk: every download is refused up front.
    let store = lyon(1, &["--min-free-disk-bytes", "1000000000000000"]);
    store.publish("1.0.0", true, 0);
    store.assign(STORE, "pos-app@1.0.0");
    let statuses = store.wait_for_all("failed", "1.0.0");
    let error = statuses[0]["error"].as_str().unwrap();
    assert!(error.contains("not enough disk space"), "{error}");
    assert!(!store.tills[0].data.join("slots/pos-app/current").exists());
    // Nothing was downloaded either.
    let downloads: Vec<_> = std::fs::read_dir(store.tills[0].data.join("downloads"))
        .unwrap()
        .collect();
    assert!(downloads.is_empty(), "{downloads:?}");
}

/// A catalog bundle source for `store`: its own prices.
fn catalog_source(dir: &Path, store: &str, cents: u32) -> PathBuf {
    let src = dir.join(format!("catalog-{store}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("posfleet-bundle.toml"),
        format!(
            "name = \"catalog-{store}\"\nversion = \"2026.11.1\"\nkind = \"catalog\"\nhardware = [\"*\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        src.join("prices.csv"),
        format!("sku,name,cents\n1001,Espresso,{cents}\n"),
    )
    .unwrap();
    src
}

#[test]
fn each_till_gets_its_own_store_catalog_and_no_other() {
    let mut fleet = Fleet::builder().start();
    let mut tills = Vec::new();
    for (store, cents) in [("lyon-02", 250), ("nice-01", 310)] {
        let till = fleet
            .open_store(&StoreSpec {
                time_zone: "Europe/Paris",
                ..StoreSpec::new(store, 1)
            })
            .start;
        fleet
            .cp
            .publish(&catalog_source(fleet.dir.path(), store, cents), &fleet.keys);
        fleet.assign(store, &format!("catalog-{store}@2026.11.1"));
        tills.push((store, cents, fleet.tills[till].data.clone()));
    }
    let cp = &fleet.cp;
    for (store, cents, data) in &tills {
        let prices = data.join(format!("slots/catalog-{store}/current/prices.csv"));
        let text = eventually(&format!("{store}'s catalog on its till"), TIMEOUT, || {
            std::fs::read_to_string(&prices).ok()
        });
        assert!(text.contains(&format!("Espresso,{cents}")), "{text}");
        let catalogs: Vec<String> = std::fs::read_dir(data.join("slots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("catalog-"))
            .collect();
        assert_eq!(catalogs, [format!("catalog-{store}")]);
    }
    // A catalog goes to a store, not to one till of another store.
    let device = cp.cli_json(&["device", "list", "--store", "lyon-02"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = cp.cli(&["device", "assign", &device, "catalog-nice-01@2026.11.1"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("per store"), "{stderr}");
}

/// Publishes bundle `name` 1.0.0, whose pre_activate hook is the shell
/// script `script`.
fn publish_hook_probe(fleet: &Fleet, name: &str, script: &str) {
    let src = fleet.dir.path().join(name);
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(
        src.join("posfleet-bundle.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\nkind = \"software\"\nhardware = [\"*\"]\n\
             [pre_activate]\ncommand = [\"bin/probe\"]\ntimeout_seconds = 10\n"
        ),
    )
    .unwrap();
    let probe = src.join("bin/probe");
    std::fs::write(&probe, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    fleet.cp.publish(&src, &fleet.keys);
}

/// A till started by [`install_hook_probe`].
struct ProbeTill {
    data: PathBuf,
    /// What it reported of the probe once it stopped working on it.
    status: Value,
    /// The enrollment token it was given (in its environment).
    secret: String,
    _agent: Process,
}

/// Starts a till of `STORE` with `args` and the environment `env`, gives it
/// bundle `name` 1.0.0 and waits until it is `installed` or `failed`.
fn install_hook_probe(fleet: &Fleet, name: &str, args: &[&str], env: &[(&str, &str)]) -> ProbeTill {
    let secret = fleet.enrollment_token(STORE, 1);
    let data = fleet.dir.path().join("till");
    let mut command = std::process::Command::new(binary("posfleet-agent"));
    command
        .args(["--server-url", &fleet.cp.url()])
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--log-format", "json", "--max-backoff-seconds", "2"])
        .args(["--p2p-enabled", "false"])
        .args(fleet.agent_args(None, args))
        .env("POSFLEET_ENROLLMENT_TOKEN", &secret)
        .envs(env.iter().copied());
    let agent = Process::spawn(command);
    fleet.assign(STORE, &format!("{name}@1.0.0"));
    let device = eventually("the till enrolled", TIMEOUT, || enrolled_device_id(&data));
    let status = eventually(&format!("{name} installed or failed"), TIMEOUT, || {
        let status = fleet.cp.bundle_status(&device, name);
        ["installed", "failed"]
            .contains(&status["phase"].as_str().unwrap_or_default())
            .then_some(status)
    });
    ProbeTill {
        data,
        status,
        secret,
        _agent: agent,
    }
}

#[test]
fn a_hook_sees_none_of_the_agents_secrets() {
    let fleet = Fleet::builder().start();
    fleet.create_store(STORE, "UTC");
    // A bundle whose pre_activate hook writes its environment into its slot.
    publish_hook_probe(&fleet, "env-probe", "env > \"$POSFLEET_SLOT_DIR/hook.env\"");
    // The agent's enrollment token and a secret its service manager passes
    // come from its environment.
    let till = install_hook_probe(
        &fleet,
        "env-probe",
        &[],
        &[("PAYMENT_GATEWAY_KEY", "sk_live_do_not_leak")],
    );
    assert_eq!(till.status["phase"], "installed", "{}", till.status);
    let (data, secret) = (&till.data, till.secret.as_str());

    let recorded = std::fs::read_to_string(data.join("slots/env-probe/1.0.0/hook.env")).unwrap();
    assert!(!recorded.contains("sk_live_do_not_leak"), "{recorded}");
    assert!(!recorded.contains(secret), "{recorded}");
    let mut names: Vec<&str> = recorded
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !["PWD", "OLDPWD", "SHLVL", "_"].contains(k))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "PATH",
            "POSFLEET_BUNDLE_NAME",
            "POSFLEET_BUNDLE_VERSION",
            "POSFLEET_PREVIOUS_VERSION",
            "POSFLEET_SLOT_DIR"
        ],
        "{recorded}"
    );
}

/// With `hook_user`, a bundle's hooks run as that user, not as the agent's
/// (root here: the test needs it to switch users at all).
#[test]
fn hooks_run_as_the_configured_hook_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: switching to another user needs root");
        return;
    }
    let fleet = Fleet::builder().start();
    fleet.create_store(STORE, "UTC");
    // The user must reach the slots: the fleet's folder is traversable.
    std::fs::set_permissions(fleet.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    publish_hook_probe(
        &fleet,
        "user-probe",
        "u=$(id -un); [ \"$u\" = nobody ] || { echo \"ran as $u\" >&2; exit 1; }",
    );
    let till = install_hook_probe(&fleet, "user-probe", &["--hook-user", "nobody"], &[]);
    assert_eq!(till.status["phase"], "installed", "{}", till.status);
}
