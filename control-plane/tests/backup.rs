//! Backup and restore: a backup taken while the control plane serves,
//! restored into a fresh data dir and database, brings back the fleet (its
//! stores, its tills with their certificates, the repository with its keys
//! and bundles); a restore refuses a target that is not empty, a damaged
//! backup (naming the file) and a backup from a newer schema, writing
//! nothing.

mod common;

use common::*;
use ed25519_dalek::SigningKey;
use posfleet_bundle::manifest::Kind;
use posfleet_control_plane::backup::{self, MANIFEST_FILE, Manifest};
use posfleet_control_plane::config::{Config, PostgresTools};
use posfleet_proto::v1;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const STORE: &str = "lyon-01";

/// A TLS control plane with a store, a published bundle assigned to it and
/// an enrolled till that has heartbeated.
struct Fleet {
    setup: Setup,
    till_key: SigningKey,
    till: v1::EnrollResponse,
    bundle: v1::Bundle,
    repository: v1::Repository,
}

async fn fleet(backend: Backend) -> Fleet {
    let setup = setup(backend, |config| {
        config.tls_server_names = vec!["127.0.0.1".into()];
    })
    .await;
    let mut admin = setup.server.admin().await;
    admin.store(STORE).await;
    let targets_key = admin.init_repository().await;
    let bundle = admin
        .publish(
            &targets_key,
            "pos-app",
            "1.0.0",
            Kind::Software,
            &["pos-x1"],
        )
        .await;
    let req = admin.req(v1::AssignBundleRequest {
        target: Some(v1::assign_bundle_request::Target::StoreId(STORE.into())),
        name: bundle.name.clone(),
        version: bundle.version.clone(),
        download_ahead: None,
        emergency: false,
    });
    admin.client.assign_bundle(req).await.unwrap();
    let token = admin.token(STORE, 1, 0).await.unwrap().secret;
    let till_key = new_key();
    let till = setup
        .server
        .agent()
        .await
        .enroll(enroll_request(&till_key, &token, "SN-1"))
        .await
        .unwrap()
        .into_inner();
    let fleet = Fleet {
        repository: repository(&mut admin).await,
        setup,
        till_key,
        till,
        bundle,
    };
    fleet.heartbeat(&fleet.setup.server).await.unwrap();
    fleet
}

/// A heartbeat from the till enrolled as `till` with `key`, over mutual
/// TLS with its certificate.
async fn heartbeat_as(
    server: &TestServer,
    key: &SigningKey,
    till: &v1::EnrollResponse,
) -> Result<v1::HeartbeatResponse, tonic::Status> {
    let channel = server.tls_channel(Some((&till.device_certificate_pem, key)));
    AgentServiceClient::new(channel)
        .heartbeat(v1::HeartbeatRequest {
            agent_version: "1.0.0".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

impl Fleet {
    async fn heartbeat(&self, server: &TestServer) -> Result<v1::HeartbeatResponse, tonic::Status> {
        heartbeat_as(server, &self.till_key, &self.till).await
    }

    fn config(&self) -> &Config {
        &self.setup.server.config
    }
}

async fn repository(admin: &mut Admin) -> v1::Repository {
    let req = admin.req(v1::GetRepositoryRequest {});
    admin.client.get_repository(req).await.unwrap().into_inner()
}

/// A fresh data dir and database for a restore, in `dir`.
async fn fresh_target(backend: Backend, dir: &Path, like: &Config) -> (Config, TestDb) {
    let db = TestDb::new(backend, dir).await;
    let config = Config {
        data_dir: dir.join("restored"),
        database_url: db.url.clone(),
        ..like.clone()
    };
    (config, db)
}

fn tools() -> PostgresTools {
    PostgresTools::default()
}

/// `/repo/` path of a published bundle's bytes.
fn target_path(bundle: &v1::Bundle) -> String {
    let (dir, file) = bundle.target.rsplit_once('/').unwrap();
    format!("/repo/targets/{dir}/{}.{file}", bundle.sha256)
}

/// Backed up while serving, the original stopped and its data gone,
/// restored into a fresh data dir and database: the same admin token, the
/// store, the till heartbeating with the certificate it had (the fleet CA
/// came back), the repository signed with the same online keys and serving
/// the bundle's bytes.
async fn a_restored_backup_brings_the_fleet_back(backend: Backend) {
    let fleet = fleet(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("backup");
    let manifest = backup::backup(fleet.config(), &to, &tools()).await.unwrap();
    assert_eq!(manifest.rows["stores"], 1, "{manifest:?}");
    assert_eq!(manifest.rows["devices"], 1, "{manifest:?}");
    assert_eq!(manifest.rows["bundles"], 1, "{manifest:?}");
    assert_eq!(
        manifest.schema_version,
        posfleet_control_plane::storage::known_schema_version()
    );
    let mut files: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    files.sort();
    let database = match backend {
        Backend::Sqlite => "database/posfleet.db",
        Backend::Postgres => "database/posfleet.pgdump",
    };
    assert_eq!(
        files,
        [
            database,
            "files/admin-setup-code",
            "files/repository-keys/snapshot.key",
            "files/repository-keys/timestamp.key",
            "files/tls/fleet-ca.crt",
            "files/tls/fleet-ca.key",
            "files/tls/trust-bundle.pem",
        ]
    );
    // The bundle and its chunk list.
    assert_eq!(manifest.blobs.len(), 2, "{manifest:?}");
    assert!(manifest.blobs.iter().all(|b| b.copied));
    assert!(
        manifest
            .blobs
            .iter()
            .any(|b| b.sha256 == fleet.bundle.sha256 && b.size_bytes == fleet.bundle.length)
    );

    let Fleet {
        setup,
        till_key,
        till,
        bundle,
        repository: before,
    } = fleet;
    let like = setup.server.config.clone();
    let admin_token = setup.server.admin_token.clone();
    let data_dir = like.data_dir.clone();
    // Gone with its temporary folder, SQLite database included.
    setup.finish().await;
    assert!(!data_dir.exists());

    let (config, db) = fresh_target(backend, dir.path(), &like).await;
    let restored = backup::restore(&config, &to, &tools()).await.unwrap();
    assert_eq!(restored, manifest);
    // The admin's session was in the database: it still works.
    let server = TestServer::start_as(config, admin_token).await;
    let mut admin = server.admin().await;
    assert_eq!(repository(&mut admin).await, before);
    let response = heartbeat_as(&server, &till_key, &till).await.unwrap();
    assert!(
        response
            .desired_bundles
            .iter()
            .any(|b| b.name == "pos-app" && b.version == "1.0.0"),
        "{response:?}"
    );
    let device = admin.device(&till.device_id).await.unwrap();
    assert_eq!(device.store_id, STORE);
    let me = Some((till.device_certificate_pem.as_str(), &till_key));
    let (code, body) = server.https_get(&target_path(&bundle), me).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "pos-app 1.0.0 ".repeat(300));
    let (code, body) = server.https_get("/repo/timestamp.json", me).await;
    assert_eq!(code, 200, "{body}");
    server.stop().await;
    db.cleanup().await;
}

/// A restore goes into an empty data dir and an empty database only, and
/// writes nothing when refused.
async fn a_restore_into_a_non_empty_target_is_refused(backend: Backend) {
    let fleet = fleet(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("backup");
    backup::backup(fleet.config(), &to, &tools()).await.unwrap();

    // Into the running control plane's own data dir.
    let error = backup::restore(fleet.config(), &to, &tools())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!(
            "the data dir {} is not empty",
            fleet.config().data_dir.display()
        )),
        "{error}"
    );
    assert!(error.contains("repository-keys"), "{error}");

    // An empty data dir, but the running control plane's database.
    let config = Config {
        data_dir: dir.path().join("restored"),
        ..fleet.config().clone()
    };
    let error = backup::restore(&config, &to, &tools())
        .await
        .unwrap_err()
        .to_string();
    match backend {
        Backend::Sqlite => assert!(
            error.contains("the SQLite database") && error.contains("exists"),
            "{error}"
        ),
        Backend::Postgres => {
            assert!(error.contains("is not empty"), "{error}");
            assert!(error.contains("public._sqlx_migrations"), "{error}");
        }
    }
    assert!(!config.data_dir.exists(), "nothing written");
    // The running control plane is untouched.
    fleet.heartbeat(&fleet.setup.server).await.unwrap();
    fleet.setup.finish().await;
}

/// Heartbeats and admin calls, reads and writes, keep being answered while
/// backups run.
async fn backing_up_does_not_stop_serving(backend: Backend) {
    use std::sync::atomic::{AtomicU8, Ordering};
    const BEFORE: u8 = 0;
    const BACKING_UP: u8 = 1;
    const DONE: u8 = 2;
    let fleet = std::sync::Arc::new(fleet(backend).await);
    let phase = std::sync::Arc::new(AtomicU8::new(BEFORE));
    let calls = {
        let fleet = fleet.clone();
        let phase = phase.clone();
        tokio::spawn(async move {
            let server = &fleet.setup.server;
            let mut admin = server.admin().await;
            let mut during = 0;
            for round in 0.. {
                let started = phase.load(Ordering::SeqCst);
                if started == DONE {
                    break;
                }
                fleet.heartbeat(server).await.unwrap();
                admin.device(&fleet.till.device_id).await.unwrap();
                admin.store(&format!("store-{round}")).await;
                if started == BACKING_UP && phase.load(Ordering::SeqCst) == BACKING_UP {
                    during += 1;
                }
            }
            during
        })
    };
    let dir = tempfile::tempdir().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    phase.store(BACKING_UP, Ordering::SeqCst);
    for i in 0..5 {
        backup::backup(fleet.config(), &dir.path().join(i.to_string()), &tools())
            .await
            .unwrap();
    }
    phase.store(DONE, Ordering::SeqCst);
    let during = calls.await.unwrap();
    assert!(during > 0, "no call was answered during the backups");
    let fleet = std::sync::Arc::into_inner(fleet).unwrap();
    fleet.setup.finish().await;
}

on_both_backends!(
    a_restored_backup_brings_the_fleet_back,
    a_restore_into_a_non_empty_target_is_refused,
    backing_up_does_not_stop_serving,
);

/// A backup of the fleet and a fresh target to restore it into.
struct Drill {
    fleet: Fleet,
    dir: tempfile::TempDir,
    backup: PathBuf,
    target: Config,
    target_db: TestDb,
}

async fn drill(backend: Backend) -> Drill {
    let fleet = fleet(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup");
    backup::backup(fleet.config(), &backup, &tools())
        .await
        .unwrap();
    let (target, target_db) = fresh_target(backend, dir.path(), fleet.config()).await;
    Drill {
        fleet,
        dir,
        backup,
        target,
        target_db,
    }
}

impl Drill {
    /// The restore's error, which must leave the target as it was.
    async fn refused(&self) -> String {
        let error = backup::restore(&self.target, &self.backup, &tools())
            .await
            .unwrap_err()
            .to_string();
        assert!(!self.target.data_dir.exists(), "nothing written: {error}");
        assert!(
            !Path::new(
                self.target_db
                    .url
                    .trim_start_matches("sqlite://")
                    .split('?')
                    .next()
                    .unwrap()
            )
            .exists(),
            "no database written: {error}"
        );
        error
    }

    fn manifest(&self) -> Manifest {
        backup::read_manifest(&self.backup).unwrap()
    }

    fn write_manifest(&self, manifest: &Manifest) {
        std::fs::write(
            self.backup.join(MANIFEST_FILE),
            serde_json::to_vec_pretty(manifest).unwrap(),
        )
        .unwrap();
    }

    async fn finish(self) {
        self.target_db.cleanup().await;
        self.fleet.setup.finish().await;
        drop(self.dir);
    }
}

/// A damaged, truncated or missing file of a backup is named, and nothing
/// is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_backup_file_is_refused_by_name() {
    let drill = drill(Backend::Sqlite).await;
    let key = drill.backup.join("files/repository-keys/snapshot.key");
    let original = std::fs::read(&key).unwrap();
    let mut damaged = original.clone();
    damaged[0] ^= 1;
    std::fs::write(&key, &damaged).unwrap();
    let error = drill.refused().await;
    assert!(
        error.starts_with(&format!(
            "backup file {} is damaged: its SHA-256 is",
            key.display()
        )),
        "{error}"
    );
    std::fs::write(&key, &original).unwrap();

    let blob = &drill.manifest().blobs[0];
    let blob = drill
        .backup
        .join("blobs/sha256")
        .join(&blob.sha256[..2])
        .join(&blob.sha256);
    std::fs::remove_file(&blob).unwrap();
    let error = drill.refused().await;
    assert!(
        error.contains(&format!(
            "backup file {} is damaged: it is missing",
            blob.display()
        )),
        "{error}"
    );

    let database = drill.backup.join("database/posfleet.db");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&database)
        .unwrap();
    file.set_len(4096).unwrap();
    let error = drill.refused().await;
    assert!(
        error.contains(&format!("backup file {} is damaged", database.display())),
        "{error}"
    );
    drill.finish().await;
}

/// A backup from a newer posfleet (a schema this binary does not know) is
/// refused, saying which version to use; nothing is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_a_newer_schema_is_refused() {
    let drill = drill(Backend::Sqlite).await;
    let known = posfleet_control_plane::storage::known_schema_version();
    let mut manifest = drill.manifest();
    manifest.schema_version = known + 2;
    manifest.posfleet_version = "9.1.0".into();
    drill.write_manifest(&manifest);
    let error = drill.refused().await;
    assert_eq!(
        error,
        format!(
            "backup is at schema {}, this posfleet-control-plane knows up to {known}: \
             use version 9.1.0 or newer",
            known + 2
        )
    );
    drill.finish().await;
}

/// A SQLite backup cannot be restored into PostgreSQL (nor the other way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_restored_into_its_own_kind_of_database() {
    let mut drill = drill(Backend::Sqlite).await;
    drill.target.database_url = "postgres://nobody@127.0.0.1:1/none".into();
    let error = drill.refused().await;
    assert_eq!(
        error,
        "the backup holds a SQLite database and database_url names a PostgreSQL one: \
         restore into a SQLite database"
    );
    drill.finish().await;
}

fn modes(root: &Path) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::metadata(&path).unwrap();
        let relative = path.strip_prefix(root).unwrap().display().to_string();
        found.push((relative, meta.permissions().mode() & 0o777));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    found.sort();
    found
}

/// Every folder of a backup is 0700 and every file 0600; a backup never
/// goes into an existing folder; a failed one leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_private_and_a_failed_one_leaves_nothing() {
    let drill = drill(Backend::Sqlite).await;
    for (path, mode) in modes(&drill.backup) {
        let is_dir = drill.backup.join(&path).is_dir();
        assert_eq!(mode, if is_dir { 0o700 } else { 0o600 }, "{path}");
    }
    let error = backup::backup(drill.fleet.config(), &drill.backup, &tools())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        format!(
            "{} exists: a backup goes to a new folder",
            drill.backup.display()
        )
    );

    // A blob gone from the store: the backup fails, naming it, and no
    // folder (not even a hidden one) is left.
    let blob = &drill.manifest().blobs[0].sha256;
    let stored = drill
        .fleet
        .config()
        .data_dir
        .join("blobs/sha256")
        .join(&blob[..2])
        .join(blob);
    std::fs::remove_file(&stored).unwrap();
    let to = drill.dir.path().join("second");
    let error = backup::backup(drill.fleet.config(), &to, &tools())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains(blob.as_str()), "{error}");
    assert!(error.contains("is not in the local blob store"), "{error}");
    assert!(!to.exists());
    let leftovers: Vec<String> = std::fs::read_dir(drill.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drill.finish().await;
}

/// The commands, through the real binary: `backup` beside a running
/// control plane and `restore` into a fresh data dir (flags before or
/// after the command), exit status 0 with a summary; a refused restore
/// exits 1 and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_run_from_the_binary() {
    let fleet = fleet(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_posfleet-control-plane");
    let run = |args: &[&str]| {
        std::process::Command::new(binary)
            .args(["--log-level", "warn"])
            .args(args)
            .output()
            .unwrap()
    };
    let data_dir = fleet.config().data_dir.to_str().unwrap().to_string();
    let database_url = fleet.config().database_url.clone();
    let to = dir.path().join("backup");
    let output = run(&[
        "--data-dir",
        &data_dir,
        "--database-url",
        &database_url,
        "backup",
        "--to",
        to.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.starts_with(&format!("Backed up to {}", to.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 stores, 1 devices, 1 bundles"),
        "{stdout}"
    );

    let output = run(&[
        "restore",
        "--from",
        to.to_str().unwrap(),
        "--data-dir",
        &data_dir,
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not empty"), "{stderr}");

    // SQLite in the restored data dir (no --database-url).
    let restored = dir.path().join("restored");
    let output = run(&[
        "restore",
        "--from",
        to.to_str().unwrap(),
        "--data-dir",
        restored.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{output:?}");
    assert!(restored.join("posfleet.db").is_file());
    assert!(restored.join("tls/fleet-ca.key").is_file());
    fleet.setup.finish().await;
}

/// Without `pg_dump` where it is looked for, the backup says what to
/// install or set, and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
async fn without_pg_dump_a_postgres_backup_says_what_to_install() {
    let fleet = fleet(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("backup");
    let tools = PostgresTools {
        pg_bin_dir: Some(dir.path().join("no-such-folder")),
    };
    let error = backup::backup(fleet.config(), &to, &tools)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("pg_dump not found"), "{error}");
    assert!(error.contains("--pg-bin-dir"), "{error}");
    assert!(!to.exists());
    fleet.setup.finish().await;
}

/// Blobs on an object store are listed in the manifest with their sizes,
/// not copied: the store keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_lists_object_store_blobs_without_copying_them() {
    let fleet = fleet(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("backup");
    let mut config = fleet.config().clone();
    config.blob_store_url = "s3://posfleet-blobs/prod".into();
    let manifest = backup::backup(&config, &to, &tools()).await.unwrap();
    assert_eq!(manifest.blobs.len(), 2, "{manifest:?}");
    assert!(manifest.blobs.iter().all(|b| !b.copied), "{manifest:?}");
    assert!(
        manifest
            .blobs
            .iter()
            .any(|b| b.sha256 == fleet.bundle.sha256 && b.size_bytes == fleet.bundle.length)
    );
    assert!(!to.join("blobs").exists());
    fleet.setup.finish().await;
}
