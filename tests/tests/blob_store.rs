//! Bundle blobs on an S3-compatible object store, with real processes: a
//! control plane configured with `blob_store_url = "s3://…"` against
//! `moto_server`, bundles published with the `posfleet` CLI (the admin
//! gRPC API), downloaded from `/repo/` by the agent's repository client
//! (streamed through the control plane, or redirected to a presigned URL),
//! and the object store killed mid-publish: the operator gets UNAVAILABLE
//! naming the store, nothing is half-published, tills get a retryable 503.
//!
//! Needs moto: `POSFLEET_TEST_MOTO=path/to/moto_server cargo test -p
//! posfleet-e2e --test blob_store -- --ignored` (.ci/run does).

use posfleet_agent::repository::{RepoError, RepositoryClient, Timeouts};
use posfleet_bundle::client::Limits;
use posfleet_e2e::moto::{BUCKET, HttpAnswer, Moto, free_port, http_get_url, http_request};
use posfleet_e2e::{ControlPlane, Process, binary, block_on, check_ok, pos_app_source};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// A control plane on SQLite in `dir/cp` keeping blobs in `moto` under
/// `prefix`.
fn control_plane(dir: &Path, moto: &Moto, prefix: &str, redirect: bool) -> ControlPlane {
    let config = dir.join("cp.toml");
    std::fs::write(&config, moto.config_toml(prefix, redirect)).unwrap();
    ControlPlane::start(
        &dir.join("cp"),
        None,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    )
}

/// Builds pos-app `version` with `payload` extra bytes; the bundle file.
fn build(cp: &ControlPlane, dir: &Path, version: &str, payload: usize) -> PathBuf {
    let src = pos_app_source(&dir.join(format!("src-{version}")), version, true, payload);
    cp.build_bundle(&src, &dir.join(format!("pos-app-{version}.bundle")))
}

fn publish_command(cp: &ControlPlane, file: &Path, keys: &Path) -> Command {
    cp.cli_command(&[
        "bundle",
        "publish",
        file.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
        // Deltas are tested in deltas.rs.
        "--no-deltas",
    ])
}

fn publish(cp: &ControlPlane, file: &Path, keys: &Path) -> Output {
    publish_command(cp, file, keys).output().unwrap()
}

/// The published bundles' targets.
fn targets(cp: &ControlPlane) -> Vec<String> {
    cp.cli_json(&["bundle", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["target"].as_str().unwrap().to_string())
        .collect()
}

fn sha256_of(cp: &ControlPlane, target: &str) -> String {
    cp.cli_json(&["bundle", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["target"] == target)
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `/repo/` path of pos-app `version`.
fn target_path(sha256: &str, version: &str) -> String {
    format!("/repo/targets/pos-app/{sha256}.{version}")
}

/// The blob's key in the bucket.
fn key_of(prefix: &str, sha256: &str) -> String {
    format!("{prefix}/sha256/{}/{sha256}", &sha256[..2])
}

/// The blob's path on the S3 server (path-style).
fn object_path(prefix: &str, sha256: &str) -> String {
    format!("/{BUCKET}/{}", key_of(prefix, sha256))
}

fn get(cp: &ControlPlane, path: &str, headers: &[(&str, &str)]) -> HttpAnswer {
    http_request(&cp.http_address, "GET", path, headers, b"")
}

/// moto, a control plane keeping blobs in it under `prefix`, and pos-app
/// 1.0.0 (`payload` extra bytes) published to it.
struct Published {
    moto: Moto,
    cp: ControlPlane,
    keys: PathBuf,
    bytes: Vec<u8>,
    sha256: String,
}

fn published(dir: &Path, prefix: &str, redirect: bool, payload: usize) -> Published {
    let moto = Moto::start();
    let cp = control_plane(dir, &moto, prefix, redirect);
    let keys = dir.join("keys");
    cp.init_repository(&keys);
    let file = build(&cp, dir, "1.0.0", payload);
    check_ok(publish(&cp, &file, &keys));
    Published {
        bytes: std::fs::read(&file).unwrap(),
        sha256: sha256_of(&cp, "pos-app/1.0.0"),
        moto,
        cp,
        keys,
    }
}

struct Agent {
    client: RepositoryClient,
}

impl Agent {
    fn new(cp: &ControlPlane, keys: &Path, dir: &Path) -> Agent {
        let pinned = dir.join("pinned-root.json");
        std::fs::copy(keys.join("root.json"), &pinned).unwrap();
        let client = RepositoryClient::open(
            &pinned,
            &dir.join("agent"),
            &format!("http://{}/repo/", cp.http_address),
            Limits::default(),
            Timeouts::default(),
        )
        .unwrap();
        Agent { client }
    }

    /// Refreshes the metadata and downloads pos-app `version` into `dest`
    /// (resuming from what is there), every piece verified.
    fn download(&mut self, version: &str, dest: &Path) -> Result<(), RepoError> {
        block_on(async {
            self.client.refresh().await?;
            let target = self
                .client
                .target(&format!("pos-app/{version}"), "pos-x1")?;
            self.client.download(&target, dest).await
        })
    }
}

/// Published through the admin API into the bucket (in parts: the bundle
/// is over 8 MiB), served by `/repo/` from it whole and in ranges with
/// immutable caching, downloaded and resumed by the agent's client. Then
/// moto is killed in the middle of the next publish's multipart upload:
/// the operator gets UNAVAILABLE naming the object store, the bundle is not
/// listed and its targets version not spent, tills get 503 with
/// Retry-After for blobs (metadata still served). With the store back
/// (empty: moto keeps nothing), the same bundle publishes.
#[test]
#[ignore = "needs moto: set POSFLEET_TEST_MOTO to moto_server and pass --ignored (.ci/run does)"]
fn publish_serve_resume_and_a_store_killed_mid_publish() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Published {
        mut moto,
        cp,
        keys,
        bytes,
        sha256,
    } = published(d, "fleet/blobs", false, 20 << 20);
    let started = cp.process.first("Bundle blobs are in the object store.");
    assert!(started.is_some(), "{}", cp.process.lines().join("\n"));

    // In the bucket, under the prefix; not on the control plane's disk.
    let object = http_request(
        &moto.address(),
        "GET",
        &object_path("fleet/blobs", &sha256),
        &[],
        b"",
    );
    assert_eq!(object.status, 200);
    assert!(object.body == bytes, "the object is the bundle");
    assert!(!cp.data_dir.join("blobs/sha256").join(&sha256[..2]).exists());

    // Served whole and in ranges, cacheable forever; metadata keeps its own
    // caching.
    let path = target_path(&sha256, "1.0.0");
    let whole = get(&cp, &path, &[]);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("cache-control"), Some(IMMUTABLE));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert!(whole.body == bytes, "whole bundle");
    let part = get(&cp, &path, &[("Range", "bytes=9437184-9437283")]);
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 9437184-9437283/{}", bytes.len()).as_str())
    );
    assert_eq!(part.body, bytes[9_437_184..9_437_284]);
    let tail = get(&cp, &path, &[("Range", "bytes=-10")]);
    assert_eq!(tail.body, bytes[bytes.len() - 10..]);
    let beyond = get(&cp, &path, &[("Range", &format!("bytes={}-", bytes.len()))]);
    assert_eq!(beyond.status, 416);
    let timestamp = get(&cp, "/repo/timestamp.json", &[]);
    assert_eq!(timestamp.header("cache-control"), Some("no-cache"));
    assert_eq!(
        get(&cp, &target_path(&"0".repeat(64), "1.0.0"), &[]).status,
        404
    );

    // The agent's client resumes from the verified pieces on disk.
    let mut agent = Agent::new(&cp, &keys, d);
    let dest = d.join("download");
    std::fs::write(&dest, &bytes[..5_500_000]).unwrap();
    agent.download("1.0.0", &dest).unwrap();
    assert!(std::fs::read(&dest).unwrap() == bytes, "resumed download");

    // moto dies in the middle of the multipart upload of 1.1.0.
    let second = build(&cp, d, "1.1.0", 40 << 20);
    let mut publishing = Process::spawn(publish_command(&cp, &second, &keys));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !moto
        .process
        .lines()
        .iter()
        .any(|l| l.contains("partNumber="))
    {
        assert!(Instant::now() < deadline, "no part uploaded within 120s");
        std::thread::sleep(Duration::from_millis(5));
    }
    moto.kill();
    let status = publishing.wait();
    let stderr = publishing.lines().join("\n");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("unavailable"), "{stderr}");
    assert!(
        stderr.contains(&format!("the object store s3://{BUCKET}/fleet/blobs/")),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was published"), "{stderr}");
    assert_eq!(targets(&cp), ["pos-app/1.0.0"]);
    // No spool file left behind.
    let spool = std::fs::read_dir(cp.data_dir.join("blobs/tmp"))
        .unwrap()
        .count();
    assert_eq!(spool, 0);

    // Tills get a retryable 503 for blobs; metadata is still served.
    let down = get(&cp, &path, &[]);
    assert_eq!(down.status, 503, "{down:?}");
    assert_eq!(down.header("retry-after"), Some("10"));
    assert_eq!(get(&cp, "/repo/timestamp.json", &[]).status, 200);
    let error = agent.download("1.0.0", &d.join("download-2")).unwrap_err();
    assert!(error.is_unreachable(), "{error}");

    // Back (empty): the same 1.1.0 publishes with the next targets version.
    moto.restart();
    check_ok(publish(&cp, &second, &keys));
    assert_eq!(targets(&cp), ["pos-app/1.0.0", "pos-app/1.1.0"]);
    let dest = d.join("download-3");
    agent.download("1.1.0", &dest).unwrap();
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&second).unwrap());
}

/// With `repo_redirect_to_object_store`, `/repo/` answers blob requests
/// with a redirect to a short-lived presigned URL, never cached; the
/// agent's client follows it, Range included, and verifies what it gets:
/// bytes changed in the bucket are refused.
#[test]
#[ignore = "needs moto: set POSFLEET_TEST_MOTO to moto_server and pass --ignored (.ci/run does)"]
fn a_redirect_to_a_presigned_url_is_followed_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Published {
        moto,
        cp,
        keys,
        bytes,
        sha256,
    } = published(d, "fleet", true, 3 << 20);

    let redirect = get(&cp, &target_path(&sha256, "1.0.0"), &[]);
    assert_eq!(redirect.status, 307, "{redirect:?}");
    assert_eq!(redirect.header("cache-control"), Some("no-store"));
    let location = redirect.header("location").unwrap();
    assert!(
        location.starts_with(&format!(
            "{}/{BUCKET}/fleet/sha256/{}/{sha256}?",
            moto.endpoint(),
            &sha256[..2]
        )),
        "{location}"
    );
    assert!(location.contains("X-Amz-Signature="), "{location}");
    assert!(location.contains("X-Amz-Expires=300"), "{location}");
    let part = http_get_url(location, &[("Range", "bytes=100-199")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, bytes[100..200]);

    let mut agent = Agent::new(&cp, &keys, d);
    let dest = d.join("download");
    std::fs::write(&dest, &bytes[..1_200_000]).unwrap();
    agent.download("1.0.0", &dest).unwrap();
    assert!(
        std::fs::read(&dest).unwrap() == bytes,
        "followed and verified"
    );

    // Someone with the bucket's keys changes the bytes: the till refuses
    // them, whatever URL they came from.
    let mut tampered = bytes.clone();
    tampered[2_000_000] ^= 0xff;
    moto.put_object(&key_of("fleet", &sha256), tampered);
    let dest = d.join("download-tampered");
    let refused = agent.download("1.0.0", &dest).unwrap_err();
    assert!(
        matches!(refused, RepoError::Refused(_)),
        "refused as a bad piece: {refused}"
    );
    assert!(std::fs::metadata(&dest).unwrap().len() < 2_000_000);
}

/// A store that does not answer at start is named in an error and the
/// control plane serves anyway (heartbeats need no blobs); a bucket that
/// does not exist stops the start, saying so.
#[test]
#[ignore = "needs moto: set POSFLEET_TEST_MOTO to moto_server and pass --ignored (.ci/run does)"]
fn the_store_is_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let config = d.join("unreachable.toml");
    std::fs::write(
        &config,
        format!(
            "blob_store_url = \"s3://{BUCKET}\"\nblob_store_endpoint = \"{nobody}\"\n\
             blob_store_allow_http = true\nblob_store_region = \"us-east-1\"\n\
             blob_store_access_key_id = \"k\"\nblob_store_secret_access_key = \"s\"\n"
        ),
    )
    .unwrap();
    let cp = ControlPlane::start(
        &d.join("cp"),
        None,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    );
    let logged = cp
        .process
        .first(
            "The object store is unreachable: bundles can be neither published nor downloaded \
             until it answers; serving everything else.",
        )
        .unwrap_or_else(|| panic!("{}", cp.process.lines().join("\n")))
        .1;
    assert_eq!(logged["store"], format!("s3://{BUCKET}/"));
    assert!(
        logged["error"].as_str().unwrap().contains("unavailable"),
        "{logged}"
    );
    check_ok(cp.cli(&["store", "list"]));
    drop(cp);

    let moto = Moto::start();
    let config = d.join("no-bucket.toml");
    std::fs::write(
        &config,
        moto.config_toml("x", false)
            .replace(&format!("s3://{BUCKET}/"), "s3://no-such-bucket/"),
    )
    .unwrap();
    let mut command = Command::new(binary("posfleet-control-plane"));
    command
        .args(["--data-dir", d.join("cp2").to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .args(["--grpc-listen-address", "127.0.0.1:0"])
        .args(["--http-listen-address", "127.0.0.1:0"]);
    let mut refused = Process::spawn(command);
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused.is_running() {
        assert!(
            Instant::now() < deadline,
            "still running after 60s:\n{}",
            refused.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = refused.wait();
    let stderr = refused.lines().join("\n");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("s3://no-such-bucket/"), "{stderr}");
    assert!(stderr.contains("the bucket does not exist"), "{stderr}");
}
