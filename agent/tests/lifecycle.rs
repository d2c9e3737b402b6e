//! The lifecycle task against a real repository client: what it refuses
//! to start, and what it reports for the operator.

use chrono::Utc;
use posfleet_agent::fetch::{Download, Fetcher, Received};
use posfleet_agent::repository::{RepoError, RepositoryClient, Timeouts};
use posfleet_bundle::chunks::ChunkList;
use posfleet_bundle::client::{Limits, VerifiedTarget};
use posfleet_proto::v1;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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
    let mut running = common::Running::start(&data_dir, repository, fetcher.clone(), "1.1.0", true);
    let status = running.status_where(10, |s| !s.error.is_empty()).await;
    // A few more passes, to see that none of them starts a download.
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;

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
