//! A real S3-compatible server for the object-store tests and benchmark:
//! the Python `moto` package in server mode (`moto_server`, named by
//! `POSFLEET_TEST_MOTO`; `.ci/run` installs it), on a free loopback port,
//! killed when dropped. It keeps everything in memory: a restart starts
//! empty.

use crate::Process;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The variable naming the `moto_server` program.
pub const MOTO_ENV: &str = "POSFLEET_TEST_MOTO";

/// The bucket the control plane is configured with.
pub const BUCKET: &str = "posfleet-blobs";

pub struct Moto {
    pub process: Process,
    pub port: u16,
    program: PathBuf,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

impl Moto {
    /// `moto_server` on a free port, answering, with [`BUCKET`] created.
    pub fn start() -> Moto {
        let program = PathBuf::from(
            std::env::var_os(MOTO_ENV)
                .unwrap_or_else(|| panic!("{MOTO_ENV} must name moto_server (.ci/run sets it)")),
        );
        Moto::start_program(program)
    }

    /// `program` (moto's `moto_server`) on a free port, as [`Moto::start`].
    pub fn start_program(program: PathBuf) -> Moto {
        Moto::start_on(program, free_port())
    }

    fn start_on(program: PathBuf, port: u16) -> Moto {
        let mut command = Command::new(&program);
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let process = Process::spawn(command);
        let moto = Moto {
            process,
            port,
            program,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(moto.address()).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {} within 60s:\n{}",
                moto.address(),
                moto.process.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let created = http_request(&moto.address(), "PUT", &format!("/{BUCKET}"), &[], b"");
        assert_eq!(created.status, 200, "create bucket: {created:?}");
        moto
    }

    /// A fresh, empty server on the same port (after [`Moto::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        *self = Moto::start_on(self.program.clone(), self.port);
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address())
    }

    /// SIGKILL: the store vanishes mid-request.
    pub fn kill(&mut self) {
        self.process.kill9();
    }

    /// Puts `bytes` at `key` in [`BUCKET`], signed with the test
    /// credentials, as anyone holding the bucket's keys could.
    pub fn put_object(&self, key: &str, bytes: Vec<u8>) {
        use object_store::ObjectStoreExt;
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("posfleet-test")
            .with_secret_access_key("posfleet-test-secret")
            .build()
            .expect("an S3 client");
        crate::block_on(store.put(&object_store::path::Path::from(key), bytes.into()))
            .expect("put the object");
    }

    /// The control plane settings for this server, keys under `prefix`, as
    /// a TOML file for `--config`.
    pub fn config_toml(&self, prefix: &str, redirect: bool) -> String {
        format!(
            "blob_store_url = \"s3://{BUCKET}/{prefix}\"\n\
             blob_store_endpoint = \"{}\"\n\
             blob_store_allow_http = true\n\
             blob_store_region = \"us-east-1\"\n\
             blob_store_access_key_id = \"posfleet-test\"\n\
             blob_store_secret_access_key = \"posfleet-test-secret\"\n\
             repo_redirect_to_object_store = {redirect}\n",
            self.endpoint()
        )
    }
}

/// An HTTP answer read off a plain socket.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to `address` over a plain socket, the connection
/// closed after it; the answer read whole (a `Content-Length` body).
pub fn http_request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("send");
    stream.write_all(body).expect("send body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: response[split + 4..].to_vec(),
    }
}

/// GET `url` (`http://host:port/path?query`), as a client following a
/// redirect would.
pub fn http_get_url(url: &str, headers: &[(&str, &str)]) -> HttpAnswer {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (address, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    http_request(address, "GET", path, headers, b"")
}
