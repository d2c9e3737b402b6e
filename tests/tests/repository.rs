//! Signed bundles end to end, with real processes: keys, build, publish,
//! list, download over HTTP with Range, verification by the agent's
//! repository client, key rotation, and the reference TUF client.

use posfleet_agent::repository::{RepositoryClient, Timeouts};
use posfleet_bundle::client::Limits;
use posfleet_e2e::{ControlPlane, PostgresDb, block_on, pseudo_random_bytes};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

fn write_bundle_source(dir: &Path, version: &str, size: usize) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(
        dir.join("posfleet-bundle.toml"),
        format!("name = \"pos-app\"\nversion = \"{version}\"\nkind = \"software\"\nhardware = [\"pos-x1\"]\n"),
    )
    .unwrap();
    // Incompressible, so the bundle spans several 1 MiB pieces.
    let data = pseudo_random_bytes(0x9e3779b97f4a7c15u64 ^ size as u64, size);
    std::fs::write(dir.join("bin/pos-app"), data).unwrap();
}

/// Writes a bundle source of `size` bytes at `version` and builds it into
/// `dir/name` with `posfleet bundle build`.
fn build_bundle(cp: &ControlPlane, dir: &Path, version: &str, size: usize, name: &str) -> PathBuf {
    write_bundle_source(&dir.join("src"), version, size);
    let file = dir.join(name);
    let src = dir.join("src");
    ok(cp.cli(&[
        "bundle",
        "build",
        src.to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ]));
    file
}

/// `posfleet bundle publish FILE --keys KEYS`.
fn publish(cp: &ControlPlane, file: &Path, keys: &str) -> std::process::Output {
    cp.cli(&["bundle", "publish", file.to_str().unwrap(), "--keys", keys])
}

fn ok(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// GET with a Range header, over a plain socket: (status, body).
fn get_range(address: &str, path: &str, range: &str) -> (u16, Vec<u8>) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: {range}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = std::str::from_utf8(&response[9..12])
        .unwrap()
        .parse()
        .unwrap();
    (status, response[split + 4..].to_vec())
}

fn repository_client(cp: &ControlPlane, pinned: &Path, data: &Path) -> RepositoryClient {
    RepositoryClient::open(
        pinned,
        data,
        &format!("http://{}/repo/", cp.http_address),
        Limits::default(),
        Timeouts::default(),
    )
    .unwrap()
}

fn round_trip(database_url: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cp = ControlPlane::start(
        &d.join("cp"),
        database_url,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
    );
    let keys = d.join("keys");
    let keys_arg = keys.to_str().unwrap();
    ok(cp.cli(&[
        "keys",
        "init",
        keys_arg,
        "--root-keys",
        "3",
        "--root-threshold",
        "2",
    ]));
    let pinned = d.join("pinned-root.json");
    std::fs::copy(keys.join("root.json"), &pinned).unwrap();

    let file = build_bundle(&cp, d, "1.0.0", 2_600_000, "pos-app-1.0.0.bundle");
    ok(publish(&cp, &file, keys_arg));
    let listed = cp.cli_json(&["bundle", "list"]);
    assert_eq!(listed[0]["target"], "pos-app/1.0.0");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(listed[0]["length"], bytes.len() as u64);
    let sha256 = listed[0]["sha256"].as_str().unwrap().to_string();

    // Publishing it again is refused, and so is a bundle signed with a key
    // that is not a targets key.
    let again = publish(&cp, &file, keys_arg);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already published"));
    let rogue = d.join("rogue-keys");
    std::fs::create_dir_all(&rogue).unwrap();
    std::fs::write(
        rogue.join("targets-1.key"),
        format!("{}\n", "42".repeat(32)),
    )
    .unwrap();
    let evil = build_bundle(&cp, d, "6.6.6", 1000, "evil.bundle");
    let refused = publish(&cp, &evil, rogue.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("invalid argument") && stderr.contains("signatures"),
        "{stderr}"
    );

    // Range requests let downloads resume.
    let path = format!("/repo/targets/pos-app/{sha256}.1.0.0");
    let (status, body) = get_range(&cp.http_address, &path, "bytes=1048576-1048675");
    assert_eq!(status, 206);
    assert_eq!(body, bytes[1_048_576..1_048_676]);

    // The agent's client verifies the metadata chain and every piece, and
    // resumes from the verified pieces already on disk.
    let mut client = repository_client(&cp, &pinned, &d.join("agent"));
    block_on(client.refresh()).unwrap();
    let target = client.target("pos-app/1.0.0", "pos-x1").unwrap();
    let dest = d.join("download");
    std::fs::write(&dest, &bytes[..1_500_000]).unwrap();
    block_on(client.download(&target, &dest)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert!(client.target("pos-app/1.0.0", "kiosk-k2").is_err());

    // Ops rotate the targets key and publish 1.1.0; a client pinned to the
    // first root follows the rotation.
    ok(cp.cli(&["keys", "rotate", keys_arg, "--role", "targets"]));
    let second = build_bundle(&cp, d, "1.1.0", 5000, "pos-app-1.1.0.bundle");
    ok(publish(&cp, &second, keys_arg));
    block_on(client.refresh()).unwrap();
    assert_eq!(client.trusted().root().version, 2);
    let target = client.target("pos-app/1.1.0", "pos-x1").unwrap();
    let dest = d.join("download-2");
    block_on(client.download(&target, &dest)).unwrap();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(&second).unwrap()
    );

    // A client restarted later starts from what it trusted.
    let restarted = repository_client(&cp, &pinned, &d.join("agent"));
    assert_eq!(restarted.trusted().root().version, 2);
    assert!(restarted.target("pos-app/1.1.0", "pos-x1").is_ok());
}

#[test]
fn build_publish_list_fetch_and_verify_on_sqlite() {
    round_trip(None);
}

#[test]
#[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
fn build_publish_list_fetch_and_verify_on_postgres() {
    let db = PostgresDb::create();
    round_trip(Some(&db.url));
}

#[test]
#[ignore = "needs python-tuf: set POSFLEET_TEST_PYTHON to a python with `tuf` installed (.ci/run does)"]
fn the_reference_tuf_client_downloads_a_published_bundle() {
    let python = std::env::var("POSFLEET_TEST_PYTHON").expect("POSFLEET_TEST_PYTHON");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cp = ControlPlane::start_sqlite(&d.join("cp"));
    let keys = d.join("keys");
    ok(cp.cli(&["keys", "init", keys.to_str().unwrap()]));
    let pinned = d.join("pinned-root.json");
    std::fs::copy(keys.join("root.json"), &pinned).unwrap();
    let file = build_bundle(&cp, d, "1.0.0", 2_200_000, "b.bundle");
    ok(publish(&cp, &file, keys.to_str().unwrap()));
    // A root rotation too, so the client walks the root chain.
    ok(cp.cli(&["keys", "rotate", keys.to_str().unwrap(), "--role", "root"]));

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tuf_client.py");
    let repo_url = format!("http://{}/repo", cp.http_address);
    let run = |target: &str| {
        Command::new(&python)
            .arg(&script)
            .args([&repo_url, pinned.to_str().unwrap(), target])
            .output()
            .unwrap()
    };
    let downloaded = ok(run("pos-app/1.0.0"));
    assert_eq!(
        std::fs::read(downloaded.trim()).unwrap(),
        std::fs::read(&file).unwrap()
    );
    // A target the repository does not list is not found.
    assert!(!run("pos-app/9.9.9").status.success());
}
