//! Test stores: real swarms over loopback in one process, and an origin
//! that serves a bundle from memory and counts what it sends (the store's
//! WAN edge).
#![allow(dead_code)]

use futures::future::join_all;
use posfleet_bundle::chunks::{ChunkList, digest_reader};
use posfleet_p2p::{
    Bundle, Config, Error, FetchStats, Member, Multiaddr, OriginSource, P2p, PeerId,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const MIB: usize = 1 << 20;

/// Tests share two cores: one scenario at a time keeps timings honest.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    init_tracing();
    LOCK.lock().await
}

fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

pub fn bundle(len: usize, seed: u64) -> (Arc<Vec<u8>>, Bundle) {
    // A cheap generator: every piece different, every run the same.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // Hashed by `posfleet-bundle`, as a publisher does: tests build
    // trusted values the way the product does.
    let digest = digest_reader(&data[..]).unwrap();
    let chunks = digest.chunks;
    assert_eq!(chunks.length(), len as u64);
    let digest = digest.sha256;
    (Arc::new(data), Bundle { digest, chunks })
}

/// The origin: serves pieces from memory at `bytes_per_second` (0 for
/// unpaced) and counts every byte it sends, across all tills that use it.
#[derive(Clone)]
pub struct FakeOrigin {
    pub data: Arc<Vec<u8>>,
    pub chunks: Arc<ChunkList>,
    pub bytes_per_second: u64,
    pub served: Arc<AtomicU64>,
    pub calls: Arc<AtomicUsize>,
    pub first_call: Arc<Mutex<Option<Instant>>>,
    /// Bytes served to this till only.
    pub mine: Arc<AtomicU64>,
    /// The first call (from whichever till) never sends anything.
    pub hang_first_call: Arc<AtomicBool>,
}

impl FakeOrigin {
    pub fn new(data: Arc<Vec<u8>>, bundle: &Bundle, bytes_per_second: u64) -> FakeOrigin {
        FakeOrigin {
            data,
            chunks: Arc::new(bundle.chunks.clone()),
            bytes_per_second,
            served: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            first_call: Arc::new(Mutex::new(None)),
            mine: Arc::new(AtomicU64::new(0)),
            hang_first_call: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Another till's handle on the same origin: shared total, own count.
    pub fn for_another_till(&self) -> FakeOrigin {
        FakeOrigin {
            mine: Arc::new(AtomicU64::new(0)),
            ..self.clone()
        }
    }

    /// One handle on this origin for each till.
    pub fn for_each(&self, tills: &[Till]) -> Vec<FakeOrigin> {
        tills.iter().map(|_| self.for_another_till()).collect()
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    pub fn mine(&self) -> u64 {
        self.mine.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl OriginSource for FakeOrigin {
    async fn fetch_pieces(
        &self,
        first: usize,
        last: usize,
        piece: &mut (dyn FnMut(usize, Vec<u8>) -> Result<(), Error> + Send),
    ) -> Result<(), Error> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang_first_call.swap(false, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.first_call
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
        let size = self.chunks.chunk_size() as usize;
        for index in first..=last {
            let start = index * size;
            let end = (start + size).min(self.data.len());
            if self.bytes_per_second > 0 {
                let seconds = (end - start) as f64 / self.bytes_per_second as f64;
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            }
            self.served
                .fetch_add((end - start) as u64, Ordering::SeqCst);
            self.mine.fetch_add((end - start) as u64, Ordering::SeqCst);
            piece(index, self.data[start..end].to_vec())?;
        }
        Ok(())
    }
}

pub fn loopback() -> Vec<Multiaddr> {
    vec![
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
    ]
}

pub fn test_config() -> Config {
    Config {
        listen_addrs: loopback(),
        mdns: false,
        origin_fallback_delay: Duration::from_secs(3),
        stall_timeout: Duration::from_secs(2),
        settle_delay: Duration::from_secs(2),
        ..Config::default()
    }
}

pub struct Till {
    pub p2p: P2p,
    pub task: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
    pub seed: [u8; 32],
    pub addrs: Vec<Multiaddr>,
}

impl Till {
    pub fn peer_id(&self) -> PeerId {
        self.p2p.peer_id()
    }

    pub fn dest(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    /// Fetches the bundle to `dest()` through its handle on the origin.
    pub async fn fetch(&self, bundle: &Bundle, origin: &FakeOrigin) -> Result<FetchStats, Error> {
        let origin = Arc::new(origin.clone());
        let dest = self.dest();
        self.p2p.fetch(bundle.clone(), &dest, origin, |_| {}).await
    }

    pub fn member(&self) -> Member {
        Member {
            peer_id: self.peer_id(),
            addrs: self.addrs.clone(),
        }
    }
}

static NEXT_SEED: AtomicU64 = AtomicU64::new(1);

pub fn fresh_seed() -> [u8; 32] {
    let n = NEXT_SEED.fetch_add(1, Ordering::SeqCst);
    let mut seed = [0x5a; 32];
    seed[..8].copy_from_slice(&n.to_be_bytes());
    seed[8..16].copy_from_slice(&(std::process::id() as u64).to_be_bytes());
    seed
}

pub async fn till_with(seed: [u8; 32], config: Config, dir: tempfile::TempDir) -> Till {
    let (p2p, task) = posfleet_p2p::spawn(seed, config).await.unwrap();
    let addrs = p2p.listen_addrs().await;
    assert!(!addrs.is_empty());
    Till {
        p2p,
        task,
        dir,
        seed,
        addrs,
    }
}

pub async fn till(config: Config) -> Till {
    till_with(fresh_seed(), config, tempfile::tempdir().unwrap()).await
}

/// `n` tills of one store, each connected to every other.
pub async fn store_of(n: usize) -> Vec<Till> {
    let mut tills = Vec::new();
    for _ in 0..n {
        tills.push(till(test_config()).await);
    }
    full_mesh(&tills).await;
    tills
}

/// A till that holds the whole bundle and shares it.
pub async fn seeder(config: Config, data: &[u8], bundle: &Bundle) -> Till {
    let t = till(config).await;
    std::fs::write(t.dest(), data).unwrap();
    t.p2p.share(bundle.clone(), &t.dest()).await.unwrap();
    t
}

pub async fn shutdown_all<'a>(tills: impl IntoIterator<Item = &'a Till>) {
    for t in tills {
        t.p2p.shutdown().await;
    }
}

/// Every till fetches the bundle at once, each through its own handle on
/// the origin.
pub async fn fetch_each(
    tills: &[Till],
    bundle: &Bundle,
    origins: &[FakeOrigin],
) -> Vec<Result<FetchStats, Error>> {
    join_all(tills.iter().zip(origins).map(|(t, o)| t.fetch(bundle, o))).await
}

/// The same, every fetch expected to succeed.
pub async fn fetch_all(tills: &[Till], bundle: &Bundle, origins: &[FakeOrigin]) -> Vec<FetchStats> {
    let results = fetch_each(tills, bundle, origins).await;
    results.into_iter().map(|r| r.unwrap()).collect()
}

/// Keeps only the addresses of one transport ("tcp" or "quic-v1").
pub fn only(addrs: &[Multiaddr], transport: &str) -> Vec<Multiaddr> {
    addrs
        .iter()
        .filter(|a| a.to_string().contains(&format!("/{transport}")))
        .cloned()
        .collect()
}

/// Makes every till a member of every other and waits until all are
/// connected.
pub async fn full_mesh(tills: &[Till]) {
    let members: Vec<Member> = tills.iter().map(|t| t.member()).collect();
    mesh(tills, members).await;
}

/// The same, each reachable over one transport ("tcp" or "quic-v1") only.
pub async fn full_mesh_over(tills: &[Till], transport: &str) {
    let members: Vec<Member> = tills
        .iter()
        .map(|t| Member {
            peer_id: t.peer_id(),
            addrs: only(&t.addrs, transport),
        })
        .collect();
    mesh(tills, members).await;
}

async fn mesh(tills: &[Till], members: Vec<Member>) {
    for t in tills {
        t.p2p.set_members(members.clone()).await;
    }
    wait_connected(tills).await;
}

pub async fn wait_connected(tills: &[Till]) {
    let want = tills.len() - 1;
    wait_for(
        "every till connected to every other",
        Duration::from_secs(10),
        || async {
            for t in tills {
                if t.p2p.connected_members().await.len() != want {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
