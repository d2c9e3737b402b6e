//! A slow network link on loopback: a TCP proxy that paces what it
//! forwards, for tests of WAN links and slow uploads.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One direction of a link: when it is free to send again (shared by all
/// connections, as one link is), and the bytes it delivered.
#[derive(Clone)]
struct Direction {
    bytes_per_second: u64,
    free_at: Arc<Mutex<Instant>>,
    delivered: Arc<AtomicU64>,
}

impl Direction {
    fn new(bytes_per_second: u64) -> Direction {
        Direction {
            bytes_per_second,
            free_at: Arc::new(Mutex::new(Instant::now())),
            delivered: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Copies `from` to `to` at this direction's pace until either closes.
    fn copy(&self, mut from: TcpStream, mut to: TcpStream) {
        let mut buffer = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let due = {
                let mut free_at = self.free_at.lock().expect("no panic holds this lock");
                let airtime = Duration::from_secs_f64(n as f64 / self.bytes_per_second as f64);
                *free_at = (*free_at).max(Instant::now()) + airtime;
                *free_at
            };
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&buffer[..n]).is_err() {
                break;
            }
            self.delivered.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    }
}

/// A TCP proxy in front of `upstream` whose each direction carries at most
/// `bytes_per_second`, shared by all its connections. It runs until the
/// test process ends.
pub struct PacedLink {
    address: String,
    up: Direction,
    down: Direction,
}

impl PacedLink {
    /// Starts a link to `upstream` (`host:port`) with the same rate both
    /// ways.
    pub fn start(upstream: &str, bytes_per_second: u64) -> PacedLink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the link");
        let address = listener
            .local_addr()
            .expect("a bound listener has an address")
            .to_string();
        let (up, down) = (
            Direction::new(bytes_per_second),
            Direction::new(bytes_per_second),
        );
        let upstream = upstream.to_string();
        let (up_, down_) = (up.clone(), down.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let up = up_.clone();
                std::thread::spawn(move || up.copy(client, server));
                let down = down_.clone();
                std::thread::spawn(move || down.copy(server2, client2));
            }
        });
        PacedLink { address, up, down }
    }

    /// `host:port` to connect to instead of the upstream.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Bytes delivered to the upstream so far.
    pub fn sent_upstream(&self) -> u64 {
        self.up.delivered.load(Ordering::SeqCst)
    }

    /// Bytes delivered back to clients so far.
    pub fn delivered_to_clients(&self) -> u64 {
        self.down.delivered.load(Ordering::SeqCst)
    }
}
