//! One piece stream over loopback, per transport. A measurement, not a
//! pass/fail test:
//! `cargo test -p posfleet-p2p --release --test throughput -- --ignored --nocapture`

mod common;

use common::*;
use std::sync::Arc;
use std::time::Instant;

async fn measure(transport: &str, size: usize) -> f64 {
    let (data, bundle) = bundle(size, 42);
    let tills = vec![till(test_config()).await, till(test_config()).await];
    let (seeder, fetcher) = (&tills[0], &tills[1]);
    std::fs::write(seeder.dest(), &data[..]).unwrap();
    seeder
        .p2p
        .share(bundle.clone(), &seeder.dest())
        .await
        .unwrap();
    let mut a = seeder.member();
    a.addrs = only(&a.addrs, transport);
    let mut b = fetcher.member();
    b.addrs = only(&b.addrs, transport);
    seeder.p2p.set_members(vec![a.clone(), b.clone()]).await;
    fetcher.p2p.set_members(vec![a, b]).await;
    wait_connected(&tills).await;

    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    let start = Instant::now();
    let stats = fetcher
        .p2p
        .fetch(bundle, &fetcher.dest(), Arc::new(origin.clone()), |_| {})
        .await
        .unwrap();
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(stats.origin_bytes, 0);
    assert_eq!(std::fs::read(fetcher.dest()).unwrap(), data[..]);
    for t in &tills {
        t.p2p.shutdown().await;
    }
    size as f64 / MIB as f64 / seconds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it in release"]
async fn one_piece_stream_on_loopback() {
    let _serial = serial().await;
    for transport in ["tcp", "quic-v1"] {
        let rate = measure(transport, 128 * MIB).await;
        println!("{transport}: {rate:.0} MiB/s");
    }
}
