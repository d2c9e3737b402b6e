//! Pieces served to peers: queued, read on helper tasks, held to
//! `max_concurrent_transfers` in memory and to the per-peer upload cap.

use libp2p::PeerId;
use libp2p::request_response::{InboundRequestId, ResponseChannel};
use std::time::{Duration, Instant};
use tracing::error;

use super::{Internal, Node, ServeJob, local_by_id};
use crate::error::{Error, Result};
use crate::protocol::{Digest, Response};
use crate::rate::TokenBucket;

impl Node {
    /// A peer asks for a piece: queued if this till has it.
    pub(super) fn piece_request(
        &mut self,
        peer: PeerId,
        request: InboundRequestId,
        bundle: Digest,
        index: usize,
        channel: ResponseChannel<Response>,
    ) {
        let job = self
            .bundles
            .get(&bundle)
            .filter(|l| l.have.get(index))
            .map(|l| (l.id, l.file.clone()));
        match job {
            Some((local, file)) => {
                self.serve_queue.push_back(ServeJob {
                    peer,
                    request,
                    channel,
                    local,
                    file,
                    index,
                });
                self.pump_serves();
            }
            None => {
                self.respond(channel, Response::NotFound);
            }
        }
    }

    /// A response is flushed (or failed): its slot is free.
    pub(super) fn response_flushed(&mut self, request: InboundRequestId) {
        if self.sending.remove(&request) {
            self.pump_serves();
        }
    }

    fn pump_serves(&mut self) {
        // A slot is held from the read until libp2p has flushed the
        // response: at most this many pieces sit in memory for serving.
        while self.serving + self.sending.len() < self.config.max_concurrent_transfers.max(1) {
            let Some(job) = self.serve_queue.pop_front() else {
                break;
            };
            if !self.allowed(&job.peer) {
                self.respond(job.channel, Response::Refused);
                continue;
            }
            if !job.channel.is_open() {
                continue;
            }
            let delay = match self.config.upload_limit_bytes_per_second_per_peer {
                0 => Duration::ZERO,
                rate => {
                    let now = Instant::now();
                    let len = job.file.chunks().chunk_len(job.index).unwrap_or(0);
                    let burst = u64::from(job.file.chunks().chunk_size());
                    self.buckets
                        .entry(job.peer)
                        .or_insert_with(|| TokenBucket::new(rate, burst, now))
                        .reserve(len, now)
                }
            };
            self.serving += 1;
            let tx = self.internal_tx.clone();
            self.tasks.spawn(async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let (file, index) = (job.file.clone(), job.index);
                let result = tokio::task::spawn_blocking(move || file.read_for_serving(index))
                    .await
                    .unwrap_or(Err(Error::Stopped));
                let _ = tx.send(Internal::Served { job, result });
            });
        }
    }

    /// A piece read for a peer: sent, or, if it could not be read, no
    /// longer offered.
    pub(super) fn served(&mut self, job: ServeJob, result: Result<Vec<u8>>) {
        let ServeJob {
            peer,
            request,
            channel,
            local,
            index,
            ..
        } = job;
        self.serving = self.serving.saturating_sub(1);
        match result {
            Ok(data) => {
                #[cfg(feature = "test-hooks")]
                let data = crate::hooks::piece(&self.config, data);
                let bytes = data.len() as u64;
                if self.allowed(&peer) && self.respond(channel, Response::Piece(data)) {
                    self.stats.served_bytes += bytes;
                    self.sending.insert(request);
                }
            }
            Err(error) => {
                error!(peer_id = %peer, piece = index, %error, "Cannot serve a piece.");
                if let Some(l) = local_by_id(&mut self.bundles, local) {
                    l.have.clear(index);
                }
                self.status_dirty = true;
                self.respond(channel, Response::NotFound);
            }
        }
        self.pump_serves();
    }
}
