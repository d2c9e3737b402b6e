//! Storage through sqlx's `Any` driver: SQLite (the default, a file in the data
//! dir, WAL mode) or PostgreSQL. Every query here is written once in SQL both
//! accept (`$N` parameters, `ON CONFLICT`, `RETURNING`, `UPDATE … FROM`);
//! statements built at run time use `Placeholders`. The conformance suites in
//! `tests/` run against both.
//! Timestamps are UTC milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::error::Error;

mod events;
pub use events::{EventRecord, MAX_EVENTS_PER_PAGE, NewEvent};
mod audit;
pub mod rollouts;
pub use audit::{
    AUDIT_PENDING, AUDIT_ROW_OVERHEAD_BYTES, AdminTokenInfo, AdminTokenRecord,
    AdminTokenRevocation, AuditRecord, NewAuditEntry, UNAUTHENTICATED_ACTOR,
};
mod webhooks;
pub use webhooks::{AttemptRecord, DeliveryRecord, DeliveryState, NewDelivery, WebhookRecord};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Heartbeats written per statement (12 parameters each; both databases
/// accept well over 6,000 parameters).
const HEARTBEAT_ROWS_PER_STATEMENT: usize = 500;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRecord {
    pub id: String,
    pub name: String,
    pub time_zone: String,
    pub created_at_ms: i64,
    pub device_count: i64,
    /// `None`: installs may happen at any time.
    pub maintenance_window: Option<WindowRecord>,
    pub labels: BTreeMap<String, String>,
}

/// A daily maintenance window in the store's local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRecord {
    /// Minutes after local midnight (0..1439).
    pub start_minute: i64,
    /// 1..1440.
    pub duration_minutes: i64,
}

/// The version of a bundle a device (or every device of a store) should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredBundleRecord {
    pub name: String,
    pub version: String,
    /// The published bundle's kind: `software` or `catalog`.
    pub kind: String,
    pub download_ahead: bool,
    pub emergency: bool,
    /// A sanctioned step back to a lower version (a rollout's rollback).
    pub rollback: bool,
}

/// Whose desired state an assignment sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignTarget {
    Device(String),
    Store(String),
}

/// The desired state of a store and of each of its devices: its window, its
/// bundle rows and its devices' own rows, and its membership list. Every
/// heartbeat from the store is answered from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreDesiredState {
    pub time_zone: String,
    pub maintenance_window: Option<WindowRecord>,
    /// The store's rows, sorted by name.
    pub store_bundles: Vec<DesiredBundleRecord>,
    /// Devices' own rows, by device id.
    pub device_bundles: HashMap<String, Vec<DesiredBundleRecord>>,
    /// The store's membership list: its enrolled devices that are not
    /// revoked, sorted by id.
    pub peers: Vec<StorePeerRecord>,
    /// SHA-256 over `peers`: a till holding this list is up to date.
    pub peers_digest: Vec<u8>,
    /// The store's revoked devices, refused when they call.
    pub revoked: HashMap<String, RevokedRecord>,
}

/// Where one bundle version's bytes came from, summed over a store's tills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRecord {
    pub bundle: String,
    pub version: String,
    pub tills: i64,
    pub bytes_from_origin: i64,
    pub bytes_from_peers: i64,
    /// 0 when the version is not published.
    pub size_bytes: i64,
}

/// One till of a store, as the others see it for P2P.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePeerRecord {
    pub device_id: String,
    pub public_key_hex: String,
    /// The multiaddrs it last reported.
    pub addrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedRecord {
    pub at_ms: i64,
    pub reason: String,
}

/// The digest of a membership list: each field length-prefixed, so no two
/// lists share one.
pub fn peers_digest(peers: &[StorePeerRecord]) -> Vec<u8> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    for peer in peers {
        field(peer.device_id.as_bytes());
        field(peer.public_key_hex.as_bytes());
        field(&(peer.addrs.len() as u64).to_be_bytes());
        for addr in &peer.addrs {
            field(addr.as_bytes());
        }
    }
    hash.finalize().to_vec()
}

impl StoreDesiredState {
    /// One device's desired bundles: its own rows over the store's, one per
    /// bundle name, sorted by name.
    pub fn for_device(&self, device_id: &str) -> Vec<DesiredBundleRecord> {
        let own = self.device_bundles.get(device_id).into_iter().flatten();
        merge_desired(
            self.store_bundles
                .iter()
                .map(|b| (false, b.clone()))
                .chain(own.map(|b| (true, b.clone()))),
        )
    }
}

/// A bundle's state as the device last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleStatusRecord {
    pub name: String,
    /// `software`, `catalog`, or empty when the agent did not say.
    pub kind: String,
    pub active_version: String,
    pub target_version: String,
    /// `pending`, `downloading`, `downloaded`, `installing`, `installed`,
    /// `failed`, `rolled_back`.
    pub phase: String,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub error: String,
    /// The agent's time of the change.
    pub updated_at_ms: i64,
    /// Verified bytes of target_version from the control plane and from
    /// the store's other tills.
    pub bytes_from_origin: i64,
    pub bytes_from_peers: i64,
}

/// Keeps, per bundle name, the device's own row over its store's. `rows`
/// are `(own, bundle)`; the result is sorted by name.
pub fn merge_desired(
    rows: impl IntoIterator<Item = (bool, DesiredBundleRecord)>,
) -> Vec<DesiredBundleRecord> {
    let mut by_name: BTreeMap<String, (bool, DesiredBundleRecord)> = BTreeMap::new();
    for (own, bundle) in rows {
        match by_name.get(&bundle.name) {
            Some((true, _)) if !own => {}
            _ => {
                by_name.insert(bundle.name.clone(), (own, bundle));
            }
        }
    }
    by_name.into_values().map(|(_, b)| b).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentTokenRecord {
    pub id: String,
    pub store_id: String,
    pub uses_total: i64,
    pub uses_remaining: i64,
    pub expires_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

/// A peripheral as reported in the last heartbeat (proto enum values kept as
/// numbers so an agent newer than the server loses nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeripheralRecord {
    pub kind: i32,
    pub name: String,
    pub state: i32,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthRecord {
    pub uptime_seconds: i64,
    pub disk_free_bytes: i64,
    pub disk_total_bytes: i64,
    pub memory_total_bytes: i64,
    pub memory_available_bytes: i64,
    pub peripherals: Vec<PeripheralRecord>,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: String,
    pub public_key_hex: String,
    /// SHA-256 of the secret part of the device credential.
    pub credential_sha256: String,
    pub hardware_model: String,
    pub serial_number: String,
    pub agent_version: String,
    pub heartbeat_interval_seconds: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: String,
    pub store_id: String,
    pub hardware_model: String,
    pub serial_number: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_at_ms: i64,
    pub last_seen_ms: i64,
    pub heartbeat_interval_seconds: i64,
    pub agent_version: String,
    pub installed_bundles: BTreeMap<String, String>,
    pub agent_uptime_seconds: i64,
    pub health: HealthRecord,
    pub revoked: Option<RevokedRecord>,
}

/// What the control plane needs to check a device credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    pub credential_sha256: String,
    pub store_id: String,
}

/// One device's reported state from one heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatRecord {
    pub device_id: String,
    pub seen_at_ms: i64,
    pub heartbeat_interval_seconds: i64,
    pub agent_version: String,
    pub installed_bundles: BTreeMap<String, String>,
    pub agent_uptime_seconds: i64,
    pub health: HealthRecord,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Online,
    Offline,
}

#[derive(Debug, Clone)]
pub struct DeviceFilter {
    pub store_id: Option<String>,
    pub status: Option<StatusFilter>,
    pub labels: BTreeMap<String, String>,
    /// Keyset pagination: only devices whose id sorts after this one.
    pub after_id: String,
    pub limit: i64,
    pub now_ms: i64,
    pub offline_after_missed_heartbeats: i64,
}

/// One signed metadata file of the bundle repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRecord {
    pub role: String,
    pub version: i64,
    pub body: String,
    pub expires_at_ms: i64,
}

/// A published bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRecord {
    pub target: String,
    pub name: String,
    pub version: String,
    pub kind: String,
    pub hardware: Vec<String>,
    pub length: i64,
    pub sha256: String,
    pub chunks_sha256: String,
    pub targets_version: i64,
    pub published_at_ms: i64,
}

/// Why an enrollment was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the enrollment token is not valid")]
    UnknownToken,
    #[error("the enrollment token expired")]
    Expired { expired_at_ms: i64 },
    #[error("the enrollment token was revoked")]
    Revoked { revoked_at_ms: i64 },
    #[error("the enrollment token has no uses left")]
    UsedUp,
    #[error("this public key is already enrolled as device {device_id}")]
    PublicKeyInUse { device_id: String },
    #[error(transparent)]
    Storage(#[from] Error),
}

impl From<sqlx::Error> for EnrollError {
    fn from(error: sqlx::Error) -> Self {
        EnrollError::Storage(Error::Database(error))
    }
}

/// True when a device seen at `last_seen_ms` is still online at `now_ms`.
/// The SQL filters in `list_devices` use the same rule.
pub fn is_online(
    last_seen_ms: i64,
    heartbeat_interval_seconds: i64,
    offline_after_missed_heartbeats: i64,
    now_ms: i64,
) -> bool {
    last_seen_ms + heartbeat_interval_seconds * 1000 * offline_after_missed_heartbeats >= now_ms
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

const DEVICE_COLUMNS: &str = "d.id, d.store_id, d.hardware_model, d.serial_number, \
    d.enrolled_at_ms, d.last_seen_ms, d.heartbeat_interval_seconds, d.agent_version, \
    d.installed_bundles_json, d.agent_uptime_seconds, d.uptime_seconds, d.disk_free_bytes, \
    d.disk_total_bytes, d.memory_total_bytes, d.memory_available_bytes, d.peripherals_json, \
    d.revoked_at_ms, d.revoked_reason";

fn device_from_row(row: &AnyRow) -> Result<DeviceRecord, Error> {
    let installed: String = row.try_get("installed_bundles_json")?;
    let peripherals: String = row.try_get("peripherals_json")?;
    let id: String = row.try_get("id")?;
    Ok(DeviceRecord {
        installed_bundles: serde_json::from_str(&installed)
            .map_err(|e| Error::Corrupt(format!("installed bundles of {id}: {e}")))?,
        health: HealthRecord {
            uptime_seconds: row.try_get("uptime_seconds")?,
            disk_free_bytes: row.try_get("disk_free_bytes")?,
            disk_total_bytes: row.try_get("disk_total_bytes")?,
            memory_total_bytes: row.try_get("memory_total_bytes")?,
            memory_available_bytes: row.try_get("memory_available_bytes")?,
            peripherals: serde_json::from_str(&peripherals)
                .map_err(|e| Error::Corrupt(format!("peripherals of {id}: {e}")))?,
        },
        store_id: row.try_get("store_id")?,
        hardware_model: row.try_get("hardware_model")?,
        serial_number: row.try_get("serial_number")?,
        labels: BTreeMap::new(),
        enrolled_at_ms: row.try_get("enrolled_at_ms")?,
        last_seen_ms: row.try_get("last_seen_ms")?,
        heartbeat_interval_seconds: row.try_get("heartbeat_interval_seconds")?,
        agent_version: row.try_get("agent_version")?,
        agent_uptime_seconds: row.try_get("agent_uptime_seconds")?,
        revoked: match row.try_get::<Option<i64>, _>("revoked_at_ms")? {
            Some(at_ms) => Some(RevokedRecord {
                at_ms,
                reason: row.try_get("revoked_reason")?,
            }),
            None => None,
        },
        id,
    })
}

const STORE_COLUMNS: &str = "s.id, s.name, s.time_zone, s.created_at_ms, \
    s.maintenance_start_minute, s.maintenance_duration_minutes, \
    (SELECT COUNT(*) FROM devices d WHERE d.store_id = s.id) AS device_count";

fn window_from_row(row: &AnyRow) -> Result<Option<WindowRecord>, sqlx::Error> {
    let start: Option<i64> = row.try_get("maintenance_start_minute")?;
    let duration: Option<i64> = row.try_get("maintenance_duration_minutes")?;
    Ok(start
        .zip(duration)
        .map(|(start_minute, duration_minutes)| WindowRecord {
            start_minute,
            duration_minutes,
        }))
}

fn store_from_row(row: &AnyRow) -> Result<StoreRecord, sqlx::Error> {
    Ok(StoreRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        time_zone: row.try_get("time_zone")?,
        created_at_ms: row.try_get("created_at_ms")?,
        device_count: row.try_get("device_count")?,
        maintenance_window: window_from_row(row)?,
        labels: BTreeMap::new(),
    })
}

fn bundle_from_row(row: &AnyRow) -> Result<BundleRecord, Error> {
    let hardware: String = row.try_get("hardware_json")?;
    Ok(BundleRecord {
        target: row.try_get("target")?,
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        kind: row.try_get("kind")?,
        hardware: serde_json::from_str(&hardware)
            .map_err(|e| Error::Corrupt(format!("bundle hardware: {e}")))?,
        length: row.try_get("length")?,
        sha256: row.try_get("sha256")?,
        chunks_sha256: row.try_get("chunks_sha256")?,
        targets_version: row.try_get("targets_version")?,
        published_at_ms: row.try_get("published_at_ms")?,
    })
}

fn status_from_row(row: &AnyRow) -> Result<BundleStatusRecord, sqlx::Error> {
    Ok(BundleStatusRecord {
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        active_version: row.try_get("active_version")?,
        target_version: row.try_get("target_version")?,
        phase: row.try_get("phase")?,
        bytes_done: row.try_get("bytes_done")?,
        bytes_total: row.try_get("bytes_total")?,
        error: row.try_get("error")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        bytes_from_origin: row.try_get("bytes_from_origin")?,
        bytes_from_peers: row.try_get("bytes_from_peers")?,
    })
}

fn token_from_row(row: &AnyRow) -> Result<EnrollmentTokenRecord, sqlx::Error> {
    Ok(EnrollmentTokenRecord {
        id: row.try_get("id")?,
        store_id: row.try_get("store_id")?,
        uses_total: row.try_get("uses_total")?,
        uses_remaining: row.try_get("uses_remaining")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

/// The fleet's database. Cheap to clone (a pool handle).
#[derive(Clone, Debug)]
pub struct Storage {
    pool: AnyPool,
    backend: Backend,
    /// Connections given back to the pool: one per statement run outside a
    /// transaction, one per transaction (`posfleet_database_connection_uses_total`).
    uses: prometheus::IntCounter,
}

impl Storage {
    /// Opens the database and runs the migrations it has not seen yet.
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
        MIGRATOR.run(&pool).await?;
        Ok(Storage {
            pool,
            backend,
            uses,
        })
    }

    /// The counter of connection uses, for `/metrics`.
    pub fn connection_uses(&self) -> &prometheus::IntCounter {
        &self.uses
    }

    /// Closes every connection (waits for queries in flight).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Succeeds when the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    // ----- admin API tokens -----

    pub async fn admin_token_count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM admin_tokens WHERE revoked_at_ms IS NULL")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }

    pub async fn insert_admin_token(
        &self,
        id: &str,
        secret_sha256: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO admin_tokens (id, secret_sha256, name, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(secret_sha256)
        .bind(name)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    // ----- stores -----

    /// Creates a store; `Ok(false)` if the id is taken.
    pub async fn create_store(&self, store: &StoreRecord) -> Result<bool, sqlx::Error> {
        let window = store.maintenance_window;
        let result = sqlx::query(
            "INSERT INTO stores (id, name, time_zone, created_at_ms, maintenance_start_minute, \
             maintenance_duration_minutes) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&store.id)
        .bind(&store.name)
        .bind(&store.time_zone)
        .bind(store.created_at_ms)
        .bind(window.map(|w| w.start_minute))
        .bind(window.map(|w| w.duration_minutes))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn list_stores(&self, after_id: &str, limit: i64) -> Result<Vec<StoreRecord>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {STORE_COLUMNS} FROM stores s WHERE s.id > $1 ORDER BY s.id LIMIT $2"
        ))
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut stores = rows
            .iter()
            .map(store_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.attach_store_labels(&mut stores).await?;
        Ok(stores)
    }

    pub async fn get_store(&self, id: &str) -> Result<Option<StoreRecord>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {STORE_COLUMNS} FROM stores s WHERE s.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut stores = vec![store_from_row(&row)?];
        self.attach_store_labels(&mut stores).await?;
        Ok(stores.pop())
    }

    /// Sets (or with `None` clears) a store's maintenance window; `None` if
    /// no such store.
    pub async fn set_maintenance_window(
        &self,
        id: &str,
        window: Option<WindowRecord>,
    ) -> Result<Option<StoreRecord>, Error> {
        let updated = sqlx::query(
            "UPDATE stores SET maintenance_start_minute = $2, maintenance_duration_minutes = $3 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(window.map(|w| w.start_minute))
        .bind(window.map(|w| w.duration_minutes))
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_store(id).await
    }

    pub async fn store_exists(&self, id: &str) -> Result<bool, sqlx::Error> {
        Ok(sqlx::query("SELECT id FROM stores WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    // ----- enrollment tokens -----

    pub async fn create_enrollment_token(
        &self,
        token: &EnrollmentTokenRecord,
        secret_sha256: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, store_id, secret_sha256, uses_total, uses_remaining, \
             expires_at_ms, revoked_at_ms, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
        )
        .bind(&token.id)
        .bind(&token.store_id)
        .bind(secret_sha256)
        .bind(token.uses_total)
        .bind(token.uses_remaining)
        .bind(token.expires_at_ms)
        .bind(token.created_at_ms)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    pub async fn list_enrollment_tokens(
        &self,
        store_id: Option<&str>,
    ) -> Result<Vec<EnrollmentTokenRecord>, sqlx::Error> {
        let query = match store_id {
            Some(store) => sqlx::query(
                "SELECT * FROM enrollment_tokens WHERE store_id = $1 ORDER BY created_at_ms, id",
            )
            .bind(store.to_string()),
            None => sqlx::query("SELECT * FROM enrollment_tokens ORDER BY created_at_ms, id"),
        };
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    /// Revokes a token (idempotent: the first revocation time is kept).
    pub async fn revoke_enrollment_token(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<EnrollmentTokenRecord>, sqlx::Error> {
        sqlx::query(
            "UPDATE enrollment_tokens SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1 \
             RETURNING *",
        )
        .bind(id)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(token_from_row)
        .transpose()
    }

    /// Spends one use of the token and creates the device, atomically: a
    /// refused enrollment spends nothing. A token that is unknown, revoked,
    /// expired or used up costs one read and no write: anyone can present
    /// one, and SQLite has a single writer.
    pub async fn enroll_device(
        &self,
        token_sha256: &str,
        device: &NewDevice,
        now_ms: i64,
    ) -> Result<DeviceRecord, EnrollError> {
        let token = sqlx::query("SELECT * FROM enrollment_tokens WHERE secret_sha256 = $1")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(token_from_row)
            .transpose()?;
        let Some(token) = token else {
            return Err(EnrollError::UnknownToken);
        };
        if let Some(revoked_at_ms) = token.revoked_at_ms {
            return Err(EnrollError::Revoked { revoked_at_ms });
        }
        if token.expires_at_ms <= now_ms {
            return Err(EnrollError::Expired {
                expired_at_ms: token.expires_at_ms,
            });
        }
        // A retry by a device that enrolled but never saw the answer (killed,
        // network cut): the same key, proven by the caller's signature, with
        // the token that enrolled it, gets a fresh credential for the same
        // device instead of being stranded. Only until the device's first
        // heartbeat (it has its credential by then) and while the token is
        // live, so a captured request cannot be replayed to take a device over.
        let enrolled = sqlx::query(
            "SELECT id, first_heartbeat_ms, enrollment_token_id FROM devices WHERE public_key = $1",
        )
        .bind(&device.public_key_hex)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = enrolled {
            let id: String = row.try_get("id")?;
            let first_heartbeat: Option<i64> = row.try_get("first_heartbeat_ms")?;
            let token_id: Option<String> = row.try_get("enrollment_token_id")?;
            if first_heartbeat.is_some() || token_id.as_deref() != Some(token.id.as_str()) {
                return Err(if token.uses_remaining <= 0 {
                    EnrollError::UsedUp
                } else {
                    EnrollError::PublicKeyInUse { device_id: id }
                });
            }
            let retried = sqlx::query(
                "UPDATE devices SET credential_sha256 = $1 WHERE id = $2 \
                 AND first_heartbeat_ms IS NULL AND enrollment_token_id = \
                 (SELECT id FROM enrollment_tokens WHERE id = $3 \
                 AND revoked_at_ms IS NULL AND expires_at_ms > $4) RETURNING id",
            )
            .bind(&device.credential_sha256)
            .bind(&id)
            .bind(&token.id)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
            if retried.is_none() {
                // Its first heartbeat, or a revocation, came in between.
                return Err(EnrollError::PublicKeyInUse { device_id: id });
            }
            return self.get_device(&id).await?.ok_or(EnrollError::UnknownToken);
        }
        if token.uses_remaining <= 0 {
            return Err(EnrollError::UsedUp);
        }
        let mut tx = self.pool.begin().await?;
        // The write comes first so SQLite takes its write lock up front.
        let spent = sqlx::query(
            "UPDATE enrollment_tokens SET uses_remaining = uses_remaining - 1 \
             WHERE secret_sha256 = $1 AND revoked_at_ms IS NULL AND expires_at_ms > $2 \
             AND uses_remaining > 0 RETURNING id, store_id",
        )
        .bind(token_sha256)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(spent) = spent else {
            tx.rollback().await?;
            return Err(self.why_token_refused(token_sha256, now_ms).await?);
        };
        let token_id: String = spent.try_get("id")?;
        let store_id: String = spent.try_get("store_id")?;
        if let Some(row) = sqlx::query("SELECT id FROM devices WHERE public_key = $1")
            .bind(&device.public_key_hex)
            .fetch_optional(&mut *tx)
            .await?
        {
            tx.rollback().await?;
            return Err(EnrollError::PublicKeyInUse {
                device_id: row.try_get("id")?,
            });
        }
        let inserted = sqlx::query(
            "INSERT INTO devices (id, store_id, public_key, credential_sha256, hardware_model, \
             serial_number, enrollment_token_id, enrolled_at_ms, last_seen_ms, \
             heartbeat_interval_seconds, agent_version, installed_bundles_json, agent_uptime_seconds, \
             uptime_seconds, disk_free_bytes, disk_total_bytes, memory_total_bytes, \
             memory_available_bytes, peripherals_json) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, '{}', 0, 0, 0, 0, 0, 0, '[]')",
        )
        .bind(&device.id)
        .bind(&store_id)
        .bind(&device.public_key_hex)
        .bind(&device.credential_sha256)
        .bind(&device.hardware_model)
        .bind(&device.serial_number)
        .bind(&token_id)
        .bind(now_ms)
        .bind(device.heartbeat_interval_seconds)
        .bind(&device.agent_version)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // Another enrollment with the same key committed in between.
            Err(e) if is_unique_violation(&e) => {
                return Err(EnrollError::PublicKeyInUse {
                    device_id: "another device".into(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(DeviceRecord {
            id: device.id.clone(),
            store_id,
            hardware_model: device.hardware_model.clone(),
            serial_number: device.serial_number.clone(),
            labels: BTreeMap::new(),
            enrolled_at_ms: now_ms,
            last_seen_ms: now_ms,
            heartbeat_interval_seconds: device.heartbeat_interval_seconds,
            agent_version: device.agent_version.clone(),
            installed_bundles: BTreeMap::new(),
            agent_uptime_seconds: 0,
            health: HealthRecord::default(),
            revoked: None,
        })
    }

    async fn why_token_refused(
        &self,
        token_sha256: &str,
        now_ms: i64,
    ) -> Result<EnrollError, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM enrollment_tokens WHERE secret_sha256 = $1")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await?;
        let Some(token) = row.as_ref().map(token_from_row).transpose()? else {
            return Ok(EnrollError::UnknownToken);
        };
        Ok(if let Some(revoked_at_ms) = token.revoked_at_ms {
            EnrollError::Revoked { revoked_at_ms }
        } else if token.expires_at_ms <= now_ms {
            EnrollError::Expired {
                expired_at_ms: token.expires_at_ms,
            }
        } else {
            EnrollError::UsedUp
        })
    }

    // ----- devices -----

    pub async fn device_auth(&self, device_id: &str) -> Result<Option<DeviceAuth>, sqlx::Error> {
        sqlx::query("SELECT credential_sha256, store_id FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| {
                Ok(DeviceAuth {
                    credential_sha256: row.try_get("credential_sha256")?,
                    store_id: row.try_get("store_id")?,
                })
            })
            .transpose()
    }

    /// Writes a batch of heartbeats in a few multi-row statements. The caller
    /// keeps at most one heartbeat per device in a batch.
    pub async fn record_heartbeats(&self, batch: &[HeartbeatRecord]) -> Result<(), Error> {
        for chunk in batch.chunks(HEARTBEAT_ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "UPDATE devices SET last_seen_ms = v.column2, \
                 first_heartbeat_ms = COALESCE(first_heartbeat_ms, v.column2), \
                 heartbeat_interval_seconds = v.column3, \
                 agent_version = v.column4, installed_bundles_json = v.column5, \
                 agent_uptime_seconds = v.column6, uptime_seconds = v.column7, \
                 disk_free_bytes = v.column8, disk_total_bytes = v.column9, \
                 memory_total_bytes = v.column10, memory_available_bytes = v.column11, \
                 peripherals_json = v.column12 FROM (VALUES ",
            );
            let mut params = Vec::with_capacity(chunk.len() * 12);
            let mut placeholders = Placeholders::new(self.backend);
            for (i, hb) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let row: Vec<String> = (0..12).map(|_| placeholders.next()).collect();
                sql.push_str(&format!("({})", row.join(", ")));
                let installed = serde_json::to_string(&hb.installed_bundles)
                    .map_err(|e| Error::Corrupt(e.to_string()))?;
                let peripherals = serde_json::to_string(&hb.health.peripherals)
                    .map_err(|e| Error::Corrupt(e.to_string()))?;
                params.extend([
                    Param::Text(hb.device_id.clone()),
                    Param::Int(hb.seen_at_ms),
                    Param::Int(hb.heartbeat_interval_seconds),
                    Param::Text(hb.agent_version.clone()),
                    Param::Text(installed),
                    Param::Int(hb.agent_uptime_seconds),
                    Param::Int(hb.health.uptime_seconds),
                    Param::Int(hb.health.disk_free_bytes),
                    Param::Int(hb.health.disk_total_bytes),
                    Param::Int(hb.health.memory_total_bytes),
                    Param::Int(hb.health.memory_available_bytes),
                    Param::Text(peripherals),
                ]);
            }
            sql.push_str(") AS v WHERE devices.id = v.column1");
            bind_all(sqlx::query(&sql).persistent(false), params)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    pub async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, Error> {
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut devices = vec![device_from_row(&row)?];
        self.attach_labels(&mut devices).await?;
        Ok(devices.pop())
    }

    pub async fn list_devices(&self, filter: &DeviceFilter) -> Result<Vec<DeviceRecord>, Error> {
        let mut placeholders = Placeholders::new(self.backend);
        let mut sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.id > {}",
            placeholders.next()
        );
        let mut params = vec![Param::Text(filter.after_id.clone())];
        let mut next = |params: &mut Vec<Param>, p: Param| {
            params.push(p);
            placeholders.next()
        };
        if let Some(store) = &filter.store_id {
            let p = next(&mut params, Param::Text(store.clone()));
            sql.push_str(&format!(" AND d.store_id = {p}"));
        }
        if let Some(status) = filter.status {
            let window = next(
                &mut params,
                Param::Int(1000 * filter.offline_after_missed_heartbeats),
            );
            let now = next(&mut params, Param::Int(filter.now_ms));
            let op = match status {
                StatusFilter::Online => ">=",
                StatusFilter::Offline => "<",
            };
            sql.push_str(&format!(
                " AND d.last_seen_ms + d.heartbeat_interval_seconds * {window} {op} {now}"
            ));
        }
        for (key, value) in &filter.labels {
            let k = next(&mut params, Param::Text(key.clone()));
            let v = next(&mut params, Param::Text(value.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM device_labels l WHERE l.device_id = d.id \
                 AND l.key = {k} AND l.value = {v})"
            ));
        }
        let limit = next(&mut params, Param::Int(filter.limit));
        sql.push_str(&format!(" ORDER BY d.id LIMIT {limit}"));
        let rows = bind_all(sqlx::query(&sql).persistent(false), params)
            .fetch_all(&self.pool)
            .await?;
        let mut devices = rows
            .iter()
            .map(device_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.attach_labels(&mut devices).await?;
        Ok(devices)
    }

    async fn attach_labels(&self, devices: &mut [DeviceRecord]) -> Result<(), Error> {
        if devices.is_empty() {
            return Ok(());
        }
        let mut next = Placeholders::new(self.backend);
        let placeholders: Vec<String> = devices.iter().map(|_| next.next()).collect();
        let sql = format!(
            "SELECT device_id, key, value FROM device_labels WHERE device_id IN ({})",
            placeholders.join(", ")
        );
        let params = devices.iter().map(|d| Param::Text(d.id.clone())).collect();
        let rows = bind_all(sqlx::query(&sql).persistent(false), params)
            .fetch_all(&self.pool)
            .await?;
        let mut by_device: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for row in rows {
            by_device
                .entry(row.try_get("device_id")?)
                .or_default()
                .insert(row.try_get("key")?, row.try_get("value")?);
        }
        for device in devices {
            if let Some(labels) = by_device.remove(&device.id) {
                device.labels = labels;
            }
        }
        Ok(())
    }

    /// Sets and removes labels in one transaction; `None` if no such device.
    pub async fn set_device_labels(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Option<DeviceRecord>, Error> {
        if self.device_auth(id).await?.is_none() {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await?;
        for (key, value) in set {
            sqlx::query(
                "INSERT INTO device_labels (device_id, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (device_id, key) DO UPDATE SET value = excluded.value",
            )
            .bind(id)
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        for key in remove {
            sqlx::query("DELETE FROM device_labels WHERE device_id = $1 AND key = $2")
                .bind(id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.get_device(id).await
    }

    /// (online, total) device counts, for the metrics endpoint.
    pub async fn count_devices(
        &self,
        now_ms: i64,
        offline_after_missed_heartbeats: i64,
    ) -> Result<(i64, i64), sqlx::Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, \
             COALESCE(SUM(CASE WHEN last_seen_ms + heartbeat_interval_seconds * $1 >= $2 \
             THEN 1 ELSE 0 END), 0) AS online FROM devices",
        )
        .bind(1000 * offline_after_missed_heartbeats)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("online")?, row.try_get("total")?))
    }

    // ----- bundle repository -----

    /// The newest version of a metadata role and its file.
    pub async fn latest_metadata(&self, role: &str) -> Result<Option<(i64, String)>, sqlx::Error> {
        sqlx::query(
            "SELECT version, body FROM repo_metadata WHERE role = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(role)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| Ok((row.try_get("version")?, row.try_get("body")?)))
        .transpose()
    }

    pub async fn metadata(&self, role: &str, version: i64) -> Result<Option<String>, sqlx::Error> {
        sqlx::query("SELECT body FROM repo_metadata WHERE role = $1 AND version = $2")
            .bind(role)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get("body"))
            .transpose()
    }

    /// Stores metadata files (and the bundle they publish) in one
    /// transaction. `Ok(false)` when one of the versions exists already:
    /// another change got there first, and nothing was written.
    pub async fn insert_metadata(
        &self,
        files: &[MetadataRecord],
        bundle: Option<&BundleRecord>,
        now_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        for file in files {
            let inserted = sqlx::query(
                "INSERT INTO repo_metadata (role, version, body, expires_at_ms, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (role, version) DO NOTHING",
            )
            .bind(&file.role)
            .bind(file.version)
            .bind(&file.body)
            .bind(file.expires_at_ms)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        if let Some(b) = bundle {
            let hardware =
                serde_json::to_string(&b.hardware).expect("a list of strings serializes");
            let inserted = sqlx::query(
                "INSERT INTO bundles (target, name, version, kind, hardware_json, length, sha256, \
                 chunks_sha256, targets_version, published_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (target) DO NOTHING",
            )
            .bind(&b.target)
            .bind(&b.name)
            .bind(&b.version)
            .bind(&b.kind)
            .bind(hardware)
            .bind(b.length)
            .bind(&b.sha256)
            .bind(&b.chunks_sha256)
            .bind(b.targets_version)
            .bind(b.published_at_ms)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    pub async fn list_bundles(&self, name: Option<&str>) -> Result<Vec<BundleRecord>, Error> {
        let query = match name {
            Some(name) => sqlx::query(
                "SELECT * FROM bundles WHERE name = $1 ORDER BY published_at_ms, target",
            )
            .bind(name.to_string()),
            None => sqlx::query("SELECT * FROM bundles ORDER BY name, published_at_ms, target"),
        };
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(bundle_from_row)
            .collect()
    }

    /// The published bundle `name` `version`, if any.
    pub async fn get_bundle(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<BundleRecord>, Error> {
        sqlx::query("SELECT * FROM bundles WHERE target = $1")
            .bind(format!("{name}/{version}"))
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(bundle_from_row)
            .transpose()
    }

    // ----- desired and reported bundle state -----

    /// Sets the desired version of a bundle for a device or a store, and
    /// returns how many devices it now applies to: 1 for a device; for a
    /// store, its devices that have no row of their own for this bundle.
    /// The caller checks that the target exists.
    pub async fn assign_bundle(
        &self,
        target: &AssignTarget,
        bundle: &DesiredBundleRecord,
        now_ms: i64,
    ) -> Result<i64, sqlx::Error> {
        let (table, column, id) = match target {
            AssignTarget::Device(id) => ("device_desired_bundles", "device_id", id),
            AssignTarget::Store(id) => ("store_desired_bundles", "store_id", id),
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {table} ({column}, name, version, kind, download_ahead, emergency, \
             rollback, assigned_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT ({column}, name) DO UPDATE SET version = excluded.version, \
             kind = excluded.kind, download_ahead = excluded.download_ahead, \
             emergency = excluded.emergency, rollback = excluded.rollback, \
             assigned_at_ms = excluded.assigned_at_ms"
        ))
        .bind(id)
        .bind(&bundle.name)
        .bind(&bundle.version)
        .bind(&bundle.kind)
        .bind(i64::from(bundle.download_ahead))
        .bind(i64::from(bundle.emergency))
        .bind(i64::from(bundle.rollback))
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let assigned = match target {
            AssignTarget::Device(_) => 1,
            AssignTarget::Store(store_id) => sqlx::query(
                "SELECT COUNT(*) AS n FROM devices d WHERE d.store_id = $1 AND NOT EXISTS \
                 (SELECT 1 FROM device_desired_bundles o WHERE o.device_id = d.id AND o.name = $2)",
            )
            .bind(store_id)
            .bind(&bundle.name)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?,
        };
        tx.commit().await?;
        Ok(assigned)
    }

    /// A store's window and bundle rows and its devices' own rows, in one
    /// indexed query. `None` if the store is unknown.
    pub async fn store_desired_state(
        &self,
        store_id: &str,
    ) -> Result<Option<StoreDesiredState>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT s.time_zone, s.maintenance_start_minute, s.maintenance_duration_minutes, \
             b.device_id, b.name, b.version, b.kind, b.download_ahead, b.emergency, b.rollback \
             FROM stores s LEFT JOIN ( \
             SELECT '' AS device_id, name, version, kind, download_ahead, emergency, rollback \
             FROM store_desired_bundles WHERE store_id = $1 \
             UNION ALL \
             SELECT o.device_id, o.name, o.version, o.kind, o.download_ahead, o.emergency, \
             o.rollback FROM device_desired_bundles o JOIN devices d ON d.id = o.device_id \
             WHERE d.store_id = $1 \
             ) b ON 1 = 1 WHERE s.id = $1 ORDER BY b.name",
        )
        .bind(store_id)
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut state = StoreDesiredState {
            time_zone: first.try_get("time_zone")?,
            maintenance_window: window_from_row(first)?,
            ..Default::default()
        };
        for row in &rows {
            let Some(name) = row.try_get::<Option<String>, _>("name")? else {
                continue; // no bundle rows at all: the one row is the store's
            };
            let device_id: String = row.try_get("device_id")?;
            let bundle = DesiredBundleRecord {
                name,
                version: row.try_get("version")?,
                kind: row.try_get("kind")?,
                download_ahead: row.try_get::<i64, _>("download_ahead")? != 0,
                emergency: row.try_get::<i64, _>("emergency")? != 0,
                rollback: row.try_get::<i64, _>("rollback")? != 0,
            };
            if device_id.is_empty() {
                state.store_bundles.push(bundle);
            } else {
                state
                    .device_bundles
                    .entry(device_id)
                    .or_default()
                    .push(bundle);
            }
        }
        let devices = sqlx::query(
            "SELECT id, public_key, p2p_addrs_json, revoked_at_ms, revoked_reason \
             FROM devices WHERE store_id = $1 ORDER BY id",
        )
        .bind(store_id)
        .fetch_all(&self.pool)
        .await?;
        for row in &devices {
            let device_id: String = row.try_get("id")?;
            if let Some(at_ms) = row.try_get::<Option<i64>, _>("revoked_at_ms")? {
                let reason = row.try_get("revoked_reason")?;
                state
                    .revoked
                    .insert(device_id, RevokedRecord { at_ms, reason });
                continue;
            }
            let addrs: String = row.try_get("p2p_addrs_json")?;
            state.peers.push(StorePeerRecord {
                device_id,
                public_key_hex: row.try_get("public_key")?,
                // Written by this code from validated strings; a damaged
                // value only costs that till its peers' dials.
                addrs: serde_json::from_str(&addrs).unwrap_or_default(),
            });
        }
        state.peers_digest = peers_digest(&state.peers);
        Ok(Some(state))
    }

    /// Per bundle version the store's tills last reported on: the tills,
    /// and the bytes they got from the origin and from each other.
    pub async fn store_transfers(&self, store_id: &str) -> Result<Vec<TransferRecord>, Error> {
        let rows = sqlx::query(
            "SELECT st.name, st.target_version, COUNT(*) AS tills, \
             SUM(st.bytes_from_origin) AS origin, SUM(st.bytes_from_peers) AS peers, \
             MAX(b.length) AS size \
             FROM device_bundle_status st JOIN devices d ON d.id = st.device_id \
             LEFT JOIN bundles b ON b.name = st.name AND b.version = st.target_version \
             WHERE d.store_id = $1 AND st.target_version <> '' \
             GROUP BY st.name, st.target_version ORDER BY st.name, st.target_version",
        )
        .bind(store_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TransferRecord {
                    bundle: row.try_get("name")?,
                    version: row.try_get("target_version")?,
                    tills: row.try_get("tills")?,
                    bytes_from_origin: row.try_get::<Option<i64>, _>("origin")?.unwrap_or(0),
                    bytes_from_peers: row.try_get::<Option<i64>, _>("peers")?.unwrap_or(0),
                    size_bytes: row.try_get::<Option<i64>, _>("size")?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// Records where a till listens for its store's other tills.
    pub async fn set_p2p_addrs(&self, device_id: &str, addrs: &[String]) -> Result<(), Error> {
        let json = serde_json::to_string(addrs).expect("strings serialize");
        sqlx::query("UPDATE devices SET p2p_addrs_json = $1 WHERE id = $2")
            .bind(json)
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Revokes a device: it is refused from then on and leaves its store's
    /// membership list. Returns its store, or `None` for an unknown
    /// device. Revoking a revoked device keeps the first revocation.
    pub async fn revoke_device(
        &self,
        device_id: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<Option<String>, Error> {
        sqlx::query(
            "UPDATE devices SET revoked_at_ms = $1, revoked_reason = $2 \
             WHERE id = $3 AND revoked_at_ms IS NULL",
        )
        .bind(at_ms)
        .bind(reason)
        .bind(device_id)
        .execute(&self.pool)
        .await?;
        Ok(sqlx::query("SELECT store_id FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| row.try_get("store_id"))
            .transpose()?)
    }

    /// Stores reported bundle states. Per bundle, a report older than the
    /// stored one (by the agent's `updated_at_ms`) changes nothing. The caller
    /// keeps at most one report per bundle name.
    pub async fn record_bundle_statuses(
        &self,
        device_id: &str,
        statuses: &[BundleStatusRecord],
    ) -> Result<(), sqlx::Error> {
        if statuses.is_empty() {
            return Ok(());
        }
        let mut placeholders = Placeholders::new(self.backend);
        let mut params = Vec::with_capacity(statuses.len() * 12);
        let rows: Vec<String> = statuses
            .iter()
            .map(|st| {
                params.extend([
                    Param::Text(device_id.to_string()),
                    Param::Text(st.name.clone()),
                    Param::Text(st.kind.clone()),
                    Param::Text(st.active_version.clone()),
                    Param::Text(st.target_version.clone()),
                    Param::Text(st.phase.clone()),
                    Param::Int(st.bytes_done),
                    Param::Int(st.bytes_total),
                    Param::Text(st.error.clone()),
                    Param::Int(st.updated_at_ms),
                    Param::Int(st.bytes_from_origin),
                    Param::Int(st.bytes_from_peers),
                ]);
                let row: Vec<String> = (0..12).map(|_| placeholders.next()).collect();
                format!("({})", row.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO device_bundle_status (device_id, name, kind, active_version, \
             target_version, phase, bytes_done, bytes_total, error, updated_at_ms, \
             bytes_from_origin, bytes_from_peers) VALUES {} \
             ON CONFLICT (device_id, name) DO UPDATE SET kind = excluded.kind, \
             active_version = excluded.active_version, target_version = excluded.target_version, \
             phase = excluded.phase, bytes_done = excluded.bytes_done, \
             bytes_total = excluded.bytes_total, error = excluded.error, \
             updated_at_ms = excluded.updated_at_ms, \
             bytes_from_origin = excluded.bytes_from_origin, \
             bytes_from_peers = excluded.bytes_from_peers \
             WHERE device_bundle_status.updated_at_ms <= excluded.updated_at_ms",
            rows.join(", ")
        );
        bind_all(sqlx::query(&sql).persistent(false), params)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// What a device last reported, per bundle, sorted by name.
    pub async fn bundle_statuses(
        &self,
        device_id: &str,
    ) -> Result<Vec<BundleStatusRecord>, sqlx::Error> {
        sqlx::query("SELECT * FROM device_bundle_status WHERE device_id = $1 ORDER BY name")
            .bind(device_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(status_from_row)
            .collect()
    }

    pub async fn count_stores(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM stores")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_devices_own_assignment_beats_its_stores() {
        let b = |name: &str, version: &str| DesiredBundleRecord {
            name: name.into(),
            version: version.into(),
            kind: "software".into(),
            download_ahead: true,
            emergency: false,
            rollback: false,
        };
        let versions = |rows: Vec<(bool, DesiredBundleRecord)>| -> Vec<(String, String)> {
            merge_desired(rows)
                .into_iter()
                .map(|b| (b.name, b.version))
                .collect()
        };
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        // Whatever the order rows come in.
        for rows in [
            vec![(false, b("app", "1.0.0")), (true, b("app", "2.0.0"))],
            vec![(true, b("app", "2.0.0")), (false, b("app", "1.0.0"))],
        ] {
            assert_eq!(versions(rows), vec![pair("app", "2.0.0")]);
        }
        assert_eq!(
            versions(vec![(false, b("zz", "1.0.0")), (true, b("aa", "3.0.0"))]),
            vec![pair("aa", "3.0.0"), pair("zz", "1.0.0")],
            "sorted by name"
        );
        assert!(versions(vec![]).is_empty());
    }

    #[test]
    fn online_rule_counts_missed_intervals() {
        // 30 s interval, offline after 3 missed: online up to 90 s after.
        assert!(is_online(0, 30, 3, 90_000));
        assert!(!is_online(0, 30, 3, 90_001));
    }

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
}
