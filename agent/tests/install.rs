//! Installs of real bundle archives into a data dir: switching, health
//! checks and rollback, refusals, a full disk, and a crash at every step of
//! an install followed by `recover`.

use posfleet_agent::HookUser;
use posfleet_agent::install::{CrashPoint, Outcome, RecoveryAction, Slots};
use posfleet_bundle::manifest::Kind;
use semver::Version;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NAME: &str = "pos-app";

/// A bundle source to build: `app.txt` and `bin/pos-app`, plus hooks as
/// `#!/bin/sh` scripts.
#[derive(Clone)]
struct Bundle {
    name: String,
    version: String,
    kind: &'static str,
    files: Vec<(String, Vec<u8>)>,
    pre_activate: Option<String>,
    health_check: Option<(String, u64, u32)>,
}

impl Bundle {
    fn new(version: &str) -> Bundle {
        Bundle {
            name: NAME.into(),
            version: version.into(),
            kind: "software",
            files: vec![("app.txt".into(), format!("{NAME} {version}\n").into_bytes())],
            pre_activate: None,
            health_check: None,
        }
    }

    fn pre_activate(mut self, body: &str) -> Bundle {
        self.pre_activate = Some(body.into());
        self
    }

    fn health_check(mut self, body: &str, timeout_seconds: u64, retries: u32) -> Bundle {
        self.health_check = Some((body.into(), timeout_seconds, retries));
        self
    }

    fn file(mut self, path: &str, bytes: Vec<u8>) -> Bundle {
        self.files.push((path.into(), bytes));
        self
    }

    fn version(&self) -> Version {
        Version::parse(&self.version).unwrap()
    }
}

/// A built bundle: its source tree (to compare slots with) and archive.
struct Built {
    src: PathBuf,
    archive: PathBuf,
}

struct Fixture {
    work: tempfile::TempDir,
    data: PathBuf,
}

fn script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Files below `root`, relative, with their bytes and executable bit.
fn tree(root: &Path) -> Vec<(PathBuf, Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let path = rel.join(entry.file_name());
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else {
                let exec = meta.permissions().mode() & 0o100 != 0;
                out.push((path, std::fs::read(entry.path()).unwrap(), exec));
            }
        }
    }
    out.sort();
    out
}

impl Fixture {
    fn new() -> Fixture {
        let work = tempfile::tempdir().unwrap();
        let data = work.path().join("data");
        Fixture { work, data }
    }

    fn on(data: PathBuf) -> Fixture {
        Fixture {
            work: tempfile::tempdir().unwrap(),
            data,
        }
    }

    /// Slots as the agent opens them at start, with a short retry pause.
    fn slots(&self) -> Slots {
        Slots::open(&self.data)
            .unwrap()
            .with_retry_pause(Duration::from_millis(10))
    }

    /// A file outside the data dir that hooks append to.
    fn log(&self) -> PathBuf {
        self.work.path().join("hooks.log")
    }

    fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn build(&self, bundle: &Bundle) -> Built {
        let id = format!("{}-{}-{}", bundle.name, bundle.version, rand_suffix());
        let src = self.work.path().join("src").join(&id);
        std::fs::create_dir_all(&src).unwrap();
        let mut manifest = format!(
            "name = \"{}\"\nversion = \"{}\"\nkind = \"{}\"\nhardware = [\"*\"]\n",
            bundle.name, bundle.version, bundle.kind
        );
        if let Some(body) = &bundle.pre_activate {
            script(&src.join("bin/pre-activate"), body);
            manifest.push_str(
                "[pre_activate]\ncommand = [\"bin/pre-activate\"]\ntimeout_seconds = 10\n",
            );
        }
        if let Some((body, timeout, retries)) = &bundle.health_check {
            script(&src.join("bin/health-check"), body);
            manifest.push_str(&format!(
                "[health_check]\ncommand = [\"bin/health-check\"]\ntimeout_seconds = {timeout}\nretries = {retries}\n"
            ));
        }
        std::fs::write(src.join("posfleet-bundle.toml"), manifest).unwrap();
        for (path, bytes) in &bundle.files {
            let path = src.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let archive = self.work.path().join(format!("{id}.bundle"));
        posfleet_bundle::archive::build(&src, &archive).unwrap();
        Built { src, archive }
    }

    async fn install(&self, slots: &Slots, bundle: &Bundle) -> (Outcome, Built) {
        let built = self.build(bundle);
        let kind = if bundle.kind == "catalog" {
            Kind::Catalog
        } else {
            Kind::Software
        };
        let outcome = slots
            .install(&bundle.name, &bundle.version(), kind, &built.archive)
            .await
            .unwrap();
        (outcome, built)
    }

    fn dir(&self) -> PathBuf {
        self.data.join("slots").join(NAME)
    }

    fn current(&self) -> Option<String> {
        std::fs::read_link(self.dir().join("current"))
            .ok()
            .map(|target| target.to_str().unwrap().to_string())
    }

    /// The names in the bundle's directory, sorted.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The journal's state; `None` before anything was journaled.
    fn journal_state(&self) -> Option<String> {
        let bytes = std::fs::read(self.dir().join("journal.json")).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        Some(json["state"].as_str().unwrap().to_string())
    }

    /// `current` names `version`, and its slot holds exactly `built`'s source.
    #[track_caller]
    fn assert_active(&self, version: &str, built: &Built) {
        assert_eq!(self.current().as_deref(), Some(version));
        assert_eq!(
            self.slots().active(NAME).unwrap(),
            Some(Version::parse(version).unwrap())
        );
        assert_eq!(
            self.slots().confirmed(NAME).unwrap(),
            Some(Version::parse(version).unwrap())
        );
        assert_eq!(
            tree(&self.dir().join(version)),
            tree(&built.src),
            "slot {version} differs from its source"
        );
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

/// True once `pid` has exited (a zombie waiting for a reaper counts: the
/// container's init may not reap).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) state ..."; comm may hold spaces.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z'),
    }
}

fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test]
async fn installs_switch_current_and_keep_the_previous_slot() {
    let f = Fixture::new();
    let slots = f.slots();
    let log = f.log();
    let log = log.display();
    let bundle = |version: &str| {
        Bundle::new(version)
            .pre_activate(&format!(
                "echo \"pre $POSFLEET_BUNDLE_NAME $POSFLEET_BUNDLE_VERSION [$POSFLEET_PREVIOUS_VERSION] $POSFLEET_SLOT_DIR $(pwd) $(readlink ../current)\" >> {log}"
            ))
            .health_check(
                &format!("echo \"health $POSFLEET_BUNDLE_VERSION $(readlink ../current)\" >> {log}"),
                10,
                0,
            )
    };
    let (outcome, first) = f.install(&slots, &bundle("1.0.0")).await;
    assert_eq!(outcome, Outcome::Installed);
    f.assert_active("1.0.0", &first);
    assert_eq!(f.entries(), ["1.0.0", "current", "journal.json"]);
    assert_eq!(f.journal_state().as_deref(), Some("stable"));

    let (outcome, second) = f.install(&slots, &bundle("1.1.0")).await;
    assert_eq!(outcome, Outcome::Installed);
    f.assert_active("1.1.0", &second);
    assert_eq!(f.entries(), ["1.0.0", "1.1.0", "current", "journal.json"]);
    assert_eq!(
        slots
            .active_versions()
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        [(NAME.to_string(), Version::parse("1.1.0").unwrap())]
    );
    // pre_activate runs in the new slot before the switch, the health check
    // after it.
    let slot = |v: &str| f.dir().join(v).display().to_string();
    assert_eq!(
        f.log_lines(),
        [
            format!("pre pos-app 1.0.0 [] {0} {0} ", slot("1.0.0")),
            "health 1.0.0 1.0.0".to_string(),
            format!("pre pos-app 1.1.0 [1.0.0] {0} {0} 1.0.0", slot("1.1.0")),
            "health 1.1.0 1.1.0".to_string(),
        ]
    );

    // The active version again: nothing runs, nothing changes.
    let (outcome, _) = f.install(&slots, &bundle("1.1.0")).await;
    assert_eq!(outcome, Outcome::Installed);
    assert_eq!(f.log_lines().len(), 4);
    f.assert_active("1.1.0", &second);
}

#[tokio::test]
async fn a_failing_health_check_rolls_back_with_its_output() {
    let f = Fixture::new();
    let slots = f.slots();
    f.install(&slots, &Bundle::new("1.0.0")).await;
    let (_, good) = f.install(&slots, &Bundle::new("1.1.0")).await;
    let bad = Bundle::new("1.2.0").health_check(
        &format!(
            "echo attempt >> {}\necho 'database unreachable' >&2\nexit 1",
            f.log().display()
        ),
        10,
        2,
    );
    let (outcome, _) = f.install(&slots, &bad).await;
    let Outcome::RolledBack { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("database unreachable"), "{reason}");
    assert!(reason.contains("exited with code 1"), "{reason}");
    assert!(reason.contains("3 attempts"), "{reason}");
    assert_eq!(f.log_lines(), ["attempt"; 3]);
    f.assert_active("1.1.0", &good);
    assert_eq!(f.entries(), ["1.0.0", "1.1.0", "current", "journal.json"]);
    assert_eq!(f.journal_state().as_deref(), Some("stable"));
}

#[tokio::test]
async fn a_failing_first_install_leaves_nothing_active() {
    let f = Fixture::new();
    let slots = f.slots();
    let bad = Bundle::new("1.0.0").health_check("echo no; exit 1", 10, 0);
    let (outcome, _) = f.install(&slots, &bad).await;
    assert!(matches!(outcome, Outcome::RolledBack { .. }), "{outcome:?}");
    assert_eq!(f.current(), None);
    assert_eq!(slots.active(NAME).unwrap(), None);
    assert!(slots.active_versions().unwrap().is_empty());
    assert_eq!(f.entries(), ["journal.json"]);
}

#[tokio::test]
async fn a_failing_pre_activate_switches_nothing() {
    let f = Fixture::new();
    let slots = f.slots();
    let (_, good) = f.install(&slots, &Bundle::new("1.0.0")).await;
    let bad = Bundle::new("1.1.0")
        .pre_activate("echo 'cannot migrate the database'; exit 2")
        .health_check(&format!("echo health >> {}", f.log().display()), 10, 0);
    let (outcome, _) = f.install(&slots, &bad).await;
    let Outcome::Failed { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("pre_activate"), "{reason}");
    assert!(reason.contains("cannot migrate the database"), "{reason}");
    assert!(reason.contains("exited with code 2"), "{reason}");
    f.assert_active("1.0.0", &good);
    assert_eq!(f.entries(), ["1.0.0", "current", "journal.json"]);
    assert!(f.log_lines().is_empty(), "the health check ran");
}

#[tokio::test]
async fn a_hanging_health_check_is_killed_and_rolled_back() {
    let f = Fixture::new();
    let slots = f.slots();
    let (_, good) = f.install(&slots, &Bundle::new("1.0.0")).await;
    // The backgrounded grandchild keeps the output pipe open after the
    // hook itself is killed.
    let pids = f.work.path().join("pids");
    let hanging = Bundle::new("1.1.0").health_check(
        &format!(
            "sleep 1000 &\necho $! >> {0}\necho $$ >> {0}\necho waiting\nsleep 1000",
            pids.display()
        ),
        1,
        1,
    );
    let started = Instant::now();
    let (outcome, _) = f.install(&slots, &hanging).await;
    let elapsed = started.elapsed();
    let Outcome::RolledBack { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("timed out after 1 s"), "{reason}");
    assert!(reason.contains("waiting"), "{reason}");
    // Two attempts of 1 s each, and a little.
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    f.assert_active("1.0.0", &good);
    let pids: Vec<i32> = std::fs::read_to_string(pids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "two attempts, two processes each");
    for pid in pids {
        assert!(wait_gone(pid), "process {pid} outlived its hook");
    }
}

#[tokio::test]
async fn old_slots_are_removed_keeping_the_active_one_and_the_one_before() {
    let f = Fixture::new();
    let slots = f.slots();
    let mut last = None;
    for version in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"] {
        let (outcome, built) = f.install(&slots, &Bundle::new(version)).await;
        assert_eq!(outcome, Outcome::Installed);
        last = Some(built);
    }
    assert_eq!(f.entries(), ["1.2.0", "1.3.0", "current", "journal.json"]);
    f.assert_active("1.3.0", &last.unwrap());
}

#[tokio::test]
async fn a_manifest_that_does_not_match_is_refused() {
    let f = Fixture::new();
    let slots = f.slots();
    let (_, good) = f.install(&slots, &Bundle::new("1.0.0")).await;
    let built = f.build(&Bundle::new("1.1.0"));
    let v = |s: &str| Version::parse(s).unwrap();
    for (name, version, kind) in [
        (NAME, v("1.2.0"), Kind::Software),
        (NAME, v("1.1.0"), Kind::Catalog),
        ("other-app", v("1.1.0"), Kind::Software),
    ] {
        let outcome = slots
            .install(name, &version, kind, &built.archive)
            .await
            .unwrap();
        let Outcome::Failed { reason } = outcome else {
            panic!("{outcome:?}");
        };
        assert!(
            reason.contains("the archive holds pos-app 1.1.0 (software)"),
            "{reason}"
        );
    }
    f.assert_active("1.0.0", &good);
    assert_eq!(f.entries(), ["1.0.0", "current", "journal.json"]);
    assert_eq!(slots.active("other-app").unwrap(), None);
}

/// One tar entry, written by hand: the agent has no tar writer, and one
/// would refuse these names anyway.
fn tar_entry(out: &mut Vec<u8>, path: &str, kind: u8, mode: u32, data: &[u8], link: &str) {
    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{value:0width$o}\0", width = field.len() - 1);
        field.copy_from_slice(text.as_bytes());
    }
    let mut header = [0u8; 512];
    header[..path.len()].copy_from_slice(path.as_bytes());
    octal(&mut header[100..108], mode.into());
    octal(&mut header[108..116], 0);
    octal(&mut header[116..124], 0);
    octal(&mut header[124..136], data.len() as u64);
    octal(&mut header[136..148], 0);
    header[156] = kind;
    header[157..157 + link.len()].copy_from_slice(link.as_bytes());
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

/// A zstd frame of stored (raw) blocks.
fn zstd_stored(data: &[u8]) -> Vec<u8> {
    // Magic number; no checksum or content size; a 128 KiB window.
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x38];
    let blocks: Vec<&[u8]> = data.chunks(128 * 1024).collect();
    for (i, block) in blocks.iter().enumerate() {
        let last = u32::from(i + 1 == blocks.len());
        // Last-block flag, type 0 (raw), size.
        let header = last | ((block.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
    out
}

/// An archive of `manifest` and `entries` (path, type, mode, data, link
/// target), written by hand.
fn hand_made(work: &Path, manifest: &str, entries: &[(&str, u8, u32, &[u8], &str)]) -> PathBuf {
    let mut tar = Vec::new();
    tar_entry(
        &mut tar,
        "posfleet-bundle.toml",
        b'0',
        0o644,
        manifest.as_bytes(),
        "",
    );
    for &(path, kind, mode, data, link) in entries {
        tar_entry(&mut tar, path, kind, mode, data, link);
    }
    tar.resize(tar.len() + 1024, 0);
    let path = work.join(format!("hand-made-{}.bundle", rand_suffix()));
    std::fs::write(&path, zstd_stored(&tar)).unwrap();
    path
}

fn hand_made_archive(work: &Path, extra: &[(&str, u8, &str)]) -> PathBuf {
    let manifest =
        "name = \"pos-app\"\nversion = \"1.1.0\"\nkind = \"software\"\nhardware = [\"*\"]\n";
    let entries: Vec<(&str, u8, u32, &[u8], &str)> = extra
        .iter()
        .map(|&(path, kind, link)| {
            let data: &[u8] = if kind == b'0' { b"pwned" } else { b"" };
            (path, kind, 0o644, data, link)
        })
        .collect();
    hand_made(work, manifest, &entries)
}

#[tokio::test]
async fn an_archive_escaping_its_slot_is_refused() {
    let f = Fixture::new();
    let slots = f.slots();
    let (_, good) = f.install(&slots, &Bundle::new("1.0.0")).await;
    let v110 = Version::parse("1.1.0").unwrap();
    // The staging dir is data/slots/pos-app/.staging-1.1.0: `../../..`
    // reaches the data dir.
    for (entries, refusal) in [
        (vec![("../../../escaped", b'0', "")], "`..`"),
        (vec![("bin/../../../../escaped", b'0', "")], "`..`"),
        (
            vec![("link", b'2', "../../.."), ("link/escaped", b'0', "")],
            "symbolic link",
        ),
        (vec![("passwd", b'1', "/etc/passwd")], "hard link"),
    ] {
        let archive = hand_made_archive(f.work.path(), &entries);
        let outcome = slots
            .install(NAME, &v110, Kind::Software, &archive)
            .await
            .unwrap();
        let Outcome::Failed { reason } = outcome else {
            panic!("{entries:?}: {outcome:?}");
        };
        assert!(reason.contains(refusal), "{reason}");
        assert!(!f.data.join("escaped").exists());
        assert!(!f.data.join("slots/escaped").exists());
        let mut top: Vec<_> = std::fs::read_dir(&f.data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        top.sort();
        assert_eq!(top, ["slots"]);
        assert_eq!(f.entries(), ["1.0.0", "current", "journal.json"]);
        f.assert_active("1.0.0", &good);
    }
    // The same hand-made archive, harmless, installs: the refusals above
    // are the entries', not the writer's.
    let archive = hand_made_archive(f.work.path(), &[("bin/fine", b'0', "")]);
    let outcome = slots
        .install(NAME, &v110, Kind::Software, &archive)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Installed);
    assert_eq!(
        std::fs::read(f.dir().join("1.1.0/bin/fine")).unwrap(),
        b"pwned"
    );
}

/// A tmpfs mounted over a directory until dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status();
        matches!(status, Ok(s) if s.success()).then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_install_and_keeps_the_current_version() {
    let mount_point = tempfile::tempdir().unwrap();
    let Some(_tmpfs) = Tmpfs::mount(mount_point.path(), "2m") else {
        eprintln!("skipped: cannot mount a tmpfs here (it needs root)");
        return;
    };
    let f = Fixture::on(mount_point.path().join("data"));
    let slots = f.slots();
    let (_, good) = f.install(&slots, &Bundle::new("1.0.0")).await;
    let big = Bundle::new("1.1.0").file("data/big.bin", vec![0; 4 << 20]);
    let (outcome, _) = f.install(&slots, &big).await;
    let Outcome::NoSpace { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("disk is full"), "{reason}");
    f.assert_active("1.0.0", &good);
    assert_eq!(f.entries(), ["1.0.0", "current", "journal.json"]);
    // The space is back: what the failed unpack wrote is gone. (A process
    // another test forks at that moment holds the test's open files until
    // it execs, so the tmpfs may take an instant to show it.)
    let free = || {
        let stat = nix::sys::statvfs::statvfs(mount_point.path()).unwrap();
        stat.blocks_available() as u64 * stat.fragment_size() as u64
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while free() < 1 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(free() >= 1 << 20, "{} bytes free", free());
    let (outcome, small) = f.install(&slots, &Bundle::new("1.1.0")).await;
    assert_eq!(outcome, Outcome::Installed);
    f.assert_active("1.1.0", &small);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    None,
    RolledBack,
    Abandoned,
}

fn report_of(recoveries: &[posfleet_agent::install::Recovery]) -> Report {
    match recoveries {
        [] => Report::None,
        [one] => match one.action {
            RecoveryAction::RolledBack { .. } => Report::RolledBack,
            RecoveryAction::Abandoned { .. } => Report::Abandoned,
            RecoveryAction::Repaired => panic!("{one:?}"),
        },
        more => panic!("{more:?}"),
    }
}

/// Installs 1.1.0 (over 1.0.0 when `previous`), stopping right after
/// `point` as a crash there would; then a restarted agent recovers.
/// Checks what the crash left, what recovery reports, and that exactly one
/// whole version (or none) is active after it.
async fn crash_and_recover(
    point: CrashPoint,
    previous: bool,
    healthy: bool,
    left: (&str, Option<&str>),
    report: Report,
    active_after: Option<&str>,
) {
    let f = Fixture::new();
    let first = previous.then(|| f.build(&Bundle::new("1.0.0")));
    if let Some(first) = &first {
        let outcome = f
            .slots()
            .install(NAME, &Version::new(1, 0, 0), Kind::Software, &first.archive)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Installed);
    }
    let second = Bundle::new("1.1.0").health_check(
        if healthy {
            "exit 0"
        } else {
            "echo 'unhealthy!'; exit 1"
        },
        10,
        0,
    );
    let built = f.build(&second);
    let crashing = f.slots().with_crash_after(point);
    let stopped = crashing
        .install(NAME, &second.version(), Kind::Software, &built.archive)
        .await;
    assert!(stopped.is_err(), "{point:?}: {stopped:?}");
    drop(crashing);

    // What the crash left.
    let (leftover, current) = left;
    assert!(
        f.entries().iter().any(|e| e == leftover),
        "{point:?}: no {leftover} in {:?}",
        f.entries()
    );
    assert_eq!(f.current().as_deref(), current, "{point:?}");

    // Restart.
    let slots = f.slots();
    let recoveries = slots.recover().unwrap();
    assert_eq!(report_of(&recoveries), report, "{point:?}: {recoveries:?}");
    if let [recovery] = &recoveries[..] {
        assert_eq!(recovery.name, NAME);
        assert_eq!(
            recovery.active.as_ref().map(Version::to_string).as_deref(),
            active_after
        );
        if !healthy {
            assert!(recovery.reason.contains("unhealthy!"), "{recovery:?}");
        }
    }
    match active_after {
        Some("1.0.0") => f.assert_active("1.0.0", first.as_ref().unwrap()),
        Some(version) => f.assert_active(version, &built),
        None => {
            assert_eq!(f.current(), None, "{point:?}");
            assert_eq!(slots.active(NAME).unwrap(), None);
        }
    }
    // Nothing half made is left, and the journal is settled.
    for entry in f.entries() {
        assert!(
            entry == "current" || entry == "journal.json" || Version::parse(&entry).is_ok(),
            "{point:?}: {entry} left"
        );
    }
    assert!(
        matches!(f.journal_state().as_deref(), None | Some("stable")),
        "{point:?}"
    );
    assert!(
        slots.recover().unwrap().is_empty(),
        "{point:?}: recovered twice"
    );

    // And the agent carries on.
    let (outcome, next) = f.install(&slots, &Bundle::new("1.2.0")).await;
    assert_eq!(outcome, Outcome::Installed, "{point:?}");
    f.assert_active("1.2.0", &next);
}

#[tokio::test]
async fn a_crash_at_any_step_leaves_one_whole_version() {
    use CrashPoint::*;
    use Report::{Abandoned, RolledBack};
    let old = Some("1.0.0");
    let new = Some("1.1.0");
    for (point, healthy, left, report, active) in [
        (Unpacked, true, (".staging-1.1.0", old), Report::None, old),
        (SlotInPlace, true, ("1.1.0", old), Report::None, old),
        (PreActivated, true, ("1.1.0", old), Report::None, old),
        (Journaled, true, ("1.1.0", old), Abandoned, old),
        (Switched, true, ("1.1.0", new), RolledBack, old),
        (Healthy, true, ("1.1.0", new), RolledBack, old),
        (Confirmed, true, ("1.0.0", new), Report::None, new),
        (RollbackJournaled, false, ("1.1.0", new), RolledBack, old),
        (SwitchedBack, false, ("1.1.0", old), RolledBack, old),
        (BadSlotRemoved, false, ("1.0.0", old), RolledBack, old),
    ] {
        crash_and_recover(point, true, healthy, left, report, active).await;
    }
}

#[tokio::test]
async fn a_crash_during_a_first_install_leaves_nothing_or_the_whole_version() {
    use CrashPoint::*;
    use Report::{Abandoned, RolledBack};
    let new = Some("1.1.0");
    for (point, healthy, left, report, active) in [
        (Unpacked, true, (".staging-1.1.0", None), Report::None, None),
        (Journaled, true, ("1.1.0", None), Abandoned, None),
        (Switched, true, ("1.1.0", new), RolledBack, None),
        (Confirmed, true, ("1.1.0", new), Report::None, new),
        (RollbackJournaled, false, ("1.1.0", new), RolledBack, None),
        (SwitchedBack, false, ("1.1.0", None), RolledBack, None),
        (
            BadSlotRemoved,
            false,
            ("journal.json", None),
            RolledBack,
            None,
        ),
    ] {
        crash_and_recover(point, false, healthy, left, report, active).await;
    }
}

#[tokio::test]
async fn an_install_dropped_during_its_health_check_is_rolled_back_at_restart() {
    let f = Fixture::new();
    let (_, good) = f.install(&f.slots(), &Bundle::new("1.0.0")).await;
    let pid_file = f.work.path().join("pid");
    let slow = Bundle::new("1.1.0").health_check(
        &format!("echo $$ > {}\nsleep 1000", pid_file.display()),
        600,
        0,
    );
    let built = f.build(&slow);
    let slots = f.slots();
    let version = slow.version();
    let install = slots.install(NAME, &version, Kind::Software, &built.archive);
    let waited = tokio::time::timeout(Duration::from_secs(3), install).await;
    assert!(waited.is_err(), "{waited:?}");
    // The agent dies here; so does its hook.
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_gone(pid), "the health check outlived the install");
    assert_eq!(f.current().as_deref(), Some("1.1.0"));
    // Active but not confirmed: the till still reports 1.0.0.
    assert_eq!(
        f.slots().confirmed(NAME).unwrap(),
        Some(Version::parse("1.0.0").unwrap())
    );

    let restarted = f.slots();
    let recoveries = restarted.recover().unwrap();
    assert_eq!(report_of(&recoveries), Report::RolledBack, "{recoveries:?}");
    assert!(
        recoveries[0]
            .reason
            .contains("stopped before 1.1.0 was confirmed healthy"),
        "{recoveries:?}"
    );
    f.assert_active("1.0.0", &good);
    assert_eq!(f.entries(), ["1.0.0", "current", "journal.json"]);
}

#[tokio::test]
async fn a_catalog_bundle_with_hooks_is_refused_and_its_hooks_never_run() {
    let f = Fixture::new();
    let slots = f.slots();
    let ran = f.work.path().join("hook-ran");
    // Built by hand: `posfleet bundle build` refuses such a manifest, but a
    // till must refuse it whatever the repository serves.
    let manifest = "name = \"catalog-lyon\"\nversion = \"1.0.0\"\nkind = \"catalog\"\n\
                    hardware = [\"*\"]\n[pre_activate]\ncommand = [\"bin/run\"]\n\
                    timeout_seconds = 10\n[health_check]\ncommand = [\"bin/run\"]\n\
                    timeout_seconds = 10\n";
    let program = format!("#!/bin/sh\ntouch {}\n", ran.display());
    let archive = hand_made(
        f.work.path(),
        manifest,
        &[("bin/run", b'0', 0o755, program.as_bytes(), "")],
    );
    let outcome = slots
        .install(
            "catalog-lyon",
            &Version::new(1, 0, 0),
            Kind::Catalog,
            &archive,
        )
        .await
        .unwrap();
    let Outcome::Failed { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("carries no hooks"), "{reason}");
    assert!(!ran.exists(), "a catalog's hook ran");
    assert_eq!(slots.active("catalog-lyon").unwrap(), None);
}

#[tokio::test]
async fn hooks_run_as_hook_user_and_reach_their_slot() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can run hooks as another user");
        return;
    }
    let nobody = HookUser::lookup("nobody")
        .unwrap()
        .expect("a `nobody` user");
    let f = Fixture::new();
    // The agent makes its data dir private; the directories above it are
    // the system's (here, the test's).
    std::fs::set_permissions(f.work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(&f.data).unwrap();
    std::fs::set_permissions(&f.data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let slots = f.slots().with_hook_user(nobody.clone()).unwrap();
    let out = f.work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let record = |hook: &str| format!("id -u > {}/{hook}", out.display());
    let bundle = Bundle::new("1.0.0")
        .pre_activate(&record("pre-activate"))
        .health_check(&record("health-check"), 10, 0);
    let (outcome, built) = f.install(&slots, &bundle).await;
    assert_eq!(outcome, Outcome::Installed);
    f.assert_active("1.0.0", &built);
    for hook in ["pre-activate", "health-check"] {
        let uid = std::fs::read_to_string(out.join(hook)).unwrap();
        assert_eq!(uid.trim(), nobody.uid.to_string(), "{hook}");
    }
    // Traversable, not listable: the data dir's names stay private.
    let mode = std::fs::metadata(&f.data).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o711);
}
