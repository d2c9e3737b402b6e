//! What a posfleet bundle is, and when to trust one.
//!
//! - `manifest`, `archive`: the bundle format (a directory with
//!   `posfleet-bundle.toml`, packed reproducibly as tar + zstd).
//! - `delta`: rebuilding a version's tar from the one before and a delta.
//! - `chunks`: the SHA-256 of every 1 MiB piece, so each piece is verified on
//!   its own, whoever served it.
//! - `tuf`: TUF 1.0 metadata in canonical JSON, signed with Ed25519.
//! - `repo`: building and signing metadata (ops and the control plane).
//! - `client`: deciding which metadata and targets to trust (agents), and
//!   `VerifiedTarget`, the one value that says a bundle may be fetched.
//!
//! Trust is decided here only. Other crates never hash bundle bytes nor
//! build a trusted value: `ChunkList::verify_piece`,
//! `VerifiedTarget::verify_file` and `VerifiedTarget::decode_chunk_list`
//! do the checking, and their errors tell a bad digest (whoever served
//! the bytes lied: `Error::is_bad_digest`) from a wrong shape.
//!
//! No network and no database here.
#![forbid(unsafe_code)]

pub mod archive;
pub mod chunks;
pub mod client;
pub mod delta;
pub mod error;
mod hash;
pub mod manifest;
pub mod repo;
pub mod tuf;

pub use error::{Error, Result};
