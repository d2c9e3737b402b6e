//! Logs on demand, the till's side. The agent keeps its own log lines
//! (`capture`) and the application log files of `log_paths` (`tail`) in a
//! bounded store under `<data_dir>/logs/` (`store`) that survives
//! restarts. When a heartbeat's answer carries a log request, the matching
//! lines are redacted (`redact`) and uploaded with `UploadLogs`, within the
//! upload bandwidth cap, and new lines are followed when asked (`upload`).
//!
//! One task owns the store and the followed files: it appends what the
//! layer and the files produce every [`POLL_INTERVAL`], and hands uploads
//! a snapshot of the segments and a subscription to the lines stored after
//! it, so a follow misses nothing between the two.

mod capture;
mod redact;
mod store;
mod tail;
mod upload;

pub use capture::{Capture, Captured, capture};
pub use redact::{DEFAULT_PATTERNS, Redactor};
pub(crate) use upload::{UploadSettings, spawn_uploads};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};

use store::{Entry, LogStore, Snapshot};
use tail::{Position, Tailer};

/// How often followed files are read and captured lines written.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Followed files' positions are saved at most this often.
const SAVE_POSITIONS_INTERVAL: Duration = Duration::from_secs(2);
/// Captured lines written at once when many come between two polls.
const FLUSH_LINES: usize = 1024;
/// New lines a follow may fall behind by before some are skipped.
const FOLLOW_BACKLOG: usize = 4096;
/// A failure to write the store is logged at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);
const POSITIONS_FILE: &str = "positions.json";

/// The store's contents at one moment and what is stored after it.
pub(crate) struct Subscription {
    pub snapshot: Snapshot,
    pub new_lines: broadcast::Receiver<Entry>,
}

/// Talks to the store's task; cheap to clone. The task ends when every
/// handle is dropped.
#[derive(Clone)]
pub(crate) struct StoreHandle {
    commands: mpsc::Sender<oneshot::Sender<Subscription>>,
}

impl StoreHandle {
    /// `None` when the task has stopped.
    pub async fn subscribe(&self) -> Option<Subscription> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// Opens the store in `dir` (at most `max_bytes`) and starts its task,
/// following `paths` and writing `captured`.
pub(crate) fn spawn_store(
    dir: &Path,
    max_bytes: u64,
    paths: &[PathBuf],
    captured: Option<Captured>,
) -> std::io::Result<StoreHandle> {
    let store = LogStore::open(dir, max_bytes)?;
    let positions_path = dir.join(POSITIONS_FILE);
    let saved: BTreeMap<PathBuf, Position> =
        posfleet_runtime::files::read_optional(&positions_path)?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
    let tailers = paths
        .iter()
        .map(|path| Tailer::new(path, saved.get(path).copied()))
        .collect();
    let (commands, requests) = mpsc::channel(8);
    let (new_lines, _) = broadcast::channel(FOLLOW_BACKLOG);
    let owner = Owner {
        store,
        tailers,
        positions_path,
        saved,
        new_lines,
        pending: Vec::new(),
        last_error: None,
    };
    tokio::spawn(owner.run(captured, requests));
    Ok(StoreHandle { commands })
}

/// The task that owns the store and the followed files.
struct Owner {
    store: LogStore,
    tailers: Vec<Tailer>,
    positions_path: PathBuf,
    saved: BTreeMap<PathBuf, Position>,
    new_lines: broadcast::Sender<Entry>,
    pending: Vec<Entry>,
    last_error: Option<Instant>,
}

impl Owner {
    async fn run(
        mut self,
        mut captured: Option<Captured>,
        mut requests: mpsc::Receiver<oneshot::Sender<Subscription>>,
    ) {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        let mut save = tokio::time::interval(SAVE_POSITIONS_INTERVAL);
        let mut dropped_reported = 0;
        loop {
            tokio::select! {
                line = next_captured(&mut captured) => match line {
                    Some(entry) => {
                        self.pending.push(entry);
                        if self.pending.len() >= FLUSH_LINES {
                            self.flush();
                        }
                    }
                    None => captured = None,
                },
                _ = poll.tick() => {
                    if let Some(captured) = &captured {
                        let dropped = captured.dropped.load(Ordering::Relaxed);
                        if dropped > dropped_reported {
                            let text = format!("WARN posfleet_agent::logs: {} agent log lines were dropped (the log store fell behind)", dropped - dropped_reported);
                            self.pending.push(Entry::new(store::AGENT_SOURCE, &text));
                            dropped_reported = dropped;
                        }
                    }
                    for tailer in &mut self.tailers {
                        let source = tailer.path().display().to_string();
                        for line in tailer.poll() {
                            self.pending.push(Entry::new(&source, &line));
                        }
                    }
                    self.flush();
                }
                _ = save.tick() => self.save_positions(),
                request = requests.recv() => match request {
                    Some(reply) => {
                        self.flush();
                        let _ = reply.send(Subscription {
                            snapshot: self.store.snapshot(),
                            new_lines: self.new_lines.subscribe(),
                        });
                    }
                    None => break,
                },
            }
        }
        self.flush();
        self.save_positions();
    }

    /// Writes the pending lines and hands them to follows.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.pending);
        if let Err(error) = self.store.append(&lines) {
            if self
                .last_error
                .is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL)
            {
                self.last_error = Some(Instant::now());
                tracing::error!(%error, "Cannot write the log store; lines are lost until it can.");
            }
            return;
        }
        for line in lines {
            // No follow listening is not an error.
            let _ = self.new_lines.send(line);
        }
    }

    fn save_positions(&mut self) {
        let positions: BTreeMap<PathBuf, Position> = self
            .tailers
            .iter()
            .filter_map(|t| t.position().map(|p| (t.path().to_path_buf(), p)))
            .collect();
        if positions == self.saved {
            return;
        }
        let result = serde_json::to_vec(&positions)
            .map_err(std::io::Error::other)
            .and_then(|bytes| posfleet_runtime::files::write_private(&self.positions_path, &bytes));
        match result {
            Ok(()) => self.saved = positions,
            Err(error) => {
                tracing::warn!(%error, path = %self.positions_path.display(), "Cannot save where the followed log files were read up to.")
            }
        }
    }
}

async fn next_captured(captured: &mut Option<Captured>) -> Option<Entry> {
    match captured {
        Some(captured) => captured.lines.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path);
        file.and_then(|mut f| f.write_all(text.as_bytes())).unwrap();
    }

    /// The texts stored, oldest first, once they are `expected` (the task
    /// reads files twice a second).
    async fn stored_eventually(store: &StoreHandle, expected: &[&str]) {
        let mut texts = Vec::new();
        for _ in 0..50 {
            let snapshot = store.subscribe().await.unwrap().snapshot;
            texts.clear();
            store::read(&snapshot, |e| texts.push(e.text)).unwrap();
            if texts == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("stored {texts:?}, expected {expected:?}");
    }

    #[tokio::test]
    async fn followed_lines_are_stored_handed_to_follows_and_resumed_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app.log");
        let logs = dir.path().join("logs");
        append(&app, "one\n");
        let store = spawn_store(&logs, 1024 * 1024, std::slice::from_ref(&app), None).unwrap();
        stored_eventually(&store, &["one"]).await;
        // A line stored after a subscription reaches it, with its source.
        let mut subscription = store.subscribe().await.unwrap();
        append(&app, "two\n");
        let line = tokio::time::timeout(Duration::from_secs(5), subscription.new_lines.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (line.text.as_str(), line.source),
            ("two", app.display().to_string())
        );
        // Stopped (the task saves where the file was read up to), written
        // to meanwhile, started again: nothing lost, nothing twice.
        drop((store, subscription));
        tokio::time::sleep(Duration::from_millis(200)).await;
        append(&app, "three\n");
        let store = spawn_store(&logs, 1024 * 1024, std::slice::from_ref(&app), None).unwrap();
        stored_eventually(&store, &["one", "two", "three"]).await;
    }
}
