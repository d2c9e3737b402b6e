//! posfleet's gRPC API, package `posfleet.v1`, generated at build time from
//! `proto/posfleet/v1/*.proto` by `protox` and `tonic-prost-build` (no `protoc`).
#![forbid(unsafe_code)]

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("posfleet.v1");
}

pub mod setup;
pub mod signals;
pub mod totp;

/// The encoded `FileDescriptorSet` of the API, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/posfleet_descriptor.bin"));

/// Metadata key carrying credentials on every call.
pub const AUTHORIZATION: &str = "authorization";

/// The bytes a device signs with its Ed25519 key when it enrolls, proving it
/// holds the private key of the public key it presents. Each field is
/// length-prefixed so no two different requests share a payload.
pub fn enroll_signing_payload(
    enrollment_token: &str,
    public_key: &[u8],
    hardware_model: &str,
    serial_number: &str,
) -> Vec<u8> {
    signing_payload(
        b"posfleet-enroll-v1",
        &[
            enrollment_token.as_bytes(),
            public_key,
            hardware_model.as_bytes(),
            serial_number.as_bytes(),
        ],
    )
}

/// The bytes a device whose certificate has expired signs with its key to
/// renew it: which device, when (the control plane accepts a few minutes
/// of clock difference, so a captured proof soon stops working), and the
/// certificate request it vouches for.
pub fn renew_signing_payload(
    device_id: &str,
    signed_at_unix_ms: i64,
    certificate_request: &[u8],
) -> Vec<u8> {
    signing_payload(
        b"posfleet-renew-v1",
        &[
            device_id.as_bytes(),
            &signed_at_unix_ms.to_be_bytes(),
            certificate_request,
        ],
    )
}

/// A domain tag, then each field prefixed with its length.
fn signing_payload(tag: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut out = tag.to_vec();
    for field in fields {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_payload_separates_fields() {
        // Moving a byte from one field to the next must change the payload.
        let a = enroll_signing_payload("ab", b"k", "c", "d");
        let b = enroll_signing_payload("a", b"k", "bc", "d");
        assert_ne!(a, b);
        // An enrollment proof is never a renewal proof.
        assert_ne!(
            renew_signing_payload("dev-1", 5, b"req"),
            enroll_signing_payload("dev-1", &5i64.to_be_bytes(), "req", "")
        );
    }

    #[test]
    fn descriptor_set_names_both_services() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<_> = fds
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        assert!(services.contains(&"AgentService".to_string()));
        assert!(services.contains(&"AdminService".to_string()));
        assert!(services.contains(&"SessionService".to_string()));
    }
}
