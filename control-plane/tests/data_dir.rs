//! What the control plane leaves on disk: the data dir and everything
//! secret in it readable by its owner only, whatever the umask and however
//! the dir was made; online keys written whole.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Starts the real binary under `umask 000` on SQLite in `data_dir`.
fn start_with_open_umask(data_dir: &Path) -> Child {
    let binary = env!("CARGO_BIN_EXE_posfleet-control-plane");
    Command::new("sh")
        .arg("-c")
        .arg(r#"umask 000 && exec "$0" "$@""#)
        .arg(binary)
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .args(["--grpc-listen-address", "127.0.0.1:0"])
        .args(["--http-listen-address", "127.0.0.1:0"])
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start posfleet-control-plane")
}

/// Everything the control plane keeps secret, once it has started: the
/// database (a power cut or a stolen backup aside, it holds every device's
/// credential hash), its WAL, the online repository keys, the first
/// admin's setup code.
#[test]
fn the_data_dir_and_its_secrets_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Made by hand (or by a package) world-readable before the first start.
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut server = start_with_open_umask(&data);
    let wanted = [
        "admin-setup-code",
        "posfleet.db",
        "posfleet.db-wal",
        "posfleet.db-shm",
        "repository-keys/snapshot.key",
        "repository-keys/timestamp.key",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !wanted.iter().all(|f| data.join(f).exists()) {
        assert!(
            server.try_wait().unwrap().is_none(),
            "the control plane exited"
        );
        assert!(Instant::now() < deadline, "the control plane did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let modes: Vec<(&str, u32)> = std::iter::once(("", mode(&data)))
        .chain(std::iter::once((
            "repository-keys",
            mode(&data.join("repository-keys")),
        )))
        .chain(wanted.iter().map(|f| (*f, mode(&data.join(f)))))
        .collect();
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(
        modes,
        [
            ("", 0o700),
            ("repository-keys", 0o700),
            ("admin-setup-code", 0o600),
            ("posfleet.db", 0o600),
            ("posfleet.db-wal", 0o600),
            ("posfleet.db-shm", 0o600),
            ("repository-keys/snapshot.key", 0o600),
            ("repository-keys/timestamp.key", 0o600),
        ]
    );
    // No temporary key file is left behind.
    let mut keys: Vec<String> = std::fs::read_dir(data.join("repository-keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["snapshot.key", "timestamp.key"]);
}

/// A database made by an older version with the umask's mode gets 0600
/// at the next start.
#[test]
fn an_existing_world_readable_database_is_made_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let db = data.join("posfleet.db");
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut server = start_with_open_umask(&data);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.join("admin-setup-code").exists() {
        assert!(server.try_wait().unwrap().is_none(), "exited");
        assert!(Instant::now() < deadline, "did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let db_mode = mode(&db);
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(db_mode, 0o600);
}
