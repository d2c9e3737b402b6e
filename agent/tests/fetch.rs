//! Fetching a bundle from the origin over real HTTP when the network or
//! the server misbehaves: a cut connection resumes from the last verified
//! piece, a corrupted piece is never written.

use posfleet_agent::fetch::{Download, Fetcher, Origin};
use posfleet_agent::repository::{RepoError, Timeouts, consistent_target_path};
use posfleet_bundle::chunks::{CHUNK_SIZE, ChunkList};
use posfleet_bundle::client::{Limits, TrustedMetadata, VerifiedTarget};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

mod common;

const PIECE: usize = CHUNK_SIZE as usize;

/// How the test server answers a target request.
#[derive(Clone, Copy)]
enum Mode {
    /// Send this many bytes of the body, then drop the connection.
    CutAfter(usize),
    /// Flip a byte inside this piece.
    CorruptPiece(usize),
    Honest,
}

struct Served {
    /// `Range` start of each target request (None: no Range).
    ranges: Vec<Option<u64>>,
    body_bytes: u64,
}

fn bundle_bytes() -> Vec<u8> {
    common::noise(0x2545_f491_4f6c_dd1d, 5 * PIECE + 123_456)
}

/// The target for `data` as a till gets it: signed in a repository built
/// here, then verified by the TUF client.
fn target_for(data: &[u8]) -> (VerifiedTarget, ChunkList) {
    let mut repo = common::TestRepo::default();
    repo.add("pos-app/2.0.0", data);
    let now = chrono::Utc::now();
    let published = repo.publish(1, now + chrono::Duration::days(1));
    let mut trusted = TrustedMetadata::from_pinned_root(&repo.root(), Limits::default()).unwrap();
    trusted.update_timestamp(&published.timestamp, now).unwrap();
    trusted.update_snapshot(&published.snapshot, now).unwrap();
    trusted.update_targets(&published.targets, now).unwrap();
    let target = trusted.bundle("pos-app/2.0.0", "pos-x1", now).unwrap();
    let list = target
        .decode_chunk_list(&repo.chunk_lists["pos-app/2.0.0"].encode())
        .unwrap();
    (target, list)
}

/// The whole of `target` into `dest`, with no one watching the progress.
fn download<'a>(target: &'a VerifiedTarget, list: &'a ChunkList, dest: &'a Path) -> Download<'a> {
    fn unwatched(_: u64) {}
    Download {
        target,
        list,
        dest,
        progress: &unwatched,
    }
}

/// Serves `data` as the target, answering the first request with `first`
/// and later ones honestly (with Range). Returns the address and the log.
fn serve(data: Vec<u8>, first: Mode) -> (String, Arc<Mutex<Served>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let served = Arc::new(Mutex::new(Served {
        ranges: Vec::new(),
        body_bytes: 0,
    }));
    let log = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = value.trim().trim_end_matches('-').parse::<u64>().ok();
                }
            }
            let mode = {
                let mut log = log.lock().unwrap();
                log.ranges.push(range);
                if log.ranges.len() == 1 {
                    first
                } else {
                    Mode::Honest
                }
            };
            let start = range.unwrap_or(0) as usize;
            let mut body = data[start..].to_vec();
            if let Mode::CorruptPiece(piece) = mode {
                body[piece * PIECE + 10 - start] ^= 0xff;
            }
            let status = if range.is_some() {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .unwrap();
            let send = match mode {
                Mode::CutAfter(n) => n.min(body.len()),
                _ => body.len(),
            };
            let _ = stream.write_all(&body[..send]);
            let _ = stream.flush();
            log.lock().unwrap().body_bytes += send as u64;
        }
    });
    (address, served)
}

fn origin(address: &str) -> Origin {
    Origin::new(&format!("http://{address}/repo/"), Timeouts::default()).unwrap()
}

#[tokio::test]
async fn a_cut_connection_resumes_from_the_last_verified_piece() {
    let data = bundle_bytes();
    let (target, list) = target_for(&data);
    assert!(
        consistent_target_path(target.name(), &target.sha256_hex()).contains(&target.sha256_hex())
    );
    // Cut two and a half pieces in: two whole pieces are kept.
    let (address, served) = serve(data.clone(), Mode::CutAfter(2 * PIECE + PIECE / 2));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("bundle.part");
    let origin = origin(&address);
    let progress = Arc::new(Mutex::new(Vec::new()));
    let seen = progress.clone();
    let report = move |n: u64| seen.lock().unwrap().push(n);
    let watched = Download {
        progress: &report,
        ..download(&target, &list, &dest)
    };
    let err = origin.fetch(watched).await.unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::Fetch { .. }
                | RepoError::Refused(posfleet_bundle::Error::LengthMismatch { .. })
        ),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 2 * PIECE as u64);
    assert_eq!(progress.lock().unwrap().last(), Some(&(2 * PIECE as u64)));

    // The network is back: only the rest is asked for, and the whole file
    // is right.
    origin.fetch(watched).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let served = served.lock().unwrap();
    assert_eq!(served.ranges, vec![None, Some(2 * PIECE as u64)]);
    // Bytes sent = the cut attempt + the remainder: verified bytes were
    // never sent twice.
    assert_eq!(
        served.body_bytes,
        (2 * PIECE + PIECE / 2) as u64 + (data.len() - 2 * PIECE) as u64
    );
    assert_eq!(progress.lock().unwrap().last(), Some(&(data.len() as u64)));
}

#[tokio::test]
async fn a_corrupted_piece_is_never_written() {
    let data = bundle_bytes();
    let (target, list) = target_for(&data);
    let (address, served) = serve(data.clone(), Mode::CorruptPiece(3));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("bundle.part");
    let origin = origin(&address);
    let err = origin
        .fetch(download(&target, &list, &dest))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::Refused(posfleet_bundle::Error::ChunkHashMismatch { index: 3 })
        ),
        "{err}"
    );
    // Pieces 0 to 2 are on disk, nothing of the bad one.
    assert_eq!(std::fs::read(&dest).unwrap(), data[..3 * PIECE]);
    // The next attempt starts at the bad piece.
    origin.fetch(download(&target, &list, &dest)).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(
        served.lock().unwrap().ranges,
        vec![None, Some(3 * PIECE as u64)]
    );
}

#[tokio::test]
async fn garbage_already_on_disk_is_replaced_not_trusted() {
    let data = bundle_bytes();
    let (target, list) = target_for(&data);
    let (address, served) = serve(data.clone(), Mode::Honest);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("bundle.part");
    // A first piece right, the second tampered with, then more bytes.
    let mut on_disk = data[..3 * PIECE].to_vec();
    on_disk[PIECE + 1] ^= 1;
    std::fs::write(&dest, &on_disk).unwrap();
    origin(&address)
        .fetch(download(&target, &list, &dest))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(served.lock().unwrap().ranges, vec![Some(PIECE as u64)]);
}
