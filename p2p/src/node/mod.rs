//! The one task that owns the Swarm, and with it every piece of network
//! state: members, peers' announcements, bundles being shared and fetched,
//! requests in flight. Blocking work (hashing, disk) runs on helper tasks
//! that report back over an internal channel; nothing here is shared
//! behind a lock.
//!
//! This file holds the task's state, its loop and the dispatch of commands,
//! swarm events and helper reports; the handlers sit beside it, one file a
//! concern, each an `impl Node` block.

mod bundles;
mod chunk_list;
mod download;
mod membership;
mod metadata;
mod origin;
mod pick;
mod status;
mod upload;

use futures::StreamExt;
use libp2p::request_response::{
    self, Event as RrEvent, InboundRequestId, Message, OutboundFailure, OutboundRequestId,
    ResponseChannel,
};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, allow_block_list, connection_limits, mdns};
use posfleet_bundle::chunks::ChunkList;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::bitmap::Bitmap;
use crate::config::Config;
use crate::election::Election;
use crate::error::{Error, Result};
use crate::metadata::MetadataError;
use crate::piece_file::PieceFile;
use crate::protocol::{Codec, Digest, Request, Response};
use crate::rate::TokenBucket;
use crate::{Bundle, FetchStats, Member, OriginSource, Stats};

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
        job: ServeJob,
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

/// A piece request from a peer, from the queue to the response.
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

fn have_bytes(have: &Bitmap, chunks: &ChunkList) -> u64 {
    (0..have.len())
        .filter(|&i| have.get(i))
        .map(|i| chunks.chunk_len(i).unwrap_or(0))
        .sum()
}

/// The bundle a request or a helper task was for, by its `Local::id`.
fn local_by_id(bundles: &mut HashMap<Digest, Local>, id: u64) -> Option<&mut Local> {
    bundles.values_mut().find(|l| l.id == id)
}

/// A bundle being fetched, its parts borrowed apart.
struct Fetching<'a> {
    digest: Digest,
    have: &'a mut Bitmap,
    file: &'a PieceFile,
    fresh: &'a mut HashMap<usize, Instant>,
    fetch: &'a mut Fetch,
}

impl Local {
    fn fetching(&mut self) -> Option<Fetching<'_>> {
        let fetch = self.fetch.as_mut()?;
        Some(Fetching {
            digest: self.digest,
            have: &mut self.have,
            file: &self.file,
            fresh: &mut self.fresh,
            fetch,
        })
    }
}

impl Fetching<'_> {
    /// A piece verified and written: held from now on, and the fetch's
    /// progress told. False if it was held already.
    fn landed(&mut self, index: usize, now: Instant) -> bool {
        if !self.have.set(index) {
            return false;
        }
        self.fetch.election.progressed(now);
        self.fetch
            .progress
            .send_replace(have_bytes(self.have, self.file.chunks()));
        true
    }
}

/// The bundle a helper task reported on, by its `Local::id`, if it is
/// still being fetched.
fn fetching_by_id(bundles: &mut HashMap<Digest, Local>, id: u64) -> Option<Fetching<'_>> {
    local_by_id(bundles, id)?.fetching()
}

impl Fetch {
    /// Ends the fetch: its origin download stops and its caller hears
    /// `error`.
    fn end(&mut self, error: Error) {
        if let Some(task) = self.origin_task.take() {
            task.abort.abort();
        }
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(error));
        }
    }
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

    fn respond(&mut self, channel: ResponseChannel<Response>, response: Response) -> bool {
        self.swarm
            .behaviour_mut()
            .pieces
            .send_response(channel, response)
            .is_ok()
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
                let _ = reply.send(self.connected_members());
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
                self.unshare(digest);
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

    async fn shutdown(&mut self) {
        info!("Stopping the p2p task.");
        for local in self.bundles.values_mut() {
            if let Some(fetch) = &mut local.fetch {
                fetch.end(Error::Stopped);
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
                self.response_flushed(request_id);
            }
            RrEvent::ResponseSent { request_id, .. } => self.response_flushed(request_id),
        }
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
            Request::Status(status) => self.status_request(peer, status, channel),
            Request::Piece { bundle, index } => {
                self.piece_request(peer, request_id, bundle, index as usize, channel)
            }
            Request::ChunkList { digest } => self.serve_chunk_list(digest, channel),
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
            Outbound::Status => self.status_answer(peer, response),
            Outbound::Piece { local, index } => self.piece_answer(peer, local, index, response),
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
            Outbound::Piece { local, index } => self.piece_failed(peer, local, index),
            Outbound::ChunkList { query } => {
                self.chunk_list_answer(query, peer, Response::NotFound)
            }
            Outbound::Metadata { name, reply, .. } => {
                self.metadata_failed(peer, name, reply, error)
            }
        }
    }

    fn internal(&mut self, event: Internal) {
        let now = Instant::now();
        match event {
            Internal::Served { job, result } => self.served(job, result),
            Internal::Stored {
                local,
                index,
                peer,
                bytes,
                result,
            } => self.stored(now, local, index, peer, bytes, result),
            Internal::OriginPiece {
                local,
                task,
                index,
                bytes,
            } => self.origin_piece(now, local, task, index, bytes),
            Internal::OriginDone {
                local,
                task,
                result,
            } => self.origin_done(now, local, task, result),
            Internal::MetadataRead {
                peer,
                channel,
                name,
                result,
            } => self.metadata_read(peer, channel, name, result),
            Internal::Finished { local, result } => self.finished(local, result),
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
}
