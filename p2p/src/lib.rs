//! Bundle sharing between the tills of one store, over libp2p, so that each
//! bundle crosses the store's WAN link once.
//!
//! # Shape
//!
//! [`spawn`] starts the one task that owns the libp2p `Swarm` (TCP + noise +
//! yamux, and QUIC; the identity is the device's Ed25519 key). [`P2p`] is a
//! cloneable client: each call is a command over an `mpsc` channel with a
//! `oneshot` reply. Hashing and disk I/O run on helper tasks that report
//! back to the swarm task; no network state sits behind a lock.
//!
//! # Membership
//!
//! Only PeerIds on the store's member list ([`P2p::set_members`], from the
//! control plane) may connect: others are denied when the connection is
//! established (libp2p's allow list), and every request is checked again.
//! Members dropped from the list are disconnected at once. Members are
//! dialed at the addresses the list gives, plus any mDNS finds. A peer that
//! serves a piece or chunk list that fails verification is banned for the
//! life of the process: disconnected, denied, its requests refused.
//!
//! # Protocol `/posfleet/pieces/1`
//!
//! One request-response protocol; frames are `kind: u8, length: u32 BE,
//! payload`, and each kind has a size limit checked before allocation
//! ([`Limits`]): a piece or chunk-list request is exactly 36 or 32 bytes, a
//! status at most 64 KiB, a piece response at most one piece (1 MiB), a chunk
//! list at most 1 MiB, a TUF metadata file at most 32 MiB (and at most what
//! the asker's request names). Anything larger fails the stream.
//!
//! # TUF metadata
//!
//! A till that cannot reach the origin asks its peers for TUF metadata
//! ([`P2p::metadata_from_peer`]): the files they verified and saved
//! ([`P2p::serve_metadata`]), by TUF name only (`timestamp.json`,
//! `snapshot.json`, `targets.json`, `<N>.root.json`; any other name is
//! refused). The asker's TUF client verifies them like the origin's. A peer
//! answering over the asked size or with bytes that do not parse as the
//! role is banned; one whose file parses but does not verify is not (it may
//! just be older). See `metadata.rs`.
//!
//! | request | response |
//! | --- | --- |
//! | `Status` (what I have and fetch) | `Status` (what the peer has and fetches) |
//! | `Piece { bundle, index }` | `Piece(bytes)` or `NotFound` |
//! | `ChunkList { digest }` | `ChunkList(bytes)` or `NotFound` |
//! | `Metadata { name, max_bytes }` | `Metadata(bytes)`, `NotFound` or `UnknownName` |
//! | anything from a non-member | `Refused` |
//!
//! A status lists, per bundle: its digest, its chunk list's digest, whether
//! the peer still fetches it, whether it is downloading from the origin right
//! now, and a bitmap of the pieces it holds (omitted when whole). Tills push
//! their status to every connected member when it changes (at most every
//! `announce_interval`, at once when a piece arrives from the origin), and
//! refresh it every 2 s while any till around fetches (every 10 s when all
//! is quiet).
//!
//! Decoding costs what the bytes received weigh: a frame's buffer grows as
//! its bytes arrive rather than to the length its header declares, a "whole"
//! flag stays a flag (no bitmap is built from it), an entry for a bundle this
//! till holds must have that bundle's piece count and chunk list, and an
//! answer must be of the kind and within the size its request asked for.
//!
//! # Pieces
//!
//! One 1 MiB piece per request, never a whole bundle in a message. A fetch
//! keeps up to `max_concurrent_transfers` requests in flight across its
//! peers (4 per peer), rarest piece first. Every piece is checked against
//! the signed chunk list before it is written, and before it is first served
//! from a file this till did not write since it opened it.
//! The destination is written at piece offsets; a sidecar `<dest>.pieces`
//! records the verified pieces so a restarted fetch resumes (the pieces it
//! lists are hashed again on open). Memory holds only pieces in flight.
//!
//! # Once per store
//!
//! For the pieces no one in the store has, one till goes to the origin: the
//! one with the highest rendezvous score `SHA-256(PeerId || bundle digest)`
//! among itself and the connected members that announce they need the
//! bundle. It decides once every connected member answered the announcement
//! of its fetch (at most `settle_delay`), fetches only the missing pieces
//! and announces each as it lands, so the others pull from it and from each
//! other. If it makes no progress for `stall_timeout`, or leaves, the next
//! in that order takes over from what the store has; if two fetch at once,
//! the lower-ranked stops. A till with no connected member goes to the origin
//! alone after `origin_fallback_delay`. See `election.rs` for the rules.

#![forbid(unsafe_code)]

mod bitmap;
mod config;
mod election;
mod error;
#[cfg(feature = "test-hooks")]
mod hooks;
mod metadata;
mod node;
mod piece_file;
mod protocol;
mod rate;
mod seeding;

pub use config::Config;
pub use error::{Error, Result};
pub use libp2p::{Multiaddr, PeerId};
pub use metadata::{MetadataError, role_of as metadata_role};
pub use protocol::Limits;

use libp2p::swarm::SwarmEvent;
use libp2p::{Swarm, identity, noise, request_response, tcp, yamux};
use posfleet_bundle::chunks::ChunkList;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

use node::{Behaviour, Command, FetchCommand, Node};
use piece_file::PieceFile;
use protocol::{Codec, PROTOCOL};

/// A till of the store, as the control plane lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub peer_id: PeerId,
    pub addrs: Vec<Multiaddr>,
}

/// A bundle as its signed metadata describes it.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// SHA-256 of the whole file.
    pub digest: [u8; 32],
    /// The chunk list, already verified against its signed digest.
    pub chunks: ChunkList,
}

/// Where the bytes of one fetch came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub origin_bytes: u64,
    pub peer_bytes: u64,
}

/// Counters since the task started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Piece bytes sent to peers.
    pub served_bytes: u64,
    /// Piece bytes received from peers and stored.
    pub peer_bytes: u64,
    /// Piece bytes received from the origin.
    pub origin_bytes: u64,
    /// Peers banned for serving bad data.
    pub banned_peers: u64,
    /// TUF metadata files sent to peers.
    pub metadata_served: u64,
}

/// The origin (the control plane's repository), as the agent reaches it.
#[async_trait::async_trait]
pub trait OriginSource: Send + Sync {
    /// Streams pieces `first..=last` from the origin, calling `piece(index,
    /// bytes)` for each in order as it arrives. If `piece` returns an error,
    /// stop and return it. The implementation may verify pieces itself; the
    /// p2p side verifies every piece again before writing it.
    async fn fetch_pieces(
        &self,
        first: usize,
        last: usize,
        piece: &mut (dyn FnMut(usize, Vec<u8>) -> Result<()> + Send),
    ) -> Result<()>;
}

/// The PeerId of a device, from its Ed25519 public key.
pub fn peer_id_from_ed25519_public(bytes: [u8; 32]) -> Result<PeerId> {
    let key = identity::ed25519::PublicKey::try_from_bytes(&bytes).map_err(|e| {
        Error::InvalidPublicKey {
            message: e.to_string(),
        }
    })?;
    Ok(identity::PublicKey::from(key).to_peer_id())
}

/// How long [`spawn`] waits for its listeners to report an address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the swarm task. `seed` is the device's Ed25519 secret key (the
/// 32-byte seed). Returns once every listen address is bound.
pub async fn spawn(seed: [u8; 32], config: Config) -> Result<(P2p, tokio::task::JoinHandle<()>)> {
    let mut seed = seed;
    let keypair =
        identity::Keypair::ed25519_from_bytes(&mut seed).map_err(|e| Error::InvalidSeed {
            message: e.to_string(),
        })?;
    let peer_id = keypair.public().to_peer_id();
    let transport = |e: &dyn std::fmt::Display| Error::Transport {
        message: e.to_string(),
    };
    let mdns_on = config.mdns;
    let codec = Codec::new(config.limits);
    let rr_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(4 * config.max_concurrent_transfers.max(1) + 16);
    let limits = libp2p::connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(2))
        .with_max_pending_incoming(Some(config.max_connections))
        .with_max_pending_outgoing(Some(config.max_connections));

    let mut swarm: Swarm<Behaviour> = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::new().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_behaviour(
            |key| -> std::result::Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let mdns = if mdns_on {
                    Some(libp2p::mdns::tokio::Behaviour::new(
                        libp2p::mdns::Config::default(),
                        key.public().to_peer_id(),
                    )?)
                } else {
                    None
                };
                Ok(Behaviour {
                    members: Default::default(),
                    banned: Default::default(),
                    limits: libp2p::connection_limits::Behaviour::new(limits),
                    pieces: request_response::Behaviour::with_codec(
                        codec,
                        [(PROTOCOL, request_response::ProtocolSupport::Full)],
                        rr_config,
                    ),
                    mdns: mdns.into(),
                })
            },
        )
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(node::IDLE_CONNECTION_TIMEOUT))
        .build();

    let mut pending = HashSet::new();
    for addr in &config.listen_addrs {
        let id = swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
        pending.insert((id, addr.clone()));
    }
    let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
    while !pending.is_empty() {
        let event =
            tokio::time::timeout_at(deadline, futures::StreamExt::select_next_some(&mut swarm))
                .await
                .map_err(|_| Error::Listen {
                    addr: pending
                        .iter()
                        .next()
                        .map(|(_, a)| a.clone())
                        .unwrap_or_else(Multiaddr::empty),
                    message: "no address bound in time".into(),
                })?;
        match event {
            SwarmEvent::NewListenAddr { listener_id, .. } => {
                pending.retain(|(id, _)| *id != listener_id);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some((_, addr)) = pending.iter().find(|(id, _)| *id == listener_id) {
                    return Err(Error::Listen {
                        addr: addr.clone(),
                        message: match reason {
                            Ok(()) => "listener closed".into(),
                            Err(e) => e.to_string(),
                        },
                    });
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                if let Some((_, addr)) = pending.iter().find(|(id, _)| *id == listener_id) {
                    return Err(Error::Listen {
                        addr: addr.clone(),
                        message: error.to_string(),
                    });
                }
            }
            _ => {}
        }
    }

    let (tx, rx) = mpsc::channel(64);
    let config = Arc::new(config);
    let handle = tokio::spawn(Node::new(swarm, (*config).clone(), rx).run());
    Ok((
        P2p {
            tx,
            peer_id,
            config,
        },
        handle,
    ))
}

/// The client of the swarm task. Cheap to clone; every call fails with
/// [`Error::Stopped`] (or returns an empty answer) once the task ended.
#[derive(Clone)]
pub struct P2p {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    config: Arc<Config>,
}

impl P2p {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(command(reply)).await.ok()?;
        answer.await.ok()
    }

    /// The addresses actually bound, to report to the control plane.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.ask(Command::ListenAddrs).await.unwrap_or_default()
    }

    /// Replaces the store's member list: dials the members and disconnects
    /// anyone no longer on it.
    pub async fn set_members(&self, members: Vec<Member>) {
        self.ask(|reply| Command::SetMembers(members, reply)).await;
    }

    pub async fn connected_members(&self) -> Vec<PeerId> {
        self.ask(Command::ConnectedMembers)
            .await
            .unwrap_or_default()
    }

    /// Offers a whole bundle file for serving (after an install, or on
    /// restart). Its pieces are verified as they are served.
    pub async fn share(&self, bundle: Bundle, path: &Path) -> Result<()> {
        let chunks = Arc::new(bundle.chunks.clone());
        let path = path.to_path_buf();
        let file = tokio::task::spawn_blocking(move || PieceFile::open_whole(&path, chunks))
            .await
            .map_err(|_| Error::Stopped)??;
        self.ask(|reply| Command::Share {
            bundle,
            file: Arc::new(file),
            reply,
        })
        .await
        .unwrap_or(Err(Error::Stopped))
    }

    /// Stops serving (and fetching) a bundle.
    pub async fn unshare(&self, digest: [u8; 32]) {
        self.ask(|reply| Command::Unshare { digest, reply }).await;
    }

    /// A chunk list from the store's peers, checked against `chunks_digest`
    /// (from signed metadata); `None` if no connected peer has a valid one.
    /// A peer that sends a list not matching the digest is banned.
    pub async fn chunk_list_from_peers(
        &self,
        chunks_digest: [u8; 32],
        chunk_size: u32,
        length: u64,
    ) -> Option<ChunkList> {
        self.ask(|reply| Command::ChunkList {
            digest: chunks_digest,
            chunk_size,
            length,
            reply,
        })
        .await
        .flatten()
    }

    /// Brings `dest` to the whole bundle, from the store's peers and (once
    /// per store) the origin; keeps the verified pieces already there.
    /// `progress` gets the verified bytes on disk as they grow. Once done,
    /// the bundle stays shared from the open file until [`P2p::unshare`], so
    /// the agent may rename it. If this till already shares the bundle
    /// whole, `dest` is filled from that copy. Dropping the future cancels
    /// the fetch.
    pub async fn fetch(
        &self,
        bundle: Bundle,
        dest: &Path,
        origin: Arc<dyn OriginSource>,
        progress: impl Fn(u64) + Send + Sync,
    ) -> Result<FetchStats> {
        let limit = self.config.limits.max_piece_bytes;
        if bundle.chunks.chunk_size() > limit {
            return Err(Error::PieceTooLarge {
                chunk_size: bundle.chunks.chunk_size(),
                limit,
            });
        }
        let chunks = Arc::new(bundle.chunks.clone());
        let path = dest.to_path_buf();
        let (file, have) =
            tokio::task::spawn_blocking(move || PieceFile::open_for_fetch(&path, chunks))
                .await
                .map_err(|_| Error::Stopped)??;
        let start = (0..have.len())
            .filter(|&i| have.get(i))
            .map(|i| bundle.chunks.chunk_len(i).unwrap_or(0))
            .sum();
        progress(start);
        let (progress_tx, mut progress_rx) = watch::channel(start);
        let (reply, mut answer) = oneshot::channel();
        let command = Command::Fetch(Box::new(FetchCommand {
            bundle,
            file: Arc::new(file),
            have,
            origin,
            progress: progress_tx,
            reply,
        }));
        self.tx.send(command).await.map_err(|_| Error::Stopped)?;
        let mut last = start;
        loop {
            tokio::select! {
                result = &mut answer => {
                    let now = *progress_rx.borrow();
                    if now != last {
                        progress(now);
                    }
                    return result.unwrap_or(Err(Error::Stopped));
                }
                Ok(()) = progress_rx.changed() => {
                    let now = *progress_rx.borrow_and_update();
                    if now != last {
                        last = now;
                        progress(now);
                    }
                }
            }
        }
    }

    /// Serves the TUF metadata files saved in `dir` (after verification)
    /// to the store's members that ask for them.
    pub async fn serve_metadata(&self, dir: &Path) {
        let dir = dir.to_path_buf();
        self.ask(|reply| Command::ServeMetadata(dir, reply)).await;
    }

    /// TUF metadata file `name` (see [`metadata_role`]) from member `peer`,
    /// at most `max_bytes`: `None` if the peer does not have it. The bytes
    /// parse as the role the name stands for (a peer whose answer does not,
    /// or is larger than asked, is banned) but are not verified: that is
    /// the caller's TUF client's job.
    pub async fn metadata_from_peer(
        &self,
        peer: PeerId,
        name: &str,
        max_bytes: u64,
    ) -> std::result::Result<Option<Vec<u8>>, MetadataError> {
        let max_bytes = u32::try_from(max_bytes).unwrap_or(u32::MAX);
        let answer = self
            .ask(|reply| Command::Metadata {
                peer,
                name: name.to_string(),
                max_bytes,
                reply,
            })
            .await
            .ok_or(MetadataError::Stopped)??;
        let Some(bytes) = answer else {
            return Ok(None);
        };
        let checked = {
            let name = name.to_string();
            tokio::task::spawn_blocking(move || {
                let result = metadata::check_parses(&name, &bytes);
                (bytes, result)
            })
            .await
            .map_err(|_| MetadataError::Stopped)?
        };
        match checked {
            (bytes, Ok(())) => Ok(Some(bytes)),
            (_, Err(message)) => {
                self.ask(|reply| Command::Ban {
                    peer,
                    reason: "served metadata that does not parse",
                    reply,
                })
                .await;
                Err(MetadataError::BadAnswer {
                    peer: peer.to_string(),
                    name: name.to_string(),
                    message,
                })
            }
        }
    }

    pub async fn stats(&self) -> Stats {
        self.ask(Command::Stats).await.unwrap_or_default()
    }

    /// Stops the task: fetches in progress end with [`Error::Stopped`] (their
    /// pieces stay on disk for a later resume), connections are closed.
    pub async fn shutdown(&self) {
        self.ask(Command::Shutdown).await;
    }
}
