//! Pieces fetched from peers: which to ask whom for (`pick.rs`), the
//! requests in flight, and each piece verified and written on a helper task.

use libp2p::PeerId;
use std::time::Instant;

use super::pick::{Capacity, Holder, rarest_first, salt_of};
use super::{Internal, Node, Outbound, fetching_by_id, local_by_id};
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};

/// Piece requests to one peer at once.
const PER_PEER_IN_FLIGHT: usize = 4;

impl Node {
    /// The request for `index` to `peer` is over (a later request of the
    /// same piece to another peer stays).
    fn unrequest(&mut self, local: u64, index: usize, peer: PeerId) {
        if let Some(fetch) = local_by_id(&mut self.bundles, local).and_then(|l| l.fetch.as_mut())
            && fetch.requested.get(&index) == Some(&peer)
        {
            fetch.requested.remove(&index);
        }
    }

    fn store_piece(&mut self, local: u64, index: usize, peer: PeerId, data: Vec<u8>) {
        let Some(l) = self.bundles.values().find(|l| l.id == local) else {
            return;
        };
        if l.fetch.is_none() || l.have.get(index) {
            self.unrequest(local, index, peer);
            return;
        }
        let file = l.file.clone();
        let tx = self.internal_tx.clone();
        self.tasks.spawn_blocking(move || {
            let bytes = data.len();
            let result = file.write_verified(index, &data);
            drop(data);
            let _ = tx.send(Internal::Stored {
                local,
                index,
                peer,
                bytes,
                result,
            });
        });
    }

    /// Requests missing pieces from peers, rarest first, within the
    /// in-flight limits.
    pub(super) fn schedule(&mut self) {
        if !std::mem::take(&mut self.schedule_dirty) {
            return;
        }
        // Pieces stay counted from the request until they are written, so
        // at most this many are in memory on the receiving side.
        let in_flight: usize = self
            .bundles
            .values()
            .filter_map(|l| l.fetch.as_ref())
            .map(|f| f.requested.len())
            .sum();
        let mut budget = self
            .config
            .max_concurrent_transfers
            .max(1)
            .saturating_sub(in_flight);
        if budget == 0 {
            return;
        }
        let salt = salt_of(&self.local_peer);
        let Node {
            bundles,
            peers,
            swarm,
            outbound,
            ..
        } = self;
        for l in bundles.values_mut() {
            let Some(fetch) = l.fetch.as_mut() else {
                continue;
            };
            if fetch.finishing {
                continue;
            }
            // Who has what of this bundle, and how busy each is.
            let holders: Vec<Holder<'_, PeerId>> = peers
                .iter()
                .filter(|(_, p)| Self::usable(p))
                .filter_map(|(id, p)| {
                    let r = p.bundles.get(&l.digest)?;
                    (r.chunks_digest == l.chunks_digest && r.have.len() == l.have.len()).then(
                        || Holder {
                            peer: *id,
                            salt: salt_of(id),
                            have: &r.have,
                            load: p.in_flight,
                        },
                    )
                })
                .collect();
            let capacity = Capacity {
                per_peer: PER_PEER_IN_FLIGHT,
                budget,
            };
            let requested = &fetch.requested;
            let picks = rarest_first(
                &l.have,
                |i| requested.contains_key(&i),
                &holders,
                salt,
                capacity,
            );
            budget -= picks.len();
            drop(holders);
            for (index, peer) in picks {
                let id = swarm.behaviour_mut().pieces.send_request(
                    &peer,
                    Request::Piece {
                        bundle: l.digest,
                        index: index as u32,
                    },
                );
                outbound.insert(id, Outbound::Piece { local: l.id, index });
                fetch.requested.insert(index, peer);
                if let Some(p) = peers.get_mut(&peer) {
                    p.in_flight += 1;
                }
            }
            if budget == 0 {
                break;
            }
        }
    }

    /// A peer answered a piece request.
    pub(super) fn piece_answer(
        &mut self,
        peer: PeerId,
        local: u64,
        index: usize,
        response: Response,
    ) {
        self.piece_returned(peer);
        match response {
            Response::Piece(data) => self.store_piece(local, index, peer, data),
            other => {
                if matches!(other, Response::NotFound) {
                    // Its announcement was stale: forget that piece.
                    if let Some(digest) = self.digest_of(local)
                        && let Some(remote) = self
                            .peers
                            .get_mut(&peer)
                            .and_then(|p| p.bundles.get_mut(&digest))
                    {
                        remote.have.clear(index);
                    }
                }
                self.unrequest(local, index, peer);
            }
        }
    }

    /// A piece request got no answer.
    pub(super) fn piece_failed(&mut self, peer: PeerId, local: u64, index: usize) {
        self.piece_returned(peer);
        self.unrequest(local, index, peer);
    }

    /// One request fewer in flight to `peer`.
    fn piece_returned(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }

    /// A piece from a peer was verified and written, or failed to be.
    pub(super) fn stored(
        &mut self,
        now: Instant,
        local: u64,
        index: usize,
        peer: PeerId,
        bytes: usize,
        result: Result<()>,
    ) {
        let Some(mut f) = fetching_by_id(&mut self.bundles, local) else {
            return;
        };
        let digest = f.digest;
        if f.fetch.requested.get(&index) == Some(&peer) {
            f.fetch.requested.remove(&index);
        }
        match result {
            Ok(()) => {
                if f.landed(index, now) {
                    f.fetch.stats.peer_bytes += bytes as u64;
                    self.stats.peer_bytes += bytes as u64;
                    self.status_dirty = true;
                }
                self.check_complete(digest);
            }
            Err(Error::HashMismatch { .. }) => {
                self.ban(peer, "served a piece that does not match the chunk list");
            }
            Err(error) => self.fail_fetch(digest, error),
        }
    }
}
