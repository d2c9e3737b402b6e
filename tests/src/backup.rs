//! Timing `posfleet-control-plane backup` and `restore` on a populated
//! control plane (fleet-sim `--backup`): backups taken while it serves,
//! each restored into a fresh data dir and database.

use serde::Serialize;
use std::path::Path;
use std::time::Instant;

use crate::{ControlPlane, PostgresDb, median};

/// Backup and restore times, runs and their medians.
#[derive(Debug, Serialize)]
pub struct BackupFigures {
    pub runs: usize,
    pub backup_seconds: Vec<f64>,
    pub restore_seconds: Vec<f64>,
    pub median_backup_seconds: f64,
    pub median_restore_seconds: f64,
    /// The database file in the backup (`database/…`).
    pub database_bytes: u64,
    /// Everything in the backup.
    pub backup_bytes: u64,
    /// What `backup` printed (the last run).
    pub summary: String,
}

/// Backs `cp` up `runs` times into `dir` and restores each backup into a
/// fresh data dir and, with `postgres_server`, a fresh database on it.
pub fn measure(
    cp: &ControlPlane,
    dir: &Path,
    postgres_server: Option<&str>,
    runs: usize,
) -> BackupFigures {
    let mut backup_seconds = Vec::new();
    let mut restore_seconds = Vec::new();
    let mut summary = String::new();
    let (mut database_bytes, mut backup_bytes) = (0, 0);
    for run in 0..runs {
        let to = dir.join(format!("backup-{run}"));
        let started = Instant::now();
        // Without the temporary folder's name, for the figures file.
        summary = cp.backup(&to).replace(&to.display().to_string(), "DIR");
        backup_seconds.push(started.elapsed().as_secs_f64());
        eprintln!("  backup {run}: {:.2}s", backup_seconds[run]);
        database_bytes = tree_bytes(&to.join("database"));
        backup_bytes = tree_bytes(&to);

        let db = postgres_server.map(PostgresDb::create_on);
        let data_dir = dir.join(format!("restored-{run}"));
        let started = Instant::now();
        crate::restore(&data_dir, db.as_ref().map(|db| db.url.as_str()), &to);
        restore_seconds.push(started.elapsed().as_secs_f64());
        eprintln!("  restore {run}: {:.2}s", restore_seconds[run]);
        drop(db);
        for done in [&to, &data_dir] {
            std::fs::remove_dir_all(done).expect("remove a measured folder");
        }
    }
    BackupFigures {
        runs,
        median_backup_seconds: median(backup_seconds.clone()),
        median_restore_seconds: median(restore_seconds.clone()),
        backup_seconds,
        restore_seconds,
        database_bytes,
        backup_bytes,
        summary: summary.trim().to_string(),
    }
}

/// Bytes of the files under `path`.
fn tree_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| tree_bytes(&entry.path()))
        .sum()
}
