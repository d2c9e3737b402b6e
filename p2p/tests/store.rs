//! A store of tills in one process: real swarms over loopback TCP and QUIC,
//! an in-memory origin that counts the bytes it serves.

mod common;

use common::*;
use futures::future::join_all;
use posfleet_p2p::{Config, FetchStats, Member};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn assert_same_file(till: &Till, data: &[u8]) {
    let got = std::fs::read(till.dest()).unwrap();
    assert!(got == data, "till {} holds different bytes", till.peer_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tills_starting_together_take_the_bundle_from_the_origin_once() {
    let _serial = serial().await;
    let size = 20 * MIB;
    let (data, bundle) = bundle(size, 1);
    let tills = store_of(8).await;
    // A WAN of 40 MiB/s: the store's LAN must keep up with the fetcher.
    let origin = FakeOrigin::new(data.clone(), &bundle, 40 * MIB as u64);
    let origins = origin.for_each(&tills);

    let start = Instant::now();
    let stats = fetch_all(&tills, &bundle, &origins).await;
    let elapsed = start.elapsed();

    let served = origin.served();
    let fetchers = origins.iter().filter(|o| o.mine() > 0).count();
    println!(
        "8 tills, {size} bytes: origin served {served} in {elapsed:?}, {fetchers} till(s) used it"
    );
    assert!(
        served as f64 <= 1.01 * size as f64,
        "origin served {served} bytes for a {size}-byte bundle"
    );
    assert_eq!(fetchers, 1, "exactly one till goes to the origin");
    for (t, s) in tills.iter().zip(&stats) {
        assert_same_file(t, &data);
        assert!(s.origin_bytes + s.peer_bytes >= size as u64);
        assert!(!t.dir.path().join("bundle.pieces").exists());
    }
    shutdown_all(&tills).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_store_takes_the_bundle_from_the_origin_once() {
    let _serial = serial().await;
    let size = 6 * MIB;
    let (data, bundle) = bundle(size, 11);
    let mut stores: Vec<Vec<Till>> = Vec::new();
    for _ in 0..2 {
        stores.push(store_of(3).await);
    }
    let origin = FakeOrigin::new(data.clone(), &bundle, 20 * MIB as u64);
    let per_store: Vec<Vec<FakeOrigin>> =
        stores.iter().map(|tills| origin.for_each(tills)).collect();
    let fetches = stores
        .iter()
        .zip(&per_store)
        .map(|(tills, origins)| fetch_all(tills, &bundle, origins));
    join_all(fetches).await;
    for (tills, origins) in stores.iter().zip(&per_store) {
        let store_bytes: u64 = origins.iter().map(|o| o.mine()).sum();
        assert_eq!(store_bytes, size as u64, "each store once");
        for t in tills {
            assert_same_file(t, &data);
            assert_eq!(t.p2p.connected_members().await.len(), 2);
        }
    }
    shutdown_all(stores.iter().flatten()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_completes_when_the_origin_fetcher_dies_halfway() {
    let _serial = serial().await;
    let size = 40 * MIB;
    let (data, bundle) = bundle(size, 2);
    let tills = store_of(5).await;
    let origin = FakeOrigin::new(data.clone(), &bundle, 5 * MIB as u64);
    let origins = origin.for_each(&tills);

    let killer = async {
        wait_for(
            "half the bundle from the origin",
            Duration::from_secs(20),
            || async { origin.served() >= size as u64 / 2 },
        )
        .await;
        let fetcher = origins.iter().position(|o| o.mine() > 0).unwrap();
        tills[fetcher].p2p.shutdown().await;
        fetcher
    };
    let fetches = fetch_each(&tills, &bundle, &origins);
    let (killed, results) = tokio::join!(killer, fetches);

    let served = origin.served();
    println!("fetcher killed at half: origin served {served} of {size}");
    for (i, (t, r)) in tills.iter().zip(results).enumerate() {
        if i == killed {
            assert!(r.is_err(), "the killed till's fetch ends with an error");
            continue;
        }
        r.unwrap();
        assert_same_file(t, &data);
    }
    assert!(
        served as f64 <= 1.05 * size as f64,
        "origin served {served} bytes for a {size}-byte bundle"
    );
    assert!(
        origins.iter().filter(|o| o.mine() > 0).count() >= 2,
        "another till took over"
    );
    shutdown_all(&tills).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_origin_fetcher_is_replaced_by_the_next_in_order() {
    let _serial = serial().await;
    let size = 8 * MIB;
    let (data, bundle) = bundle(size, 9);
    let tills = store_of(3).await;
    // The till chosen first gets an origin that never answers.
    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    origin.hang_first_call.store(true, Ordering::SeqCst);
    let origins = origin.for_each(&tills);

    let start = Instant::now();
    fetch_all(&tills, &bundle, &origins).await;
    let elapsed = start.elapsed();

    let stall = test_config().stall_timeout;
    assert!(
        elapsed >= stall,
        "done in {elapsed:?}, before the stall timeout"
    );
    assert!(
        elapsed < stall + Duration::from_secs(10),
        "took {elapsed:?}"
    );
    assert_eq!(
        origin.calls.load(Ordering::SeqCst),
        2,
        "one stalled call, one takeover"
    );
    assert_eq!(origin.served(), size as u64);
    for t in &tills {
        assert_same_file(t, &data);
        t.p2p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_till_serving_corrupt_pieces_is_banned_and_the_others_still_get_good_bytes() {
    let _serial = serial().await;
    let size = 8 * MIB;
    let (data, bundle) = bundle(size, 3);
    let liar = Config {
        corrupt_served_data: true,
        ..test_config()
    };
    let mut tills = vec![seeder(liar, &data, &bundle).await];
    for _ in 0..3 {
        tills.push(till(test_config()).await);
    }
    // Over QUIC only, for once.
    full_mesh_over(&tills, "quic-v1").await;

    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    let origins = origin.for_each(&tills[1..]);
    fetch_all(&tills[1..], &bundle, &origins).await;

    let liar_id = tills[0].peer_id();
    for t in &tills[1..] {
        assert_same_file(t, &data);
        assert_eq!(t.p2p.stats().await.banned_peers, 1);
        assert!(!t.p2p.connected_members().await.contains(&liar_id));
    }
    // It keeps dialing its old peers, and each refuses it as the
    // connection is set up.
    wait_for("the liar cut off", Duration::from_secs(5), || async {
        tills[0].p2p.connected_members().await.is_empty()
    })
    .await;
    // The pieces came from the origin once, then from the honest tills.
    assert!(
        origin.served() as f64 <= 1.05 * size as f64,
        "{}",
        origin.served()
    );
    shutdown_all(&tills).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_get_nothing_and_removed_members_are_disconnected() {
    let _serial = serial().await;
    let size = 4 * MIB;
    let (data, bundle) = bundle(size, 4);
    let seeder = seeder(test_config(), &data, &bundle).await;
    let member = till(test_config()).await;
    let outsider = till(Config {
        origin_fallback_delay: Duration::from_millis(500),
        ..test_config()
    })
    .await;
    seeder
        .p2p
        .set_members(vec![seeder.member(), member.member()])
        .await;
    member
        .p2p
        .set_members(vec![seeder.member(), member.member()])
        .await;
    // The outsider thinks it belongs; the seeder does not.
    outsider
        .p2p
        .set_members(vec![seeder.member(), outsider.member()])
        .await;
    wait_for("the member connected", Duration::from_secs(10), || async {
        member.p2p.connected_members().await == vec![seeder.peer_id()]
    })
    .await;

    let chunks_digest = bundle.chunks.digest();
    let length = bundle.chunks.length();
    let chunk_size = bundle.chunks.chunk_size();
    assert!(
        outsider
            .p2p
            .chunk_list_from_peers(chunks_digest, chunk_size, length)
            .await
            .is_none()
    );
    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    let stats = outsider.fetch(&bundle, &origin).await.unwrap();
    assert_eq!(stats.peer_bytes, 0);
    assert_eq!(stats.origin_bytes, size as u64);
    assert_same_file(&outsider, &data);
    assert_eq!(seeder.p2p.stats().await.served_bytes, 0);
    assert_eq!(
        seeder.p2p.connected_members().await,
        vec![member.peer_id()],
        "the outsider never counts as connected"
    );

    // The member gets the chunk list; once removed from the list, nothing.
    assert!(
        member
            .p2p
            .chunk_list_from_peers(chunks_digest, chunk_size, length)
            .await
            .is_some()
    );
    seeder.p2p.set_members(vec![seeder.member()]).await;
    wait_for(
        "the removed member disconnected",
        Duration::from_secs(5),
        || async {
            seeder.p2p.connected_members().await.is_empty()
                && member.p2p.connected_members().await.is_empty()
        },
    )
    .await;
    // It keeps trying to connect (the seeder is still on its list) but is
    // refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(seeder.p2p.connected_members().await.is_empty());
    assert!(
        member
            .p2p
            .chunk_list_from_peers(chunks_digest, chunk_size, length)
            .await
            .is_none()
    );
    assert_eq!(seeder.p2p.stats().await.served_bytes, 0);
    shutdown_all([&seeder, &member, &outsider]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_reachable_peer_a_till_falls_back_to_the_origin_after_the_delay() {
    let _serial = serial().await;
    let size = 3 * MIB + 17;
    let (data, bundle) = bundle(size, 5);
    let delay = Duration::from_secs(2);
    let lonely = till(Config {
        origin_fallback_delay: delay,
        ..test_config()
    })
    .await;
    // A member that never answers.
    let ghost = Member {
        peer_id: posfleet_p2p::peer_id_from_ed25519_public(ed25519_public(fresh_seed())).unwrap(),
        addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
    };
    lonely.p2p.set_members(vec![lonely.member(), ghost]).await;
    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    let start = Instant::now();
    let stats = lonely.fetch(&bundle, &origin).await.unwrap();
    let first = origin.first_call.lock().unwrap().unwrap();
    assert!(
        first.duration_since(start) >= delay,
        "went to the origin after {:?}",
        first.duration_since(start)
    );
    assert!(start.elapsed() < delay + Duration::from_secs(5));
    assert_eq!(stats.origin_bytes, size as u64);
    assert_same_file(&lonely, &data);
    lonely.p2p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_id_follows_from_the_device_key() {
    let _serial = serial().await;
    let t = till(test_config()).await;
    let from_key = posfleet_p2p::peer_id_from_ed25519_public(ed25519_public(t.seed)).unwrap();
    assert_eq!(t.peer_id(), from_key);
    // Bytes that are not a point on the curve are refused.
    let not_a_key = (0u8..=255)
        .map(|b| [b; 32])
        .find(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_err())
        .unwrap();
    assert!(posfleet_p2p::peer_id_from_ed25519_public(not_a_key).is_err());
    t.p2p.shutdown().await;
}

fn ed25519_public(seed: [u8; 32]) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_till_resumes_from_its_sidecar() {
    let _serial = serial().await;
    let size = 20 * MIB;
    let (data, bundle) = bundle(size, 6);
    let config = Config {
        origin_fallback_delay: Duration::ZERO,
        ..test_config()
    };
    let first = till(config.clone()).await;
    let origin = FakeOrigin::new(data.clone(), &bundle, 20 * MIB as u64);
    let dest = first.dest();
    let fetch = first
        .p2p
        .fetch(bundle.clone(), &dest, Arc::new(origin.clone()), |_| {});
    let stop = async {
        wait_for("part of the bundle", Duration::from_secs(10), || async {
            origin.served() >= 8 * MIB as u64
        })
        .await;
        first.p2p.shutdown().await;
    };
    let (result, ()) = tokio::join!(fetch, stop);
    assert!(result.is_err(), "the fetch stopped with its till");
    let Till {
        task, dir, seed, ..
    } = first;
    task.await.unwrap();
    let before = origin.served();
    assert!(std::fs::exists(dir.path().join("bundle.pieces")).unwrap());

    // The same device starts again.
    let again = till_with(seed, config, dir).await;
    let origin2 = FakeOrigin::new(data.clone(), &bundle, 0);
    let resumed_at = Arc::new(AtomicU64::new(u64::MAX));
    let r = resumed_at.clone();
    let stats = again
        .p2p
        .fetch(
            bundle,
            &again.dest(),
            Arc::new(origin2.clone()),
            move |bytes| {
                let _ = r.compare_exchange(u64::MAX, bytes, Ordering::SeqCst, Ordering::SeqCst);
            },
        )
        .await
        .unwrap();
    let resumed = resumed_at.load(Ordering::SeqCst);
    println!(
        "first run took {before} bytes, restart resumed at {resumed}, fetched {}",
        origin2.served()
    );
    assert!(resumed + MIB as u64 >= before, "kept what was verified");
    assert_eq!(stats.origin_bytes, size as u64 - resumed);
    assert_same_file(&again, &data);
    again.p2p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chunk_list_comes_from_a_peer_and_a_wrong_one_is_rejected() {
    let _serial = serial().await;
    let (data, bundle) = bundle(5 * MIB + 3, 7);
    let honest = seeder(test_config(), &data, &bundle).await;
    let liar = Config {
        corrupt_served_data: true,
        ..test_config()
    };
    let liar = seeder(liar, &data, &bundle).await;
    let asks_honest = till(test_config()).await;
    let asks_liar = till(test_config()).await;
    for (server, client) in [(&honest, &asks_honest), (&liar, &asks_liar)] {
        let both = vec![server.member(), client.member()];
        server.p2p.set_members(both.clone()).await;
        client.p2p.set_members(both).await;
        wait_for("connected", Duration::from_secs(10), || async {
            client.p2p.connected_members().await.len() == 1
        })
        .await;
    }
    // Give the announcements a moment, then ask.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = &bundle.chunks;
    let got = asks_honest
        .p2p
        .chunk_list_from_peers(c.digest(), c.chunk_size(), c.length())
        .await;
    assert_eq!(got.as_ref(), Some(c));
    // Asking with the wrong length is the asker's mistake: no list, no ban.
    assert!(
        asks_honest
            .p2p
            .chunk_list_from_peers(c.digest(), c.chunk_size(), c.length() + 2 * MIB as u64)
            .await
            .is_none()
    );
    assert_eq!(asks_honest.p2p.stats().await.banned_peers, 0);

    assert!(
        asks_liar
            .p2p
            .chunk_list_from_peers(c.digest(), c.chunk_size(), c.length())
            .await
            .is_none()
    );
    assert_eq!(asks_liar.p2p.stats().await.banned_peers, 1);
    assert!(asks_liar.p2p.connected_members().await.is_empty());
    shutdown_all([&honest, &liar, &asks_honest, &asks_liar]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_already_here_is_copied_without_the_network() {
    let _serial = serial().await;
    let (data, bundle) = bundle(3 * MIB + 5, 10);
    let t = till(Config {
        origin_fallback_delay: Duration::ZERO,
        ..test_config()
    })
    .await;
    let installed = t.dir.path().join("installed");
    std::fs::write(&installed, &data[..]).unwrap();
    t.p2p.share(bundle.clone(), &installed).await.unwrap();
    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    let stats = t.fetch(&bundle, &origin).await.unwrap();
    assert_eq!(stats, FetchStats::default());
    assert_eq!(origin.served(), 0);
    assert_same_file(&t, &data);
    // Fetching into the shared file itself finds it whole.
    let stats = t
        .p2p
        .fetch(bundle, &installed, Arc::new(origin.clone()), |_| {})
        .await
        .unwrap();
    assert_eq!(stats, FetchStats::default());
    assert_eq!(std::fs::read(&installed).unwrap(), data[..]);
    t.p2p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_a_peer_are_capped() {
    let _serial = serial().await;
    let size = 6 * MIB;
    let (data, bundle) = bundle(size, 8);
    let capped = Config {
        upload_limit_bytes_per_second_per_peer: 4 * MIB as u64,
        ..test_config()
    };
    let seeder = seeder(capped, &data, &bundle).await;
    let fetcher = till(test_config()).await;
    let tills = vec![seeder, fetcher];
    full_mesh(&tills).await;
    let origin = FakeOrigin::new(data.clone(), &bundle, 0);
    let start = Instant::now();
    let stats = tills[1].fetch(&bundle, &origin).await.unwrap();
    let elapsed = start.elapsed();
    // One piece of burst, then 4 MiB/s: 5 MiB take 1.25 s at least.
    assert!(elapsed >= Duration::from_millis(1200), "took {elapsed:?}");
    assert_eq!(stats.peer_bytes, size as u64);
    assert_same_file(&tills[1], &data);
    shutdown_all(&tills).await;
}
