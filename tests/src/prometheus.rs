//! A Prometheus server for tests: Debian's `prometheus` binary started on a
//! free loopback port with a configuration the test writes, its HTTP API
//! queried, and a control plane's `/metrics` read as Prometheus reads it.

use crate::{ControlPlane, Process, eventually};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Names the `prometheus` binary; else it is looked for on PATH.
pub const PROMETHEUS_ENV: &str = "POSFLEET_TEST_PROMETHEUS";
/// Names the `promtool` binary; else it is looked for on PATH.
pub const PROMTOOL_ENV: &str = "POSFLEET_TEST_PROMTOOL";

const INSTALL: &str = "install Debian's prometheus package \
    (apt-get install --no-install-recommends prometheus), or name the binary";

fn find(env: &str, program: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("`{program}` not found on PATH: {INSTALL} in {env}"))
}

/// The `prometheus` binary, or a panic saying how to install it.
pub fn prometheus_binary() -> PathBuf {
    find(PROMETHEUS_ENV, "prometheus")
}

/// The `promtool` binary, or a panic saying how to install it.
pub fn promtool_binary() -> PathBuf {
    find(PROMTOOL_ENV, "promtool")
}

/// A running Prometheus server, stopped on drop.
pub struct Prometheus {
    pub process: Process,
    /// `127.0.0.1:PORT` of its web listener (the HTTP API).
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) and its storage in a
    /// temporary folder; waits until it is ready.
    pub fn start(config: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("write prometheus.yml");
        let address = free_address();
        let mut command = Command::new(prometheus_binary());
        command
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"));
        let mut process = Process::try_spawn(command)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", prometheus_binary().display()));
        eventually("Prometheus ready", Duration::from_secs(60), || {
            if let Err(exited) = process.check_running() {
                panic!("Prometheus {exited}");
            }
            matches!(http_get(&address, "/-/ready"), Ok((200, _))).then_some(())
        });
        Prometheus {
            process,
            address,
            _dir: dir,
        }
    }

    /// `GET /api/v1/PATH?PARAMS`: its `data` when the status is success,
    /// else the error Prometheus gave.
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
            .collect();
        let (status, body) = http_get(
            &self.address,
            &format!("/api/v1/{path}?{}", query.join("&")),
        )
        .map_err(|e| format!("cannot reach Prometheus: {e}"))?;
        let answer: Value =
            serde_json::from_str(&body).map_err(|_| format!("HTTP {status}: {body}"))?;
        if answer["status"] == "success" {
            Ok(answer["data"].clone())
        } else {
            Err(format!(
                "{}: {}",
                answer["errorType"].as_str().unwrap_or("error"),
                answer["error"].as_str().unwrap_or(&body)
            ))
        }
    }

    /// The value of an instant query's first sample, if it has one.
    pub fn scalar(&self, query: &str) -> Option<f64> {
        let data = self.api("query", &[("query", query)]).ok()?;
        let sample = data["result"].as_array()?.first()?["value"][1].clone();
        sample.as_str()?.parse().ok()
    }
}

/// A loopback address no one listens on now.
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").to_string()
}

/// Percent-encodes all but RFC 3986's unreserved characters.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP/1.0 GET (no chunked answer to decode): status and body.
pub fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    exchange(&mut stream, path)
}

fn exchange(stream: &mut impl ReadWrite, path: &str) -> std::io::Result<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    stream.flush()?;
    let mut response = Vec::new();
    // A TLS peer may close without close_notify once it has sent all.
    if let Err(e) = stream.read_to_end(&mut response)
        && (response.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof)
    {
        return Err(e);
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The control plane's `/metrics` as a scraper gets it: over TLS trusting
/// the fleet CA when it serves TLS.
pub fn scrape(cp: &ControlPlane) -> String {
    use posfleet_pki::rustls::{ClientConnection, StreamOwned, pki_types::ServerName};
    let tcp = TcpStream::connect(&cp.http_address).expect("connect to the HTTP listener");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let answer = if cp.tls {
        let pem = std::fs::read(cp.ca_file()).expect("read the trust bundle");
        let trusted = posfleet_pki::certificates_from_pem(&pem, "the trust bundle")
            .expect("the trust bundle's certificates");
        let config = posfleet_pki::client_config(&trusted, None).expect("TLS client config");
        let host = cp
            .http_address
            .rsplit_once(':')
            .map(|(host, _)| host.to_string())
            .expect("host:port");
        let name = ServerName::try_from(host).expect("a server name");
        let connection =
            ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS connection");
        exchange(&mut StreamOwned::new(connection, tcp), "/metrics")
    } else {
        let mut tcp = tcp;
        exchange(&mut tcp, "/metrics")
    };
    let (status, body) = answer.expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
    body
}
