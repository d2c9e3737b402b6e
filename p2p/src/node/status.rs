//! Status exchange: what this till has and fetches, pushed to every peer
//! on change and refreshed now and then; what each peer has, as it says.
//! Pieces fresh from the origin are shown to a few peers first (see
//! `seeding.rs`).

use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use std::collections::HashMap;
use std::time::Instant;
use tracing::debug;

use super::{Local, Node, Outbound, Remote};
use crate::protocol::{BundleStatus, MAX_STATUS_BUNDLES, Request, Response, Status};
use crate::seeding;

impl Node {
    /// A peer pushed its status: take it in and answer with this till's.
    pub(super) fn status_request(
        &mut self,
        peer: PeerId,
        status: Status,
        channel: ResponseChannel<Response>,
    ) {
        self.update_peer(peer, status);
        let mine = self.status_for(&peer);
        self.respond(channel, Response::Status(mine));
    }

    /// A peer answered the status this till pushed with its own.
    pub(super) fn status_answer(&mut self, peer: PeerId, response: Response) {
        if let Response::Status(status) = response {
            self.update_peer(peer, status);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.answered = p.status_sent;
            }
        }
        self.status_done(peer);
    }

    pub(super) fn update_peer(&mut self, peer: PeerId, status: Status) {
        if !self.allowed(&peer) {
            return;
        }
        let now = Instant::now();
        let p = self.peers.entry(peer).or_default();
        let mut bundles = HashMap::with_capacity(status.bundles.len());
        for b in status.bundles {
            // A bundle this till holds has a known size: an entry for it
            // with another piece count or chunk list is not that bundle.
            if let Some(local) = self.bundles.get(&b.digest)
                && (b.have.len() != local.have.len() || b.chunks_digest != local.chunks_digest)
            {
                debug!(%peer, "Status entry that does not match the bundle's chunk list ignored.");
                continue;
            }
            let old = p.bundles.get(&b.digest);
            let progressed =
                old.is_none_or(|o| b.have.count() > o.have.count() || (b.origin && !o.origin));
            let last_progress = match old {
                Some(o) if !progressed => o.last_progress,
                _ => now,
            };
            bundles.insert(
                b.digest,
                Remote {
                    chunks_digest: b.chunks_digest,
                    have: b.have,
                    fetching: b.fetching,
                    origin: b.origin,
                    last_progress,
                },
            );
        }
        p.bundles = bundles;
        p.refused = false;
        self.schedule_dirty = true;
    }

    pub(super) fn status(&self) -> Status {
        let mut bundles: Vec<&Local> = self.bundles.values().collect();
        // Fetches first: they matter most if the list is cut.
        bundles.sort_by_key(|l| (l.fetch.is_none(), l.id));
        Status {
            bundles: bundles
                .into_iter()
                .take(MAX_STATUS_BUNDLES)
                .map(|l| BundleStatus {
                    digest: l.digest,
                    chunks_digest: l.chunks_digest,
                    fetching: l.fetch.is_some(),
                    origin: l.fetch.as_ref().is_some_and(|f| f.origin_task.is_some()),
                    have: l.have.clone(),
                })
                .collect(),
        }
    }

    /// This till's status as `peer` hears it: pieces fresh from the
    /// origin only if it is one of their first holders. Only while the
    /// origin download runs: a status that says it ended lists every piece,
    /// so no peer takes a hidden piece for one the store lacks.
    pub(super) fn status_for(&self, peer: &PeerId) -> Status {
        let mut status = self.status();
        for b in &mut status.bundles {
            let Some(l) = self.bundles.get(&b.digest).filter(|l| {
                !l.fresh.is_empty() && l.fetch.as_ref().is_some_and(|f| f.origin_task.is_some())
            }) else {
                continue;
            };
            for &index in l.fresh.keys() {
                let wanting: Vec<PeerId> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| Self::usable(p))
                    .filter(|(_, p)| {
                        p.bundles.get(&l.digest).is_some_and(|r| {
                            r.fetching && r.have.len() == l.have.len() && !r.have.get(index)
                        })
                    })
                    .map(|(id, _)| *id)
                    .collect();
                if !seeding::shown_to(peer, index, &wanting) {
                    b.have.clear(index);
                }
            }
        }
        status
    }

    /// Forgets pieces as fresh once a member has them or their time is up.
    pub(super) fn age_fresh(&mut self, now: Instant) {
        let Node { bundles, peers, .. } = self;
        for l in bundles.values_mut() {
            let digest = l.digest;
            l.fresh.retain(|&index, arrived| {
                now.saturating_duration_since(*arrived) < seeding::SHOW_ALL_AFTER
                    && !peers.values().any(|p| {
                        Self::usable(p) && p.bundles.get(&digest).is_some_and(|r| r.have.get(index))
                    })
            });
        }
    }

    pub(super) fn send_status(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.status_in_flight {
            p.status_again = true;
            return;
        }
        p.status_in_flight = true;
        p.status_again = false;
        p.status_sent = Some(Instant::now());
        let status = self.status_for(&peer);
        let id = self
            .swarm
            .behaviour_mut()
            .pieces
            .send_request(&peer, Request::Status(status));
        self.outbound.insert(id, Outbound::Status);
    }

    pub(super) fn status_done(&mut self, peer: PeerId) {
        let again = match self.peers.get_mut(&peer) {
            Some(p) => {
                p.status_in_flight = false;
                p.status_again
            }
            None => false,
        };
        if again {
            self.send_status(peer);
        }
    }

    /// Pushes this till's status to every peer, at most every
    /// `announce_interval` unless `now_if_changed`.
    pub(super) fn announce(&mut self, now_if_changed: bool) {
        let now = Instant::now();
        if !self.status_dirty
            || (!now_if_changed
                && now.saturating_duration_since(self.last_announce)
                    < self.config.announce_interval)
        {
            return;
        }
        self.status_dirty = false;
        self.last_announce = now;
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.send_status(peer);
        }
    }
}
