//! The glue to the origin-fetcher election (`election.rs`): its inputs
//! gathered from the peers' announcements, its decisions carried out (an
//! origin download started for the pieces wanted, or stopped), and the
//! download's pieces and end taken in.

use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use super::{Internal, Node, OriginTask, fetching_by_id, short};
use crate::election::{Candidate, Decision, Inputs, Mode};
use crate::error::{Error, Result};
use crate::protocol::Digest;

/// An origin download that failed this many times in a row fails the fetch.
const MAX_ORIGIN_FAILURES: u32 = 3;
const ORIGIN_RETRY: Duration = Duration::from_secs(1);

impl Node {
    pub(super) fn drive_fetches(&mut self, now: Instant) {
        let fetching: Vec<Digest> = self
            .bundles
            .values()
            .filter(|l| l.fetch.is_some())
            .map(|l| l.digest)
            .collect();
        for digest in fetching {
            let cancelled = self
                .bundles
                .get(&digest)
                .and_then(|l| l.fetch.as_ref())
                .is_some_and(|f| f.reply.as_ref().is_some_and(|r| r.is_closed()));
            if cancelled {
                info!(bundle = %short(&digest), "Fetch cancelled by its caller.");
                self.fail_fetch(digest, Error::Stopped);
                continue;
            }
            let decision = self.decide(digest, now);
            match decision {
                Decision::Wait => {}
                Decision::Start(mode) => self.start_origin(digest, mode),
                Decision::Stop(reason) => {
                    if let Some(fetch) =
                        self.bundles.get_mut(&digest).and_then(|l| l.fetch.as_mut())
                        && let Some(task) = fetch.origin_task.take()
                    {
                        task.abort.abort();
                        info!(bundle = %short(&digest), %reason, "Stopped fetching from the origin.");
                        self.status_dirty = true;
                    }
                }
            }
        }
    }

    fn decide(&mut self, digest: Digest, now: Instant) -> Decision {
        let Some(l) = self.bundles.get_mut(&digest) else {
            return Decision::Wait;
        };
        let Some(fetch) = l.fetch.as_mut() else {
            return Decision::Wait;
        };
        if fetch.finishing {
            return Decision::Wait;
        }
        let mut store = l.have.clone();
        let mut candidates = Vec::new();
        let mut connected = 0;
        let mut heard_all = true;
        for (id, p) in &self.peers {
            if !Self::usable(p) {
                continue;
            }
            connected += 1;
            heard_all &= p.answered.is_some_and(|at| at >= fetch.started);
            let Some(remote) = p.bundles.get(&digest) else {
                continue;
            };
            if remote.chunks_digest != l.chunks_digest || remote.have.len() != store.len() {
                continue;
            }
            for i in 0..store.len() {
                if remote.have.get(i) {
                    store.set(i);
                }
            }
            if remote.fetching {
                candidates.push(Candidate {
                    peer: *id,
                    origin: remote.origin,
                    last_progress: remote.last_progress,
                });
            }
        }
        fetch.election.decide(&Inputs {
            now,
            store_complete: store.is_full(),
            connected,
            candidates: &candidates,
            origin_allowed: now >= fetch.origin_retry_at,
            heard_all,
        })
    }

    fn start_origin(&mut self, digest: Digest, mode: Mode) {
        let Some(l) = self.bundles.get(&digest) else {
            return;
        };
        let Some(fetch) = l.fetch.as_ref() else {
            return;
        };
        let mut wanted: Vec<usize> = l
            .have
            .missing()
            .filter(|i| !fetch.requested.contains_key(i))
            .collect();
        if mode == Mode::Store {
            // Only what no one in the store has.
            wanted.retain(|&i| {
                !self.peers.values().any(|p| {
                    Self::usable(p)
                        && p.bundles
                            .get(&digest)
                            .is_some_and(|r| r.chunks_digest == l.chunks_digest && r.have.get(i))
                })
            });
        }
        let ranges = runs(&wanted);
        let origin = fetch.origin.clone();
        let file = l.file.clone();
        let local = l.id;
        let task = self.id();
        let Some(fetch) = self.bundles.get_mut(&digest).and_then(|l| l.fetch.as_mut()) else {
            return;
        };
        if ranges.is_empty() {
            fetch.election.origin_stopped();
            return;
        }
        info!(
            bundle = %short(&digest),
            mode = ?mode,
            pieces = wanted.len(),
            ranges = ranges.len(),
            "Fetching from the origin."
        );
        let tx = self.internal_tx.clone();
        let abort = self.tasks.spawn(async move {
            let mut result = Ok(());
            for (first, last) in ranges {
                let mut on_piece = |index: usize, data: Vec<u8>| -> Result<()> {
                    if index < first || index > last {
                        return Err(Error::OriginOutOfRange { index, first, last });
                    }
                    let bytes = data.len();
                    let write = || file.write_verified(index, &data);
                    let written = match tokio::runtime::Handle::current().runtime_flavor() {
                        tokio::runtime::RuntimeFlavor::CurrentThread => write(),
                        _ => tokio::task::block_in_place(write),
                    };
                    written.map_err(|e| match e {
                        Error::HashMismatch { index, .. } => Error::OriginHashMismatch { index },
                        e => e,
                    })?;
                    let _ = tx.send(Internal::OriginPiece {
                        local,
                        task,
                        index,
                        bytes,
                    });
                    Ok(())
                };
                if let Err(error) = origin.fetch_pieces(first, last, &mut on_piece).await {
                    result = Err(error);
                    break;
                }
            }
            let _ = tx.send(Internal::OriginDone {
                local,
                task,
                result,
            });
        });
        fetch.origin_task = Some(OriginTask { id: task, abort });
        self.status_dirty = true;
        self.announce(true);
    }

    /// A piece arrived from this till's origin download.
    pub(super) fn origin_piece(
        &mut self,
        now: Instant,
        local: u64,
        task: u64,
        index: usize,
        bytes: usize,
    ) {
        let Some(mut f) = fetching_by_id(&mut self.bundles, local) else {
            return;
        };
        let digest = f.digest;
        f.fetch.stats.origin_bytes += bytes as u64;
        self.stats.origin_bytes += bytes as u64;
        if f.fetch.origin_task.as_ref().is_some_and(|t| t.id == task) {
            f.fetch.election.origin_progressed(now);
        }
        if f.landed(index, now) {
            f.fresh.insert(index, now);
            self.status_dirty = true;
            // Peers pull a piece as soon as they hear of it.
            self.announce(true);
        }
        self.check_complete(digest);
    }

    /// This till's origin download ended, done or failed.
    pub(super) fn origin_done(&mut self, now: Instant, local: u64, task: u64, result: Result<()>) {
        let Some(f) = fetching_by_id(&mut self.bundles, local) else {
            return;
        };
        let (digest, fetch) = (f.digest, f.fetch);
        if fetch.origin_task.as_ref().is_none_or(|t| t.id != task) {
            return;
        }
        fetch.origin_task = None;
        fetch.election.origin_stopped();
        self.status_dirty = true;
        match result {
            Ok(()) => {
                fetch.origin_failures = 0;
                debug!(bundle = %short(&digest), "Origin download done.");
            }
            Err(error) => {
                fetch.origin_failures += 1;
                warn!(bundle = %short(&digest), %error, failures = fetch.origin_failures, "Origin download failed.");
                if fetch.origin_failures >= MAX_ORIGIN_FAILURES {
                    self.fail_fetch(digest, error);
                } else {
                    fetch.origin_retry_at = now + ORIGIN_RETRY * fetch.origin_failures;
                }
            }
        }
    }
}

/// Contiguous runs of sorted piece indexes.
fn runs(pieces: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &i in pieces {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == i => *last = i,
            _ => out.push((i, i)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn missing_pieces_go_to_the_origin_as_contiguous_runs() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[4]), vec![(4, 4)]);
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8]), vec![(0, 2), (5, 5), (7, 8)]);
    }
}
