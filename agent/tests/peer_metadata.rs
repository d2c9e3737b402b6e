//! The repository client with its origin unreachable and a store peer (a
//! real `posfleet-p2p` swarm on loopback) serving the TUF metadata it
//! saved: newer metadata is taken once it verifies; older, expired or
//! badly signed metadata is rejected with a clear error, the trusted
//! metadata stays, and the peer is not banned for it. An origin that
//! answers with metadata that fails verification is not bypassed.

use chrono::{Duration as Days, Utc};
use ed25519_dalek::SigningKey;
use posfleet_agent::repository::{RepoError, RepositoryClient, Timeouts};
use posfleet_bundle::client::Limits;
use posfleet_bundle::{repo, tuf};
use posfleet_p2p::{Config, Member, P2p};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

/// Nothing listens there: connections are refused at once.
const DEAD_ORIGIN: &str = "http://127.0.0.1:1/repo/";

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

fn pinned_root(dir: &Path) -> PathBuf {
    common::pin_root(dir, &key(), Utc::now() + Days::days(30))
}

/// Writes timestamp, snapshot and targets of `version` into `dir`, as a
/// till saves them, signed by `signer`, expiring `expires_in` from now.
fn save_set(dir: &Path, version: u64, expires_in: Days, signer: &SigningKey) {
    let expires = Utc::now() + expires_in;
    let targets = tuf::sign(&repo::targets(version, expires, BTreeMap::new()), &[signer]);
    let snapshot = tuf::sign(
        &repo::snapshot(version, expires, version, &targets),
        &[signer],
    );
    let timestamp = tuf::sign(
        &repo::timestamp(version, expires, version, &snapshot),
        &[signer],
    );
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in [
        ("targets.json", targets),
        ("snapshot.json", snapshot),
        ("timestamp.json", timestamp),
    ] {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

async fn node(seed: u8) -> P2p {
    let config = Config {
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        ..Config::default()
    };
    posfleet_p2p::spawn([seed; 32], config).await.unwrap().0
}

/// Two tills of one store, connected.
async fn store() -> (P2p, P2p) {
    let (a, b) = (node(1).await, node(2).await);
    let mut members = Vec::new();
    for p in [&a, &b] {
        members.push(Member {
            peer_id: p.peer_id(),
            addrs: p.listen_addrs().await,
        });
    }
    a.set_members(members.clone()).await;
    b.set_members(members).await;
    let start = Instant::now();
    while a.connected_members().await.len() != 1 || b.connected_members().await.len() != 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "not connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (a, b)
}

fn client(dir: &Path, origin: &str) -> RepositoryClient {
    RepositoryClient::open(
        &pinned_root(dir),
        &dir.join("data"),
        origin,
        Limits::default(),
        Timeouts {
            metadata: Duration::from_secs(5),
            ..Timeouts::default()
        },
    )
    .unwrap()
}

fn trusted_version(client: &RepositoryClient) -> u64 {
    client.trusted().targets().unwrap().version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_from_a_peer_is_verified_like_the_origins() {
    let (peer, own) = store().await;
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("peer-tuf");
    peer.serve_metadata(&served).await;
    let mut client = client(dir.path(), DEAD_ORIGIN);

    // Without the store, an unreachable origin is the error.
    let err = client.refresh().await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");

    client.share_with_store(own.clone()).await;
    // The peer has nothing yet: both failures are named.
    let err = client.refresh().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RepoError::NoPeerMetadata { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:1") && text.contains("no timestamp.json"),
        "{text}"
    );

    // Newer metadata, signed right: trusted and saved as the peer had it.
    save_set(&served, 2, Days::days(1), &key());
    client.refresh().await.unwrap();
    assert_eq!(trusted_version(&client), 2);
    for name in ["timestamp.json", "snapshot.json", "targets.json"] {
        assert_eq!(
            std::fs::read(dir.path().join("data/tuf").join(name)).unwrap(),
            std::fs::read(served.join(name)).unwrap(),
            "{name}"
        );
    }

    // Each of these is refused, and version 2 stays trusted: (version,
    // expiry, signing key seed, what the error says).
    for (version, expires_in, signer, expected) in [
        (1, Days::days(1), 9, "older than the trusted version 2"),
        (3, Days::days(-1), 9, "expired"),
        (3, Days::days(1), 4, "valid signatures"),
    ] {
        save_set(
            &served,
            version,
            expires_in,
            &SigningKey::from_bytes(&[signer; 32]),
        );
        let err = client.refresh().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(expected), "{text}");
        assert!(text.contains(&peer.peer_id().to_string()), "{text}");
        assert_eq!(trusted_version(&client), 2);
    }
    // A peer holding metadata that does not verify is not banned for it.
    assert_eq!(own.stats().await.banned_peers, 0);
    assert_eq!(own.connected_members().await, vec![peer.peer_id()]);
    // And a restarted client trusts what was saved: version 2.
    drop(client);
    let again = RepositoryClient::open(
        &dir.path().join("root.json"),
        &dir.path().join("data"),
        DEAD_ORIGIN,
        Limits::default(),
        Timeouts::default(),
    )
    .unwrap();
    assert_eq!(trusted_version(&again), 2);
    for p in [&peer, &own] {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_answers_with_bad_metadata_is_not_bypassed() {
    // Every request gets a timestamp signed by the wrong key.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let forged_dir = tempfile::tempdir().unwrap();
    save_set(
        forged_dir.path(),
        5,
        Days::days(1),
        &SigningKey::from_bytes(&[4; 32]),
    );
    let forged = std::fs::read(forged_dir.path().join("timestamp.json")).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let path = String::from_utf8_lossy(&buf);
            let body: &[u8] = if path.starts_with("GET /repo/timestamp.json") {
                &forged
            } else {
                b""
            };
            let status = if body.is_empty() {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(body);
        }
    });
    let (peer, own) = store().await;
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("peer-tuf");
    save_set(&served, 2, Days::days(1), &key());
    peer.serve_metadata(&served).await;
    let mut client = client(dir.path(), &format!("http://{address}/repo/"));
    client.share_with_store(own.clone()).await;
    let err = client.refresh().await.unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::Refused(posfleet_bundle::Error::ThresholdNotMet { .. })
        ),
        "{err}"
    );
    assert_eq!(peer.stats().await.metadata_served, 0, "the peer was asked");
    assert!(client.trusted().targets().is_err());
    for p in [&peer, &own] {
        p.shutdown().await;
    }
}
