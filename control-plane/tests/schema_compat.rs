//! Rolling upgrades: a replica of the version before keeps starting on a
//! database a newer replica migrated, unless that schema says it no longer
//! can.

mod common;

use common::{Backend, TestDb};
use posfleet_control_plane::storage::{Storage, known_schema_version};
use sqlx::Executor;

/// Makes the database look migrated by a binary that knows one migration
/// more than this one.
async fn apply_a_newer_migration(backend: Backend, url: &str) -> i64 {
    let newer = known_schema_version() + 1;
    let checksum = match backend {
        Backend::Sqlite => "x'00'",
        Backend::Postgres => "decode('00', 'hex')",
    };
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url)
        .await
        .expect("connect");
    conn.execute(
        format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ({newer}, 'from a newer release', TRUE, {checksum}, 0)"
        )
        .as_str(),
    )
    .await
    .expect("record a newer migration");
    newer
}

async fn set_floor(url: &str, oldest_compatible: i64) {
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url)
        .await
        .expect("connect");
    conn.execute(
        format!(
            "UPDATE schema_compatibility SET oldest_compatible_migration = {oldest_compatible}"
        )
        .as_str(),
    )
    .await
    .expect("raise the floor");
}

async fn an_older_binary_runs_on_a_compatible_newer_schema_and_refuses_an_incompatible_one(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(backend, dir.path()).await;
    Storage::connect(&db.url, 2)
        .await
        .expect("a new database is migrated")
        .close()
        .await;
    let newer = apply_a_newer_migration(backend, &db.url).await;

    // The schema of the release after this one still serves this binary.
    let storage = Storage::connect(&db.url, 2)
        .await
        .expect("a compatible newer schema is used as it is");
    storage.ping().await.unwrap();
    storage.close().await;

    // That release raised the floor above what this binary knows.
    set_floor(&db.url, newer).await;
    let refused = Storage::connect(&db.url, 2)
        .await
        .expect_err("an incompatible newer schema is refused");
    let message = refused.to_string();
    assert!(
        message.contains(&format!("migration {newer}"))
            && message.contains(&format!("this one knows {}", newer - 1))
            && message.contains("run a newer version"),
        "{message}"
    );
    db.cleanup().await;
}

on_both_backends!(
    an_older_binary_runs_on_a_compatible_newer_schema_and_refuses_an_incompatible_one
);
