//! The bundles this till holds: shared whole, or being fetched, from the
//! command that starts a fetch to the file finished or the fetch failed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::{error, info};

use super::{Fetch, FetchCommand, Internal, Local, Node, short};
use crate::bitmap::Bitmap;
use crate::election::{Election, Timing};
use crate::error::{Error, Result};
use crate::piece_file::PieceFile;
use crate::protocol::Digest;
use crate::{Bundle, FetchStats};

impl Node {
    pub(super) fn unshare(&mut self, digest: Digest) {
        if let Some(local) = self.bundles.remove(&digest) {
            info!(bundle = %short(&digest), "Bundle no longer shared.");
            if let Some(mut fetch) = local.fetch {
                fetch.end(Error::Stopped);
            }
            self.status_dirty = true;
        }
    }

    pub(super) fn share(&mut self, bundle: Bundle, file: Arc<PieceFile>) -> Result<()> {
        if let Some(existing) = self.bundles.get(&bundle.digest)
            && existing.fetch.is_some()
        {
            return Err(Error::AlreadyFetching {
                digest: hex::encode(bundle.digest),
            });
        }
        let count = file.chunks().count();
        let id = self.id();
        info!(bundle = %short(&bundle.digest), path = %file.path().display(), "Sharing a bundle.");
        self.bundles.insert(
            bundle.digest,
            Local {
                id,
                digest: bundle.digest,
                chunks_digest: file.chunks().digest(),
                file,
                have: Bitmap::full(count),
                fetch: None,
                fresh: HashMap::new(),
            },
        );
        self.status_dirty = true;
        Ok(())
    }

    pub(super) fn start_fetch(&mut self, command: FetchCommand) {
        let digest = command.bundle.digest;
        if let Some(existing) = self.bundles.get(&digest) {
            if existing.fetch.is_some() {
                let _ = command.reply.send(Err(Error::AlreadyFetching {
                    digest: hex::encode(digest),
                }));
                return;
            }
            // A whole copy is here already: fill the destination from it,
            // piece by piece, verified like any other source.
            info!(bundle = %short(&digest), from = %existing.file.path().display(), to = %command.file.path().display(), "Copying a bundle already here.");
            let from = existing.file.clone();
            let FetchCommand {
                file: to,
                have,
                progress,
                reply,
                ..
            } = command;
            self.tasks.spawn_blocking(move || {
                let copy = || -> Result<FetchStats> {
                    for index in have.missing() {
                        to.write_verified(index, &from.read_verified(index)?)?;
                    }
                    to.finish()?;
                    progress.send_replace(to.chunks().length());
                    Ok(FetchStats::default())
                };
                let _ = reply.send(copy());
            });
            return;
        }
        let now = Instant::now();
        let timing = Timing {
            settle: self.config.settle_delay,
            fallback: self.config.origin_fallback_delay,
            stall: self.config.stall_timeout,
        };
        let id = self.id();
        info!(
            bundle = %short(&digest),
            path = %command.file.path().display(),
            pieces = command.have.len(),
            verified = command.have.count(),
            "Fetching a bundle."
        );
        let local = Local {
            id,
            digest,
            chunks_digest: command.file.chunks().digest(),
            file: command.file,
            have: command.have,
            fresh: HashMap::new(),
            fetch: Some(Fetch {
                origin: command.origin,
                reply: Some(command.reply),
                progress: command.progress,
                requested: HashMap::new(),
                election: Election::new(self.local_peer, digest, timing, now),
                origin_task: None,
                origin_failures: 0,
                origin_retry_at: now,
                stats: FetchStats::default(),
                finishing: false,
                started: now,
            }),
        };
        self.bundles.insert(digest, local);
        self.status_dirty = true;
        self.check_complete(digest);
    }

    pub(super) fn check_complete(&mut self, digest: Digest) {
        let Some(l) = self.bundles.get_mut(&digest) else {
            return;
        };
        let Some(fetch) = l.fetch.as_mut() else {
            return;
        };
        if !l.have.is_full() || fetch.finishing {
            return;
        }
        fetch.finishing = true;
        if let Some(task) = fetch.origin_task.take() {
            task.abort.abort();
            fetch.election.origin_stopped();
        }
        fetch.progress.send_replace(l.file.chunks().length());
        let file = l.file.clone();
        let local = l.id;
        let tx = self.internal_tx.clone();
        self.tasks.spawn_blocking(move || {
            let result = file.finish();
            let _ = tx.send(Internal::Finished { local, result });
        });
    }

    pub(super) fn fail_fetch(&mut self, digest: Digest, error: Error) {
        let Some(l) = self.bundles.remove(&digest) else {
            return;
        };
        error!(bundle = %short(&digest), %error, "Fetch failed.");
        if let Some(mut fetch) = l.fetch {
            fetch.end(error);
        }
        self.status_dirty = true;
    }

    /// A fetch's helper task finished the file (or failed to).
    pub(super) fn finished(&mut self, local: u64, result: Result<()>) {
        let Some(digest) = self.digest_of(local) else {
            return;
        };
        match result {
            Ok(()) => {
                let taken = self.bundles.get_mut(&digest).and_then(|l| l.fetch.take());
                if let Some(mut fetch) = taken {
                    info!(
                        bundle = %short(&digest),
                        origin_bytes = fetch.stats.origin_bytes,
                        peer_bytes = fetch.stats.peer_bytes,
                        "Bundle complete."
                    );
                    if let Some(reply) = fetch.reply.take() {
                        let _ = reply.send(Ok(fetch.stats));
                    }
                }
                self.status_dirty = true;
            }
            Err(error) => self.fail_fetch(digest, error),
        }
    }

    pub(super) fn digest_of(&self, local: u64) -> Option<Digest> {
        self.bundles
            .values()
            .find(|l| l.id == local)
            .map(|l| l.digest)
    }
}
