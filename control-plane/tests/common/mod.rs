//! A control plane on 127.0.0.1:0 over SQLite (a temp dir) or PostgreSQL (a
//! fresh database on the server named by POSFLEET_TEST_POSTGRES_URL), and
//! clients that speak to it the way agents and the CLI do.
#![allow(dead_code)]

pub mod fleet;

use ed25519_dalek::{Signer, SigningKey};
use posfleet_bundle::manifest::{Kind, Manifest};
use posfleet_bundle::repo::{self, RootKeys};
use posfleet_bundle::tuf::{self, TARGETS, Targets};
use posfleet_control_plane::ControlPlane;
use posfleet_control_plane::config::Config;
use posfleet_pki::rustls::pki_types::CertificateDer;
use posfleet_proto::v1;
use posfleet_proto::v1::admin_service_client::AdminServiceClient;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use sqlx::Executor;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const POSTGRES_ENV: &str = "POSFLEET_TEST_POSTGRES_URL";

/// A database for one test: a file in a temp dir, or a PostgreSQL database
/// created for the test and dropped by `cleanup`.
pub struct TestDb {
    pub url: String,
    postgres: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(backend: Backend, dir: &std::path::Path) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}?mode=rwc", dir.join("test.db").display()),
                postgres: None,
            },
            Backend::Postgres => {
                let server = std::env::var(POSTGRES_ENV)
                    .unwrap_or_else(|_| panic!("{POSTGRES_ENV} must name a PostgreSQL server"));
                sqlx::any::install_default_drivers();
                let name = format!("posfleet_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&server)
                    .await
                    .expect("connect to the PostgreSQL server");
                conn.execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .expect("create a test database");
                let (base, _) = server.rsplit_once('/').expect("URL names a database");
                TestDb {
                    url: format!("{base}/{name}"),
                    postgres: Some((server, name)),
                }
            }
        }
    }

    pub async fn cleanup(self) {
        if let Some((server, name)) = self.postgres {
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&server)
                .await
                .expect("connect to the PostgreSQL server");
            conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await
                .expect("drop the test database");
        }
    }
}

pub struct TestServer {
    pub grpc_url: String,
    /// The fleet CA's certificates, when the server serves TLS.
    pub trusted: Option<Vec<CertificateDer<'static>>>,
    pub http_addr: SocketAddr,
    /// A session of the first admin (user `admin`), set up through the real
    /// flow at the first start ([`ADMIN_PASSWORD`], a TOTP code from the
    /// shared module), saved beside the data dir for the starts after.
    pub admin_token: String,
    pub config: Config,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Result<(), posfleet_control_plane::error::Error>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        TestServer::start_with(config, None).await
    }

    /// Another replica on `of`'s database, with its own data dir: the
    /// admin token it serves with is `of`'s.
    pub async fn start_replica(config: Config, of: &TestServer) -> TestServer {
        TestServer::start_with(config, Some(of.admin_token.clone())).await
    }

    /// A control plane whose database already has an admin (restored, say),
    /// called with `admin_token`.
    pub async fn start_as(config: Config, admin_token: String) -> TestServer {
        TestServer::start_with(config, Some(admin_token)).await
    }

    async fn start_with(config: Config, admin_token: Option<String>) -> TestServer {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if config.tls() { "https" } else { "http" };
        let grpc_url = format!("{scheme}://{}", grpc.local_addr().unwrap());
        let http_addr = http.local_addr().unwrap();
        let control_plane = ControlPlane::open(config.clone())
            .await
            .expect("open control plane");
        let trusted = config.tls().then(|| {
            let pem = std::fs::read(
                config
                    .data_dir
                    .join("tls")
                    .join(posfleet_control_plane::tls::TRUST_BUNDLE_FILE),
            )
            .expect("the trust bundle written at start");
            posfleet_pki::certificates_from_pem(&pem, "the trust bundle").unwrap()
        });
        let setup_code_path = control_plane.admin_setup_code_path();
        let (stop, rx) = watch::channel(false);
        let shutdown = async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        };
        let handle = tokio::spawn(control_plane.serve(grpc, http, shutdown));
        let mut server = TestServer {
            grpc_url,
            trusted,
            http_addr,
            admin_token: String::new(),
            config,
            stop,
            handle,
        };
        server.admin_token = match admin_token {
            Some(token) => token,
            None => server.first_admin_session(&setup_code_path).await,
        };
        server
    }

    /// Where a session of the first admin is kept between starts on one
    /// data dir (beside it, not in it).
    fn admin_session_file(&self) -> std::path::PathBuf {
        let mut name = self.config.data_dir.as_os_str().to_owned();
        name.push(".admin-session");
        name.into()
    }

    /// The first admin's session: the one saved by an earlier start, or a
    /// new one from the setup code the control plane wrote.
    async fn first_admin_session(&self, setup_code_path: &std::path::Path) -> String {
        let saved = self.admin_session_file();
        if let Ok(token) = std::fs::read_to_string(&saved) {
            return token.trim().to_string();
        }
        let code = std::fs::read_to_string(setup_code_path).expect("the first admin's setup code");
        let done = posfleet_proto::setup::complete_setup(
            self.channel().await,
            posfleet_control_plane::FIRST_ADMIN,
            &code,
            ADMIN_PASSWORD,
        )
        .await
        .expect("set up the first admin");
        std::fs::write(&saved, &done.session.token).unwrap();
        done.session.token
    }

    /// Graceful stop; returns once every queued heartbeat is written.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        self.handle.await.unwrap().unwrap();
    }

    pub async fn channel(&self) -> Channel {
        match &self.trusted {
            None => Channel::from_shared(self.grpc_url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
            Some(_) => self.tls_channel(None),
        }
    }

    /// TLS trusting the fleet CA, presenting `identity` (a device
    /// certificate and its key) when given.
    fn client_config(
        &self,
        identity: Option<(&str, &SigningKey)>,
    ) -> posfleet_pki::rustls::ClientConfig {
        let trusted = self.trusted.as_ref().expect("the server serves TLS");
        let identity = identity.map(|(pem, key)| {
            (
                posfleet_pki::certificates_from_pem(pem.as_bytes(), "device certificate").unwrap(),
                posfleet_pki::private_key_der(key).unwrap(),
            )
        });
        posfleet_pki::client_config(trusted, identity).unwrap()
    }

    /// A channel over TLS trusting the fleet CA, presenting `identity` (a
    /// device certificate and its key) when given.
    pub fn tls_channel(&self, identity: Option<(&str, &SigningKey)>) -> Channel {
        let config = self.client_config(identity);
        let endpoint = tonic::transport::Endpoint::from_shared(self.grpc_url.clone()).unwrap();
        posfleet_pki::grpc_channel(&endpoint, Some(std::sync::Arc::new(config)))
    }

    pub async fn admin(&self) -> Admin {
        let channel = self.channel().await;
        Admin {
            client: AdminServiceClient::new(channel.clone()),
            channel,
            token: Some(self.admin_token.clone()),
        }
    }

    pub async fn agent(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel().await)
    }

    /// GET over TLS on the HTTP listener, presenting `identity` (a device
    /// certificate and its key) when given: (status, body).
    pub async fn https_get(
        &self,
        path: &str,
        identity: Option<(&str, &SigningKey)>,
    ) -> (u16, String) {
        let mut config = self.client_config(identity);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let socket = tokio::net::TcpStream::connect(self.http_addr)
            .await
            .unwrap();
        let name = posfleet_pki::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, socket)
            .await
            .unwrap();
        get(&mut stream, path).await
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.http_addr)
            .await
            .unwrap();
        get(&mut stream, path).await
    }
}

/// `GET path` over `stream` (HTTP/1.1, closed after): (status, body).
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    // A TLS peer may close without a close_notify: what arrived is kept.
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let code = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The password users made by [`Admin::with_new_user`] set.
pub const NEW_USER_PASSWORD: &str = "a new user's password";

/// The password the first admin sets at the first start.
pub const ADMIN_PASSWORD: &str = "first admin's password";

pub fn config(dir: &std::path::Path, db: &TestDb) -> Config {
    Config {
        data_dir: dir.join("data"),
        database_url: db.url.clone(),
        log_level: "warn".into(),
        // Tests log many users in from one address; the limit's own test
        // sets it low.
        login_rate_per_minute: 10_000,
        ..Config::default()
    }
}

/// A control plane on a fresh database, and what to clean up after it.
pub struct Setup {
    pub server: TestServer,
    pub db: TestDb,
    _dir: tempfile::TempDir,
}

pub async fn setup(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(backend, dir.path()).await;
    let mut config = config(dir.path(), &db);
    tweak(&mut config);
    Setup {
        server: TestServer::start(config).await,
        db,
        _dir: dir,
    }
}

impl Setup {
    pub async fn finish(self) {
        self.server.stop().await;
        self.db.cleanup().await;
    }

    /// A fresh `pos-x1` device enrolled in `store`: (device id, credential).
    pub async fn enrolled_device(&self, store: &str) -> (String, String) {
        self.enrolled_model(store, "pos-x1").await
    }

    /// A fresh device of `hardware_model` enrolled in `store`.
    pub async fn enrolled_model(&self, store: &str, hardware_model: &str) -> (String, String) {
        let mut admin = self.server.admin().await;
        let token = admin.token(store, 1, 0).await.unwrap().secret;
        let response = self
            .server
            .agent()
            .await
            .enroll(enroll_request_for(
                &new_key(),
                &token,
                "SN-1",
                hardware_model,
            ))
            .await
            .unwrap()
            .into_inner();
        (response.device_id, response.device_credential)
    }
}

/// A rollout of pos-app `version` to what `selector` selects, in one
/// wave of every device.
pub fn one_wave_rollout(version: &str, selector: v1::RolloutSelector) -> v1::CreateRolloutRequest {
    v1::CreateRolloutRequest {
        analysis_policy: String::new(),
        bundle_name: "pos-app".into(),
        bundle_version: version.into(),
        selector: Some(selector),
        strategy: Some(v1::RolloutStrategy {
            waves: vec![v1::WaveSpec {
                size: Some(v1::wave_spec::Size::Percent(100.0)),
            }],
            wave_unit: v1::WaveUnit::Devices as i32,
            max_failures_percent: 5.0,
            min_failures: 1,
            max_unavailable_per_store: 1,
            ..Default::default()
        }),
    }
}

/// A request for a token of `role` named `name`, living a day, unscoped.
pub fn token_request(name: &str, role: &str) -> v1::CreateAdminTokenRequest {
    v1::CreateAdminTokenRequest {
        name: name.into(),
        role: role.into(),
        expires_in_seconds: 24 * 3600,
        scope: Default::default(),
    }
}

pub fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, fragment: &str) {
    let status = result.expect_err("the call should be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(fragment),
        "message `{}` should mention `{fragment}`",
        status.message()
    );
}

/// Polls until `check` holds on the device (heartbeats are written in batches).
pub async fn eventually(
    admin: &mut Admin,
    id: &str,
    check: impl Fn(&v1::Device) -> bool,
) -> v1::Device {
    for _ in 0..100 {
        let device = admin.device(id).await.unwrap();
        if check(&device) {
            return device;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "device {id} never reached the expected state: {:?}",
        admin.device(id).await
    );
}

/// An AdminService client that sends `token` (or none).
pub struct Admin {
    pub client: AdminServiceClient<Channel>,
    /// The channel under `client`, for the SessionService.
    pub channel: Channel,
    pub token: Option<String>,
}

impl Admin {
    /// Creates a token (this client's must be an admin's) and returns a
    /// client that calls with it.
    pub async fn with_new_token(&mut self, request: v1::CreateAdminTokenRequest) -> Admin {
        let req = self.req(request);
        let secret = self
            .client
            .create_admin_token(req)
            .await
            .unwrap()
            .into_inner()
            .secret;
        Admin {
            client: self.client.clone(),
            channel: self.channel.clone(),
            token: Some(secret),
        }
    }

    /// Creates user `name` with `role` (this client's must be an admin's),
    /// sets them up as they would ([`NEW_USER_PASSWORD`], a TOTP code) and
    /// returns a client calling with their session, and their setup.
    pub async fn with_new_user(
        &mut self,
        name: &str,
        role: &str,
        scope: &[(&str, &str)],
    ) -> (Admin, posfleet_proto::setup::CompletedSetup) {
        let code = self.create_user(name, role, scope).await.setup_code;
        let done = posfleet_proto::setup::complete_setup(
            self.channel.clone(),
            name,
            &code,
            NEW_USER_PASSWORD,
        )
        .await
        .unwrap();
        let user = Admin {
            client: self.client.clone(),
            channel: self.channel.clone(),
            token: Some(done.session.token.clone()),
        };
        (user, done)
    }

    /// Creates user `name` with `role` (this client's must be an admin's),
    /// pending setup.
    pub async fn create_user(
        &mut self,
        name: &str,
        role: &str,
        scope: &[(&str, &str)],
    ) -> v1::CreateUserResponse {
        let req = self.req(v1::CreateUserRequest {
            name: name.into(),
            role: role.into(),
            scope: labels(scope),
        });
        self.client.create_user(req).await.unwrap().into_inner()
    }

    /// The audit log from its start (its first 1000 entries); with `user`,
    /// that user's entries only.
    pub async fn audit_entries_of(&mut self, user: &str) -> Vec<v1::AuditEntry> {
        let req = self.req(v1::ListAuditEntriesRequest {
            after_seq: 0,
            limit: 1000,
            user: user.into(),
        });
        self.client
            .list_audit_entries(req)
            .await
            .unwrap()
            .into_inner()
            .entries
    }

    pub fn req<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    }

    pub async fn store(&mut self, id: &str) -> v1::Store {
        let req = self.req(v1::CreateStoreRequest {
            id: id.into(),
            name: format!("Store {id}"),
            time_zone: "Europe/Paris".into(),
        });
        self.client.create_store(req).await.unwrap().into_inner()
    }

    pub async fn token(
        &mut self,
        store: &str,
        uses: u32,
        expires_in_seconds: u64,
    ) -> Result<v1::CreateEnrollmentTokenResponse, Status> {
        let req = self.req(v1::CreateEnrollmentTokenRequest {
            store_id: store.into(),
            expires_in_seconds,
            uses,
        });
        self.client
            .create_enrollment_token(req)
            .await
            .map(|r| r.into_inner())
    }

    pub async fn devices(&mut self, request: v1::ListDevicesRequest) -> Vec<v1::Device> {
        let req = self.req(request);
        self.client
            .list_devices(req)
            .await
            .unwrap()
            .into_inner()
            .devices
    }

    /// The audit log, oldest first (its first 1000 entries).
    pub async fn audit_entries(&mut self) -> Vec<v1::AuditEntry> {
        self.audit_entries_of("").await
    }

    /// The events of rollout `id`, oldest first (its first 1000).
    pub async fn rollout_events(&mut self, id: &str) -> Vec<v1::Event> {
        let req = self.req(v1::ListEventsRequest {
            rollout_id: id.into(),
            after_seq: 0,
            limit: 1000,
        });
        self.client
            .list_events(req)
            .await
            .unwrap()
            .into_inner()
            .events
    }

    pub async fn device(&mut self, id: &str) -> Result<v1::Device, Status> {
        let req = self.req(v1::GetDeviceRequest { id: id.into() });
        self.client.get_device(req).await.map(|r| r.into_inner())
    }

    /// Initializes the bundle repository with one offline key that holds
    /// the root and targets roles, and returns that key.
    pub async fn init_repository(&mut self) -> SigningKey {
        let online = self
            .client
            .get_repository(self.req(v1::GetRepositoryRequest {}))
            .await
            .unwrap()
            .into_inner();
        let vk = |hex_key: &str| {
            ed25519_dalek::VerifyingKey::from_bytes(
                &hex::decode(hex_key).unwrap().try_into().unwrap(),
            )
            .unwrap()
        };
        let offline = new_key();
        let keys = RootKeys {
            root: vec![offline.verifying_key()],
            root_threshold: 1,
            targets: vec![offline.verifying_key()],
            targets_threshold: 1,
            snapshot: vk(&online.snapshot_public_key),
            timestamp: vk(&online.timestamp_public_key),
        };
        let expires = chrono::Utc::now() + chrono::Duration::days(30);
        let req = self.req(v1::InitRepositoryRequest {
            root_json: tuf::sign(&repo::root(&keys, 1, expires), &[&offline]),
            targets_json: tuf::sign(&repo::targets(1, expires, Default::default()), &[&offline]),
        });
        self.client.init_repository(req).await.unwrap();
        offline
    }

    /// Signs and publishes bundle `name` `version` (a few KiB of arbitrary
    /// bytes: the control plane checks hashes, not contents).
    pub async fn publish(
        &mut self,
        targets_key: &SigningKey,
        name: &str,
        version: &str,
        kind: Kind,
        hardware: &[&str],
    ) -> v1::Bundle {
        let manifest = Manifest {
            name: name.into(),
            version: version.parse().unwrap(),
            kind,
            hardware: hardware.iter().map(|h| h.to_string()).collect(),
            pre_activate: None,
            health_check: None,
            service: None,
        };
        let bytes: Vec<u8> = format!("{name} {version} ").repeat(300).into_bytes();
        let digest = posfleet_bundle::chunks::digest_reader(bytes.as_slice()).unwrap();
        let entry = repo::target_file(&manifest, &digest);
        self.publish_entry(targets_key, &manifest.target_name(), entry, bytes)
            .await
            .unwrap()
    }

    /// The published bundles (and deltas) of `name`.
    pub async fn list_bundles(&mut self, name: &str) -> Vec<v1::Bundle> {
        let req = self.req(v1::ListBundlesRequest { name: name.into() });
        self.client
            .list_bundles(req)
            .await
            .unwrap()
            .into_inner()
            .bundles
    }

    /// The published targets metadata.
    pub async fn current_targets(&mut self) -> Targets {
        let current = self
            .client
            .get_repository(self.req(v1::GetRepositoryRequest {}))
            .await
            .unwrap()
            .into_inner()
            .targets_json;
        tuf::parse_envelope(TARGETS, &current, u64::MAX)
            .unwrap()
            .decode(TARGETS)
            .unwrap()
    }

    /// Signs the next targets metadata, adding `entry` as `name`, and
    /// publishes it with `bytes`.
    pub async fn publish_entry(
        &mut self,
        targets_key: &SigningKey,
        name: &str,
        entry: posfleet_bundle::tuf::TargetFile,
        bytes: Vec<u8>,
    ) -> Result<v1::Bundle, Status> {
        let current = self.current_targets().await;
        let mut entries = current.targets;
        entries.insert(name.to_string(), entry);
        let targets = repo::targets(
            current.version + 1,
            chrono::Utc::now() + chrono::Duration::days(30),
            entries,
        );
        use v1::publish_bundle_request::Part;
        let messages = vec![
            v1::PublishBundleRequest {
                part: Some(Part::Header(v1::PublishBundleHeader {
                    targets_json: tuf::sign(&targets, &[targets_key]),
                    target: name.to_string(),
                })),
            },
            v1::PublishBundleRequest {
                part: Some(Part::Data(bytes)),
            },
        ];
        self.client
            .publish_bundle(self.req(tokio_stream::iter(messages)))
            .await
            .map(|r| r.into_inner())
    }
}

/// A device key and the enroll request it signs, for a `pos-x1` till.
pub fn enroll_request(key: &SigningKey, token: &str, serial: &str) -> v1::EnrollRequest {
    enroll_request_for(key, token, serial, "pos-x1")
}

pub fn enroll_request_for(
    key: &SigningKey,
    token: &str,
    serial: &str,
    hardware_model: &str,
) -> v1::EnrollRequest {
    let public_key = key.verifying_key().to_bytes().to_vec();
    let payload =
        posfleet_proto::enroll_signing_payload(token, &public_key, hardware_model, serial);
    v1::EnrollRequest {
        enrollment_token: token.into(),
        signature: key.sign(&payload).to_bytes().to_vec(),
        public_key,
        hardware_model: hardware_model.into(),
        serial_number: serial.into(),
        agent_version: "0.9.0".into(),
        // Ignored over plaintext; what a TLS control plane requires.
        certificate_request: posfleet_pki::certificate_request(key).unwrap(),
    }
}

pub fn new_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// A request carrying `authorization: Device <credential>`.
pub fn device_request<T>(credential: &str, message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Device {credential}").parse().unwrap(),
    );
    req
}

/// The value of the series `series` (name and labels as exposed, labels in
/// name order) in the `/metrics` text `text`, if it is there.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Asserts that `series` has the value `expected` in the `/metrics` text.
pub fn assert_metric(text: &str, series: &str, expected: f64) {
    assert_eq!(
        metric_sample(text, series),
        Some(expected),
        "{series} in:\n{text}"
    );
}

/// `key=value` pairs as a request's label map.
pub fn labels(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn heartbeat(credential: &str, request: v1::HeartbeatRequest) -> Request<v1::HeartbeatRequest> {
    device_request(credential, request)
}

/// Runs `$name(backend)` on SQLite, and on PostgreSQL when asked (`--ignored`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs PostgreSQL: set POSFLEET_TEST_POSTGRES_URL and pass --ignored (.ci/run does)"]
                async fn $name() {
                    super::$name(super::common::Backend::Postgres).await
                }
            )*
        }
    };
}
