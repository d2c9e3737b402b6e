//! The lifecycle task against a real repository client: what it refuses
//! to start, and what it reports for the operator.

use chrono::Utc;
use posfleet_agent::fetch::{Download, Fetcher, Received};
use posfleet_agent::lifecycle::{Clock, Desired, DesiredState, Lifecycle, Report};
use posfleet_agent::repository::{RepoError, RepositoryClient, Timeouts};
use posfleet_bundle::chunks::ChunkList;
use posfleet_bundle::client::{Limits, VerifiedTarget};
use posfleet_bundle::manifest::Kind;
use posfleet_proto::v1;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;

mod common;

/// Counts every call; never delivers a byte.
#[derive(Default)]
struct CountingFetcher {
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl Fetcher for CountingFetcher {
    async fn chunk_list(&self, _target: &VerifiedTarget) -> Result<ChunkList, RepoError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(RepoError::Fetch {
            url: "test".into(),
            message: "no bytes here".into(),
        })
    }

    async fn fetch(&self, _download: Download<'_>) -> Result<Received, RepoError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(RepoError::Fetch {
            url: "test".into(),
            message: "no bytes here".into(),
        })
    }
}

/// The till trusted fresh metadata, then lost the origin; by the time the
/// rollout reaches it, its targets, snapshot and timestamp have expired.
/// Expired metadata vouches for nothing: no download starts (the
/// installed version keeps running), and the report says why.
#[tokio::test]
async fn expired_trust_does_not_start_a_download_while_the_origin_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut repo = common::TestRepo::default();
    repo.add("pos-app/1.1.0", &[7u8; 4096]);
    let expires = Utc::now() + chrono::Duration::seconds(3);
    let origin = common::FileServer::start(repo.publish(1, expires).files());
    let mut repository = RepositoryClient::open(
        &repo.write_root(dir.path()),
        &data_dir,
        &origin.url(),
        Limits::default(),
        Timeouts::default(),
    )
    .unwrap();
    repository.refresh().await.unwrap();

    origin.down.store(true, std::sync::atomic::Ordering::SeqCst);
    while Utc::now() <= expires {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let fetcher = Arc::new(CountingFetcher::default());
    let lifecycle = Lifecycle {
        data_dir: data_dir.clone(),
        hardware_model: "pos-x1".into(),
        repository,
        fetcher: fetcher.clone(),
        clock: Clock::System,
        check_interval: Duration::from_millis(100),
        refresh_interval: Duration::from_secs(3600),
        min_free_disk_bytes: 0,
    };
    let desired = DesiredState {
        bundles: vec![Desired {
            name: "pos-app".into(),
            version: "1.1.0".parse().unwrap(),
            kind: Kind::Software,
            download_ahead: true,
            emergency: true,
            rollback: false,
        }],
        window: None,
    };
    let (_desired_tx, desired_rx) = watch::channel(desired);
    let (report_tx, mut report_rx) = watch::channel(Report::new());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(lifecycle.run(desired_rx, report_tx, async {
        let _ = stop_rx.await;
    }));

    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(s) = report_rx.borrow_and_update().get("pos-app")
                && !s.error.is_empty()
            {
                return s.clone();
            }
            report_rx.changed().await.unwrap();
        }
    })
    .await
    .expect("a status for pos-app");
    // A few more passes, to see that none of them starts a download.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();

    assert_eq!(fetcher.calls.load(Ordering::SeqCst), 0, "{status:?}");
    assert!(
        status.error.starts_with(
            "trust metadata expired; not starting a download until the repository is reachable"
        ),
        "{status:?}"
    );
    // Waiting, not failed: the release itself did nothing wrong.
    assert_eq!(status.phase, v1::BundlePhase::Pending as i32, "{status:?}");
    assert_eq!(status.target_version, "1.1.0");
    assert!(!data_dir.join("slots/pos-app").exists());
}
