//! `posfleet-control-plane backup` and `restore`: a consistent copy of
//! everything a control plane needs to come back as it was, taken while it
//! serves, and its restoration into an empty data dir and database.
//!
//! A backup is a folder:
//!
//! - `manifest.json`: what the rest is ([`Manifest`]), every file with its
//!   SHA-256 and size, and the schema version of the database;
//! - `database/posfleet.db` (SQLite, `VACUUM INTO`: a snapshot taken in one
//!   read transaction, which writers do not wait for) or
//!   `database/posfleet.pgdump` (PostgreSQL, `pg_dump --format=custom` of a
//!   snapshot exported from the transaction the manifest's row counts and
//!   blob list were read in);
//! - `files/`: the data dir's keys, by an explicit list ([`data_dir_files`]):
//!   the online repository keys, the fleet CA and its rotation state, the
//!   first admin token;
//! - `blobs/`: the bundle blobs the database names (each bundle and its chunk
//!   list), when they are on the local disk. An object store keeps its own.
//!
//! It is written in a hidden folder beside its destination and renamed into
//! place last, so an interrupted backup never looks complete; its files are
//! mode 0600 and its folders 0700. A restore checks every file's hash
//! against the manifest and the target's emptiness before it writes
//! anything, and refuses a backup from a schema newer than this binary's.

mod create;
mod files;
mod postgres;
mod restore;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Connection, Row};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::storage::{Backend, redact_url};

pub use create::{backup, data_dir_files};
pub use restore::{read_manifest, restore};

/// The file describing a backup, at its top.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The layout of a backup this binary writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
const SQLITE_FILE: &str = "database/posfleet.db";
const POSTGRES_FILE: &str = "database/posfleet.pgdump";
/// Where the data dir's files go in a backup.
const FILES_DIR: &str = "files";
/// The local blob store's folder, in the data dir and in a backup.
const BLOBS_DIR: &str = "blobs";
/// Tables whose rows are counted at backup and checked after a restore.
const COUNTED_TABLES: [&str; 8] = [
    "stores",
    "devices",
    "repo_metadata",
    "bundles",
    "rollouts",
    "rollout_devices",
    "events",
    "audit_log",
];
/// The data dir's files a backup holds when they exist, besides the CA
/// folder's (see [`data_dir_files`]). The repository keys are required.
const REQUIRED_FILES: [&str; 2] = [
    "repository-keys/snapshot.key",
    "repository-keys/timestamp.key",
];
const OPTIONAL_FILES: [&str; 1] = [crate::ADMIN_SETUP_CODE_FILE];
/// The fleet CA's folder in the data dir, and its retired certificates.
const TLS_DIR: &str = "tls";
/// Prefix of the hidden folders a backup or a restore is written in.
const STAGING_PREFIX: &str = ".posfleet-";

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The backup's layout ([`FORMAT_VERSION`]).
    pub format: u32,
    /// The posfleet-control-plane that wrote it.
    pub posfleet_version: String,
    /// The database's newest applied migration.
    pub schema_version: i64,
    pub backend: BackendName,
    /// UTC, RFC 3339.
    pub created_at: String,
    /// Every file but the blobs and this manifest, by path in the backup:
    /// the database first.
    pub files: Vec<FileEntry>,
    /// Every blob the database names.
    pub blobs: Vec<BlobEntry>,
    /// Rows of the main tables in the backed-up database.
    pub rows: BTreeMap<String, i64>,
}

/// The database a backup holds, by its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendName {
    Sqlite,
    Postgres,
}

impl From<Backend> for BackendName {
    fn from(backend: Backend) -> BackendName {
        match backend {
            Backend::Sqlite => BackendName::Sqlite,
            Backend::Postgres => BackendName::Postgres,
        }
    }
}

impl std::fmt::Display for BackendName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendName::Sqlite => "SQLite",
            BackendName::Postgres => "PostgreSQL",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the backup's folder, `/`-separated.
    pub path: String,
    pub sha256: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub sha256: String,
    pub size_bytes: u64,
    /// In the backup's `blobs/` (a local store), or left to the object
    /// store that holds it.
    pub copied: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists: a backup goes to a new folder")]
    TargetExists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {url}: {source}")]
    Database { url: String, source: sqlx::Error },
    #[error("there is no SQLite database at {0}: nothing to back up")]
    NoDatabase(PathBuf),
    #[error("the data dir has no {0}: has a control plane ever started on it?")]
    MissingKey(PathBuf),
    #[error("the copy of the database does not verify: {0}")]
    Verify(String),
    #[error(
        "blob {sha256} (of bundle {bundle}) is not in the local blob store {path}: \
         the store is damaged"
    )]
    BlobMissing {
        sha256: String,
        bundle: String,
        path: PathBuf,
    },
    #[error(
        "{tool} not found ({path}): install the PostgreSQL client tools (the server's major \
         version or newer), or name their folder with --pg-bin-dir (POSFLEET_PG_BIN_DIR)"
    )]
    ToolMissing { tool: &'static str, path: PathBuf },
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{0} is not a posfleet backup: it has no {MANIFEST_FILE}")]
    NotABackup(PathBuf),
    #[error("{path} is damaged: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("backup file {path} is damaged: {reason}; nothing was restored")]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "the backup's format is {found}; this posfleet-control-plane reads up to {FORMAT_VERSION}: \
         use version {version} or newer"
    )]
    FormatTooNew { found: u32, version: String },
    #[error(
        "backup is at schema {backup}, this posfleet-control-plane knows up to {known}: \
         use version {version} or newer"
    )]
    SchemaTooNew {
        backup: i64,
        known: i64,
        version: String,
    },
    #[error(
        "the backup holds a {backup} database and database_url names a {target} one: \
         restore into a {backup} database"
    )]
    BackendMismatch {
        backup: BackendName,
        target: BackendName,
    },
    #[error(
        "the data dir {path} is not empty ({entries}): a restore goes into an empty one, \
         so nothing of a running or other fleet is overwritten"
    )]
    DataDirNotEmpty { path: PathBuf, entries: String },
    #[error("the SQLite database {0} exists: a restore goes into a new one")]
    SqliteExists(PathBuf),
    #[error(
        "database {url} is not empty (it has {tables}): restore into an empty database \
         (CREATE DATABASE … on the server)"
    )]
    DatabaseNotEmpty { url: String, tables: String },
    #[error("the restored database differs from the backup: {0}")]
    RowsDiffer(String),
    #[error("{0}")]
    Internal(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn db_error(url: &str) -> impl FnOnce(sqlx::Error) -> BackupError + '_ {
    move |source| BackupError::Database {
        url: redact_url(url),
        source,
    }
}

/// The schema versions this binary can restore: any up to the newest
/// migration it has (older ones are migrated at the next start).
pub fn check_compatible(manifest: &Manifest, known_schema: i64) -> Result<(), BackupError> {
    if manifest.format > FORMAT_VERSION {
        return Err(BackupError::FormatTooNew {
            found: manifest.format,
            version: manifest.posfleet_version.clone(),
        });
    }
    if manifest.schema_version > known_schema {
        return Err(BackupError::SchemaTooNew {
            backup: manifest.schema_version,
            known: known_schema,
            version: manifest.posfleet_version.clone(),
        });
    }
    Ok(())
}

/// The blob store's folder when blobs are on the local disk. A store
/// elsewhere (object storage) is durable on its own: a backup lists its
/// blobs without copying them.
fn local_blob_dir(config: &Config) -> Option<PathBuf> {
    matches!(
        crate::blobs::Location::parse(&config.blob_store_url),
        Ok(crate::blobs::Location::DataDir)
    )
    .then(|| config.data_dir.join(BLOBS_DIR))
}

fn blob_path(root: &Path, sha256: &str) -> PathBuf {
    root.join("sha256").join(&sha256[..2]).join(sha256)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

async fn connect(url: &str) -> Result<AnyConnection, BackupError> {
    sqlx::any::install_default_drivers();
    AnyConnection::connect(url).await.map_err(db_error(url))
}

/// The newest migration applied to the database on `conn`.
async fn schema_version(conn: &mut AnyConnection, url: &str) -> Result<i64, BackupError> {
    let version: Option<i64> =
        sqlx::query("SELECT MAX(version) AS version FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut *conn)
            .await
            .and_then(|row| row.try_get("version"))
            .map_err(db_error(url))?;
    Ok(version.unwrap_or(0))
}

async fn count_rows(
    conn: &mut AnyConnection,
    url: &str,
) -> Result<BTreeMap<String, i64>, BackupError> {
    let mut rows = BTreeMap::new();
    for table in COUNTED_TABLES {
        let count: i64 = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(&mut *conn)
            .await
            .and_then(|row| row.try_get("n"))
            .map_err(db_error(url))?;
        rows.insert(table.to_string(), count);
    }
    Ok(rows)
}

/// One line on what a backup holds, for the commands' summaries.
pub fn describe(manifest: &Manifest) -> String {
    let count = |table: &str| manifest.rows.get(table).copied().unwrap_or_default();
    let copied = manifest.blobs.iter().filter(|b| b.copied).count();
    format!(
        "{} database at schema {} ({} stores, {} devices, {} bundles, {} rollouts), \
         {} files of the data dir, {} blobs ({copied} copied)",
        manifest.backend,
        manifest.schema_version,
        count("stores"),
        count("devices"),
        count("bundles"),
        count("rollouts"),
        manifest.files.len() - 1,
        manifest.blobs.len(),
    )
}

/// How long a step took, for the commands' summaries.
pub fn seconds(elapsed: Duration) -> String {
    format!("{:.1}s", elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(format: u32, schema_version: i64) -> Manifest {
        Manifest {
            format,
            posfleet_version: "1.4.0".into(),
            schema_version,
            backend: BackendName::Sqlite,
            created_at: "2026-12-03T08:00:00Z".into(),
            files: Vec::new(),
            blobs: Vec::new(),
            rows: BTreeMap::new(),
        }
    }

    #[test]
    fn older_and_equal_schemas_restore_and_newer_ones_are_refused() {
        for (format, schema, known, expected) in [
            (1, 12, 14, Ok(())),
            (1, 14, 14, Ok(())),
            (
                1,
                16,
                14,
                Err(
                    "backup is at schema 16, this posfleet-control-plane knows up to 14: \
                     use version 1.4.0 or newer",
                ),
            ),
            (
                2,
                14,
                14,
                Err(
                    "the backup's format is 2; this posfleet-control-plane reads up to 1: \
                     use version 1.4.0 or newer",
                ),
            ),
        ] {
            let result =
                check_compatible(&manifest(format, schema), known).map_err(|e| e.to_string());
            assert_eq!(
                result,
                expected.map_err(str::to_string),
                "format {format}, schema {schema}, known {known}"
            );
        }
    }
}
