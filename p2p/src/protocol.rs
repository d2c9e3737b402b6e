//! The wire protocol: one request-response protocol with a small binary
//! codec. Every frame is `kind: u8, length: u32 (big endian), payload`, and
//! the length is checked against the limit for that kind before anything is
//! allocated.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use std::io;

use crate::bitmap::Bitmap;
use crate::metadata::MAX_NAME_BYTES;

pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new("/posfleet/pieces/1");

pub type Digest = [u8; 32];

/// The most bundles one status message describes.
pub(crate) const MAX_STATUS_BUNDLES: usize = 256;
/// The most pieces a bundle may have to be exchanged (1 TiB of 1 MiB pieces).
pub(crate) const MAX_PIECES: usize = 1 << 20;

/// What a frame's buffer starts at before its bytes arrive.
const FIRST_READ_BYTES: usize = 16 << 10;

/// Message size limits. A frame over its limit fails the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest piece served or accepted (the payload of a piece response).
    pub max_piece_bytes: u32,
    /// Largest status message (requests and responses).
    pub max_status_bytes: u32,
    /// Largest chunk list served or accepted.
    pub max_chunk_list_bytes: u32,
    /// Largest TUF metadata file served or accepted (each request also
    /// carries the asker's own, smaller limit for that file).
    pub max_metadata_bytes: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_piece_bytes: posfleet_bundle::chunks::CHUNK_SIZE,
            max_status_bytes: 64 << 10,
            // 32 bytes a piece: 32,768 pieces, 32 GiB in 1 MiB pieces.
            max_chunk_list_bytes: 1 << 20,
            // What the TUF client accepts for its largest role, targets.
            max_metadata_bytes: u32::try_from(
                posfleet_bundle::client::Limits::default().max_targets_size,
            )
            .unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// "Here is what I have and fetch"; the answer is the peer's own status.
    Status(Status),
    Piece {
        bundle: Digest,
        index: u32,
    },
    /// A chunk list, named by its digest (as signed in the metadata).
    ChunkList {
        digest: Digest,
    },
    /// A TUF metadata file the peer verified and saved, by name (see
    /// `metadata.rs`), answered only if it is at most `max_bytes`.
    Metadata {
        name: String,
        max_bytes: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Response {
    Status(Status),
    Piece(Vec<u8>),
    ChunkList(Vec<u8>),
    Metadata(Vec<u8>),
    NotFound,
    /// The name asked for is not a TUF metadata file name.
    UnknownName,
    /// The asker is not on this peer's membership list, or is banned.
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Status {
    pub bundles: Vec<BundleStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BundleStatus {
    /// SHA-256 of the whole bundle file.
    pub digest: Digest,
    /// Digest of its chunk list.
    pub chunks_digest: Digest,
    /// The peer wants the bundle (it is not whole there yet).
    pub fetching: bool,
    /// The peer is downloading pieces from the origin right now.
    pub origin: bool,
    pub have: Bitmap,
}

const STATUS: u8 = 1;
const PIECE: u8 = 2;
const CHUNK_LIST: u8 = 3;
const NOT_FOUND: u8 = 4;
const REFUSED: u8 = 5;
const METADATA: u8 = 6;
const UNKNOWN_NAME: u8 = 7;

const FLAG_FETCHING: u8 = 1;
const FLAG_ORIGIN: u8 = 2;
/// Every piece is there; no bitmap follows.
const FLAG_WHOLE: u8 = 4;

impl Status {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.bundles.len() * 80);
        out.extend_from_slice(&(self.bundles.len() as u16).to_be_bytes());
        for b in &self.bundles {
            out.extend_from_slice(&b.digest);
            out.extend_from_slice(&b.chunks_digest);
            let whole = b.have.is_full();
            let mut flags = 0;
            for (set, flag) in [
                (b.fetching, FLAG_FETCHING),
                (b.origin, FLAG_ORIGIN),
                (whole, FLAG_WHOLE),
            ] {
                if set {
                    flags |= flag;
                }
            }
            out.push(flags);
            out.extend_from_slice(&(b.have.len() as u32).to_be_bytes());
            // A map that is not whole always has its bits.
            if let Some(bits) = b.have.partial_bytes().filter(|_| !whole) {
                out.extend_from_slice(bits);
            }
        }
        out
    }

    pub fn decode(mut bytes: &[u8]) -> io::Result<Status> {
        let count = u16::from_be_bytes(take(&mut bytes)?) as usize;
        if count > MAX_STATUS_BUNDLES {
            return Err(invalid("too many bundles in a status"));
        }
        let mut bundles = Vec::with_capacity(count);
        for _ in 0..count {
            let digest: Digest = take(&mut bytes)?;
            let chunks_digest: Digest = take(&mut bytes)?;
            let [flags] = take::<1>(&mut bytes)?;
            let pieces = u32::from_be_bytes(take(&mut bytes)?) as usize;
            if pieces > MAX_PIECES {
                return Err(invalid("too many pieces in a status"));
            }
            let have = if flags & FLAG_WHOLE != 0 {
                Bitmap::full(pieces)
            } else {
                let n = pieces.div_ceil(8);
                if bytes.len() < n {
                    return Err(invalid("truncated status"));
                }
                let (bits, rest) = bytes.split_at(n);
                bytes = rest;
                Bitmap::decode(pieces, bits).ok_or_else(|| invalid("bad bitmap"))?
            };
            bundles.push(BundleStatus {
                digest,
                chunks_digest,
                fetching: flags & FLAG_FETCHING != 0,
                origin: flags & FLAG_ORIGIN != 0,
                have,
            });
        }
        if !bytes.is_empty() {
            return Err(invalid("trailing bytes after a status"));
        }
        Ok(Status { bundles })
    }
}

fn take<const N: usize>(bytes: &mut &[u8]) -> io::Result<[u8; N]> {
    if bytes.len() < N {
        return Err(invalid("truncated message"));
    }
    let (head, rest) = bytes.split_at(N);
    *bytes = rest;
    Ok(head.try_into().expect("split_at returned N bytes"))
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: impl Fn(u8) -> Option<u32>,
) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await?;
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let max = limit(kind).ok_or_else(|| invalid("unknown message kind"))?;
    if len > max {
        return Err(invalid("message over its size limit"));
    }
    // The buffer grows with the bytes that arrive, not with the length the
    // header declares: a peer that declares a large frame and sends little
    // costs little.
    let mut payload = Vec::with_capacity((len as usize).min(FIRST_READ_BYTES));
    (&mut *io)
        .take(u64::from(len))
        .read_to_end(&mut payload)
        .await?;
    if payload.len() != len as usize {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "message shorter than its header says",
        ));
    }
    Ok((kind, payload))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    kind: u8,
    payload: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| invalid("message too large"))?;
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_be_bytes());
    io.write_all(&header).await?;
    io.write_all(payload).await?;
    io.flush().await
}

/// The codec. libp2p clones it for each stream, and an outbound stream
/// writes its request and reads the answer with the same clone: the clone
/// remembers what it asked, and accepts only an answer of that kind and size.
#[derive(Debug, Clone, Default)]
pub(crate) struct Codec {
    limits: Limits,
    asked: Option<Asked>,
}

/// The kind of answer a request wants, and the largest one it takes.
#[derive(Debug, Clone, Copy)]
struct Asked {
    kind: u8,
    max_bytes: u32,
}

impl Codec {
    pub fn new(limits: Limits) -> Codec {
        Codec {
            limits,
            asked: None,
        }
    }

    fn request_limit(&self, kind: u8) -> Option<u32> {
        match kind {
            STATUS => Some(self.limits.max_status_bytes),
            PIECE => Some(36),
            CHUNK_LIST => Some(32),
            METADATA => Some(4 + MAX_NAME_BYTES),
            _ => None,
        }
    }

    fn response_limit(&self, kind: u8) -> Option<u32> {
        match kind {
            NOT_FOUND | REFUSED | UNKNOWN_NAME => return Some(0),
            _ => {}
        }
        if let Some(asked) = self.asked {
            return (asked.kind == kind).then_some(asked.max_bytes);
        }
        match kind {
            STATUS => Some(self.limits.max_status_bytes),
            PIECE => Some(self.limits.max_piece_bytes),
            CHUNK_LIST => Some(self.limits.max_chunk_list_bytes),
            METADATA => Some(self.limits.max_metadata_bytes),
            _ => None,
        }
    }

    /// Remembers what `request` asks for, for [`Codec::response_limit`].
    fn ask(&mut self, request: &Request) {
        let (kind, max_bytes) = match request {
            Request::Status(_) => (STATUS, self.limits.max_status_bytes),
            Request::Piece { .. } => (PIECE, self.limits.max_piece_bytes),
            Request::ChunkList { .. } => (CHUNK_LIST, self.limits.max_chunk_list_bytes),
            Request::Metadata { max_bytes, .. } => {
                (METADATA, (*max_bytes).min(self.limits.max_metadata_bytes))
            }
        };
        self.asked = Some(Asked { kind, max_bytes });
    }

    fn check_out(&self, len: usize, limit: u32) -> io::Result<()> {
        if len > limit as usize {
            return Err(invalid("refusing to send a message over its size limit"));
        }
        Ok(())
    }
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let (kind, payload) = read_frame(io, |k| self.request_limit(k)).await?;
        match kind {
            STATUS => Ok(Request::Status(Status::decode(&payload)?)),
            PIECE => {
                let mut p = &payload[..];
                let bundle = take(&mut p)?;
                let index = u32::from_be_bytes(take(&mut p)?);
                Ok(Request::Piece { bundle, index })
            }
            CHUNK_LIST => Ok(Request::ChunkList {
                digest: take(&mut &payload[..])?,
            }),
            METADATA => {
                let mut p = &payload[..];
                let max_bytes = u32::from_be_bytes(take(&mut p)?);
                // A name that is not UTF-8 is no metadata name either: it is
                // refused as such rather than failing the stream.
                let name = String::from_utf8_lossy(p).into_owned();
                Ok(Request::Metadata { name, max_bytes })
            }
            _ => Err(invalid("unknown request kind")),
        }
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let (kind, payload) = read_frame(io, |k| self.response_limit(k)).await?;
        match kind {
            STATUS => Ok(Response::Status(Status::decode(&payload)?)),
            PIECE => Ok(Response::Piece(payload)),
            CHUNK_LIST => Ok(Response::ChunkList(payload)),
            METADATA => Ok(Response::Metadata(payload)),
            UNKNOWN_NAME => Ok(Response::UnknownName),
            NOT_FOUND => Ok(Response::NotFound),
            REFUSED => Ok(Response::Refused),
            _ => Err(invalid("unknown response kind")),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.ask(&request);
        match request {
            Request::Status(status) => {
                let payload = status.encode();
                self.check_out(payload.len(), self.limits.max_status_bytes)?;
                write_frame(io, STATUS, &payload).await
            }
            Request::Piece { bundle, index } => {
                let mut payload = [0u8; 36];
                payload[..32].copy_from_slice(&bundle);
                payload[32..].copy_from_slice(&index.to_be_bytes());
                write_frame(io, PIECE, &payload).await
            }
            Request::ChunkList { digest } => write_frame(io, CHUNK_LIST, &digest).await,
            Request::Metadata { name, max_bytes } => {
                self.check_out(name.len(), MAX_NAME_BYTES)?;
                let mut payload = Vec::with_capacity(4 + name.len());
                payload.extend_from_slice(&max_bytes.to_be_bytes());
                payload.extend_from_slice(name.as_bytes());
                write_frame(io, METADATA, &payload).await
            }
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match response {
            Response::Status(status) => {
                let payload = status.encode();
                self.check_out(payload.len(), self.limits.max_status_bytes)?;
                write_frame(io, STATUS, &payload).await
            }
            Response::Piece(data) => {
                self.check_out(data.len(), self.limits.max_piece_bytes)?;
                write_frame(io, PIECE, &data).await
            }
            Response::ChunkList(list) => {
                self.check_out(list.len(), self.limits.max_chunk_list_bytes)?;
                write_frame(io, CHUNK_LIST, &list).await
            }
            Response::Metadata(bytes) => {
                self.check_out(bytes.len(), self.limits.max_metadata_bytes)?;
                write_frame(io, METADATA, &bytes).await
            }
            Response::NotFound => write_frame(io, NOT_FOUND, &[]).await,
            Response::Refused => write_frame(io, REFUSED, &[]).await,
            Response::UnknownName => write_frame(io, UNKNOWN_NAME, &[]).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use libp2p::request_response::Codec as _;

    fn sample_status() -> Status {
        let mut have = Bitmap::empty(20);
        have.set(3);
        have.set(19);
        Status {
            bundles: vec![
                BundleStatus {
                    digest: [1; 32],
                    chunks_digest: [2; 32],
                    fetching: true,
                    origin: true,
                    have,
                },
                BundleStatus {
                    digest: [3; 32],
                    chunks_digest: [4; 32],
                    fetching: false,
                    origin: false,
                    have: Bitmap::full(500),
                },
            ],
        }
    }

    fn round_trip_request(request: Request) -> io::Result<Request> {
        let mut codec = Codec::default();
        let mut wire = Vec::new();
        block_on(codec.write_request(&PROTOCOL, &mut wire, request))?;
        block_on(codec.read_request(&PROTOCOL, &mut &wire[..]))
    }

    fn round_trip_response(response: Response) -> io::Result<Response> {
        let mut codec = Codec::default();
        let mut wire = Vec::new();
        block_on(codec.write_response(&PROTOCOL, &mut wire, response))?;
        block_on(codec.read_response(&PROTOCOL, &mut &wire[..]))
    }

    #[test]
    fn every_message_round_trips() {
        for request in [
            Request::Status(sample_status()),
            Request::Status(Status::default()),
            Request::Piece {
                bundle: [9; 32],
                index: 77,
            },
            Request::ChunkList { digest: [5; 32] },
            Request::Metadata {
                name: "12.root.json".into(),
                max_bytes: 512 << 10,
            },
        ] {
            assert_eq!(round_trip_request(request.clone()).unwrap(), request);
        }
        for response in [
            Response::Status(sample_status()),
            Response::Piece(vec![7; 1 << 20]),
            Response::ChunkList(vec![1; 64]),
            Response::Metadata(b"{\"signed\":{}}".to_vec()),
            Response::NotFound,
            Response::Refused,
            Response::UnknownName,
        ] {
            assert_eq!(round_trip_response(response.clone()).unwrap(), response);
        }
        // A whole bundle costs no bitmap on the wire.
        let whole = Status {
            bundles: vec![sample_status().bundles[1].clone()],
        };
        assert_eq!(whole.encode().len(), 2 + 32 + 32 + 1 + 4);
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused_before_allocation() {
        let mut codec = Codec::default();
        // A piece one byte over the limit is refused on both sides.
        let big = Response::Piece(vec![0; (1 << 20) + 1]);
        assert!(block_on(codec.write_response(&PROTOCOL, &mut Vec::new(), big)).is_err());
        let mut wire = vec![PIECE];
        wire.extend_from_slice(&((1u32 << 20) + 1).to_be_bytes());
        assert!(block_on(codec.read_response(&PROTOCOL, &mut &wire[..])).is_err());
        // A request claiming 4 GiB is refused from its header alone.
        let wire = [STATUS, 0xff, 0xff, 0xff, 0xff];
        assert!(block_on(codec.read_request(&PROTOCOL, &mut &wire[..])).is_err());
        // A piece request has exactly one size.
        let mut wire = vec![PIECE, 0, 0, 0, 37];
        wire.extend_from_slice(&[0; 37]);
        assert!(block_on(codec.read_request(&PROTOCOL, &mut &wire[..])).is_err());
        // Unknown kinds, truncation and trailing bytes.
        assert!(block_on(codec.read_request(&PROTOCOL, &mut &[9u8, 0, 0, 0, 0][..])).is_err());
        assert!(block_on(codec.read_response(&PROTOCOL, &mut &[STATUS, 0, 0][..])).is_err());
        let mut payload = sample_status().encode();
        payload.push(0);
        assert!(Status::decode(&payload).is_err());
        let payload = sample_status().encode();
        assert!(Status::decode(&payload[..payload.len() - 1]).is_err());
    }

    /// A status of 256 entries that each claim a whole bundle of the most
    /// pieces allowed (about 18 KB on the wire) once cost 32 MiB and 268 M bit
    /// sets to decode, on the till's only runtime thread.
    #[test]
    fn status_amplification_whole_claims_cost_what_they_weigh() {
        let entry = BundleStatus {
            digest: [7; 32],
            chunks_digest: [8; 32],
            fetching: false,
            origin: false,
            have: Bitmap::full(MAX_PIECES),
        };
        let hostile = Status {
            bundles: vec![entry; MAX_STATUS_BUNDLES],
        }
        .encode();
        assert!(hostile.len() < 20_000, "{} bytes", hostile.len());

        let started = std::time::Instant::now();
        let status = Status::decode(&hostile).unwrap();
        let took = started.elapsed();
        let heap: usize = status.bundles.capacity() * std::mem::size_of::<BundleStatus>()
            + status
                .bundles
                .iter()
                .map(|b| b.have.heap_bytes())
                .sum::<usize>();
        assert!(heap < 1 << 20, "decoding held {heap} bytes");
        assert!(
            took < std::time::Duration::from_millis(10),
            "decoding took {took:?}"
        );
        assert!(status.bundles.iter().all(|b| b.have.get(MAX_PIECES - 1)));
    }

    #[test]
    fn a_frame_that_declares_more_than_it_sends_is_refused_without_its_buffer() {
        let mut codec = Codec::default();
        codec.ask(&Request::Piece {
            bundle: [1; 32],
            index: 0,
        });
        // A full-size piece declared, ten bytes sent, then the stream ends.
        let mut wire = vec![PIECE];
        wire.extend_from_slice(&(1u32 << 20).to_be_bytes());
        wire.extend_from_slice(&[0; 10]);
        let err = block_on(codec.read_response(&PROTOCOL, &mut &wire[..])).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_answer_must_be_of_the_kind_and_size_asked_for() {
        let answer = |request: Request, response: Response| {
            let mut codec = Codec::default();
            block_on(codec.write_request(&PROTOCOL, &mut Vec::new(), request)).unwrap();
            let mut wire = Vec::new();
            block_on(Codec::default().write_response(&PROTOCOL, &mut wire, response))?;
            block_on(codec.read_response(&PROTOCOL, &mut &wire[..]))
        };
        let piece = || Request::Piece {
            bundle: [1; 32],
            index: 3,
        };
        // A chunk-list-sized answer to a piece request is refused.
        assert!(answer(piece(), Response::ChunkList(vec![0; 64])).is_err());
        assert!(answer(piece(), Response::Status(Status::default())).is_err());
        assert!(answer(piece(), Response::Piece(vec![1; 100])).is_ok());
        assert!(answer(piece(), Response::NotFound).is_ok());
        // Metadata over what the asker said it takes is refused from the header.
        let meta = || Request::Metadata {
            name: "timestamp.json".into(),
            max_bytes: 100,
        };
        assert!(answer(meta(), Response::Metadata(vec![b' '; 101])).is_err());
        assert!(answer(meta(), Response::Metadata(vec![b' '; 100])).is_ok());
        assert!(answer(meta(), Response::UnknownName).is_ok());
    }

    #[test]
    fn metadata_frames_have_their_own_limits() {
        let small = Limits {
            max_metadata_bytes: 1000,
            ..Limits::default()
        };
        let mut codec = Codec::new(small);
        // A file over the limit is neither sent nor read, from its header.
        let big = Response::Metadata(vec![b' '; 1001]);
        assert!(block_on(codec.write_response(&PROTOCOL, &mut Vec::new(), big)).is_err());
        let mut wire = vec![METADATA];
        wire.extend_from_slice(&1001u32.to_be_bytes());
        let err = block_on(codec.read_response(&PROTOCOL, &mut &wire[..])).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let fits = Response::Metadata(vec![b' '; 1000]);
        let mut wire = Vec::new();
        block_on(codec.write_response(&PROTOCOL, &mut wire, fits.clone())).unwrap();
        assert_eq!(
            block_on(codec.read_response(&PROTOCOL, &mut &wire[..])).unwrap(),
            fits
        );
        // Names are short.
        let long = Request::Metadata {
            name: "1".repeat(65),
            max_bytes: 1,
        };
        assert!(block_on(codec.write_request(&PROTOCOL, &mut Vec::new(), long)).is_err());
        let mut wire = vec![METADATA, 0, 0, 0, 69];
        wire.extend_from_slice(&[b'1'; 69]);
        assert!(block_on(codec.read_request(&PROTOCOL, &mut &wire[..])).is_err());
        // A name that is not UTF-8 arrives, to be refused by name.
        let mut wire = vec![METADATA, 0, 0, 0, 6, 0, 0, 0, 9, 0xff, 0xfe];
        wire.truncate(11);
        match block_on(codec.read_request(&PROTOCOL, &mut &wire[..])).unwrap() {
            Request::Metadata { name, max_bytes } => {
                assert_eq!(max_bytes, 9);
                assert!(crate::metadata::role_of(&name).is_none());
            }
            other => panic!("{other:?}"),
        }
    }
}
