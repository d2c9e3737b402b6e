//! Events: numbered in commit order without gaps, whatever the number of
//! concurrent writers, and read back with a cursor, on SQLite and (with
//! --ignored) PostgreSQL.

mod common;

use common::{Backend, assert_status, setup};
use posfleet_control_plane::storage::{NewEvent, Storage};
use posfleet_proto::v1;
use std::time::Duration;
use tonic::Code;

/// Writers commit events in transactions that stay open a while, some roll
/// back; a reader polling `seq > cursor` meanwhile must see every committed
/// event exactly once, in seq order, with no seq skipped.
async fn a_polling_reader_sees_every_committed_event_once(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let storage = Storage::connect(&s.db.url, 8).await.unwrap();
    const WRITERS: usize = 4;
    const EVENTS_PER_WRITER: usize = 15;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let storage = storage.clone();
            tokio::spawn(async move {
                let mut committed = 0;
                for i in 0..EVENTS_PER_WRITER {
                    let mut tx = storage.begin().await.unwrap();
                    let events = vec![
                        NewEvent::new("test.a", &format!("w{w}"), "", serde_json::json!({"i": i})),
                        NewEvent::new("test.b", &format!("w{w}"), "d", serde_json::json!({})),
                    ];
                    let seqs = storage.append_events(&mut tx, 1, &events).await.unwrap();
                    assert_eq!(
                        seqs[1],
                        seqs[0] + 1,
                        "a transaction's events are consecutive"
                    );
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    if i % 5 == 4 {
                        tx.rollback().await.unwrap();
                    } else {
                        tx.commit().await.unwrap();
                        committed += 2;
                    }
                }
                committed
            })
        })
        .collect();
    let reader = {
        let storage = storage.clone();
        tokio::spawn(async move {
            let mut cursor = 0u64;
            let mut seen = Vec::new();
            let expected = WRITERS * EVENTS_PER_WRITER * 2 * 4 / 5;
            for _ in 0..2000 {
                for event in storage.events_after(cursor, None, 7).await.unwrap() {
                    assert_eq!(event.seq, cursor + 1, "no event skipped or repeated");
                    cursor = event.seq;
                    seen.push(event);
                }
                if seen.len() == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        })
    };
    let mut committed = 0;
    for writer in writers {
        committed += writer.await.unwrap();
    }
    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), committed);
    assert_eq!(storage.last_event_seq().await.unwrap(), committed as u64);
    // Per rollout, the cursor works the same way.
    let w0 = storage.events_after(0, Some("w0"), 1000).await.unwrap();
    assert_eq!(w0.len(), EVENTS_PER_WRITER * 2 * 4 / 5);
    assert!(w0.windows(2).all(|p| p[0].seq < p[1].seq));
    assert!(w0.iter().all(|e| e.rollout_id == "w0"));
    storage.close().await;
    s.finish().await;
}

async fn list_events_pages_with_a_cursor(backend: Backend) {
    let s = setup(backend, |_| {}).await;
    let mut admin = s.server.admin().await;
    let list = |after_seq, rollout_id: &str, limit| v1::ListEventsRequest {
        rollout_id: rollout_id.into(),
        after_seq,
        limit,
    };
    let req = admin.req(list(0, "", 0));
    assert!(
        admin
            .client
            .list_events(req)
            .await
            .unwrap()
            .into_inner()
            .events
            .is_empty()
    );
    let storage = Storage::connect(&s.db.url, 2).await.unwrap();
    let mut tx = storage.begin().await.unwrap();
    let events: Vec<NewEvent> = (0..150)
        .map(|i| {
            let rollout = if i % 3 == 0 { "ro-a" } else { "ro-b" };
            NewEvent::new("test.kind", rollout, "dev-1", serde_json::json!({ "i": i }))
        })
        .collect();
    storage.append_events(&mut tx, 42, &events).await.unwrap();
    tx.commit().await.unwrap();

    let page = |admin: &mut common::Admin, request| {
        let req = admin.req(request);
        let mut client = admin.client.clone();
        async move { client.list_events(req).await.map(|r| r.into_inner().events) }
    };
    let first = page(&mut admin, list(0, "", 0)).await.unwrap();
    assert_eq!(first.len(), 100, "the default page");
    assert_eq!(first[0].seq, 1);
    assert_eq!(first[0].at_unix_ms, 42);
    assert_eq!(first[0].kind, "test.kind");
    assert_eq!(first[0].device_id, "dev-1");
    assert_eq!(first[0].data_json, r#"{"i":0}"#);
    let rest = page(&mut admin, list(100, "", 1000)).await.unwrap();
    assert_eq!(rest.first().map(|e| e.seq), Some(101));
    assert_eq!(rest.len(), 50);
    let a = page(&mut admin, list(0, "ro-a", 1000)).await.unwrap();
    assert_eq!(a.len(), 50);
    assert!(a.iter().all(|e| e.rollout_id == "ro-a"));
    let after = page(&mut admin, list(150, "", 10)).await.unwrap();
    assert!(after.is_empty());
    assert_status(
        page(&mut admin, list(0, "bad\nid", 10)).await,
        Code::InvalidArgument,
        "rollout_id",
    );
    admin.token = None;
    assert_status(
        page(&mut admin, list(0, "", 10)).await,
        Code::Unauthenticated,
        "token",
    );
    storage.close().await;
    s.finish().await;
}

on_both_backends!(
    a_polling_reader_sees_every_committed_event_once,
    list_events_pages_with_a_cursor,
);
