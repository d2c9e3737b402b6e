//! Publishing deltas over real gRPC, on SQLite and (with --ignored)
//! PostgreSQL: a delta target naming a published bundle and an earlier
//! published version of it is stored beside them; one that names anything
//! else is refused with the reason, and publishes nothing.

mod common;

use common::{Admin, Backend, assert_status, setup};
use ed25519_dalek::SigningKey;
use posfleet_bundle::chunks;
use posfleet_bundle::manifest::{Kind, Manifest};
use posfleet_bundle::repo;
use posfleet_proto::v1;
use tonic::Code;

fn manifest(version: &str, kind: Kind) -> Manifest {
    Manifest {
        name: "pos-app".into(),
        version: version.parse().unwrap(),
        kind,
        hardware: vec!["pos-x1".into()],
        pre_activate: None,
        health_check: None,
        service: None,
    }
}

/// A delta entry (its bytes arbitrary: the control plane checks what it
/// names, a till what it rebuilds) from `base` to `result` as the current
/// targets metadata has them, the named base's hash replaced by `base_sha`
/// when given.
async fn delta_entry(
    admin: &mut Admin,
    base: &str,
    result: &str,
    kind: Kind,
    bytes: &[u8],
) -> posfleet_bundle::tuf::TargetFile {
    let current = admin.current_targets().await;
    let missing = posfleet_bundle::tuf::TargetFile {
        length: 1,
        hashes: [("sha256".to_string(), "00".repeat(32))].into(),
        custom: None,
    };
    let base_entry = current.targets.get(base).unwrap_or(&missing);
    let result_entry = current.targets.get(result).unwrap_or(&missing);
    let version = result.split_once('/').unwrap().1;
    let digest = chunks::digest_reader(bytes).unwrap();
    repo::delta_target_file(
        &manifest(version, kind),
        &digest,
        (base, base_entry),
        (result, result_entry),
    )
    .unwrap()
}

async fn published(backend: Backend) -> (common::Setup, Admin, SigningKey) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let key = admin.init_repository().await;
    for version in ["1.0.0", "1.1.0"] {
        admin
            .publish(&key, "pos-app", version, Kind::Software, &["pos-x1"])
            .await;
    }
    (s, admin, key)
}

async fn a_delta_is_published_beside_its_bundles(backend: Backend) {
    let (_s, mut admin, key) = published(backend).await;
    let bytes = b"PFDELTA1 a few bytes".repeat(40);
    let entry = delta_entry(
        &mut admin,
        "pos-app/1.0.0",
        "pos-app/1.1.0",
        Kind::Software,
        &bytes,
    )
    .await;
    let delta = admin
        .publish_entry(&key, "pos-app/1.1.0/from-1.0.0.delta", entry, bytes.clone())
        .await
        .unwrap();
    assert_eq!(delta.target, "pos-app/1.1.0/from-1.0.0.delta");
    assert_eq!(
        (delta.name.as_str(), delta.version.as_str()),
        ("pos-app", "1.1.0")
    );
    assert_eq!(delta.delta_from, "1.0.0");
    assert_eq!(delta.length, bytes.len() as u64);

    let listed = admin.list_bundles("pos-app").await;
    let rows: Vec<(&str, &str)> = listed
        .iter()
        .map(|b| (b.target.as_str(), b.delta_from.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("pos-app/1.0.0", ""),
            ("pos-app/1.1.0", ""),
            ("pos-app/1.1.0/from-1.0.0.delta", "1.0.0"),
        ]
    );
}

async fn a_delta_that_names_anything_but_published_versions_is_refused(backend: Backend) {
    let (_s, mut admin, key) = published(backend).await;
    admin
        .publish(&key, "pos-app", "0.9.0", Kind::Software, &["pos-x1"])
        .await;
    let bytes = b"delta".repeat(100);
    let cases = [
        (
            "pos-app/1.0.0",
            "pos-app/1.1.0",
            "pos-app/1.1.0/from-0.9.0.delta",
            Kind::Software,
            "must be named pos-app/1.1.0/from-1.0.0.delta",
        ),
        (
            "pos-app/0.8.0",
            "pos-app/1.1.0",
            "pos-app/1.1.0/from-0.8.0.delta",
            Kind::Software,
            "pos-app/0.8.0 is not published",
        ),
        (
            "pos-app/1.1.0",
            "pos-app/1.0.0",
            "pos-app/1.0.0/from-1.1.0.delta",
            Kind::Software,
            "must rebuild a newer version than pos-app/1.1.0",
        ),
        (
            "pos-app/1.0.0",
            "pos-app/1.1.0",
            "pos-app/1.1.0/from-1.0.0.delta",
            Kind::Catalog,
            "kind, version and hardware must be those of pos-app/1.1.0",
        ),
    ];
    for (base, result, name, kind, expected) in cases {
        let entry = delta_entry(&mut admin, base, result, kind, &bytes).await;
        let refused = admin.publish_entry(&key, name, entry, bytes.clone()).await;
        assert_status(refused, Code::InvalidArgument, expected);
    }
    // A base whose hash is not the published one (a till's copy would not
    // be the bundle the delta applies to).
    let mut entry = delta_entry(
        &mut admin,
        "pos-app/1.0.0",
        "pos-app/1.1.0",
        Kind::Software,
        &bytes,
    )
    .await;
    let mut info: posfleet_bundle::tuf::BundleInfo =
        serde_json::from_value(entry.custom.clone().unwrap()).unwrap();
    info.delta.as_mut().unwrap().base_sha256 = "ab".repeat(32);
    entry.custom = Some(serde_json::to_value(info).unwrap());
    let refused = admin
        .publish_entry(&key, "pos-app/1.1.0/from-1.0.0.delta", entry, bytes.clone())
        .await;
    assert_status(
        refused,
        Code::InvalidArgument,
        "which is not the published one",
    );

    let listed = admin.list_bundles("pos-app").await;
    assert!(
        listed.iter().all(|b| b.delta_from.is_empty()),
        "nothing was published: {listed:?}"
    );
    assert_eq!(admin.current_targets().await.targets.len(), 3);
}

/// What a publisher makes deltas from: a published bundle's bytes, whole
/// and exact, over several messages; an unknown target is not found.
async fn a_published_bundle_downloads_as_it_was_published(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let key = admin.init_repository().await;
    // 3 MiB and a bit: more than one message.
    let bytes: Vec<u8> = (0..(3 << 20) + 17).map(|i: u32| (i % 251) as u8).collect();
    let digest = chunks::digest_reader(bytes.as_slice()).unwrap();
    let entry = repo::target_file(&manifest("1.0.0", Kind::Software), &digest);
    admin
        .publish_entry(&key, "pos-app/1.0.0", entry, bytes.clone())
        .await
        .unwrap();
    let download = |target: &str| {
        let req = admin.req(v1::DownloadBundleRequest {
            target: target.into(),
        });
        let mut client = admin.client.clone();
        async move {
            let mut stream = client.download_bundle(req).await?.into_inner();
            let (mut got, mut messages) = (Vec::new(), 0);
            while let Some(chunk) = stream.message().await? {
                assert!(chunk.data.len() <= 1 << 20);
                got.extend_from_slice(&chunk.data);
                messages += 1;
            }
            Ok::<_, tonic::Status>((got, messages))
        }
    };
    let (got, messages) = download("pos-app/1.0.0").await.unwrap();
    assert!(got == bytes, "{} bytes back of {}", got.len(), bytes.len());
    assert!(messages >= 4, "{messages} messages");
    assert_status(
        download("pos-app/9.9.9").await,
        Code::NotFound,
        "pos-app/9.9.9 is not published",
    );
}

on_both_backends!(
    a_delta_is_published_beside_its_bundles,
    a_delta_that_names_anything_but_published_versions_is_refused,
    a_published_bundle_downloads_as_it_was_published,
);
