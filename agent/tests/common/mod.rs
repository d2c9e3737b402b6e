//! A signed repository built in the test, and a loopback HTTP server for
//! its files: trusted values (targets, chunk lists) come out of the real
//! verification path, as on a till.
#![allow(dead_code)]

use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use posfleet_bundle::chunks::{self, ChunkList};
use posfleet_bundle::manifest::{Kind, Manifest};
use posfleet_bundle::tuf::TargetFile;
use posfleet_bundle::{repo, tuf};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The manifest of software target `name` (`<bundle>/<version>`), for
/// any hardware.
fn software(name: &str) -> Manifest {
    let (bundle, version) = name.split_once('/').unwrap();
    Manifest {
        name: bundle.into(),
        version: version.parse().unwrap(),
        kind: Kind::Software,
        hardware: vec!["*".into()],
        pre_activate: None,
        health_check: None,
        service: None,
    }
}

/// `len` bytes that do not compress, the same for the same `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A lifecycle task working towards pos-app `version` (software, no
/// window) with `repository` and `fetcher`, its reports in `report`.
pub struct Running {
    pub report: tokio::sync::watch::Receiver<posfleet_agent::lifecycle::Report>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), posfleet_agent::Error>>,
}

impl Running {
    pub fn start(
        data_dir: &Path,
        repository: posfleet_agent::repository::RepositoryClient,
        fetcher: Arc<dyn posfleet_agent::fetch::Fetcher>,
        version: &str,
        emergency: bool,
    ) -> Running {
        use posfleet_agent::lifecycle::{Clock, Desired, DesiredState, Lifecycle, Report};
        use std::time::Duration;
        let lifecycle = Lifecycle {
            data_dir: data_dir.to_path_buf(),
            hardware_model: "pos-x1".into(),
            repository,
            fetcher,
            clock: Clock::System,
            check_interval: Duration::from_millis(100),
            refresh_interval: Duration::from_secs(3600),
            min_free_disk_bytes: 0,
            hook_user: None,
            self_update: posfleet_agent::selfupdate::SelfUpdate {
                launched: None,
                confirm: Duration::from_secs(300),
            },
        };
        let desired = DesiredState {
            bundles: vec![Desired {
                name: "pos-app".into(),
                version: version.parse().unwrap(),
                kind: Kind::Software,
                download_ahead: true,
                emergency,
                rollback: false,
            }],
            window: None,
        };
        let (desired_tx, desired_rx) = tokio::sync::watch::channel(desired);
        let (report_tx, report) = tokio::sync::watch::channel(Report::new());
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(lifecycle.run(desired_rx, report_tx, async move {
            let _ = stop_rx.await;
            drop(desired_tx);
        }));
        Running { report, stop, task }
    }

    /// The first status of pos-app that `wanted` accepts, within `seconds`.
    pub async fn status_where(
        &mut self,
        seconds: u64,
        wanted: impl Fn(&posfleet_proto::v1::BundleStatus) -> bool,
    ) -> posfleet_proto::v1::BundleStatus {
        let wait = async {
            loop {
                if let Some(s) = self.report.borrow_and_update().get("pos-app")
                    && wanted(s)
                {
                    return s.clone();
                }
                self.report.changed().await.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(seconds), wait)
            .await
            .expect("the status waited for")
    }

    /// Stops the task; it must have ended without an error.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// One key for every role: what matters here is the client, not the key
/// layout.
pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// A root that trusts `key` for every role, signed by it, expiring at
/// `expires`.
pub fn root_signed_by(key: &SigningKey, expires: DateTime<Utc>) -> Vec<u8> {
    let vk = key.verifying_key();
    let keys = repo::RootKeys {
        root: vec![vk],
        root_threshold: 1,
        targets: vec![vk],
        targets_threshold: 1,
        snapshot: vk,
        timestamp: vk,
    };
    tuf::sign(&repo::root(&keys, 1, expires), &[key])
}

/// That root written to `dir/root.json`, for a till to pin.
pub fn pin_root(dir: &Path, key: &SigningKey, expires: DateTime<Utc>) -> PathBuf {
    let path = dir.join("root.json");
    std::fs::write(&path, root_signed_by(key, expires)).unwrap();
    path
}

/// The metadata files of one publication, as a till saves them.
pub struct Published {
    pub timestamp: Vec<u8>,
    pub snapshot: Vec<u8>,
    pub targets: Vec<u8>,
    pub version: u64,
}

impl Published {
    /// Writes them where a till keeps what it trusted (`<data_dir>/tuf/`).
    pub fn save(&self, data_dir: &Path) {
        let dir = data_dir.join("tuf");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in [
            ("timestamp.json", &self.timestamp),
            ("snapshot.json", &self.snapshot),
            ("targets.json", &self.targets),
        ] {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// The files as the origin serves them (consistent snapshots).
    pub fn files(&self) -> HashMap<String, Vec<u8>> {
        HashMap::from([
            ("timestamp.json".to_string(), self.timestamp.clone()),
            (
                format!("{}.snapshot.json", self.version),
                self.snapshot.clone(),
            ),
            (
                format!("{}.targets.json", self.version),
                self.targets.clone(),
            ),
        ])
    }
}

#[derive(Default)]
pub struct TestRepo {
    entries: BTreeMap<String, TargetFile>,
    pub chunk_lists: BTreeMap<String, ChunkList>,
}

impl TestRepo {
    /// The root a till pins, expiring in a day.
    pub fn root(&self) -> Vec<u8> {
        root_signed_by(&key(), Utc::now() + chrono::Duration::days(1))
    }

    pub fn write_root(&self, dir: &Path) -> PathBuf {
        pin_root(dir, &key(), Utc::now() + chrono::Duration::days(1))
    }

    /// Lists `data` as target `name` (`<bundle>/<version>`), for any hardware.
    pub fn add(&mut self, name: &str, data: &[u8]) {
        let manifest = software(name);
        let digest = chunks::digest_reader(data).unwrap();
        self.entries
            .insert(name.into(), repo::target_file(&manifest, &digest));
        self.chunk_lists.insert(name.into(), digest.chunks);
    }

    /// Lists `data` as the delta `name` that rebuilds target `result` from
    /// target `base` (both listed already).
    pub fn add_delta(&mut self, name: &str, base: &str, result: &str, data: &[u8]) {
        let manifest = software(result);
        let digest = chunks::digest_reader(data).unwrap();
        let entry = repo::delta_target_file(
            &manifest,
            &digest,
            (base, &self.entries[base]),
            (result, &self.entries[result]),
        )
        .unwrap();
        self.entries.insert(name.into(), entry);
        self.chunk_lists.insert(name.into(), digest.chunks);
    }

    /// Signs timestamp, snapshot and targets of `version`, all expiring
    /// at `expires`.
    pub fn publish(&self, version: u64, expires: DateTime<Utc>) -> Published {
        let targets = tuf::sign(
            &repo::targets(version, expires, self.entries.clone()),
            &[&key()],
        );
        let snapshot = tuf::sign(
            &repo::snapshot(version, expires, version, &targets),
            &[&key()],
        );
        let timestamp = tuf::sign(
            &repo::timestamp(version, expires, version, &snapshot),
            &[&key()],
        );
        Published {
            timestamp,
            snapshot,
            targets,
            version,
        }
    }
}

/// A repository origin on loopback: serves `files` under `/repo/` (404
/// for anything else) until `down` is set, then answers 502 as a gateway
/// whose upstream is gone.
pub struct FileServer {
    pub address: String,
    pub files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    pub down: Arc<AtomicBool>,
}

impl FileServer {
    pub fn start(files: HashMap<String, Vec<u8>>) -> FileServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let files = Arc::new(Mutex::new(files));
        let down = Arc::new(AtomicBool::new(false));
        let (served, is_down) = (files.clone(), down.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .trim_start_matches("/repo/")
                    .to_string();
                let body = served.lock().unwrap().get(&path).cloned();
                let (status, body) = match body {
                    _ if is_down.load(Ordering::SeqCst) => ("502 Bad Gateway", Vec::new()),
                    Some(body) => ("200 OK", body),
                    None => ("404 Not Found", Vec::new()),
                };
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            }
        });
        FileServer {
            address,
            files,
            down,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/repo/", self.address)
    }
}
