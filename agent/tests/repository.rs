//! The agent's repository client against hostile servers: slow retrieval
//! and endless data are cut off by its limits.

use posfleet_agent::repository::{RepoError, RepositoryClient, Timeouts};
use posfleet_bundle::client::Limits;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A pinned root for a repository nobody serves properly.
fn pinned_root(dir: &std::path::Path) -> std::path::PathBuf {
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    common::pin_root(dir, &key, chrono::Utc::now() + chrono::Duration::days(1))
}

/// Serves every request with `respond` on a thread; returns the address.
fn serve(respond: fn(&mut std::net::TcpStream)) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                respond(&mut stream);
            });
        }
    });
    address
}

fn client(address: &str, dir: &std::path::Path, timeouts: Timeouts) -> RepositoryClient {
    RepositoryClient::open(
        &pinned_root(dir),
        &dir.join("data"),
        &format!("http://{address}/repo/"),
        Limits::default(),
        timeouts,
    )
    .unwrap()
}

#[tokio::test]
async fn a_server_that_trickles_is_cut_off() {
    let address = serve(|stream| {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
        for _ in 0..1000 {
            if stream.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let timeouts = Timeouts {
        metadata: Duration::from_secs(1),
        ..Timeouts::default()
    };
    let mut client = client(&address, dir.path(), timeouts);
    let started = Instant::now();
    let err = client.refresh().await.unwrap_err();
    assert!(
        matches!(err, RepoError::Timeout { seconds: 1, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn endless_metadata_is_cut_off() {
    let address = serve(|stream| {
        // No length announced; the body just keeps coming.
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let block = vec![b' '; 64 * 1024];
        for _ in 0..1024 {
            if stream.write_all(&block).is_err() {
                return;
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut client = client(&address, dir.path(), Timeouts::default());
    let err = client.refresh().await.unwrap_err();
    assert!(matches!(err, RepoError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn a_corrupt_pinned_root_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.json");
    std::fs::write(&path, b"{\"signed\": {}}").unwrap();
    let err = RepositoryClient::open(
        &path,
        dir.path(),
        "http://127.0.0.1:1/repo/",
        Limits::default(),
        Timeouts::default(),
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("root"), "{err}");
}

mod common;

/// The timestamp a till saved has since expired (it was offline, or the
/// repository's online key stopped signing). A restart must still hold it
/// as the floor: an older timestamp, unexpired because it was signed for
/// longer, is a rollback, not a way back in.
#[tokio::test]
async fn a_restart_keeps_the_rollback_baseline_when_the_saved_timestamp_expired() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let repo = common::TestRepo::default();
    let old = repo.publish(1, chrono::Utc::now() + chrono::Duration::days(1));
    let newer = repo.publish(2, chrono::Utc::now() - chrono::Duration::minutes(1));
    newer.save(&data);
    let origin = common::FileServer::start(old.files());

    let mut client = RepositoryClient::open(
        &repo.write_root(dir.path()),
        &data,
        &origin.url(),
        Limits::default(),
        Timeouts::default(),
    )
    .unwrap();
    let err = client.refresh().await.unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::Refused(posfleet_bundle::Error::RollbackAttempt {
                ref role,
                trusted: 2,
                offered: 1
            }) if role == "timestamp"
        ),
        "{err}"
    );
    // Nothing older was saved over the baseline.
    assert_eq!(
        std::fs::read(data.join("tuf/timestamp.json")).unwrap(),
        newer.timestamp
    );
}
