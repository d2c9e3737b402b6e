//! SHA-256, the one hash of bundle bytes and metadata. ring's
//! implementation is assembly in every build profile: every byte a till
//! moves is hashed once or twice, and a portable implementation is much
//! slower in debug builds (tests included).

use ring::digest::{Context, SHA256, digest};

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    to_array(digest(&SHA256, bytes).as_ref())
}

/// SHA-256 over bytes fed in parts.
pub(crate) struct Sha256(Context);

impl Sha256 {
    pub(crate) fn new() -> Sha256 {
        Sha256(Context::new(&SHA256))
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn finish(self) -> [u8; 32] {
        to_array(self.0.finish().as_ref())
    }
}

fn to_array(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // A SHA-256 digest is 32 bytes: this copies all of it.
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut parts = Sha256::new();
        parts.update(b"a");
        parts.update(b"bc");
        assert_eq!(parts.finish(), sha256(b"abc"));
    }
}
