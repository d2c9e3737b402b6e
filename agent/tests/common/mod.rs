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
        let (bundle, version) = name.split_once('/').unwrap();
        let manifest = Manifest {
            name: bundle.into(),
            version: version.parse().unwrap(),
            kind: Kind::Software,
            hardware: vec!["*".into()],
            pre_activate: None,
            health_check: None,
        };
        let digest = chunks::digest_reader(data).unwrap();
        self.entries
            .insert(name.into(), repo::target_file(&manifest, &digest));
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
