//! Measurements, not pass/fail tests. Run them in release:
//! `cargo test -p posfleet-p2p --release --test throughput -- --ignored --nocapture --test-threads 1`

mod common;

use common::*;
use std::sync::Arc;
use std::time::Instant;

/// Resident memory of this process now, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// MiB/s of one fetch from one seeder, and how much the process's resident
/// memory grew meanwhile (both tills together, the bundle itself excluded).
async fn measure(transport: &str, size: usize) -> (f64, f64) {
    let (data, bundle) = bundle(size, 42);
    let tills = vec![
        seeder(test_config(), &data, &bundle).await,
        till(test_config()).await,
    ];
    let fetcher = &tills[1];
    full_mesh_over(&tills, transport).await;

    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    let before = rss_mib();
    let peak = Arc::new(std::sync::Mutex::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let now = rss_mib();
                {
                    let mut p = peak.lock().unwrap();
                    *p = p.max(now);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    let start = Instant::now();
    let stats = fetcher.fetch(&bundle, &origin).await.unwrap();
    let seconds = start.elapsed().as_secs_f64();
    sampler.abort();
    let grew = *peak.lock().unwrap() - before;
    assert_eq!(stats.origin_bytes, 0);
    assert_eq!(std::fs::read(fetcher.dest()).unwrap(), data[..]);
    shutdown_all(&tills).await;
    (size as f64 / MIB as f64 / seconds, grew)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it in release"]
async fn one_piece_stream_on_loopback() {
    let _serial = serial().await;
    for transport in ["tcp", "quic-v1"] {
        let (rate, grew) = measure(transport, 256 * MIB).await;
        println!(
            "{transport}: {rate:.0} MiB/s; resident memory grew by {grew:.0} MiB (seeder and fetcher together)"
        );
    }
}

/// A store of `n` tills behind a WAN of `wan` bytes/s, all starting at once:
/// origin bytes / size, and the time until the last till is done divided
/// by size / WAN rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it in release"]
async fn a_store_behind_a_thin_wan() {
    let _serial = serial().await;
    for announce in [50, 200] {
        store_behind_a_thin_wan(std::time::Duration::from_millis(announce)).await;
    }
}

async fn store_behind_a_thin_wan(announce_interval: std::time::Duration) {
    let (n, size, wan) = (20, 40 * MIB, 8 * MIB as u64);
    let (data, bundle) = bundle(size, 43);
    let mut tills = Vec::new();
    for _ in 0..n {
        tills.push(
            till(posfleet_p2p::Config {
                announce_interval,
                ..test_config()
            })
            .await,
        );
    }
    full_mesh(&tills).await;
    let origin = FakeOrigin::new(data.clone(), &bundle, wan);
    let start = Instant::now();
    fetch_all(&tills, &bundle, &origin.for_each(&tills)).await;
    let last = start.elapsed().as_secs_f64();
    let physical = size as f64 / wan as f64;
    println!(
        "{n} tills, announce every {announce_interval:?}, {} MiB, WAN {} MiB/s: origin bytes / size = {:.3}, last till done / (size / WAN) = {:.2} ({last:.1} s of {physical:.1} s; includes the {:?} settle delay)",
        size / MIB,
        wan / MIB as u64,
        origin.served() as f64 / size as f64,
        last / physical,
        test_config().settle_delay,
    );
    for t in &tills {
        assert_eq!(std::fs::read(t.dest()).unwrap(), data[..]);
        t.p2p.shutdown().await;
    }
}
