//! The lifecycle taking a release from a delta against the version the
//! till has, with real bundles, a real repository client and slots: a
//! delta that rebuilds the release saves its bytes; one that does not
//! (signed, but made against other bytes) is caught by the release's
//! signed hash before anything is staged, and the till fetches the whole
//! release instead and says why.

use chrono::Utc;
use posfleet_agent::fetch::{Download, Fetcher, Received};
use posfleet_agent::install::{Outcome, Slots};
use posfleet_agent::repository::{RepoError, RepositoryClient, Timeouts};
use posfleet_bundle::chunks::ChunkList;
use posfleet_bundle::client::{Limits, VerifiedTarget};
use posfleet_bundle::manifest::Kind;
use posfleet_proto::v1;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod common;

/// Serves targets from memory, as the origin would (the bytes as signed),
/// and remembers which were fetched.
struct MemoryFetcher {
    files: HashMap<String, Vec<u8>>,
    lists: HashMap<String, ChunkList>,
    fetched: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Fetcher for MemoryFetcher {
    async fn chunk_list(&self, target: &VerifiedTarget) -> Result<ChunkList, RepoError> {
        Ok(self.lists[target.name()].clone())
    }

    async fn fetch(&self, download: Download<'_>) -> Result<Received, RepoError> {
        let name = download.target.name().to_string();
        let bytes = &self.files[&name];
        std::fs::write(download.dest, bytes).unwrap();
        (download.progress)(bytes.len() as u64);
        self.fetched.lock().unwrap().push(name);
        Ok(Received {
            from_origin: bytes.len() as u64,
            from_peers: 0,
        })
    }
}

/// Packs a bundle of pos-app `version` whose `lib.bin` holds `library`,
/// into `<dir>/<tag>.bundle`.
fn bundle(dir: &Path, tag: &str, version: &str, library: &[u8]) -> PathBuf {
    let src = dir.join(tag);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("posfleet-bundle.toml"),
        format!(
            "name = \"pos-app\"\nversion = \"{version}\"\nkind = \"software\"\nhardware = [\"*\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(src.join("lib.bin"), library).unwrap();
    let file = src.with_extension("bundle");
    posfleet_bundle::archive::build(&src, &file).unwrap();
    file
}

/// 1.0.0 installed; 1.1.0 published (its library one byte different),
/// with the delta made from `delta_to` (1.1.0's bundle, or another); the
/// lifecycle asked for 1.1.0. Returns its last status of pos-app once it
/// is installed, what it fetched, and the folder holding the data dir
/// (`data`).
async fn take_release_with_delta(
    good_delta: bool,
) -> (v1::BundleStatus, Vec<String>, tempfile::TempDir) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    let data_dir = dir.join("data");
    let old = common::noise(7, 3 << 20);
    let mut new = old.clone();
    new[1 << 20] ^= 0xff;
    let base = bundle(&dir, "base", "1.0.0", &old);
    let result = bundle(&dir, "result", "1.1.0", &new);
    // Signed as the delta to 1.1.0, but rebuilding other bytes.
    let other = bundle(&dir, "other", "1.1.0", &common::noise(9, 3 << 20));
    let delta = dir.join("pos-app.delta");
    let made_to = if good_delta { &result } else { &other };
    posfleet_bundle::delta::make_from_bundles(&base, made_to, &delta).unwrap();

    let mut repo = common::TestRepo::default();
    let mut files = HashMap::new();
    for (name, path) in [("pos-app/1.0.0", &base), ("pos-app/1.1.0", &result)] {
        let bytes = std::fs::read(path).unwrap();
        repo.add(name, &bytes);
        files.insert(name.to_string(), bytes);
    }
    let delta_name = "pos-app/1.1.0/from-1.0.0.delta";
    let delta_bytes = std::fs::read(&delta).unwrap();
    repo.add_delta(delta_name, "pos-app/1.0.0", "pos-app/1.1.0", &delta_bytes);
    files.insert(delta_name.to_string(), delta_bytes);
    let expires = Utc::now() + chrono::Duration::hours(1);
    let origin = common::FileServer::start(repo.publish(1, expires).files());
    let mut repository = RepositoryClient::open(
        &repo.write_root(&dir),
        &data_dir,
        &origin.url(),
        Limits::default(),
        Timeouts::default(),
    )
    .unwrap();
    repository.refresh().await.unwrap();

    let slots = Slots::open(&data_dir).unwrap();
    let installed = slots
        .install("pos-app", &"1.0.0".parse().unwrap(), Kind::Software, &base)
        .await
        .unwrap();
    assert!(matches!(installed, Outcome::Installed), "{installed:?}");
    drop(slots);

    let fetcher = Arc::new(MemoryFetcher {
        files,
        lists: repo.chunk_lists.clone().into_iter().collect(),
        fetched: Mutex::new(Vec::new()),
    });
    let mut running =
        common::Running::start(&data_dir, repository, fetcher.clone(), "1.1.0", false);
    let status = running
        .status_where(30, |s| {
            s.phase == v1::BundlePhase::Installed as i32 && s.active_version == "1.1.0"
        })
        .await;
    running.stop().await;
    let installed = std::fs::read(data_dir.join("slots/pos-app/current/lib.bin")).unwrap();
    assert!(installed == new, "the installed library is not 1.1.0's");
    let fetched = fetcher.fetched.lock().unwrap().clone();
    (status, fetched, temp)
}

#[tokio::test]
async fn a_delta_from_the_installed_version_saves_the_release_bytes() {
    let (status, fetched, temp) = take_release_with_delta(true).await;
    assert_eq!(fetched, ["pos-app/1.1.0/from-1.0.0.delta"]);
    assert!(status.bytes_saved_by_delta > 2 << 20, "{status:?}");
    assert_eq!(status.delta_error, "", "{status:?}");
    // Nothing of the rebuild is left beside the downloads.
    let left: Vec<_> = std::fs::read_dir(temp.path().join("data/downloads"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_delta_that_does_not_rebuild_the_release_falls_back_to_the_whole_bundle() {
    let (status, fetched, _temp) = take_release_with_delta(false).await;
    assert_eq!(
        fetched,
        ["pos-app/1.1.0/from-1.0.0.delta", "pos-app/1.1.0"],
        "the delta, then the whole release"
    );
    assert_eq!(status.bytes_saved_by_delta, 0, "{status:?}");
    assert!(
        status
            .delta_error
            .starts_with("the delta pos-app/1.1.0/from-1.0.0.delta does not rebuild pos-app/1.1.0"),
        "{status:?}"
    );
}
