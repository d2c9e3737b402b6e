//! A control plane on 127.0.0.1:0 over SQLite (a temp dir) or PostgreSQL (a
//! fresh database on the server named by POSFLEET_TEST_POSTGRES_URL), and
//! clients that speak to it the way agents and the CLI do.
#![allow(dead_code)]

use ed25519_dalek::{Signer, SigningKey};
use posfleet_control_plane::ControlPlane;
use posfleet_control_plane::config::Config;
use posfleet_proto::v1;
use posfleet_proto::v1::admin_service_client::AdminServiceClient;
use posfleet_proto::v1::agent_service_client::AgentServiceClient;
use sqlx::Executor;
use std::net::SocketAddr;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Status};

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
    pub http_addr: SocketAddr,
    pub admin_token: String,
    pub config: Config,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Result<(), posfleet_control_plane::error::Error>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
        let http_addr = http.local_addr().unwrap();
        let control_plane = ControlPlane::open(config.clone())
            .await
            .expect("open control plane");
        let admin_token = std::fs::read_to_string(control_plane.admin_token_path())
            .unwrap()
            .trim()
            .to_string();
        let (stop, rx) = watch::channel(false);
        let shutdown = async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        };
        let handle = tokio::spawn(control_plane.serve(grpc, http, shutdown));
        TestServer {
            grpc_url,
            http_addr,
            admin_token,
            config,
            stop,
            handle,
        }
    }

    /// Graceful stop; returns once every queued heartbeat is written.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        self.handle.await.unwrap().unwrap();
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn admin(&self) -> Admin {
        Admin {
            client: AdminServiceClient::new(self.channel().await),
            token: Some(self.admin_token.clone()),
        }
    }

    pub async fn agent(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel().await)
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.http_addr)
            .await
            .unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }
}

pub fn config(dir: &std::path::Path, db: &TestDb) -> Config {
    Config {
        data_dir: dir.join("data"),
        database_url: db.url.clone(),
        log_level: "warn".into(),
        ..Config::default()
    }
}

/// An AdminService client that sends `token` (or none).
pub struct Admin {
    pub client: AdminServiceClient<Channel>,
    pub token: Option<String>,
}

impl Admin {
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

    pub async fn device(&mut self, id: &str) -> Result<v1::Device, Status> {
        let req = self.req(v1::GetDeviceRequest { id: id.into() });
        self.client.get_device(req).await.map(|r| r.into_inner())
    }
}

/// A device key and the enroll request it signs.
pub fn enroll_request(key: &SigningKey, token: &str, serial: &str) -> v1::EnrollRequest {
    let public_key = key.verifying_key().to_bytes().to_vec();
    let payload = posfleet_proto::enroll_signing_payload(token, &public_key, "pos-x1", serial);
    v1::EnrollRequest {
        enrollment_token: token.into(),
        signature: key.sign(&payload).to_bytes().to_vec(),
        public_key,
        hardware_model: "pos-x1".into(),
        serial_number: serial.into(),
        agent_version: "0.9.0".into(),
    }
}

pub fn new_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

pub fn heartbeat(credential: &str, request: v1::HeartbeatRequest) -> Request<v1::HeartbeatRequest> {
    let mut req = Request::new(request);
    req.metadata_mut().insert(
        "authorization",
        format!("Device {credential}").parse().unwrap(),
    );
    req
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
