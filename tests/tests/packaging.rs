//! The files of `packaging/` as systemd and the programs read them: every
//! unit passes `systemd-analyze verify` without a warning; each service's
//! exposure under `systemd-analyze security --offline=yes` is at most
//! [`MAX_EXPOSURE`] and gives up only the protections listed here with their
//! reasons; the sysusers.d and tmpfiles.d files make the users and the folder
//! the units rely on; the example configurations load through the programs'
//! own loaders with the paths the units give them; and the backup unit's
//! commands name a new dated folder and keep the newest backups.
//!
//! Needs systemd's tools (Debian's `systemd` package), not a running
//! systemd: `systemd-analyze`, `systemd-sysusers`, `systemd-tmpfiles`.

use clap::Parser;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The highest overall exposure `systemd-analyze security` may give a
/// service: 0 is locked down, 10 fully exposed, and systemd calls up to 4.9
/// "OK". The services score 1.2 to 1.4 (README, "Installing a till from
/// scratch"). The per-check lists below catch a single protection lost,
/// which moves the score by as little as 0.1.
const MAX_EXPOSURE: f64 = 2.0;

/// The checks of `systemd-analyze security` a service may fail, each with
/// why; any other failing check fails the test.
const ACCEPTED_EXPOSURES: &[(&str, &[(&str, &str)])] = &[
    (
        "posfleet-agent.service",
        &[
            NETWORK,
            ADDRESSES,
            INET,
            UNIX,
            (
                "RestrictAddressFamilies=~AF_NETLINK",
                "libp2p watches the interface addresses it listens on",
            ),
            ROOT_DIRECTORY,
            USERS,
            RTC,
            (
                "MemoryDenyWriteExecute=",
                "bundle hooks run in the sandbox and may be JIT runtimes",
            ),
            (
                "ProcSubset=",
                "the serial number falls back to /proc/sys/kernel/hostname",
            ),
            (
                "UMask=",
                "unpacked slots must be readable by the till's own services",
            ),
        ],
    ),
    (
        "posfleet-control-plane.service",
        &[
            NETWORK,
            ADDRESSES,
            INET,
            UNIX,
            ROOT_DIRECTORY,
            USERS,
            RTC,
            (
                "SystemCallFilter=~@resources",
                "it raises its own open-files limit (setrlimit)",
            ),
        ],
    ),
    (
        "posfleet-control-plane-backup.service",
        &[NETWORK, ADDRESSES, INET, UNIX, ROOT_DIRECTORY, USERS, RTC],
    ),
];

const NETWORK: (&str, &str) = ("PrivateNetwork=", "a network service");
const ADDRESSES: (&str, &str) = (
    "IPAddressDeny=",
    "its peers' addresses are the site's, not known in advance",
);
const INET: (&str, &str) = (
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    "gRPC, HTTP, PostgreSQL, P2P",
);
const UNIX: (&str, &str) = (
    "RestrictAddressFamilies=~AF_UNIX",
    "the resolver, the journal, PostgreSQL's local socket",
);
const ROOT_DIRECTORY: (&str, &str) = (
    "RootDirectory=/RootImage=",
    "the binaries are installed in the host's /usr",
);
const USERS: (&str, &str) = (
    "PrivateUsers=",
    "files readable through a group (log files, certificates) stay readable",
);
const RTC: (&str, &str) = (
    "DeviceAllow=",
    "ProtectClock= itself allows reading the RTC",
);

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The units of `packaging/systemd/`, by file name.
fn units() -> BTreeMap<String, String> {
    let dir = packaging().join("systemd");
    let units: BTreeMap<String, String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, read(&path))
        })
        .collect();
    assert!(!units.is_empty(), "no units in {}", dir.display());
    units
}

/// The values of `key` in a unit, in order (comments skipped).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

fn one_value<'a>(unit: &'a str, key: &str) -> &'a str {
    match values(unit, key).as_slice() {
        [value] => value,
        other => panic!("expected one {key}=, found {other:?}"),
    }
}

/// A command line of a unit as systemd hands it over: `%%` and `$$` are a
/// literal `%` and `$`.
fn unescape(text: &str) -> String {
    text.replace("%%", "%").replace("$$", "$")
}

/// The script of an `ExecStart=/bin/sh -c '…'` line.
fn shell_script(exec: &str) -> String {
    let script = exec
        .strip_prefix("/bin/sh -c '")
        .and_then(|rest| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("not a `/bin/sh -c '…'` command: {exec}"));
    unescape(script)
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?} ({e}); install systemd's tools (Debian: apt-get install systemd)",
            command.get_program()
        )
    })
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Where the README's install steps put the programs the units start.
const INSTALLED_PROGRAMS: &[&str] = &[
    "/usr/lib/posfleet/posfleet-agent-launcher",
    "/usr/lib/posfleet/posfleet-agent",
    "/usr/bin/posfleet-control-plane",
];

/// The units copied into `dir`, each of [`INSTALLED_PROGRAMS`] replaced by an
/// executable file of the same name in `dir/bin`: `verify` checks that a
/// unit's programs exist, and they are not installed on this machine (any
/// other program a unit names must be).
fn stage_units(dir: &Path, units: &BTreeMap<String, String>) -> Vec<PathBuf> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // Longest first: one path may begin another.
    let mut programs = INSTALLED_PROGRAMS.to_vec();
    programs.sort_by_key(|path| std::cmp::Reverse(path.len()));
    let mut staged = Vec::new();
    for (name, unit) in units {
        let mut unit = unit.clone();
        for program in &programs {
            let stand_in = bin.join(Path::new(program).file_name().unwrap());
            write_executable(&stand_in, "#!/bin/sh\n");
            unit = unit.replace(program, stand_in.to_str().unwrap());
        }
        let path = dir.join(name);
        std::fs::write(&path, unit).unwrap();
        staged.push(path);
    }
    staged
}

/// What `systemd-analyze verify` says about the units, all at once (a timer
/// is checked with its service beside it); empty when nothing is wrong.
fn verify(units: &BTreeMap<String, String>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let staged = stage_units(dir.path(), units);
    let output = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&staged));
    let said = text(&output);
    if output.status.success() {
        said
    } else {
        format!("{said}(exit status {})", output.status)
    }
}

#[test]
fn every_unit_verifies_without_a_warning() {
    let said = verify(&units());
    assert!(said.is_empty(), "systemd-analyze verify:\n{said}");
}

#[test]
fn verify_reports_a_broken_unit() {
    // The check above can fail: a misspelt key, a key in the wrong section
    // and a program that is not where the install steps put it are reported.
    let mut units = units();
    let agent = units.get_mut("posfleet-agent.service").unwrap();
    *agent = agent
        .replace("ProtectSystem=strict", "ProtectSytem=strict")
        .replace("posfleet-agent-launcher", "posfleet-agent-launcer")
        .replace("StartLimitIntervalSec=0\n", "")
        .replace("[Service]\n", "[Service]\nStartLimitIntervalSec=0\n");
    let said = verify(&units);
    assert!(said.contains("ProtectSytem"), "{said}");
    assert!(said.contains("StartLimitIntervalSec"), "{said}");
    assert!(said.contains("posfleet-agent-launcer"), "{said}");
}

/// `systemd-analyze security --offline=yes` of a staged unit: the overall
/// exposure, and each failing check's name with its exposure.
fn security(unit: &Path) -> (f64, Vec<(String, String)>) {
    let output = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit));
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    let overall = said
        .lines()
        .find_map(|line| {
            let (_, rest) = line.split_once("Overall exposure level for ")?;
            let (_, score) = rest.split_once(": ")?;
            score.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no overall exposure in:\n{said}"));
    let output = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--json=short"])
        .arg(unit));
    assert!(output.status.success(), "{}", text(&output));
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let failing = checks
        .iter()
        .filter_map(|check| {
            let exposure = check["exposure"].as_str()?;
            (exposure.parse::<f64>().ok()? > 0.0)
                .then(|| (check["name"].as_str().unwrap().to_string(), exposure.into()))
        })
        .collect();
    (overall, failing)
}

#[test]
fn each_service_gives_up_only_the_protections_it_needs() {
    let units = units();
    let dir = tempfile::tempdir().unwrap();
    let staged = stage_units(dir.path(), &units);
    let services: Vec<&PathBuf> = staged
        .iter()
        .filter(|path| path.extension().is_some_and(|e| e == "service"))
        .collect();
    assert_eq!(services.len(), ACCEPTED_EXPOSURES.len(), "{services:?}");
    let mut problems = Vec::new();
    for path in services {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (overall, failing) = security(path);
        eprintln!("{name}: overall exposure {overall}");
        if overall > MAX_EXPOSURE {
            problems.push(format!(
                "{name}: overall exposure {overall} > {MAX_EXPOSURE}"
            ));
        }
        let accepted = ACCEPTED_EXPOSURES
            .iter()
            .find(|(unit, _)| *unit == name)
            .map(|(_, checks)| *checks)
            .unwrap_or_else(|| panic!("{name} is not in ACCEPTED_EXPOSURES"));
        for (check, exposure) in &failing {
            if !accepted.iter().any(|(accepted, _)| accepted == check) {
                problems.push(format!("{name}: {check} is exposed ({exposure})"));
            }
        }
    }
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

/// Whether this process may give files away (`systemd-tmpfiles` chowns).
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn sysusers_and_tmpfiles_make_the_users_and_the_backups_folder() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let sysusers = packaging().join("sysusers.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&sysusers)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let output = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .args(&files));
    let said = text(&output);
    assert!(output.status.success(), "systemd-sysusers:\n{said}");
    assert!(!said.contains(".conf:"), "systemd-sysusers:\n{said}");
    let passwd = read(&root.path().join("etc/passwd"));
    // Each unit's user exists, with its state directory as its home.
    let units = units();
    for name in ["posfleet-agent.service", "posfleet-control-plane.service"] {
        let unit = &units[name];
        let user = one_value(unit, "User");
        let home = format!("/var/lib/{}", one_value(unit, "StateDirectory"));
        assert!(
            passwd.lines().any(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                fields[0] == user && fields[5] == home && fields[6].ends_with("nologin")
            }),
            "{name}: no system user {user} with home {home} in:\n{passwd}"
        );
    }
    if !is_root() {
        eprintln!("not root: the tmpfiles.d folder's owner is not checked");
        return;
    }
    let output = run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(packaging().join("tmpfiles.d/posfleet-control-plane.conf")));
    assert!(output.status.success(), "{}", text(&output));
    // The folder the backup unit may write to, the control plane's alone.
    let backup = &units["posfleet-control-plane-backup.service"];
    let folder = one_value(backup, "ReadWritePaths");
    let made = std::fs::metadata(root.path().join(folder.trim_start_matches('/'))).unwrap();
    let uid = passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields[0] == one_value(backup, "User")).then(|| fields[2].parse::<u32>().unwrap())
        })
        .unwrap();
    assert!(made.is_dir());
    assert_eq!((made.uid(), made.mode() & 0o777), (uid, 0o700));
}

/// The `--config` path a command line names.
fn config_flag(exec: &str) -> &str {
    let words: Vec<&str> = exec.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "--config")
        .unwrap_or_else(|| panic!("no --config in {exec}"));
    words[at + 1]
}

/// A copy of an example configuration in `dir`, with the files it names
/// under `/etc/posfleet/` there too.
fn example_config(dir: &Path, installed_as: &str) -> PathBuf {
    let name = installed_as
        .strip_prefix("/etc/posfleet/")
        .unwrap_or_else(|| panic!("{installed_as} is not in /etc/posfleet"));
    let text = read(&packaging().join("etc").join(name));
    let etc = format!("{}/", dir.display());
    let path = dir.join(name);
    std::fs::write(&path, text.replace("/etc/posfleet/", &etc)).unwrap();
    path
}

#[test]
fn the_agent_unit_runs_with_the_example_configuration_and_its_state_directory() {
    let units = units();
    let unit = &units["posfleet-agent.service"];
    let exec = one_value(unit, "ExecStart");
    let dir = tempfile::tempdir().unwrap();
    let config = example_config(dir.path(), config_flag(exec));
    // The files the example names, as the README's install steps make them.
    let (ca, _) =
        posfleet_pki::FleetCa::create("test fleet CA", std::time::SystemTime::now()).unwrap();
    std::fs::write(dir.path().join("trust-bundle.pem"), ca.certificates_pem()).unwrap();
    std::fs::write(dir.path().join("root.json"), "{}").unwrap();
    let token = dir.path().join("enrollment-token");
    std::fs::write(&token, "pfe_example\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();

    let args = posfleet_agent::config::Args::parse_from([
        "posfleet-agent",
        "--config",
        config.to_str().unwrap(),
    ]);
    let loaded = posfleet_agent::config::AgentConfig::load_from(&args, Vec::new())
        .unwrap_or_else(|e| panic!("the example agent.toml is refused: {e}"));
    assert_eq!(loaded.enrollment_token, "pfe_example");
    assert!(loaded.tls());
    assert_eq!(
        loaded.data_dir,
        Path::new("/var/lib").join(one_value(unit, "StateDirectory")),
        "data_dir must be the unit's state directory"
    );
    assert_eq!(one_value(unit, "ConfigurationDirectory"), "posfleet");
    assert_eq!(one_value(unit, "KillMode"), "control-group");
}

#[test]
fn the_control_plane_unit_runs_with_the_example_configuration_and_its_state_directory() {
    let units = units();
    let unit = &units["posfleet-control-plane.service"];
    let exec = one_value(unit, "ExecStart");
    let dir = tempfile::tempdir().unwrap();
    let config = example_config(dir.path(), config_flag(exec));
    // The unit's command line as the program parses it, with the copy.
    let words = unescape(exec).replace(config_flag(exec), config.to_str().unwrap());
    let args =
        posfleet_control_plane::config::Args::try_parse_from(words.split_whitespace()).unwrap();
    assert!(args.command.is_none(), "the service serves");
    let loaded = posfleet_control_plane::config::Config::load_from(&args, Vec::new())
        .unwrap_or_else(|e| panic!("the example control-plane.toml is refused: {e}"));
    assert_eq!(
        loaded.data_dir,
        Path::new("/var/lib").join(one_value(unit, "StateDirectory")),
        "data_dir must be the unit's state directory"
    );
    assert!(!loaded.tls_server_names.is_empty(), "served over TLS");
    assert_eq!(one_value(unit, "LimitNOFILE"), "65536");
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A program that prints its arguments one a line, standing in for another.
fn recorder(dir: &Path) -> PathBuf {
    let path = dir.join("recorder");
    write_executable(&path, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n");
    path
}

#[test]
fn the_backup_unit_backs_up_into_a_new_dated_folder_and_keeps_the_newest_14() {
    let units = units();
    let unit = &units["posfleet-control-plane-backup.service"];
    let folder = one_value(unit, "ReadWritePaths");
    let server = &units["posfleet-control-plane.service"];
    let program = one_value(server, "ExecStart")
        .split_whitespace()
        .next()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The command it runs, as the control plane parses it: `backup --to`
    // a folder named by the UTC time, with the server's configuration.
    let script = shell_script(one_value(unit, "ExecStart"));
    let script = script.replace(program, recorder(dir.path()).to_str().unwrap());
    let output = run(Command::new("/bin/sh").arg("-c").arg(&script));
    assert!(output.status.success(), "{}", text(&output));
    let argv = String::from_utf8(output.stdout).unwrap();
    let args = posfleet_control_plane::config::Args::try_parse_from(
        std::iter::once("posfleet-control-plane").chain(argv.lines()),
    )
    .unwrap_or_else(|e| panic!("{argv}: {e}"));
    assert_eq!(
        args.config,
        Some(PathBuf::from(config_flag(one_value(server, "ExecStart"))))
    );
    let Some(posfleet_control_plane::config::Command::Backup { to, .. }) = args.command else {
        panic!("not a backup: {argv}");
    };
    let stamp = to
        .strip_prefix(folder)
        .unwrap_or_else(|_| panic!("{} is not in {folder}", to.display()))
        .to_str()
        .unwrap();
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%dT%H%M%SZ")
        .unwrap_or_else(|e| panic!("`{stamp}` is not a UTC time: {e}"));

    // After a backup, the 14 newest are kept; a backup being written (a
    // hidden folder) is not touched.
    let backups = dir.path().join("backups");
    let mut made = Vec::new();
    for day in 1..=20 {
        let name = format!("2026-11-{day:02}T030000Z");
        std::fs::create_dir_all(backups.join(&name).join("database")).unwrap();
        made.push(name);
    }
    std::fs::create_dir_all(backups.join(".posfleet-backup-partial")).unwrap();
    let prune =
        shell_script(one_value(unit, "ExecStartPost")).replace(folder, backups.to_str().unwrap());
    let output = run(Command::new("/bin/sh").arg("-c").arg(&prune));
    assert!(output.status.success(), "{}", text(&output));
    let mut left: Vec<String> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected = made[6..].to_vec();
    expected.insert(0, ".posfleet-backup-partial".into());
    assert_eq!(left, expected);
}
