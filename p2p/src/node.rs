//! The one task that owns the Swarm, and with it every piece of network
//! state: members, peers' announcements, bundles being shared and fetched,
//! requests in flight. Blocking work (hashing, disk) runs on helper tasks
//! that report back over an internal channel; nothing here is shared
//! behind a lock.

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{
    self, Event as RrEvent, InboundRequestId, Message, OutboundFailure, OutboundRequestId,
    ResponseChannel,
};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, allow_block_list, connection_limits, mdns};
use posfleet_bundle::chunks::ChunkList;
use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU8;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::bitmap::Bitmap;
use crate::config::Config;
use crate::election::{Candidate, Decision, Election, Inputs, Mode, Timing};
use crate::error::{Error, Result};
use crate::metadata::{self, MetadataError};
use crate::piece_file::PieceFile;
use crate::protocol::{BundleStatus, Codec, Digest, MAX_STATUS_BUNDLES, Request, Response, Status};
use crate::rate::TokenBucket;
use crate::seeding;
use crate::{Bundle, FetchStats, Member, OriginSource, Stats};

/// Piece requests to one peer at once.
const PER_PEER_IN_FLIGHT: usize = 4;
/// How often decisions and announcements are looked at while this till
/// fetches or seeds fresh pieces.
const TICK: Duration = Duration::from_millis(20);
/// The same when it does neither: redials and status refreshes only, so
/// an idle till stays idle.
const QUIET_TICK: Duration = Duration::from_secs(1);
/// Status is sent to every peer at least this often, changed or not, while
/// any till around fetches something; when all is quiet, less often.
const STATUS_REFRESH: Duration = Duration::from_secs(2);
const STATUS_REFRESH_IDLE: Duration = Duration::from_secs(10);
/// Members not connected are dialed again this often.
const REDIAL: Duration = Duration::from_secs(2);
/// An origin download that failed this many times in a row fails the fetch.
const MAX_ORIGIN_FAILURES: u32 = 3;
const ORIGIN_RETRY: Duration = Duration::from_secs(1);
/// Connections to members carry a status refresh at least every 10 s; this
/// only closes connections that went silent.
pub(crate) const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Only PeerIds on the store's membership list may connect.
    pub members: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    /// Peers that served bad data; refused even while members.
    pub banned: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub pieces: request_response::Behaviour<Codec>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    SetMembers(Vec<Member>, oneshot::Sender<()>),
    ConnectedMembers(oneshot::Sender<Vec<PeerId>>),
    Share {
        bundle: Bundle,
        file: Arc<PieceFile>,
        reply: oneshot::Sender<Result<()>>,
    },
    Unshare {
        digest: Digest,
        reply: oneshot::Sender<()>,
    },
    Fetch(Box<FetchCommand>),
    ChunkList {
        digest: Digest,
        chunk_size: u32,
        length: u64,
        reply: oneshot::Sender<Option<ChunkList>>,
    },
    Stats(oneshot::Sender<Stats>),
    Shutdown(oneshot::Sender<()>),
    /// Serve the TUF metadata saved in this directory.
    ServeMetadata(PathBuf, oneshot::Sender<()>),
    Metadata {
        peer: PeerId,
        name: String,
        max_bytes: u32,
        reply: MetadataReply,
    },
    Ban {
        peer: PeerId,
        reason: &'static str,
        reply: oneshot::Sender<()>,
    },
}

pub(crate) type MetadataReply =
    oneshot::Sender<std::result::Result<Option<Vec<u8>>, MetadataError>>;

pub(crate) struct FetchCommand {
    pub bundle: Bundle,
    pub file: Arc<PieceFile>,
    pub have: Bitmap,
    pub origin: Arc<dyn OriginSource>,
    pub progress: watch::Sender<u64>,
    pub reply: oneshot::Sender<Result<FetchStats>>,
}

/// Reports from helper tasks.
enum Internal {
    Stored {
        local: u64,
        index: usize,
        peer: PeerId,
        bytes: usize,
        result: Result<()>,
    },
    OriginPiece {
        local: u64,
        task: u64,
        index: usize,
        bytes: usize,
    },
    OriginDone {
        local: u64,
        task: u64,
        result: Result<()>,
    },
    Served {
        peer: PeerId,
        request: InboundRequestId,
        channel: ResponseChannel<Response>,
        local: u64,
        index: usize,
        result: Result<Vec<u8>>,
    },
    Finished {
        local: u64,
        result: Result<()>,
    },
    MetadataRead {
        peer: PeerId,
        channel: ResponseChannel<Response>,
        name: String,
        result: std::io::Result<Option<Vec<u8>>>,
    },
}

/// A connected member.
#[derive(Default)]
struct Peer {
    bundles: HashMap<Digest, Remote>,
    /// Piece requests from this till to it.
    in_flight: usize,
    status_in_flight: bool,
    status_again: bool,
    /// When the status request in flight was sent.
    status_sent: Option<Instant>,
    /// When the last status request it answered was sent: its answer is at
    /// least that recent and it knew this till's status of then.
    answered: Option<Instant>,
    /// It answered that this till is not on its list.
    refused: bool,
}

struct Remote {
    chunks_digest: Digest,
    have: Bitmap,
    fetching: bool,
    origin: bool,
    last_progress: Instant,
}

/// A bundle this till serves, and maybe fetches.
struct Local {
    id: u64,
    digest: Digest,
    chunks_digest: Digest,
    file: Arc<PieceFile>,
    have: Bitmap,
    fetch: Option<Fetch>,
    /// Pieces from this till's origin download that no connected member
    /// has announced yet, and when they arrived (see `seeding.rs`).
    fresh: HashMap<usize, Instant>,
}

struct Fetch {
    origin: Arc<dyn OriginSource>,
    reply: Option<oneshot::Sender<Result<FetchStats>>>,
    progress: watch::Sender<u64>,
    /// Pieces requested from peers, and from whom.
    requested: HashMap<usize, PeerId>,
    election: Election,
    origin_task: Option<OriginTask>,
    origin_failures: u32,
    origin_retry_at: Instant,
    stats: FetchStats,
    finishing: bool,
    started: Instant,
}

struct OriginTask {
    id: u64,
    abort: tokio::task::AbortHandle,
}

enum Outbound {
    Status,
    Piece {
        local: u64,
        index: usize,
    },
    ChunkList {
        query: u64,
    },
    Metadata {
        name: String,
        max_bytes: u32,
        reply: MetadataReply,
    },
}

struct ServeJob {
    peer: PeerId,
    request: InboundRequestId,
    channel: ResponseChannel<Response>,
    local: u64,
    file: Arc<PieceFile>,
    index: usize,
}

struct ChunkQuery {
    digest: Digest,
    chunk_size: u32,
    length: u64,
    pending: usize,
    reply: Option<oneshot::Sender<Option<ChunkList>>>,
}

pub(crate) struct Node {
    swarm: Swarm<Behaviour>,
    config: Config,
    local_peer: PeerId,
    commands: mpsc::Receiver<Command>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    tasks: JoinSet<()>,
    members: HashMap<PeerId, Vec<Multiaddr>>,
    discovered: HashMap<PeerId, HashSet<Multiaddr>>,
    banned: HashSet<PeerId>,
    peers: HashMap<PeerId, Peer>,
    bundles: HashMap<Digest, Local>,
    outbound: HashMap<OutboundRequestId, Outbound>,
    serve_queue: VecDeque<ServeJob>,
    /// Pieces being read (or held by the upload cap) for serving.
    serving: usize,
    /// Piece responses handed to libp2p and not yet flushed.
    sending: HashSet<InboundRequestId>,
    buckets: HashMap<PeerId, TokenBucket>,
    chunk_queries: HashMap<u64, ChunkQuery>,
    /// Where the TUF metadata this till verified is saved, once known.
    metadata_dir: Option<PathBuf>,
    next_id: u64,
    stats: Stats,
    status_dirty: bool,
    /// Something changed that may let more pieces be requested.
    schedule_dirty: bool,
    last_announce: Instant,
    last_refresh: Instant,
    last_redial: Instant,
}

fn short(digest: &Digest) -> String {
    hex::encode(&digest[..6])
}

/// A cheap, per-till scramble so tills pick pieces in different orders.
fn mix(salt: u64, value: u64) -> u64 {
    let mut z = salt ^ value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn salt_of(peer: &PeerId) -> u64 {
    let bytes = peer.to_bytes();
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

fn have_bytes(have: &Bitmap, chunks: &ChunkList) -> u64 {
    (0..have.len())
        .filter(|&i| have.get(i))
        .map(|i| chunks.chunk_len(i).unwrap_or(0))
        .sum()
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

impl Node {
    pub fn new(swarm: Swarm<Behaviour>, config: Config, commands: mpsc::Receiver<Command>) -> Node {
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let local_peer = *swarm.local_peer_id();
        Node {
            swarm,
            config,
            local_peer,
            commands,
            internal_tx,
            internal_rx,
            tasks: JoinSet::new(),
            members: HashMap::new(),
            discovered: HashMap::new(),
            banned: HashSet::new(),
            peers: HashMap::new(),
            bundles: HashMap::new(),
            outbound: HashMap::new(),
            serve_queue: VecDeque::new(),
            serving: 0,
            sending: HashSet::new(),
            buckets: HashMap::new(),
            chunk_queries: HashMap::new(),
            metadata_dir: None,
            next_id: 1,
            stats: Stats::default(),
            status_dirty: false,
            schedule_dirty: false,
            last_announce: now,
            last_refresh: now,
            last_redial: now,
        }
    }

    pub async fn run(mut self) {
        let tick = tokio::time::sleep(TICK);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => {
                        if let Some(reply) = self.command(command) {
                            self.shutdown().await;
                            let _ = reply.send(());
                            return;
                        }
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                event = self.swarm.select_next_some() => self.swarm_event(event),
                Some(event) = self.internal_rx.recv() => {
                    self.schedule_dirty = true;
                    self.internal(event);
                }
                _ = &mut tick => {
                    self.schedule_dirty = true;
                    self.tick();
                    let period = self.tick_period();
                    tick.as_mut().reset(tokio::time::Instant::now() + period);
                }
            }
            self.announce(false);
            self.schedule();
            // A fetch that starts during a quiet tick is not kept waiting.
            let soon = tokio::time::Instant::now() + TICK;
            if tick.deadline() > soon && self.tick_period() == TICK {
                tick.as_mut().reset(soon);
            }
        }
    }

    fn tick_period(&self) -> Duration {
        let active = self
            .bundles
            .values()
            .any(|l| l.fetch.is_some() || !l.fresh.is_empty());
        if active { TICK } else { QUIET_TICK }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn allowed(&self, peer: &PeerId) -> bool {
        self.members.contains_key(peer) && !self.banned.contains(peer)
    }

    fn usable(peer: &Peer) -> bool {
        !peer.refused
    }

    // ---- commands -------------------------------------------------------

    /// Handles a command; returns the reply channel of a shutdown, which
    /// the caller carries out.
    fn command(&mut self, command: Command) -> Option<oneshot::Sender<()>> {
        match command {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::SetMembers(members, reply) => {
                self.set_members(members);
                let _ = reply.send(());
            }
            Command::ConnectedMembers(reply) => {
                let mut list: Vec<PeerId> = self
                    .peers
                    .keys()
                    .filter(|p| self.allowed(p))
                    .copied()
                    .collect();
                list.sort();
                let _ = reply.send(list);
            }
            Command::Share {
                bundle,
                file,
                reply,
            } => {
                let result = self.share(bundle, file);
                let _ = reply.send(result);
            }
            Command::Unshare { digest, reply } => {
                if let Some(local) = self.bundles.remove(&digest) {
                    info!(bundle = %short(&digest), "Bundle no longer shared.");
                    if let Some(mut fetch) = local.fetch {
                        if let Some(task) = fetch.origin_task.take() {
                            task.abort.abort();
                        }
                        if let Some(reply) = fetch.reply.take() {
                            let _ = reply.send(Err(Error::Stopped));
                        }
                    }
                    self.status_dirty = true;
                }
                let _ = reply.send(());
            }
            Command::Fetch(fetch) => self.start_fetch(*fetch),
            Command::ChunkList {
                digest,
                chunk_size,
                length,
                reply,
            } => self.ask_chunk_list(digest, chunk_size, length, reply),
            Command::Stats(reply) => {
                let _ = reply.send(self.stats.clone());
            }
            Command::Shutdown(reply) => return Some(reply),
            Command::ServeMetadata(dir, reply) => {
                info!(dir = %dir.display(), "Serving TUF metadata to the store.");
                self.metadata_dir = Some(dir);
                let _ = reply.send(());
            }
            Command::Metadata {
                peer,
                name,
                max_bytes,
                reply,
            } => self.ask_metadata(peer, name, max_bytes, reply),
            Command::Ban {
                peer,
                reason,
                reply,
            } => {
                self.ban(peer, reason);
                let _ = reply.send(());
            }
        }
        None
    }

    fn set_members(&mut self, members: Vec<Member>) {
        let mut new: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for member in members {
            if member.peer_id != self.local_peer {
                new.entry(member.peer_id).or_default().extend(member.addrs);
            }
        }
        let removed: Vec<PeerId> = self
            .members
            .keys()
            .filter(|p| !new.contains_key(p))
            .copied()
            .collect();
        for peer in removed {
            info!(peer_id = %peer, "Peer left the store's membership: disconnecting.");
            // Closes its connections and refuses new ones.
            self.swarm.behaviour_mut().members.disallow_peer(peer);
            self.peers.remove(&peer);
            self.discovered.remove(&peer);
        }
        for (peer, addrs) in &new {
            if self.swarm.behaviour_mut().members.allow_peer(*peer) {
                debug!(peer_id = %peer, "Peer joined the store's membership.");
            }
            for addr in addrs {
                self.swarm.add_peer_address(*peer, addr.clone());
            }
        }
        self.members = new;
        self.redial();
    }

    fn redial(&mut self) {
        self.last_redial = Instant::now();
        let targets: Vec<(PeerId, Vec<Multiaddr>)> = self
            .members
            .iter()
            .filter(|(p, _)| !self.banned.contains(p) && !self.swarm.is_connected(p))
            .map(|(p, addrs)| {
                let mut all = addrs.clone();
                if let Some(found) = self.discovered.get(p) {
                    all.extend(found.iter().cloned());
                }
                // TCP first, one address at a time: on a LAN, noise over TCP
                // costs much less CPU per byte than QUIC; QUIC is the fallback.
                all.sort_by_key(|a| !a.iter().any(|p| matches!(p, Protocol::Tcp(_))));
                (*p, all)
            })
            .filter(|(_, addrs)| !addrs.is_empty())
            .collect();
        for (peer, addrs) in targets {
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .override_dial_concurrency_factor(NonZeroU8::MIN)
                .build();
            if let Err(error) = self.swarm.dial(opts) {
                debug!(peer_id = %peer, %error, "Cannot dial a member.");
            }
        }
    }

    fn share(&mut self, bundle: Bundle, file: Arc<PieceFile>) -> Result<()> {
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

    fn start_fetch(&mut self, command: FetchCommand) {
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

    fn ask_chunk_list(
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

    fn ask_metadata(&mut self, peer: PeerId, name: String, max_bytes: u32, reply: MetadataReply) {
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
    fn serve_metadata(
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
        // The test hook sends the whole file whatever the asker's limit.
        let limit = if self.config.corrupt_served_data {
            self.config.limits.max_metadata_bytes
        } else {
            max_bytes.min(self.config.limits.max_metadata_bytes)
        };
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

    fn metadata_answer(
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

    async fn shutdown(&mut self) {
        info!("Stopping the p2p task.");
        for local in self.bundles.values_mut() {
            if let Some(fetch) = &mut local.fetch {
                if let Some(task) = fetch.origin_task.take() {
                    task.abort.abort();
                }
                if let Some(reply) = fetch.reply.take() {
                    let _ = reply.send(Err(Error::Stopped));
                }
            }
        }
        self.tasks.abort_all();
        // Close connections so peers see this till leave now rather than
        // at their idle timeout.
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in connected {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while self.swarm.connected_peers().next().is_some() {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    // ---- swarm events ---------------------------------------------------

    fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Pieces(event)) => self.pieces_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => self.mdns_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Members(never))
            | SwarmEvent::Behaviour(BehaviourEvent::Banned(never))
            | SwarmEvent::Behaviour(BehaviourEvent::Limits(never)) => match never {},
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                debug!(peer_id = %peer_id, address = %endpoint.get_remote_address(), "Connected.");
                if num_established.get() == 1 && self.allowed(&peer_id) {
                    info!(peer_id = %peer_id, "Store peer connected.");
                    self.peers.insert(peer_id, Peer::default());
                    self.send_status(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } if self.peers.remove(&peer_id).is_some() => {
                let cause = cause.map(|c| c.to_string()).unwrap_or_default();
                info!(peer_id = %peer_id, %cause, "Store peer disconnected.");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                let peer = peer_id.map(|p| p.to_string()).unwrap_or_default();
                debug!(address = %send_back_addr, peer_id = %peer, %error, "Inbound connection refused or failed.");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let peer = peer_id.map(|p| p.to_string()).unwrap_or_default();
                debug!(peer_id = %peer, %error, "Dial failed.");
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(address = %address, "Listening.");
            }
            _ => {}
        }
    }

    fn mdns_event(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(found) => {
                for (peer, addr) in found {
                    if self.members.contains_key(&peer) {
                        debug!(peer_id = %peer, address = %addr, "Member found by mDNS.");
                        self.swarm.add_peer_address(peer, addr.clone());
                        self.discovered.entry(peer).or_default().insert(addr);
                    }
                }
                self.redial();
            }
            mdns::Event::Expired(gone) => {
                for (peer, addr) in gone {
                    if let Some(set) = self.discovered.get_mut(&peer) {
                        set.remove(&addr);
                    }
                }
            }
        }
    }

    fn pieces_event(&mut self, event: RrEvent<Request, Response>) {
        match event {
            RrEvent::Message {
                peer,
                message:
                    Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => self.inbound(peer, request_id, request, channel),
            RrEvent::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                self.schedule_dirty = true;
                self.response(peer, request_id, response);
            }
            RrEvent::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.schedule_dirty = true;
                self.outbound_failed(peer, request_id, error);
            }
            RrEvent::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(peer_id = %peer, %error, "An inbound request failed.");
                if self.sending.remove(&request_id) {
                    self.pump_serves();
                }
            }
            RrEvent::ResponseSent { request_id, .. } => {
                if self.sending.remove(&request_id) {
                    self.pump_serves();
                }
            }
        }
    }

    fn respond(&mut self, channel: ResponseChannel<Response>, response: Response) -> bool {
        self.swarm
            .behaviour_mut()
            .pieces
            .send_response(channel, response)
            .is_ok()
    }

    fn inbound(
        &mut self,
        peer: PeerId,
        request_id: InboundRequestId,
        request: Request,
        channel: ResponseChannel<Response>,
    ) {
        // Connections are gated on membership; requests are checked again,
        // as the list may have changed since the connection was made.
        if !self.allowed(&peer) {
            debug!(peer_id = %peer, "Refused a request from a peer not on the member list.");
            self.respond(channel, Response::Refused);
            return;
        }
        match request {
            Request::Status(status) => {
                self.update_peer(peer, status);
                let mine = self.status_for(&peer);
                self.respond(channel, Response::Status(mine));
            }
            Request::Piece { bundle, index } => {
                let index = index as usize;
                let job = self
                    .bundles
                    .get(&bundle)
                    .filter(|l| l.have.get(index))
                    .map(|l| (l.id, l.file.clone()));
                match job {
                    Some((local, file)) => {
                        self.serve_queue.push_back(ServeJob {
                            peer,
                            request: request_id,
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
            Request::ChunkList { digest } => {
                let list = self
                    .bundles
                    .values()
                    .find(|l| l.chunks_digest == digest)
                    .map(|l| l.file.chunks().encode());
                let response = match list {
                    Some(mut list) => {
                        if self.config.corrupt_served_data && !list.is_empty() {
                            list[0] ^= 0x01;
                        }
                        Response::ChunkList(list)
                    }
                    None => Response::NotFound,
                };
                self.respond(channel, response);
            }
            Request::Metadata { name, max_bytes } => {
                self.serve_metadata(peer, name, max_bytes, channel)
            }
        }
    }

    fn response(&mut self, peer: PeerId, request_id: OutboundRequestId, response: Response) {
        let Some(outbound) = self.outbound.remove(&request_id) else {
            return;
        };
        if matches!(response, Response::Refused)
            && let Some(p) = self.peers.get_mut(&peer)
            && !p.refused
        {
            warn!(peer_id = %peer, "Peer refuses this till: not on its member list.");
            p.refused = true;
            p.bundles.clear();
        }
        match outbound {
            Outbound::Status => {
                if let Response::Status(status) = response {
                    self.update_peer(peer, status);
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.answered = p.status_sent;
                    }
                }
                self.status_done(peer);
            }
            Outbound::Piece { local, index } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.in_flight = p.in_flight.saturating_sub(1);
                }
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
            Outbound::ChunkList { query } => self.chunk_list_answer(query, peer, response),
            Outbound::Metadata {
                name,
                max_bytes,
                reply,
            } => self.metadata_answer(peer, name, max_bytes, reply, response),
        }
    }

    fn outbound_failed(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        error: OutboundFailure,
    ) {
        let Some(outbound) = self.outbound.remove(&request_id) else {
            return;
        };
        debug!(peer_id = %peer, %error, "A request to a peer failed.");
        match outbound {
            Outbound::Status => self.status_done(peer),
            Outbound::Piece { local, index } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.in_flight = p.in_flight.saturating_sub(1);
                }
                self.unrequest(local, index, peer);
            }
            Outbound::ChunkList { query } => {
                self.chunk_list_answer(query, peer, Response::NotFound)
            }
            Outbound::Metadata { name, reply, .. } => {
                // The codec fails a frame over its limit or of an unknown
                // kind as invalid data: the peer sent it, so it is banned.
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
        }
    }

    fn digest_of(&self, local: u64) -> Option<Digest> {
        self.bundles
            .values()
            .find(|l| l.id == local)
            .map(|l| l.digest)
    }

    fn local_mut(&mut self, local: u64) -> Option<&mut Local> {
        self.bundles.values_mut().find(|l| l.id == local)
    }

    /// The request for `index` to `peer` is over (a later request of the
    /// same piece to another peer stays).
    fn unrequest(&mut self, local: u64, index: usize, peer: PeerId) {
        if let Some(fetch) = self.local_mut(local).and_then(|l| l.fetch.as_mut())
            && fetch.requested.get(&index) == Some(&peer)
        {
            fetch.requested.remove(&index);
        }
    }

    fn update_peer(&mut self, peer: PeerId, status: Status) {
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

    fn chunk_list_answer(&mut self, query: u64, peer: PeerId, response: Response) {
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

    fn ban(&mut self, peer: PeerId, reason: &'static str) {
        if !self.banned.insert(peer) {
            return;
        }
        warn!(peer_id = %peer, reason, "Banned a peer.");
        self.stats.banned_peers += 1;
        // Closes its connections and refuses new ones.
        self.swarm.behaviour_mut().banned.block_peer(peer);
        self.peers.remove(&peer);
        for local in self.bundles.values_mut() {
            if let Some(fetch) = &mut local.fetch {
                fetch.requested.retain(|_, p| *p != peer);
            }
        }
    }

    // ---- pieces in and out ----------------------------------------------

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
                let ServeJob {
                    peer,
                    request,
                    channel,
                    local,
                    file,
                    index,
                } = job;
                let result = tokio::task::spawn_blocking(move || file.read_for_serving(index))
                    .await
                    .unwrap_or(Err(Error::Stopped));
                let _ = tx.send(Internal::Served {
                    peer,
                    request,
                    channel,
                    local,
                    index,
                    result,
                });
            });
        }
    }

    fn internal(&mut self, event: Internal) {
        let now = Instant::now();
        match event {
            Internal::Served {
                peer,
                request,
                channel,
                local,
                index,
                result,
            } => {
                self.serving = self.serving.saturating_sub(1);
                match result {
                    Ok(mut data) => {
                        if self.config.corrupt_served_data && !data.is_empty() {
                            let middle = data.len() / 2;
                            data[middle] ^= 0x55;
                        }
                        let bytes = data.len() as u64;
                        if self.allowed(&peer) && self.respond(channel, Response::Piece(data)) {
                            self.stats.served_bytes += bytes;
                            self.sending.insert(request);
                        }
                    }
                    Err(error) => {
                        error!(peer_id = %peer, piece = index, %error, "Cannot serve a piece.");
                        if let Some(l) = self.local_mut(local) {
                            l.have.clear(index);
                        }
                        self.status_dirty = true;
                        self.respond(channel, Response::NotFound);
                    }
                }
                self.pump_serves();
            }
            Internal::Stored {
                local,
                index,
                peer,
                bytes,
                result,
            } => {
                let Some(digest) = self.digest_of(local) else {
                    return;
                };
                let Some(l) = self.bundles.get_mut(&digest) else {
                    return;
                };
                let Some(fetch) = l.fetch.as_mut() else {
                    return;
                };
                if fetch.requested.get(&index) == Some(&peer) {
                    fetch.requested.remove(&index);
                }
                match result {
                    Ok(()) => {
                        if l.have.set(index) {
                            fetch.stats.peer_bytes += bytes as u64;
                            self.stats.peer_bytes += bytes as u64;
                            fetch.election.progressed(now);
                            fetch
                                .progress
                                .send_replace(have_bytes(&l.have, l.file.chunks()));
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
            Internal::OriginPiece {
                local,
                task,
                index,
                bytes,
            } => {
                let Some(digest) = self.digest_of(local) else {
                    return;
                };
                let Some(l) = self.bundles.get_mut(&digest) else {
                    return;
                };
                let Some(fetch) = l.fetch.as_mut() else {
                    return;
                };
                fetch.stats.origin_bytes += bytes as u64;
                self.stats.origin_bytes += bytes as u64;
                if fetch.origin_task.as_ref().is_some_and(|t| t.id == task) {
                    fetch.election.origin_progressed(now);
                }
                if l.have.set(index) {
                    l.fresh.insert(index, now);
                    fetch.election.progressed(now);
                    fetch
                        .progress
                        .send_replace(have_bytes(&l.have, l.file.chunks()));
                    self.status_dirty = true;
                    // Peers pull a piece as soon as they hear of it.
                    self.announce(true);
                }
                self.check_complete(digest);
            }
            Internal::OriginDone {
                local,
                task,
                result,
            } => {
                let Some(digest) = self.digest_of(local) else {
                    return;
                };
                let Some(l) = self.bundles.get_mut(&digest) else {
                    return;
                };
                let Some(fetch) = l.fetch.as_mut() else {
                    return;
                };
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
            Internal::MetadataRead {
                peer,
                channel,
                name,
                result,
            } => {
                let response = match result {
                    Ok(Some(mut bytes)) => {
                        if self.config.corrupt_served_data {
                            metadata::tamper(&mut bytes);
                        }
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
            Internal::Finished { local, result } => {
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
        }
    }

    fn check_complete(&mut self, digest: Digest) {
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

    fn fail_fetch(&mut self, digest: Digest, error: Error) {
        let Some(l) = self.bundles.remove(&digest) else {
            return;
        };
        error!(bundle = %short(&digest), %error, "Fetch failed.");
        if let Some(mut fetch) = l.fetch {
            if let Some(task) = fetch.origin_task.take() {
                task.abort.abort();
            }
            if let Some(reply) = fetch.reply.take() {
                let _ = reply.send(Err(error));
            }
        }
        self.status_dirty = true;
    }

    // ---- status ---------------------------------------------------------

    fn status(&self) -> Status {
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
    fn status_for(&self, peer: &PeerId) -> Status {
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
    fn age_fresh(&mut self, now: Instant) {
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

    fn send_status(&mut self, peer: PeerId) {
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

    fn status_done(&mut self, peer: PeerId) {
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
    fn announce(&mut self, now_if_changed: bool) {
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

    // ---- the periodic part ----------------------------------------------

    fn tick(&mut self) {
        let now = Instant::now();
        while self.tasks.try_join_next().is_some() {}
        self.age_fresh(now);
        if now.saturating_duration_since(self.last_redial) >= REDIAL {
            self.redial();
        }
        let busy = self.bundles.values().any(|l| l.fetch.is_some())
            || self
                .peers
                .values()
                .any(|p| p.bundles.values().any(|r| r.fetching));
        let refresh = if busy {
            STATUS_REFRESH
        } else {
            STATUS_REFRESH_IDLE
        };
        if now.saturating_duration_since(self.last_refresh) >= refresh {
            self.last_refresh = now;
            self.status_dirty = true;
            self.announce(true);
        }
        self.drive_fetches(now);
    }

    fn drive_fetches(&mut self, now: Instant) {
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

    /// Requests missing pieces from peers, rarest first, within the
    /// in-flight limits.
    fn schedule(&mut self) {
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
            // Who has what of this bundle, and how busy each source is.
            let mut sources: Vec<(PeerId, &Bitmap, usize)> = peers
                .iter()
                .filter(|(_, p)| Self::usable(p))
                .filter_map(|(id, p)| {
                    let r = p.bundles.get(&l.digest)?;
                    (r.chunks_digest == l.chunks_digest && r.have.len() == l.have.len())
                        .then_some((*id, &r.have, p.in_flight))
                })
                .collect();
            if sources.is_empty() {
                continue;
            }
            // Rarest first; ties in an order of this till's own.
            let mut wanted: Vec<(usize, u64, usize)> = l
                .have
                .missing()
                .filter(|i| !fetch.requested.contains_key(i))
                .filter_map(|i| {
                    let n = sources.iter().filter(|(_, have, _)| have.get(i)).count();
                    (n > 0).then(|| (n, mix(salt, i as u64), i))
                })
                .collect();
            wanted.sort_unstable();
            let mut picks: Vec<(usize, PeerId)> = Vec::new();
            for (_, _, index) in wanted {
                if budget == 0 {
                    break;
                }
                // The least busy holder.
                let best = sources
                    .iter_mut()
                    .filter(|(_, have, load)| have.get(index) && *load < PER_PEER_IN_FLIGHT)
                    .min_by_key(|(id, _, load)| (*load, mix(salt_of(id), index as u64)));
                if let Some((peer, _, load)) = best {
                    *load += 1;
                    picks.push((index, *peer));
                    budget -= 1;
                }
            }
            drop(sources);
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
}
