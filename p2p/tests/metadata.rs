//! TUF metadata between tills over real swarms on loopback: served by name
//! from the directory a till saved it in, to members only, within the
//! asker's size limit; unknown names refused; peers answering oversized or
//! unparsable files banned, peers answering parsable but tampered files not
//! (that is for the asker's TUF client to reject).

mod common;

use common::*;
use posfleet_bundle::tuf::{self, Root, Snapshot, Targets, Timestamp};
use posfleet_p2p::{Config, Limits, MetadataError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Writes signed timestamp, snapshot, targets and root version 2 into
/// `<base>/tuf` (a device key next to it, which must never be served);
/// returns the directory.
fn saved_metadata(base: &Path) -> PathBuf {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let dir = base.join("tuf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(base.join("device.key"), b"the till's secret key").unwrap();
    let expires = "2030-01-01T00:00:00Z".to_string();
    let spec = tuf::SPEC_VERSION.to_string();
    let files = [
        (
            "timestamp.json",
            tuf::sign(
                &Timestamp {
                    type_: "timestamp".into(),
                    spec_version: spec.clone(),
                    version: 7,
                    expires: expires.clone(),
                    meta: Default::default(),
                },
                &[&key],
            ),
        ),
        (
            "snapshot.json",
            tuf::sign(
                &Snapshot {
                    type_: "snapshot".into(),
                    spec_version: spec.clone(),
                    version: 7,
                    expires: expires.clone(),
                    meta: Default::default(),
                },
                &[&key],
            ),
        ),
        (
            "targets.json",
            tuf::sign(
                &Targets {
                    type_: "targets".into(),
                    spec_version: spec.clone(),
                    version: 4,
                    expires: expires.clone(),
                    targets: Default::default(),
                },
                &[&key],
            ),
        ),
        (
            "2.root.json",
            tuf::sign(
                &Root {
                    type_: "root".into(),
                    spec_version: spec,
                    consistent_snapshot: true,
                    version: 2,
                    expires,
                    keys: Default::default(),
                    roles: Default::default(),
                },
                &[&key],
            ),
        ),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    dir
}

/// `server` serves the metadata saved under its dir; `client` is a member
/// of its store and connected to it.
async fn pair(server: Config, client: Config) -> (Till, Till, PathBuf) {
    let server = till(server).await;
    let dir = saved_metadata(server.dir.path());
    server.p2p.serve_metadata(&dir).await;
    let client = till(client).await;
    let mut tills = vec![server, client];
    full_mesh(&tills).await;
    let client = tills.pop().unwrap();
    let server = tills.pop().unwrap();
    (server, client, dir)
}

const LIMIT: u64 = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gets_the_saved_metadata_by_name() {
    let _serial = serial().await;
    let (server, client, dir) = pair(test_config(), test_config()).await;
    for name in [
        "timestamp.json",
        "snapshot.json",
        "targets.json",
        "2.root.json",
    ] {
        let got = client
            .p2p
            .metadata_from_peer(server.peer_id(), name, LIMIT)
            .await
            .unwrap();
        assert_eq!(
            got,
            Some(std::fs::read(dir.join(name)).unwrap()),
            "{name} as saved"
        );
    }
    // A root version the peer does not have: the end of the chain.
    let none = client
        .p2p
        .metadata_from_peer(server.peer_id(), "3.root.json", LIMIT)
        .await
        .unwrap();
    assert_eq!(none, None);
    // What is served is what is on disk now.
    let newer = tuf::sign(
        &Timestamp {
            type_: "timestamp".into(),
            spec_version: tuf::SPEC_VERSION.into(),
            version: 8,
            expires: "2031-01-01T00:00:00Z".into(),
            meta: Default::default(),
        },
        &[&ed25519_dalek::SigningKey::from_bytes(&[3; 32])],
    );
    std::fs::write(dir.join("timestamp.json"), &newer).unwrap();
    let got = client
        .p2p
        .metadata_from_peer(server.peer_id(), "timestamp.json", LIMIT)
        .await
        .unwrap();
    assert_eq!(got, Some(newer));
    // A file larger than the asker accepts is not sent: honest peers are
    // not banned for having a bigger file.
    let size = std::fs::metadata(dir.join("targets.json")).unwrap().len();
    let got = client
        .p2p
        .metadata_from_peer(server.peer_id(), "targets.json", size - 1)
        .await
        .unwrap();
    assert_eq!(got, None);
    assert_eq!(server.p2p.stats().await.metadata_served, 5);
    assert_eq!(client.p2p.stats().await.banned_peers, 0);
    // A till that serves nothing answers "not found".
    let got = server
        .p2p
        .metadata_from_peer(client.peer_id(), "timestamp.json", LIMIT)
        .await
        .unwrap();
    assert_eq!(got, None);
    shutdown_all([&server, &client]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_gets_nothing() {
    let _serial = serial().await;
    let server = till(test_config()).await;
    let dir = saved_metadata(server.dir.path());
    server.p2p.serve_metadata(&dir).await;
    let member = till(test_config()).await;
    let outsider = till(test_config()).await;
    let store = vec![server.member(), member.member()];
    server.p2p.set_members(store.clone()).await;
    member.p2p.set_members(store).await;
    // The outsider thinks it belongs; the server does not.
    outsider
        .p2p
        .set_members(vec![server.member(), outsider.member()])
        .await;
    wait_for("the member connected", Duration::from_secs(10), || async {
        member.p2p.connected_members().await == vec![server.peer_id()]
    })
    .await;
    let asked = outsider
        .p2p
        .metadata_from_peer(server.peer_id(), "timestamp.json", LIMIT)
        .await;
    assert!(
        matches!(
            asked,
            Err(MetadataError::Unreachable { .. } | MetadataError::Refused { .. })
        ),
        "{asked:?}"
    );
    // Nor does it get anything from a till that does not list the server.
    let asked = outsider
        .p2p
        .metadata_from_peer(member.peer_id(), "timestamp.json", LIMIT)
        .await;
    assert!(
        matches!(asked, Err(MetadataError::NotAMember { .. })),
        "{asked:?}"
    );
    assert_eq!(server.p2p.stats().await.metadata_served, 0);
    // A member dropped from the list is refused from then on.
    assert!(
        member
            .p2p
            .metadata_from_peer(server.peer_id(), "timestamp.json", LIMIT)
            .await
            .unwrap()
            .is_some()
    );
    server.p2p.set_members(vec![server.member()]).await;
    wait_for(
        "the member disconnected",
        Duration::from_secs(5),
        || async { member.p2p.connected_members().await.is_empty() },
    )
    .await;
    let asked = member
        .p2p
        .metadata_from_peer(server.peer_id(), "timestamp.json", LIMIT)
        .await;
    assert!(asked.is_err(), "{asked:?}");
    assert_eq!(server.p2p.stats().await.metadata_served, 1);
    shutdown_all([&server, &member, &outsider]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_tuf_metadata_are_refused() {
    let _serial = serial().await;
    let (server, client, dir) = pair(test_config(), test_config()).await;
    // Files that exist, next to and inside the directory.
    std::fs::write(dir.join("store_peers.json"), b"{}").unwrap();
    for name in [
        "../device.key",
        "tuf/../../device.key",
        "/etc/passwd",
        "store_peers.json",
        "1.snapshot.json",
        "02.root.json",
        "root.json",
        "",
    ] {
        let asked = client
            .p2p
            .metadata_from_peer(server.peer_id(), name, LIMIT)
            .await;
        match asked {
            Err(MetadataError::NameRefused { name: refused, .. }) => assert_eq!(refused, name),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    // Too long to be a name: refused without asking.
    let long = format!("{}.root.json", "9".repeat(60));
    assert!(matches!(
        client
            .p2p
            .metadata_from_peer(server.peer_id(), &long, LIMIT)
            .await,
        Err(MetadataError::UnknownName { .. })
    ));
    assert_eq!(server.p2p.stats().await.metadata_served, 0);
    // Refusals are no offence: still connected, still served.
    assert_eq!(client.p2p.stats().await.banned_peers, 0);
    assert!(
        client
            .p2p
            .metadata_from_peer(server.peer_id(), "timestamp.json", LIMIT)
            .await
            .unwrap()
            .is_some()
    );
    shutdown_all([&server, &client]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_is_refused_and_its_peer_banned() {
    let _serial = serial().await;
    let liar = || Config {
        corrupt_served_data: true,
        ..test_config()
    };
    // Over the size the request names.
    let (server, client, dir) = pair(liar(), test_config()).await;
    let size = std::fs::metadata(dir.join("timestamp.json")).unwrap().len();
    let asked = client
        .p2p
        .metadata_from_peer(server.peer_id(), "timestamp.json", size - 1)
        .await;
    assert!(
        matches!(asked, Err(MetadataError::BadAnswer { .. })),
        "{asked:?}"
    );
    assert_eq!(client.p2p.stats().await.banned_peers, 1);
    assert!(client.p2p.connected_members().await.is_empty());
    shutdown_all([&server, &client]).await;

    // Over the asker's own frame limit: refused from the frame header.
    let small = Config {
        limits: Limits {
            max_metadata_bytes: 100,
            ..Limits::default()
        },
        ..test_config()
    };
    let (server, client, _) = pair(liar(), small).await;
    let asked = client
        .p2p
        .metadata_from_peer(server.peer_id(), "timestamp.json", LIMIT)
        .await;
    match asked {
        Err(MetadataError::BadAnswer { message, .. }) => {
            assert!(message.contains("size limit"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.p2p.stats().await.banned_peers, 1);
    shutdown_all([&server, &client]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_answers_ban_and_tampered_ones_are_left_to_the_tuf_client() {
    let _serial = serial().await;
    // A till whose saved snapshot is garbage, and one with a timestamp
    // where its targets file should be: neither parses as the role asked.
    type Spoil = fn(&Path);
    let garbage: [(&str, Spoil); 2] = [
        ("snapshot.json", |dir| {
            std::fs::write(dir.join("snapshot.json"), b"{\"signed\": not json").unwrap()
        }),
        ("targets.json", |dir| {
            std::fs::copy(dir.join("timestamp.json"), dir.join("targets.json")).unwrap();
        }),
    ];
    for (name, spoil) in garbage {
        let (server, client, dir) = pair(test_config(), test_config()).await;
        spoil(&dir);
        let asked = client
            .p2p
            .metadata_from_peer(server.peer_id(), name, LIMIT)
            .await;
        assert!(
            matches!(asked, Err(MetadataError::BadAnswer { .. })),
            "{name}: {asked:?}"
        );
        assert_eq!(client.p2p.stats().await.banned_peers, 1, "{name}");
        shutdown_all([&server, &client]).await;
    }

    // Tampered but well formed: handed over (the TUF client rejects it; a
    // peer may hold older metadata, which is no reason to ban).
    let liar = Config {
        corrupt_served_data: true,
        ..test_config()
    };
    let (server, client, dir) = pair(liar, test_config()).await;
    let saved = std::fs::read(dir.join("timestamp.json")).unwrap();
    let got = client
        .p2p
        .metadata_from_peer(server.peer_id(), "timestamp.json", LIMIT)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(got, saved);
    assert_eq!(got.len(), saved.len());
    assert_eq!(client.p2p.stats().await.banned_peers, 0);
    shutdown_all([&server, &client]).await;
}
