//! Chunk lists between peers, for a till that cannot reach the origin: asked
//! of every peer that announces the bundle (of every peer if none does),
//! the first that matches its signed digest kept, a peer sending one that
//! does not banned.

use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use posfleet_bundle::chunks::ChunkList;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{ChunkQuery, Node, Outbound};
use crate::protocol::{Digest, Request, Response};

impl Node {
    pub(super) fn ask_chunk_list(
        &mut self,
        digest: Digest,
        chunk_size: u32,
        length: u64,
        reply: oneshot::Sender<Option<ChunkList>>,
    ) {
        let announcing: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                Self::usable(p) && p.bundles.values().any(|r| r.chunks_digest == digest)
            })
            .map(|(id, _)| *id)
            .collect();
        let targets = if announcing.is_empty() {
            self.peers
                .iter()
                .filter(|(_, p)| Self::usable(p))
                .map(|(id, _)| *id)
                .collect()
        } else {
            announcing
        };
        if targets.is_empty() {
            let _ = reply.send(None);
            return;
        }
        let query = self.id();
        for peer in &targets {
            let id = self
                .swarm
                .behaviour_mut()
                .pieces
                .send_request(peer, Request::ChunkList { digest });
            self.outbound.insert(id, Outbound::ChunkList { query });
        }
        self.chunk_queries.insert(
            query,
            ChunkQuery {
                digest,
                chunk_size,
                length,
                pending: targets.len(),
                reply: Some(reply),
            },
        );
    }

    pub(super) fn chunk_list_answer(&mut self, query: u64, peer: PeerId, response: Response) {
        let Some(q) = self.chunk_queries.get_mut(&query) else {
            return;
        };
        q.pending = q.pending.saturating_sub(1);
        let mut bad = false;
        if let Response::ChunkList(bytes) = response
            && q.reply.is_some()
        {
            match ChunkList::decode(&bytes, q.chunk_size, q.length, &q.digest) {
                Ok(list) => {
                    if let Some(reply) = q.reply.take() {
                        debug!(peer_id = %peer, "Chunk list from a peer.");
                        let _ = reply.send(Some(list));
                    }
                }
                // Not the list the digest names: the peer lied.
                Err(error) if error.is_bad_digest() => bad = true,
                Err(error) => {
                    // The authentic list: the size or length asked for is wrong.
                    warn!(peer_id = %peer, %error, "A chunk list does not fit the bundle asked for.");
                }
            }
        }
        let done = q.pending == 0;
        if done
            && let Some(q) = self.chunk_queries.remove(&query)
            && let Some(reply) = q.reply
        {
            let _ = reply.send(None);
        }
        if bad {
            self.ban(peer, "served a chunk list that does not match its digest");
        }
    }

    /// Answers a peer asking for the chunk list of a bundle this till holds.
    pub(super) fn serve_chunk_list(&mut self, digest: Digest, channel: ResponseChannel<Response>) {
        let list = self
            .bundles
            .values()
            .find(|l| l.chunks_digest == digest)
            .map(|l| l.file.chunks().encode());
        let response = match list {
            Some(list) => {
                #[cfg(feature = "test-hooks")]
                let list = crate::hooks::chunk_list(&self.config, list);
                Response::ChunkList(list)
            }
            None => Response::NotFound,
        };
        self.respond(channel, response);
    }
}
