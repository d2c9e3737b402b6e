//! Storage through sqlx's `Any` driver: SQLite (the default, a file in the data
//! dir, WAL mode) or PostgreSQL. Every query here is written once in SQL both
//! accept (`$N` parameters, `ON CONFLICT`, `RETURNING`, `UPDATE … FROM`);
//! statements built at run time use `Placeholders`. The conformance suites in
//! `tests/` run against both.
//! Timestamps are UTC milliseconds since the Unix epoch.
//!
//! One file per table family: `stores`, `enrollment`, `devices`, `desired`
//! (assignments and reported bundle state), `repository` (signed metadata and
//! bundles), `events`, `rollouts`, `audit` (with admin tokens), `users` (with
//! their sessions), `webhooks`, `logs` (logs on demand).
//! This one holds the pool, the migrations and the helpers for statements
//! built at run time; its re-exports are the records' public paths.

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;

mod assignments;
mod audit;
mod desired;
mod devices;
mod enrollment;
mod events;
mod logs;
mod repository;
pub mod rollouts;
mod signals;
mod stats;
mod stores;
mod users;
mod webhooks;

pub use assignments::{Decision, HeldAssignmentRecord, HeldState, NewHeldAssignment};
pub use audit::{
    AUDIT_PENDING, AUDIT_ROW_OVERHEAD_BYTES, AdminTokenInfo, AdminTokenRecord,
    AdminTokenRevocation, AuditRecord, NewAdminToken, NewAuditEntry, UNAUTHENTICATED_ACTOR,
};
pub use desired::{
    AssignTarget, BundleStatusRecord, DesiredBundleRecord, StoreDesiredState, StorePeerRecord,
    TransferRecord, merge_desired, peers_digest,
};
pub use devices::{
    CertificateRecord, DeviceAuth, DeviceFilter, DeviceRecord, HealthRecord, HeartbeatRecord,
    PeripheralRecord, RenewalRecord, RevokedRecord, StatusFilter, is_online,
};
pub use enrollment::{EnrollError, EnrollmentTokenRecord, NewDevice};
pub use events::{EventRecord, MAX_EVENTS_PER_PAGE, NewEvent};
pub use logs::{LogLineRecord, LogRequestRecord, LogRequestState, NewLogRequest};
pub use repository::{BundleRecord, MetadataRecord, OnlineSigningLock, SealedKey};
pub use signals::{AnalysedDevice, DeviceSignals, SignalMinuteRecord, StoredMinute};
pub use stats::{ActiveRollout, FleetSnapshot, StoreCounts};
pub use stores::{StoreRecord, WindowRecord};
pub use users::{FinishedSetup, NewSession, NewUser, SessionRecord, UserChange, UserRecord};
pub use webhooks::{AttemptRecord, DeliveryRecord, DeliveryState, NewDelivery, WebhookRecord};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The newest migration this binary has: the schema version of a database
/// it has started on, and the newest a backup it restores may have.
pub fn known_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    // A password may also come as a query parameter (`?password=…`).
    if let Some((base, query)) = url.split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        return format!("{}?{}", redact_url(base), query.join("&"));
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Parameters of statements built at run time: `$1, $2, …` on PostgreSQL,
/// plain `?` on SQLite, whose parser looks every *named* parameter up in the
/// list of those seen before (quadratic in a statement with thousands of
/// them). Parameters must appear in the SQL in the order they are bound.
struct Placeholders {
    backend: Backend,
    count: usize,
}

impl Placeholders {
    fn new(backend: Backend) -> Placeholders {
        Placeholders { backend, count: 0 }
    }

    fn next(&mut self) -> String {
        self.count += 1;
        match self.backend {
            Backend::Sqlite => "?".to_string(),
            Backend::Postgres => format!("${}", self.count),
        }
    }
}

/// A query parameter whose type is chosen at run time.
enum Param {
    Text(String),
    Int(i64),
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for param in params {
        query = match param {
            Param::Text(s) => query.bind(s),
            Param::Int(i) => query.bind(i),
        };
    }
    query
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// The fleet's database. Cheap to clone (a pool handle).
#[derive(Clone, Debug)]
pub struct Storage {
    pool: AnyPool,
    backend: Backend,
    /// The database's URL on PostgreSQL, where replicas tell each other of
    /// changes (`LISTEN`/`NOTIFY`, see `crate::changes`).
    postgres_url: Option<Arc<str>>,
    /// Connections given back to the pool: one per statement run outside a
    /// transaction, one per transaction (`posfleet_database_connection_uses_total`).
    uses: prometheus::IntCounter,
    /// Events committed, by kind (`posfleet_rollout_events_total`).
    events: prometheus::IntCounterVec,
}

/// Runs the migrations the database has not seen yet. A database a newer
/// binary already migrated further (a rolling upgrade in progress, or one
/// rolled back) is used as it is when its `schema_compatibility` floor
/// allows this binary, and refused with [`Error::SchemaTooNew`] when not.
async fn migrate(pool: &sqlx::AnyPool) -> Result<(), Error> {
    let known = known_schema_version();
    // No table yet: a new database.
    let applied: i64 = sqlx::query("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
        .ok()
        .and_then(|row| row.try_get::<Option<i64>, _>(0).ok().flatten())
        .unwrap_or(0);
    if applied <= known {
        MIGRATOR.run(pool).await?;
        return Ok(());
    }
    let oldest_compatible: i64 =
        sqlx::query("SELECT oldest_compatible_migration FROM schema_compatibility WHERE id = 1")
            .fetch_one(pool)
            .await?
            .try_get(0)?;
    if oldest_compatible > known {
        return Err(Error::SchemaTooNew {
            applied,
            known,
            oldest_compatible,
        });
    }
    tracing::warn!(
        applied,
        known,
        "The database was migrated by a newer posfleet-control-plane; this one runs on it \
         (its schema stays compatible) until it is upgraded too."
    );
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

impl Storage {
    /// Opens the database and runs the migrations it has not seen yet
    /// (see [`migrate`] for a database a newer binary migrated).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Storage, Error> {
        sqlx::any::install_default_drivers();
        let open_error = |source| Error::DatabaseOpen {
            url: redact_url(url),
            source,
        };
        let backend = Backend::of_url(url)
            .ok_or_else(|| open_error(sqlx::Error::Configuration("unknown scheme".into())))?;
        let uses = prometheus::IntCounter::new(
            "posfleet_database_connection_uses_total",
            "Database connections taken from the pool and given back: one per statement \
             run outside a transaction, one per transaction.",
        )
        .expect("static metric definition is valid");
        let events = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "posfleet_rollout_events_total",
                "Rollout and store events committed, by kind (rollout.started, rollout.paused, …).",
            ),
            &["event"],
        )
        .expect("static metric definition is valid");
        let counted = uses.clone();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_release(move |_conn, _meta| {
                counted.inc();
                Box::pin(async { Ok(true) })
            })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the single writer. FULL
                        // syncs the WAL at every commit, so an acknowledged
                        // write (an enrollment: the agent never enrolls
                        // again) survives a power cut, not only a crash.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA busy_timeout = 5000",
                            // 64 MiB of pages per connection (the default is
                            // 2 MiB): a large fleet's device rows stay in
                            // memory instead of being read for every write.
                            "PRAGMA cache_size = -65536",
                        ] {
                            conn.execute(pragma).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(open_error)?;
        migrate(&pool).await?;
        Ok(Storage {
            pool,
            backend,
            postgres_url: (backend == Backend::Postgres).then(|| Arc::from(url)),
            uses,
            events,
        })
    }

    /// Where to `LISTEN` for other replicas' changes: `Some` on PostgreSQL.
    pub(crate) fn postgres_url(&self) -> Option<&str> {
        self.postgres_url.as_deref()
    }

    /// Tells every replica listening on `channel` (PostgreSQL `NOTIFY`;
    /// nothing to do on SQLite, which one process serves). Sent after the
    /// change committed; a failure is logged, and the other replicas'
    /// caches expire by themselves.
    pub(crate) async fn notify(&self, channel: &str, payload: &str) {
        if self.backend != Backend::Postgres {
            return;
        }
        // Wrapped: the Any driver cannot decode pg_notify's `void`.
        let sent = sqlx::query("SELECT 1 FROM (SELECT pg_notify($1, $2)) AS sent")
            .bind(channel)
            .bind(payload)
            .execute(&self.pool)
            .await;
        if let Err(error) = sent {
            tracing::warn!(%error, channel, payload, "Cannot tell the other replicas of a change.");
        }
    }

    /// The counter of connection uses, for `/metrics`.
    pub fn connection_uses(&self) -> &prometheus::IntCounter {
        &self.uses
    }

    /// The counter of committed events by kind, for `/metrics`.
    pub fn rollout_events(&self) -> &prometheus::IntCounterVec {
        &self.events
    }

    /// Counts events whose transaction committed.
    fn count_events(&self, events: &[NewEvent]) {
        for event in events {
            self.events.with_label_values(&[&event.kind]).inc();
        }
    }

    /// Closes every connection (waits for queries in flight).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Succeeds when the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(
            redact_url("sqlite://a.db?mode=rwc"),
            "sqlite://a.db?mode=rwc"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=u&password=secret&sslmode=require"),
            "postgres://db/x?user=u&password=***&sslmode=require"
        );
    }

    /// A power cut must not lose an acknowledged write (an enrollment: the
    /// agent never enrolls again): every pooled SQLite connection syncs the
    /// WAL at each commit.
    #[tokio::test]
    async fn sqlite_commits_survive_a_power_cut() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let storage = Storage::connect(&url, 2).await.unwrap();
        // Both connections of the pool at once.
        let mut conns = vec![
            storage.pool.acquire().await.unwrap(),
            storage.pool.acquire().await.unwrap(),
        ];
        for conn in &mut conns {
            let level: i64 = sqlx::query("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
            assert_eq!(level, 2, "synchronous = FULL");
        }
        drop(conns);
        storage.close().await;
    }

    /// What in a migration breaks the binaries of the version before it,
    /// which keep running during a rolling upgrade.
    fn breaks_older_binaries(sql: &str) -> Vec<String> {
        let code: String = sql
            .lines()
            .map(|line| line.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
            .to_uppercase();
        let mut found = Vec::new();
        for statement in code.split(';') {
            let words: Vec<&str> = statement.split_whitespace().collect();
            let text = words.join(" ");
            for breaking in [
                "DROP TABLE",
                "DROP COLUMN",
                "RENAME",
                "ALTER COLUMN",
                "DROP VIEW",
            ] {
                if text.contains(breaking) {
                    found.push(format!("{breaking} in `{text}`"));
                }
            }
            if text.contains("ADD COLUMN") && text.contains("NOT NULL") && !text.contains("DEFAULT")
            {
                found.push(format!("a NOT NULL column without a default in `{text}`"));
            }
        }
        found
    }

    #[test]
    fn migrations_keep_the_schema_usable_by_the_version_before_or_raise_the_floor() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("migrations dir") {
            let path = entry.expect("dir entry").path();
            let sql = std::fs::read_to_string(&path).expect("migration text");
            let raises_floor = sql.contains("UPDATE schema_compatibility");
            let breaking = breaks_older_binaries(&sql);
            assert!(
                breaking.is_empty() || raises_floor,
                "{} breaks the binaries of the version before it ({breaking:?}) without \
                 raising schema_compatibility.oldest_compatible_migration",
                path.display()
            );
            checked += 1;
        }
        assert_eq!(
            checked,
            MIGRATOR.iter().count(),
            "every migration is checked"
        );
    }

    #[test]
    fn the_check_finds_what_breaks_older_binaries() {
        assert!(
            breaks_older_binaries("ALTER TABLE a ADD COLUMN b TEXT NOT NULL DEFAULT '';")
                .is_empty()
        );
        assert!(
            breaks_older_binaries("-- DROP TABLE a in a comment\nCREATE TABLE b (c TEXT);")
                .is_empty()
        );
        assert_eq!(
            breaks_older_binaries("ALTER TABLE a\n  DROP   COLUMN b;").len(),
            1
        );
        assert_eq!(breaks_older_binaries("ALTER TABLE a RENAME TO b;").len(), 1);
        assert_eq!(
            breaks_older_binaries("ALTER TABLE a ADD COLUMN b TEXT NOT NULL;").len(),
            1
        );
    }
}
