//! The fleet's certificates. The control plane holds a fleet CA (made at
//! first start, or supplied from the company's PKI) and issues from it the
//! server certificates of its gRPC and HTTPS listeners and one short-lived
//! certificate per till. A till's certificate carries the till's own
//! Ed25519 key (its P2P identity too) and names, in URI subject alternative
//! names, the device and the store the control plane enrolled it into:
//! nothing in it is copied from the till's request but the key.
//!
//! Every TLS configuration here is built with one crypto provider, chosen
//! explicitly ([`crypto_provider`]): nothing depends on which providers the
//! dependency graph happens to enable.
#![forbid(unsafe_code)]

pub mod ca;
pub mod channel;
pub mod error;
pub mod identity;
pub mod request;
pub mod tls;

use std::sync::Arc;

pub use ca::{DeviceCertificate, FleetCa, ServerCertificate};
pub use channel::{ClientTls, grpc_channel, grpc_channel_with};
pub use error::Error;
pub use identity::DeviceIdentity;
pub use request::{certificate_request, private_key_der};
pub use rustls;
pub use tls::{
    NotThePinnedCa, Revocations, certificates_from_pem, client_config, parse_fingerprint,
    pinned_client_config, private_key_from_pem, server_config, verify_server_chain,
};

/// The one crypto provider posfleet's TLS uses: aws-lc-rs.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes [`crypto_provider`] the process's default, for any library that
/// asks rustls for the default rather than taking one. Call at start; a
/// second call does nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
