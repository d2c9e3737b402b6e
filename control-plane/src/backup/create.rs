//! Writing a backup: the database's snapshot, the data dir's keys and CA,
//! the local blobs, the manifest; in a hidden folder renamed into place.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::files::{Staging, create_private, hash_file, sync_dir, sync_tree};
use super::postgres::backup_postgres;
use super::*;
use crate::config::PostgresTools;

/// The data dir's files a backup holds, relative to it: the repository
/// keys (required, unless `keys_in_database`: sealed there with a
/// key-encryption key, see `crate::online_keys`), the first admin's setup
/// code, and in `tls/` the fleet CAs'
/// certificates and keys, their state file and the trust bundle, and the
/// retired CAs' certificates. Nothing else: the database is backed up as
/// a database, blobs by the list the database holds, and whatever else is
/// in the folder (temporary files, another program's) is not the control
/// plane's to restore.
pub fn data_dir_files(data_dir: &Path, keys_in_database: bool) -> Result<Vec<String>, BackupError> {
    let mut files = Vec::new();
    for name in REQUIRED_FILES {
        let path = data_dir.join(name);
        if path.is_file() {
            files.push(name.to_string());
        } else if !keys_in_database {
            return Err(BackupError::MissingKey(path));
        }
    }
    for name in OPTIONAL_FILES {
        if data_dir.join(name).is_file() {
            files.push(name.to_string());
        }
    }
    // The state file first: a rotation meanwhile writes the new CA's files
    // before the state file names them.
    let tls = data_dir.join(TLS_DIR);
    for name in [
        crate::tls::authorities::STATE_FILE,
        crate::tls::TRUST_BUNDLE_FILE,
    ] {
        if tls.join(name).is_file() {
            files.push(format!("{TLS_DIR}/{name}"));
        }
    }
    let retired = format!("{TLS_DIR}/{}", crate::tls::authorities::RETIRED_DIR);
    for (dir, extensions) in [
        (TLS_DIR.to_string(), &["crt", "key"][..]),
        (retired, &["crt"][..]),
    ] {
        let entries = match std::fs::read_dir(data_dir.join(&dir)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(BackupError::Io {
                    path: data_dir.join(&dir),
                    source,
                });
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&data_dir.join(&dir)))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let wanted = Path::new(&name)
                .extension()
                .is_some_and(|e| extensions.iter().any(|x| e == *x));
            if wanted && entry.file_type().map_err(io(&entry.path()))?.is_file() {
                names.push(format!("{dir}/{name}"));
            }
        }
        names.sort();
        files.extend(names);
    }
    Ok(files)
}

/// Every blob the database names: each bundle and its chunk list, with
/// the bundle that names it.
pub(super) async fn blob_list(
    conn: &mut AnyConnection,
    url: &str,
) -> Result<BTreeMap<String, (String, Option<u64>)>, BackupError> {
    let rows = sqlx::query("SELECT target, sha256, chunks_sha256, length FROM bundles")
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error(url))?;
    let mut blobs = BTreeMap::new();
    for row in rows {
        let read = || -> Result<(String, String, String, i64), sqlx::Error> {
            Ok((
                row.try_get("target")?,
                row.try_get("sha256")?,
                row.try_get("chunks_sha256")?,
                row.try_get("length")?,
            ))
        };
        let (target, sha256, chunks, length) = read().map_err(db_error(url))?;
        blobs.insert(sha256, (target.clone(), u64::try_from(length).ok()));
        blobs.entry(chunks).or_insert((target, None));
    }
    Ok(blobs)
}

/// What was read from the database's snapshot.
pub(super) struct Snapshot {
    pub(super) schema_version: i64,
    pub(super) rows: BTreeMap<String, i64>,
    pub(super) blobs: BTreeMap<String, (String, Option<u64>)>,
}

/// The SQLite database at `source`, copied to `dest` by `VACUUM INTO` and
/// checked there: integrity, schema version, rows, blobs.
async fn backup_sqlite(source: &Path, dest: &Path) -> Result<Snapshot, BackupError> {
    if !source.is_file() {
        return Err(BackupError::NoDatabase(source.to_path_buf()));
    }
    let source_url = format!("sqlite://{}?mode=ro", source.display());
    let mut conn = connect(&source_url).await?;
    sqlx::query("PRAGMA busy_timeout = 10000")
        .execute(&mut conn)
        .await
        .map_err(db_error(&source_url))?;
    // VACUUM INTO fills an empty file: made first, so it is private.
    drop(create_private(dest)?);
    let dest_text = dest
        .to_str()
        .ok_or_else(|| BackupError::Internal(format!("{} is not UTF-8", dest.display())))?;
    sqlx::query("VACUUM INTO $1")
        .bind(dest_text.to_string())
        .execute(&mut conn)
        .await
        .map_err(db_error(&source_url))?;
    conn.close().await.map_err(db_error(&source_url))?;

    let copy_url = format!("sqlite://{}?mode=ro", dest.display());
    let mut copy = connect(&copy_url).await?;
    let check: String = sqlx::query("PRAGMA integrity_check")
        .fetch_one(&mut copy)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(db_error(&copy_url))?;
    if check != "ok" {
        return Err(BackupError::Verify(check));
    }
    let snapshot = Snapshot {
        schema_version: schema_version(&mut copy, &copy_url).await?,
        rows: count_rows(&mut copy, &copy_url).await?,
        blobs: blob_list(&mut copy, &copy_url).await?,
    };
    copy.close().await.map_err(db_error(&copy_url))?;
    Ok(snapshot)
}

/// Backs up the control plane `config` describes into the new folder `to`
/// while it serves. Returns the manifest written.
pub async fn backup(
    config: &Config,
    to: &Path,
    tools: &PostgresTools,
) -> Result<Manifest, BackupError> {
    if to.exists() {
        return Err(BackupError::TargetExists(to.to_path_buf()));
    }
    let name = to
        .file_name()
        .ok_or_else(|| BackupError::Internal(format!("{} names no folder", to.display())))?;
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let staging = Staging::new(&parent, &format!("backup-{}", name.to_string_lossy()))?;
    let url = config.effective_database_url();
    let backend = Backend::of_url(&url)
        .ok_or_else(|| BackupError::Internal("database_url names no known database".into()))?;
    let (database_file, snapshot) = match backend {
        Backend::Sqlite => {
            let source = crate::sqlite_path(&url).ok_or_else(|| {
                BackupError::Internal("an in-memory SQLite database has nothing to back up".into())
            })?;
            let dest = staging.path.join(SQLITE_FILE);
            (SQLITE_FILE, backup_sqlite(&source, &dest).await?)
        }
        Backend::Postgres => {
            let dest = staging.path.join(POSTGRES_FILE);
            (POSTGRES_FILE, backup_postgres(&url, &dest, tools).await?)
        }
    };
    let (sha256, size_bytes) = hash_file(&staging.path.join(database_file), None)?;
    let mut files = vec![FileEntry {
        path: database_file.to_string(),
        sha256,
        size_bytes,
    }];
    let keys_in_database = config.repository_key_encryption_key_path.is_some();
    for name in data_dir_files(&config.data_dir, keys_in_database)? {
        let dest = staging.path.join(FILES_DIR).join(&name);
        let (sha256, size_bytes) = hash_file(&config.data_dir.join(&name), Some(&dest))?;
        files.push(FileEntry {
            path: format!("{FILES_DIR}/{name}"),
            sha256,
            size_bytes,
        });
    }
    if config.tls_ca_key_path.is_some() {
        tracing::warn!(
            "The fleet CA is the company's (tls_ca_cert_path, tls_ca_key_path): its files are \
             not in this backup; they are kept with the company's PKI."
        );
    }
    let local = local_blob_dir(config);
    let mut blobs = Vec::new();
    for (sha256, (bundle, length)) in snapshot.blobs {
        if !is_sha256_hex(&sha256) {
            return Err(BackupError::Verify(format!(
                "bundle {bundle} names the blob `{sha256}`"
            )));
        }
        let entry = match &local {
            Some(root) => {
                let path = blob_path(root, &sha256);
                if !path.is_file() {
                    return Err(BackupError::BlobMissing {
                        sha256,
                        bundle,
                        path,
                    });
                }
                let dest = blob_path(&staging.path.join(BLOBS_DIR), &sha256);
                let (actual, size_bytes) = hash_file(&path, Some(&dest))?;
                if actual != sha256 {
                    return Err(BackupError::Verify(format!(
                        "the blob {} of bundle {bundle} is damaged: its SHA-256 is {actual}",
                        path.display()
                    )));
                }
                BlobEntry {
                    sha256,
                    size_bytes,
                    copied: true,
                }
            }
            None => BlobEntry {
                sha256,
                size_bytes: length.unwrap_or(0),
                copied: false,
            },
        };
        blobs.push(entry);
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        posfleet_version: env!("CARGO_PKG_VERSION").to_string(),
        schema_version: snapshot.schema_version,
        backend: backend.into(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        files,
        blobs,
        rows: snapshot.rows,
    };
    let manifest_path = staging.path.join(MANIFEST_FILE);
    let mut file = create_private(&manifest_path)?;
    let json = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
    file.write_all(&json)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(io(&manifest_path))?;
    sync_tree(&staging.path)?;
    let staged = staging.keep();
    if let Err(source) = std::fs::rename(&staged, to) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(BackupError::Io {
            path: to.to_path_buf(),
            source,
        });
    }
    sync_dir(&parent)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_dir_files_are_the_keys_and_the_ca_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let missing = data_dir_files(data, false).unwrap_err().to_string();
        assert!(
            missing.contains("repository-keys/snapshot.key"),
            "{missing}"
        );
        for file in [
            "repository-keys/snapshot.key",
            "repository-keys/timestamp.key",
            "repository-keys/timestamp.key.tmp",
            "admin-setup-code",
            "posfleet.db",
            "posfleet.db-wal",
            "tls/authorities.json",
            "tls/trust-bundle.pem",
            "tls/fleet-ca.crt",
            "tls/fleet-ca.key",
            "tls/fleet-ca-1790000000.crt",
            "tls/fleet-ca-1790000000.key",
            "tls/fleet-ca.key.tmp",
            "tls/retired/fleet-ca-old.crt",
            "blobs/sha256/ab/abcd",
            "notes.txt",
        ] {
            let path = data.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        assert_eq!(
            data_dir_files(data, false).unwrap(),
            [
                "repository-keys/snapshot.key",
                "repository-keys/timestamp.key",
                "admin-setup-code",
                "tls/authorities.json",
                "tls/trust-bundle.pem",
                "tls/fleet-ca-1790000000.crt",
                "tls/fleet-ca-1790000000.key",
                "tls/fleet-ca.crt",
                "tls/fleet-ca.key",
                "tls/retired/fleet-ca-old.crt",
            ]
        );
    }
}
