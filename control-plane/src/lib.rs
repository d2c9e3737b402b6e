//! The posfleet control plane: holds the fleet (stores, enrollment tokens,
//! devices), serves `AgentService`, `AdminService` and `SessionService`
//! (operators' logins) over gRPC and
//! `/healthz`, `/readyz`, `/metrics` over HTTP.
//!
//! Servers take already-bound listeners and a shutdown future, so tests bind
//! `127.0.0.1:0`:
//!
//! ```no_run
//! # async fn example(config: posfleet_control_plane::config::Config) -> Result<(), posfleet_control_plane::error::Error> {
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let control_plane = posfleet_control_plane::ControlPlane::open(config).await?;
//! control_plane.serve(grpc, http, std::future::pending()).await
//! # }
//! ```
#![forbid(unsafe_code)]

mod admin_api;
mod agent_api;
pub mod audit;
pub mod authz;
pub mod backup;
pub mod blobs;
pub mod changes;
pub mod config;
mod convert;
pub mod desired;
pub mod error;
mod heartbeat;
mod http;
mod log_requests;
mod metadata_cache;
mod metrics;
pub mod online_keys;
mod password;
mod ratelimit;
pub mod repository;
pub mod rollout;
mod secret;
mod session_api;
mod signals;
pub mod storage;
mod timeout;
pub mod tls;
mod validate;
mod webhooks;

use posfleet_proto::v1::admin_service_server::AdminServiceServer;
use posfleet_proto::v1::agent_service_server::AgentServiceServer;
use posfleet_proto::v1::session_service_server::SessionServiceServer;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::storage::Storage;

/// Name of the file, in the data dir, that receives the first admin's
/// one-time setup code.
pub const ADMIN_SETUP_CODE_FILE: &str = "admin-setup-code";
/// The first admin's user name.
pub const FIRST_ADMIN: &str = "admin";
/// Largest AdminService message (bundle upload pieces, metadata files).
const ADMIN_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Heartbeats that may wait in memory for the database writer.
const HEARTBEAT_QUEUE_CAPACITY: usize = 50_000;
/// How long in-flight requests get to finish after a shutdown signal.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Now, in UTC milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// A control plane whose database is open and migrated, ready to serve.
pub struct ControlPlane {
    config: Config,
    storage: Storage,
    metrics: Metrics,
    repository: Arc<repository::Repository>,
    tls: Option<Arc<tls::Tls>>,
}

/// The file of a SQLite database URL (`sqlite://path?mode=rwc`,
/// `sqlite:path`); `None` for other databases and in-memory ones.
pub(crate) fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path.is_empty()
        || path.starts_with(":memory:")
        || query.split('&').any(|pair| pair == "mode=memory");
    (!in_memory).then(|| PathBuf::from(path))
}

/// Makes the SQLite database at `path` readable by its owner only: creates
/// it empty with mode 0600 if it does not exist (SQLite gives its `-wal` and
/// `-shm` files the database file's mode), and sets 0600 on the files of an
/// existing one.
/// Asks an object store whether it answers, at start. Refused (a missing
/// bucket, bad credentials) stops the start: nothing could be published or
/// served. Unreachable is logged as an error and the control plane serves
/// anyway: heartbeats and rollouts do not need blobs, tills get a
/// retryable 503 for bundle bytes, and operators a publish error naming the
/// store, until it answers.
async fn check_blob_store(blobs: &blobs::BlobStore) -> Result<(), Error> {
    if blobs.local_root().is_some() {
        tracing::info!(path = %blobs.name(), "Bundle blobs are in the data dir.");
        return Ok(());
    }
    match blobs.check().await {
        Ok(()) => {
            tracing::info!(store = %blobs.name(), "Bundle blobs are in the object store.");
            Ok(())
        }
        Err(error) if error.is_unavailable() => {
            tracing::error!(
                store = %blobs.name(),
                %error,
                "The object store is unreachable: bundles can be neither published nor \
                 downloaded until it answers; serving everything else."
            );
            Ok(())
        }
        Err(error) => Err(Error::BlobStore(error)),
    }
}

fn private_sqlite_files(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

impl ControlPlane {
    /// Creates the data dir (mode 0700, also when it existed with another
    /// mode), opens (and migrates) the database (a SQLite file and its WAL
    /// are mode 0600, whatever the umask), and on the very first start
    /// (no user yet) creates the first admin, user `admin`, whose one-time
    /// setup code is written once to `<data_dir>/admin-setup-code` (mode
    /// 0600): their first `posfleet login` with it sets their password and
    /// TOTP authenticator.
    pub async fn open(config: Config) -> Result<ControlPlane, Error> {
        // One crypto provider for every TLS the process makes (the
        // listeners, webhooks), whatever the dependency graph enables.
        posfleet_pki::install_crypto_provider();
        let data_dir_error = |source| Error::DataDir {
            path: config.data_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(data_dir_error)?;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(data_dir_error)?;
        let url = config.effective_database_url();
        if let Some(path) = sqlite_path(&url) {
            private_sqlite_files(&path).map_err(|source| Error::DataDir { path, source })?;
        }
        let storage = Storage::connect(&url, config.database_max_connections).await?;
        tracing::info!(database = %storage::redact_url(&url), "Database ready.");
        let kek = config
            .repository_key_encryption_key_path
            .as_deref()
            .map(online_keys::KeyEncryptionKey::load)
            .transpose()?;
        let keys = online_keys::load(
            &storage,
            &config.data_dir.join("repository-keys"),
            kek.as_ref(),
        )
        .await?;
        let blobs = blobs::BlobStore::open(&config).map_err(Error::BlobStore)?;
        check_blob_store(&blobs).await?;
        let repository = repository::Repository::open(storage.clone(), Arc::new(blobs), keys);
        repository
            .check_online_keys()
            .await
            .map_err(|e| Error::Repository(e.to_string()))?;
        let metrics = Metrics::with_store_series_limit(config.metrics_store_series_limit);
        metrics.register_storage(&storage);
        let tls = tls::Tls::open(&config, &storage).await?;
        let control_plane = ControlPlane {
            config,
            storage,
            metrics,
            repository: Arc::new(repository),
            tls,
        };
        control_plane.bootstrap_admin_user().await?;
        Ok(control_plane)
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Where the first admin's setup code is written.
    pub fn admin_setup_code_path(&self) -> PathBuf {
        self.config.data_dir.join(ADMIN_SETUP_CODE_FILE)
    }

    async fn bootstrap_admin_user(&self) -> Result<(), Error> {
        if self.storage.user_count().await? > 0 {
            return Ok(());
        }
        let code = secret::grouped_code(8);
        let path = self.admin_setup_code_path();
        // The file is written before the user is stored: if either step
        // fails the next start tries again, and nobody is ever locked out.
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(format!("{code}\n").as_bytes())?;
            file.sync_all()
        };
        write().map_err(|source| Error::AdminSetupCodeFile {
            path: path.clone(),
            source,
        })?;
        // The code does not expire: it is readable only by whoever runs
        // the control plane.
        let created = self
            .storage
            .create_user(&storage::NewUser {
                id: &secret::short_id("usr-", 6),
                name: FIRST_ADMIN,
                role: authz::Role::Admin.as_str(),
                scope_json: "",
                created_by: "setup",
                created_at_ms: now_ms(),
                setup_code_sha256: &secret::hash(&code),
                setup_code_expires_at_ms: None,
            })
            .await?;
        if !created {
            // Another replica on the same database made the first admin
            // first: this code was never stored.
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        tracing::info!(
            user = FIRST_ADMIN,
            path = %path.display(),
            "Created the first admin; their one-time setup code is in this file, readable only \
             by its owner: run `posfleet login --user admin` and give it as the password."
        );
        Ok(())
    }

    /// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` completes.
    /// Then: gRPC health and `/readyz` report not-serving at once, no new
    /// connection is accepted, open requests get at most 10 s, and every
    /// heartbeat that was acknowledged is written before this returns.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let ControlPlane {
            config,
            storage,
            metrics,
            repository,
            tls,
        } = self;
        let gate = tls.as_ref().map(|tls| tls.gate.clone()).unwrap_or_default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (queue, writer) = heartbeat::spawn_writer(
            storage.clone(),
            metrics.clone(),
            HEARTBEAT_QUEUE_CAPACITY,
            stop_rx.clone(),
        );
        // Delivers events to webhooks, on its own: never in the engine's way.
        let dispatcher = webhooks::spawn_dispatcher(
            storage.clone(),
            metrics.clone(),
            webhooks::WebhookSettings::from_config(&config),
            stop_rx.clone(),
        )?;
        let max_message = config.max_message_size_bytes;
        let desired = desired::DesiredCache::new(storage.clone());
        let repo_access = tls
            .as_ref()
            .map(|tls| http::RepoAccess::new(desired.clone(), tls.clone()));
        // Drives rollouts (on PostgreSQL, on one replica at a time).
        let (engine, engine_task) = rollout::engine::spawn(
            storage.clone(),
            desired.clone(),
            metrics.clone(),
            stop_rx.clone(),
        );
        let logs = log_requests::LogRequests::new(
            storage.clone(),
            metrics.clone(),
            log_requests::LogSettings::from_config(&config),
        );
        let agent_api = agent_api::AgentApi::new(
            storage.clone(),
            metrics.clone(),
            queue,
            desired.clone(),
            logs.clone(),
            &config,
            tls.as_ref().map(|tls| agent_api::AgentTls {
                tls: tls.clone(),
                policy: config.certificate_policy(),
            }),
        );
        // Other replicas' changes drop this one's cached entries at once.
        let listener = changes::spawn_listener(
            &storage,
            changes::Caches {
                desired: desired.clone(),
                gate: gate.clone(),
                credentials: agent_api.credential_cache(),
            },
            stop_rx.clone(),
        );
        let agent = AgentServiceServer::new(agent_api).max_decoding_message_size(max_message);
        let admin = AdminServiceServer::new(admin_api::AdminApi::new(
            storage.clone(),
            config.offline_after_missed_heartbeats,
            repository.clone(),
            desired.clone(),
            rollout::Rollouts::new(
                storage.clone(),
                desired,
                engine,
                metrics.rollout.clone(),
                config.approval_threshold_devices,
            ),
            gate.clone(),
            logs,
            tls.as_ref().map(|tls| admin_api::AdminTls {
                certificates: config.certificate_policy(),
                tls: tls.clone(),
            }),
            Duration::from_secs(config.held_assignment_expiry_seconds),
        ))
        // Publishing streams bundles in 1 MiB messages and carries whole
        // targets metadata files.
        .max_decoding_message_size(max_message.max(ADMIN_MAX_MESSAGE_BYTES));
        // Authenticates every admin call and records the mutating ones.
        let audit_log = audit::AuditLog::new(storage.clone(), metrics.clone());
        let admin = tower::Layer::layer(&audit::AuditLayer::new(audit_log.clone()), admin);
        // Logins: no bearer token, small messages.
        let sessions = SessionServiceServer::new(session_api::SessionApi::new(
            storage.clone(),
            metrics.clone(),
            audit_log,
            session_api::SessionSettings::from_config(&config),
        ))
        .max_decoding_message_size(session_api::MAX_MESSAGE_BYTES);
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<agent_api::Server>().await;
        health_reporter
            .set_serving::<AdminServiceServer<admin_api::AdminApi>>()
            .await;
        health_reporter
            .set_serving::<SessionServiceServer<session_api::SessionApi>>()
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(posfleet_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .expect("the embedded descriptor sets are valid: a unit test decodes them");
        // The older name, which several GUI clients and Python's reflection
        // client still ask for.
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .expect("the embedded descriptor sets are valid: a unit test decodes them");

        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("Shutting down: draining in-flight requests.");
            let _ = stop_tx.send(true);
            health_reporter.set_not_serving::<agent_api::Server>().await;
            health_reporter
                .set_not_serving::<AdminServiceServer<admin_api::AdminApi>>()
                .await;
            health_reporter
                .set_not_serving::<SessionServiceServer<session_api::SessionApi>>()
                .await;
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        if let Some(tls) = &tls {
            tls.spawn_refresh(storage.clone(), stop_rx.clone());
        }
        let grpc =
            tls::Incoming::start(grpc, tls.as_ref().map(|t| t.grpc_acceptor()), gate.clone())
                .map_err(Error::Http)?;
        let http = tls::Incoming::start(http, tls.as_ref().map(|t| t.http_acceptor()), gate)
            .map_err(Error::Http)?;
        if tls.is_none() && config.insecure_dev {
            for listener in [grpc.local_addr(), http.local_addr()] {
                tracing::warn!(
                    address = %listener,
                    "INSECURE (insecure_dev): serving plaintext. Admin tokens, device credentials, \
                     desired state and every store's bundles cross the network in clear, and \
                     /repo/ is open to anyone who reaches it. For a development network only: \
                     set tls_server_names for anything else."
                );
            }
        }
        tracing::info!(address = %grpc.local_addr(), tls = tls.is_some(), "gRPC listening.");
        tracing::info!(address = %http.local_addr(), tls = tls.is_some(), "HTTP listening.");
        let grpc_server = tonic::transport::Server::builder()
            // Outermost: sees every answer, timeouts and refusals included.
            .layer(metrics::grpc::GrpcMetricsLayer::new(metrics.grpc.clone()))
            // 30 s per call, but an idle timeout for bundle uploads.
            .layer(timeout::RequestTimeoutLayer::new(timeout::REQUEST_TIMEOUT))
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(agent)
            .add_service(admin)
            .add_service(sessions)
            .serve_with_incoming_shutdown(grpc.into_stream(), stopped(stop_rx.clone()));
        // Re-sign snapshot and timestamp before they expire.
        let refresher = repository.clone();
        let mut refresher_stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = refresher.refresh(chrono::Utc::now()).await {
                    tracing::error!(%error, "Cannot re-sign repository metadata.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    _ = refresher_stop.wait_for(|s| *s) => return,
                }
            }
        });
        let http_server = axum::serve(
            http,
            http::router(
                repository.clone(),
                metrics,
                config.offline_after_missed_heartbeats,
                config
                    .repo_redirect_to_object_store
                    .then(|| Duration::from_secs(config.repo_redirect_expiry_seconds)),
                stop_rx.clone(),
                repo_access,
            )
            .into_make_service_with_connect_info::<tls::Peer>(),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()));

        let servers = async {
            tokio::try_join!(async { grpc_server.await.map_err(Error::from) }, async {
                http_server.await.map_err(Error::Http)
            },)
            .map(|_| ())
        };
        let deadline = async {
            stopped(stop_rx.clone()).await;
            tokio::time::sleep(SHUTDOWN_DEADLINE).await;
        };
        let result = tokio::select! {
            result = servers => result,
            _ = deadline => {
                tracing::warn!("Requests still open 10s after the signal are abandoned.");
                Ok(())
            }
        };
        // The writer closed its queue at the signal; it ends once everything
        // acknowledged before that is written.
        if let Err(error) = writer.await {
            tracing::error!(%error, "The heartbeat writer failed.");
        }
        if let Err(error) = engine_task.await {
            tracing::error!(%error, "The rollout engine failed.");
        }
        if let Err(error) = dispatcher.await {
            tracing::error!(%error, "The webhook dispatcher failed.");
        }
        if let Some(listener) = listener
            && let Err(error) = listener.await
        {
            tracing::error!(%error, "The change listener failed.");
        }
        storage.close().await;
        tracing::info!("Stopped.");
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file() {
        for (url, path) in [
            (
                "sqlite:///var/lib/posfleet/posfleet.db?mode=rwc",
                Some("/var/lib/posfleet/posfleet.db"),
            ),
            ("sqlite://posfleet.db", Some("posfleet.db")),
            ("sqlite:data/x.db", Some("data/x.db")),
            ("sqlite::memory:", None),
            ("sqlite://x.db?mode=memory", None),
            ("postgres://u@db/posfleet", None),
        ] {
            assert_eq!(sqlite_path(url), path.map(PathBuf::from), "{url}");
        }
    }
}
