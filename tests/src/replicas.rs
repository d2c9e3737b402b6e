//! Control-plane replicas on one PostgreSQL database behind HAProxy, set up
//! as README's "Running several replicas" says: each replica with a data
//! dir of its own, every one given the same fleet CA and key-encryption
//! key as files and the same `tls_server_names`, the bundle blobs on a
//! folder they all mount, and HAProxy in TCP mode in front of both ports,
//! taking a replica out as soon as its `/readyz` stops answering.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{ControlPlane, Process, check_ok, eventually};

/// A free port on loopback, as `127.0.0.1:PORT` (free when asked: the
/// caller binds it soon after).
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").to_string()
}

/// One address HAProxy listens on and the replicas it spreads connections
/// over.
pub struct Frontend {
    pub name: String,
    pub address: String,
    /// Each server's address, and its HTTP address (`/readyz` is asked).
    pub servers: Vec<(String, String)>,
}

/// An `haproxy` process in TCP mode.
pub struct LoadBalancer {
    pub process: Process,
    pub config: PathBuf,
}

impl LoadBalancer {
    /// Writes the configuration for `frontends` into `dir` and starts
    /// HAProxy in the foreground; `ca_file`, when the replicas serve TLS,
    /// verifies their `/readyz`. Waits until every frontend accepts.
    pub fn start(dir: &Path, frontends: &[Frontend], ca_file: Option<&Path>) -> LoadBalancer {
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, haproxy_config(frontends, ca_file)).expect("write haproxy.cfg");
        let mut command = Command::new("haproxy");
        // -db: foreground, logs on stderr; -W: master-worker, so SIGTERM to
        // the process stops it all.
        command.arg("-db").arg("-W").arg("-f").arg(&config);
        let mut process =
            Process::try_spawn(command).expect("start haproxy (Debian: apt-get install haproxy)");
        for frontend in frontends {
            eventually("HAProxy listening", Duration::from_secs(10), || {
                if let Err(exit) = process.check_running() {
                    panic!("haproxy {exit}");
                }
                std::net::TcpStream::connect(&frontend.address)
                    .ok()
                    .map(|_| ())
            });
        }
        LoadBalancer { process, config }
    }
}

/// HAProxy's configuration: a TCP proxy per frontend, round robin over its
/// servers, each checked every 500 ms by `GET /readyz` on its HTTP port
/// (out after two failures in a row, back after one success), a
/// connection that fails to connect sent to another server, and the
/// connections of a server marked down closed.
pub fn haproxy_config(frontends: &[Frontend], ca_file: Option<&Path>) -> String {
    let mut config = String::from(
        "global\n\
         \x20   maxconn 4096\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 2s\n\
         \x20   timeout check 2s\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\
         \x20   retries 3\n\
         \x20   option redispatch\n\
         \x20   default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n",
    );
    let check_tls = match ca_file {
        Some(ca) => format!(" check-ssl verify required ca-file {}", ca.display()),
        None => String::new(),
    };
    for frontend in frontends {
        let name = &frontend.name;
        config.push_str(&format!(
            "\nlisten {name}\n\
             \x20   bind {}\n\
             \x20   balance roundrobin\n\
             \x20   option httpchk GET /readyz\n\
             \x20   http-check expect status 200\n",
            frontend.address
        ));
        for (i, (address, http)) in frontend.servers.iter().enumerate() {
            let (_, check_port) = http.rsplit_once(':').expect("host:port");
            config.push_str(&format!(
                "    server replica{i} {address} check port {check_port}{check_tls}\n"
            ));
        }
    }
    config
}

/// The first admin at the `posfleet` CLI, through HAProxy; cloned into
/// the threads that work while replicas are killed.
#[derive(Clone)]
pub struct Operator {
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: Option<PathBuf>,
}

impl Operator {
    pub fn command(&self) -> Command {
        crate::cli_command_at(&self.url, &self.token_file, self.ca_file.as_deref())
    }

    /// Runs the CLI with `--output json` and `args`, asserting success.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        crate::cli_json(self.command(), args)
    }

    /// As [`Operator::json`], an error (the replica serving the call was
    /// killed under it, say) given back instead: what an operator reruns.
    pub fn try_json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let output = self
            .command()
            .args(["--output", "json"])
            .args(args)
            .output()
            .expect("run posfleet");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    }

    /// A read rerun until it answers (within a minute).
    pub fn read(&self, args: &[&str]) -> serde_json::Value {
        let mut last = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match self.try_json(args) {
                Ok(value) => return value,
                Err(error) => last = error,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("posfleet {args:?} kept failing: {last}");
    }
}

/// One replica: where it lives and listens, and its process while it runs.
pub struct Replica {
    pub data_dir: PathBuf,
    pub grpc_address: String,
    pub http_address: String,
    pub control_plane: Option<ControlPlane>,
}

/// A replica killed and started again.
#[derive(Debug, Clone)]
pub struct Kill {
    pub replica: usize,
    /// Why (what the test was doing).
    pub during: String,
    pub down_for: Duration,
}

/// `count` replicas on the database at `database_url`, and HAProxy in
/// front of their gRPC and HTTP ports.
pub struct Replicas {
    pub dir: PathBuf,
    pub database_url: String,
    pub replicas: Vec<Replica>,
    pub balancer: LoadBalancer,
    /// Where tills and operators reach the fleet: HAProxy's addresses.
    pub grpc_address: String,
    pub http_address: String,
    /// Over TLS, the fleet CA's certificate, which tills and the CLI
    /// trust.
    pub ca_file: Option<PathBuf>,
    args: Vec<String>,
    pub kills: Vec<Kill>,
}

impl Replicas {
    /// Starts `count` replicas in `dir` (a key-encryption key made for
    /// them, blobs in `dir/shared/blobs`; with `tls`, a fleet CA too), the
    /// first alone (it sets the database and the first admin up), then
    /// HAProxy. `extra`: more control-plane flags.
    pub fn start(
        dir: &Path,
        database_url: &str,
        count: usize,
        tls: bool,
        extra: &[&str],
    ) -> Replicas {
        let shared = dir.join("shared");
        std::fs::create_dir_all(shared.join("blobs")).expect("create the shared folder");
        let kek = shared.join("repository-kek");
        crate::write_private(
            &kek,
            &format!("{}\n", hex::encode(rand::random::<[u8; 32]>())),
        );
        let mut args: Vec<String> = vec![
            "--repository-key-encryption-key-path".into(),
            kek.to_str().expect("utf-8 path").into(),
        ];
        let ca_file = tls.then(|| {
            let (cert, key) = make_ca(&shared);
            for (flag, value) in [
                ("--tls-server-name", Path::new("127.0.0.1")),
                ("--tls-ca-cert-path", &cert),
                ("--tls-ca-key-path", &key),
            ] {
                args.push(flag.into());
                args.push(value.to_str().expect("utf-8 path").into());
            }
            cert
        });
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut replicas = Vec::new();
        for i in 0..count {
            let data_dir = dir.join(format!("replica-{i}"));
            std::fs::create_dir_all(&data_dir).expect("create a data dir");
            // The blobs folder every replica mounts (NFS, say).
            std::os::unix::fs::symlink(shared.join("blobs"), data_dir.join("blobs"))
                .expect("link the shared blobs folder");
            let mut replica = Replica {
                data_dir,
                grpc_address: "127.0.0.1:0".into(),
                http_address: "127.0.0.1:0".into(),
                control_plane: None,
            };
            replica.start(database_url, &args);
            replicas.push(replica);
        }
        let grpc_address = free_address();
        let http_address = free_address();
        let servers = |http: bool| -> Vec<(String, String)> {
            replicas
                .iter()
                .map(|r| {
                    let address = if http {
                        &r.http_address
                    } else {
                        &r.grpc_address
                    };
                    (address.clone(), r.http_address.clone())
                })
                .collect()
        };
        let frontends = [
            Frontend {
                name: "grpc".into(),
                address: grpc_address.clone(),
                servers: servers(false),
            },
            Frontend {
                name: "http".into(),
                address: http_address.clone(),
                servers: servers(true),
            },
        ];
        let balancer = LoadBalancer::start(dir, &frontends, ca_file.as_deref());
        Replicas {
            dir: dir.to_path_buf(),
            database_url: database_url.to_string(),
            replicas,
            balancer,
            grpc_address,
            http_address,
            ca_file,
            args,
            kills: Vec::new(),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.ca_file.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The gRPC URL tills and the CLI use (HAProxy's).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc_address)
    }

    /// The bundle repository's URL (HAProxy's).
    pub fn repository_url(&self) -> String {
        format!("{}://{}/repo/", self.scheme(), self.http_address)
    }

    /// The first admin's session, set up through the first replica.
    pub fn admin_token_file(&self) -> PathBuf {
        let mut name = self.replicas[0].data_dir.as_os_str().to_owned();
        name.push(".admin-session");
        name.into()
    }

    /// The first admin at the CLI, through HAProxy.
    pub fn operator(&self) -> Operator {
        Operator {
            url: self.url(),
            token_file: self.admin_token_file(),
            ca_file: self.ca_file.clone(),
        }
    }

    /// SIGKILLs replica `index`, waits `down_for`, starts it again on its
    /// addresses and waits until HAProxy's check can see it ready.
    pub fn kill_and_restart(&mut self, index: usize, during: &str, down_for: Duration) {
        let replica = &mut self.replicas[index];
        if let Some(mut cp) = replica.control_plane.take() {
            cp.process.kill9();
        }
        std::thread::sleep(down_for);
        replica.start(&self.database_url, &self.args);
        self.kills.push(Kill {
            replica: index,
            during: during.to_string(),
            down_for,
        });
    }

    /// Runs `work` on a thread of its own while replicas are SIGKILLed one
    /// at a time, in turn from `first`, each down for `down_for` and given
    /// `up_for` after its restart before the next, at least `min_kills`
    /// times; returns what `work` returned once it has and the replica in
    /// turn is back.
    pub fn killing_while<T: Send + 'static>(
        &mut self,
        during: &str,
        first: usize,
        min_kills: usize,
        (down_for, up_for): (Duration, Duration),
        work: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let worker = std::thread::spawn(work);
        let mut next = first;
        while !worker.is_finished() || next - first < min_kills {
            self.kill_and_restart(next % self.replicas.len(), during, down_for);
            next += 1;
            let until = Instant::now() + up_for;
            while Instant::now() < until && (!worker.is_finished() || next - first < min_kills) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        match worker.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Replicas {
    /// The replica that has a bundle upload's temporary file open (in
    /// the shared blobs folder), while one does.
    pub fn receiving_upload(&self) -> Option<usize> {
        self.replicas.iter().position(|r| {
            let Some(cp) = &r.control_plane else {
                return false;
            };
            let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", cp.process.child.id())) else {
                return false;
            };
            fds.filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| target.to_string_lossy().contains("/blobs/tmp/"))
        })
    }
}

impl Replica {
    /// Starts the replica on its addresses (any free ports the first time)
    /// and waits until it answers `/readyz`.
    fn start(&mut self, database_url: &str, args: &[String]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cp = ControlPlane::start(
            &self.data_dir,
            Some(database_url),
            &self.grpc_address,
            &self.http_address,
            &args,
        );
        self.grpc_address = cp.grpc_address.clone();
        self.http_address = cp.http_address.clone();
        self.control_plane = Some(cp);
    }
}

/// A fleet CA for the replicas (an ECDSA P-256 key and a self-signed CA
/// certificate, by `openssl`), as a company's PKI would hand it out;
/// returns the certificate's and the key's files.
pub fn make_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("fleet-ca.crt");
    let key = dir.join("fleet-ca.key");
    check_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "30"])
            .args(["-subj", "/CN=posfleet replicas test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl"),
    );
    crate::write_private(
        &key,
        &std::fs::read_to_string(&key).expect("read the CA key"),
    );
    (cert, key)
}
