//! Restoring a backup: every file checked, the targets found empty, then
//! everything written in a hidden folder of the data dir and moved into
//! place, the database last.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use super::files::{Staging, hash_file, private_dir, sync_dir};
use super::postgres::split_password;
use super::*;
use crate::config::PostgresTools;

/// Reads the manifest of the backup in `from`.
pub fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackupError::NotABackup(from.to_path_buf()));
        }
        Err(source) => return Err(BackupError::Io { path, source }),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| BackupError::BadManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let bad = |reason: String| BackupError::BadManifest {
        path: path.clone(),
        reason,
    };
    for file in &manifest.files {
        let path = Path::new(&file.path);
        if !path.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(bad(format!(
                "`{}` is not a path inside the backup",
                file.path
            )));
        }
    }
    if let Some(blob) = manifest.blobs.iter().find(|b| !is_sha256_hex(&b.sha256)) {
        return Err(bad(format!("`{}` is not a SHA-256", blob.sha256)));
    }
    let database = match manifest.backend {
        BackendName::Sqlite => SQLITE_FILE,
        BackendName::Postgres => POSTGRES_FILE,
    };
    if manifest.files.first().map(|f| f.path.as_str()) != Some(database) {
        return Err(bad(format!("it does not list {database} first")));
    }
    Ok(manifest)
}

/// Checks every file the manifest lists against its hash and size.
fn verify_backup(from: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let expect = |path: PathBuf, sha256: &str, size: Option<u64>| -> Result<(), BackupError> {
        let (actual, actual_size) = match hash_file(&path, None) {
            Ok(found) => found,
            Err(BackupError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(BackupError::Damaged {
                    path,
                    reason: "it is missing".into(),
                });
            }
            Err(e) => return Err(e),
        };
        if actual != sha256 || size.is_some_and(|s| s != actual_size) {
            return Err(BackupError::Damaged {
                path,
                reason: format!(
                    "its SHA-256 is {actual} ({actual_size} bytes), the manifest says {sha256}"
                ),
            });
        }
        Ok(())
    };
    for file in &manifest.files {
        expect(from.join(&file.path), &file.sha256, Some(file.size_bytes))?;
    }
    for blob in manifest.blobs.iter().filter(|b| b.copied) {
        let path = blob_path(&from.join(BLOBS_DIR), &blob.sha256);
        expect(path, &blob.sha256, Some(blob.size_bytes))?;
    }
    Ok(())
}

/// The data dir's entries, leftovers of an interrupted restore removed.
fn data_dir_entries(data_dir: &Path) -> Result<Vec<String>, BackupError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(BackupError::Io {
                path: data_dir.to_path_buf(),
                source,
            });
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(data_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{STAGING_PREFIX}restore-")) {
            tracing::info!(path = %entry.path().display(), "Removing an interrupted restore.");
            let path = entry.path();
            if entry.file_type().map_err(io(&path))?.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            } else {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        } else {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Tables in the PostgreSQL database on `conn`, outside the system schemas.
async fn postgres_tables(conn: &mut AnyConnection, url: &str) -> Result<Vec<String>, BackupError> {
    let rows = sqlx::query(
        "SELECT table_schema || '.' || table_name AS name FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error(url))?;
    rows.iter()
        .map(|row| row.try_get("name").map_err(db_error(url)))
        .collect()
}

fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

/// Restores the backup in `from` into the empty data dir and database
/// `config` names. Nothing is written before every file of the backup is
/// checked and both targets are found empty. Returns the backup's manifest.
pub async fn restore(
    config: &Config,
    from: &Path,
    tools: &PostgresTools,
) -> Result<Manifest, BackupError> {
    let manifest = read_manifest(from)?;
    check_compatible(&manifest, crate::storage::known_schema_version())?;
    let url = config.effective_database_url();
    let backend = Backend::of_url(&url)
        .ok_or_else(|| BackupError::Internal("database_url names no known database".into()))?;
    let target = BackendName::from(backend);
    if target != manifest.backend {
        return Err(BackupError::BackendMismatch {
            backup: manifest.backend,
            target,
        });
    }
    verify_backup(from, &manifest)?;

    // The targets are empty.
    let data_dir = &config.data_dir;
    let entries = data_dir_entries(data_dir)?;
    if !entries.is_empty() {
        return Err(BackupError::DataDirNotEmpty {
            path: data_dir.clone(),
            entries: list_some(&entries),
        });
    }
    let sqlite = match backend {
        Backend::Sqlite => {
            let path = crate::sqlite_path(&url).ok_or_else(|| {
                BackupError::Internal("an in-memory SQLite database cannot be restored into".into())
            })?;
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                if Path::new(&name).exists() {
                    return Err(BackupError::SqliteExists(PathBuf::from(name)));
                }
            }
            Some(path)
        }
        Backend::Postgres => {
            let mut conn = connect(&url).await?;
            let tables = postgres_tables(&mut conn, &url).await?;
            let _ = conn.close().await;
            if !tables.is_empty() {
                return Err(BackupError::DatabaseNotEmpty {
                    url: redact_url(&url),
                    tables: format!("{} tables: {}", tables.len(), list_some(&tables)),
                });
            }
            None
        }
    };

    // Everything is written in a hidden folder of the data dir, checked
    // again as it is copied, and moved into place last.
    private_dir(data_dir)?;
    let staging = Staging::new(data_dir, "restore")?;
    let copy = |from_path: PathBuf, to_path: &Path, sha256: &str| -> Result<(), BackupError> {
        let (actual, _) = hash_file(&from_path, Some(to_path))?;
        if actual != sha256 {
            return Err(BackupError::Damaged {
                path: from_path,
                reason: format!("it changed during the restore (SHA-256 {actual})"),
            });
        }
        Ok(())
    };
    let mut moves: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut top: BTreeSet<String> = BTreeSet::new();
    for file in &manifest.files[1..] {
        let Some(relative) = file.path.strip_prefix(&format!("{FILES_DIR}/")) else {
            tracing::warn!(path = %file.path, "Not a data dir file; left in the backup.");
            continue;
        };
        copy(
            from.join(&file.path),
            &staging.path.join(relative),
            &file.sha256,
        )?;
        if let Some(Component::Normal(first)) = Path::new(relative).components().next() {
            top.insert(first.to_string_lossy().into_owned());
        }
    }
    if let Some(root) = local_blob_dir(config) {
        let staged_root = staging.path.join(BLOBS_DIR);
        for blob in &manifest.blobs {
            if blob.copied {
                copy(
                    blob_path(&from.join(BLOBS_DIR), &blob.sha256),
                    &blob_path(&staged_root, &blob.sha256),
                    &blob.sha256,
                )?;
            } else {
                tracing::warn!(
                    sha256 = %blob.sha256,
                    "A blob the backup left to an object store is not restored to local disk."
                );
            }
        }
        if staged_root.exists() {
            moves.push((staged_root, root));
        }
    } else {
        let copied = manifest.blobs.iter().filter(|b| b.copied).count();
        if copied > 0 {
            tracing::warn!(
                blobs = copied,
                store = %config.blob_store_url,
                "The backup's blobs are from a data dir, and this control plane keeps blobs in \
                 an object store: copy the backup's blobs/ folder into the store (same keys, \
                 sha256/<2 hex>/<hash>, under its prefix) before serving."
            );
        }
    }
    for name in &top {
        moves.push((staging.path.join(name), data_dir.join(name)));
    }
    let database = &manifest.files[0];
    // Beside the database when it is not in the data dir: a rename does
    // not cross file systems.
    let db_staging = match sqlite.as_ref().and_then(|p| p.parent()) {
        Some(parent) if !parent.as_os_str().is_empty() && parent != data_dir.as_path() => {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            Some(Staging::new(parent, "restore")?)
        }
        _ => None,
    };
    match &sqlite {
        Some(path) => {
            // The database last: a control plane started on a data dir
            // without it would make a new, empty fleet.
            let staged = db_staging
                .as_ref()
                .unwrap_or(&staging)
                .path
                .join(SQLITE_FILE);
            copy(from.join(&database.path), &staged, &database.sha256)?;
            let staged_url = format!("sqlite://{}?mode=ro", staged.display());
            let mut conn = connect(&staged_url).await?;
            let rows = count_rows(&mut conn, &staged_url).await?;
            let _ = conn.close().await;
            check_rows(&manifest.rows, &rows)?;
            moves.push((staged, path.clone()));
        }
        None => {
            let (dbname, password) = split_password(&url);
            let args: Vec<std::ffi::OsString> = vec![
                "--single-transaction".into(),
                "--exit-on-error".into(),
                "--no-owner".into(),
                "--no-privileges".into(),
                format!("--dbname={dbname}").into(),
                from.join(&database.path).into(),
            ];
            tools.run("pg_restore", &args, password.as_deref()).await?;
            let mut conn = connect(&url).await?;
            let rows = count_rows(&mut conn, &url).await?;
            let _ = conn.close().await;
            check_rows(&manifest.rows, &rows)?;
        }
    }
    for (from_path, to_path) in &moves {
        if let Some(parent) = to_path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::rename(from_path, to_path).map_err(io(to_path))?;
        if let Some(parent) = to_path.parent() {
            sync_dir(parent)?;
        }
    }
    drop(db_staging);
    drop(staging);
    sync_dir(data_dir)?;
    Ok(manifest)
}

fn check_rows(
    expected: &BTreeMap<String, i64>,
    actual: &BTreeMap<String, i64>,
) -> Result<(), BackupError> {
    let differences: Vec<String> = expected
        .iter()
        .filter(|(table, n)| actual.get(*table) != Some(n))
        .map(|(table, n)| {
            format!(
                "{table} has {} rows, the backup {n}",
                actual.get(table).copied().unwrap_or_default()
            )
        })
        .collect();
    if differences.is_empty() {
        Ok(())
    } else {
        Err(BackupError::RowsDiffer(differences.join("; ")))
    }
}
