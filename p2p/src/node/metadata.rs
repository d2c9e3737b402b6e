//! TUF metadata between peers: asking a peer for a file by its TUF name,
//! and serving the files this till saved after verifying them (see the
//! crate's `metadata.rs` for the names and the rules).

use libp2p::PeerId;
use libp2p::request_response::{OutboundFailure, ResponseChannel};
use tracing::{debug, warn};

use super::{Internal, MetadataReply, Node, Outbound};
use crate::metadata::{self, MetadataError};
use crate::protocol::{Request, Response};

impl Node {
    pub(super) fn ask_metadata(
        &mut self,
        peer: PeerId,
        name: String,
        max_bytes: u32,
        reply: MetadataReply,
    ) {
        // Other names go out, for the peer to refuse: only one too long to
        // send is refused here.
        if name.len() > metadata::MAX_NAME_BYTES as usize {
            let _ = reply.send(Err(MetadataError::UnknownName { name }));
            return;
        }
        if !self.allowed(&peer) {
            let _ = reply.send(Err(MetadataError::NotAMember {
                peer: peer.to_string(),
            }));
            return;
        }
        let max_bytes = max_bytes.min(self.config.limits.max_metadata_bytes);
        let id = self.swarm.behaviour_mut().pieces.send_request(
            &peer,
            Request::Metadata {
                name: name.clone(),
                max_bytes,
            },
        );
        self.outbound.insert(
            id,
            Outbound::Metadata {
                name,
                max_bytes,
                reply,
            },
        );
    }

    /// Answers a metadata request from the files saved after verification;
    /// the read runs on a helper task.
    pub(super) fn serve_metadata(
        &mut self,
        peer: PeerId,
        name: String,
        max_bytes: u32,
        channel: ResponseChannel<Response>,
    ) {
        if metadata::role_of(&name).is_none() {
            debug!(peer_id = %peer, name = %name.escape_debug(), "Refused a request for a name that is not TUF metadata.");
            self.respond(channel, Response::UnknownName);
            return;
        }
        let Some(dir) = self.metadata_dir.clone() else {
            self.respond(channel, Response::NotFound);
            return;
        };
        let limit = max_bytes.min(self.config.limits.max_metadata_bytes);
        #[cfg(feature = "test-hooks")]
        let limit = crate::hooks::metadata_limit(&self.config, limit);
        let tx = self.internal_tx.clone();
        self.tasks.spawn_blocking(move || {
            let result = metadata::read(&dir, &name, limit);
            let _ = tx.send(Internal::MetadataRead {
                peer,
                channel,
                name,
                result,
            });
        });
    }

    pub(super) fn metadata_answer(
        &mut self,
        peer: PeerId,
        name: String,
        max_bytes: u32,
        reply: MetadataReply,
        response: Response,
    ) {
        let who = peer.to_string();
        let answer = match response {
            Response::Metadata(bytes) if bytes.len() as u64 > u64::from(max_bytes) => {
                self.ban(peer, "served metadata over the size asked for");
                Err(MetadataError::BadAnswer {
                    peer: who,
                    name,
                    message: format!("{} bytes, {max_bytes} asked for at most", bytes.len()),
                })
            }
            Response::Metadata(bytes) => Ok(Some(bytes)),
            Response::NotFound => Ok(None),
            Response::UnknownName => Err(MetadataError::NameRefused { peer: who, name }),
            Response::Refused => Err(MetadataError::Refused { peer: who }),
            Response::Status(_) | Response::Piece(_) | Response::ChunkList(_) => {
                self.ban(peer, "answered a metadata request with something else");
                Err(MetadataError::BadAnswer {
                    peer: who,
                    name,
                    message: "not a metadata answer".into(),
                })
            }
        };
        let _ = reply.send(answer);
    }

    /// A metadata request got no answer, or one the codec refused.
    pub(super) fn metadata_failed(
        &mut self,
        peer: PeerId,
        name: String,
        reply: MetadataReply,
        error: OutboundFailure,
    ) {
        // The codec fails a frame over its limit or of an unknown kind as
        // invalid data: the peer sent it, so it is banned.
        let answer = match &error {
            OutboundFailure::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                self.ban(peer, "sent an oversized or malformed metadata answer");
                MetadataError::BadAnswer {
                    peer: peer.to_string(),
                    name,
                    message: e.to_string(),
                }
            }
            _ => MetadataError::Unreachable {
                peer: peer.to_string(),
                message: error.to_string(),
            },
        };
        let _ = reply.send(Err(answer));
    }

    /// A saved file read for a peer: sent, unless the peer left the list
    /// meanwhile.
    pub(super) fn metadata_read(
        &mut self,
        peer: PeerId,
        channel: ResponseChannel<Response>,
        name: String,
        result: std::io::Result<Option<Vec<u8>>>,
    ) {
        let response = match result {
            Ok(Some(bytes)) => {
                #[cfg(feature = "test-hooks")]
                let bytes = crate::hooks::metadata(&self.config, bytes);
                Response::Metadata(bytes)
            }
            Ok(None) => Response::NotFound,
            Err(error) => {
                warn!(peer_id = %peer, name = %name, %error, "Cannot read saved metadata to serve.");
                Response::NotFound
            }
        };
        if !self.allowed(&peer) {
            self.respond(channel, Response::Refused);
        } else if matches!(response, Response::Metadata(_)) {
            if self.respond(channel, response) {
                self.stats.metadata_served += 1;
            }
        } else {
            self.respond(channel, response);
        }
    }
}
