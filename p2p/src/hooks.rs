//! Test hooks: a till set to misbehave (`Config::corrupt_served_data`)
//! spoils what it serves, so tests can exercise its peers' defences. Built
//! only with the `test-hooks` feature, which the crate's own tests turn on:
//! no other build holds them.

use crate::config::Config;

/// A piece about to be served: one byte flipped.
pub(crate) fn piece(config: &Config, mut data: Vec<u8>) -> Vec<u8> {
    if config.corrupt_served_data && !data.is_empty() {
        let middle = data.len() / 2;
        data[middle] ^= 0x55;
    }
    data
}

/// A chunk list about to be served: its first byte flipped.
pub(crate) fn chunk_list(config: &Config, mut list: Vec<u8>) -> Vec<u8> {
    if config.corrupt_served_data && !list.is_empty() {
        list[0] ^= 0x01;
    }
    list
}

/// The most metadata to read for serving: the whole file, whatever the
/// asker's `limit`.
pub(crate) fn metadata_limit(config: &Config, limit: u32) -> u32 {
    if config.corrupt_served_data {
        config.limits.max_metadata_bytes
    } else {
        limit
    }
}

/// A TUF metadata file about to be served: still parsable, no longer
/// verifiable.
pub(crate) fn metadata(config: &Config, mut bytes: Vec<u8>) -> Vec<u8> {
    if config.corrupt_served_data {
        tamper(&mut bytes);
    }
    bytes
}

/// Changes one hex digit of the first signature, so the file still parses
/// but no longer verifies.
fn tamper(bytes: &mut [u8]) {
    let Some(at) = bytes.windows(5).position(|w| w == b"\"sig\"") else {
        return;
    };
    let Some(open) = bytes[at + 5..].iter().position(|&b| b == b'"') else {
        return;
    };
    if let Some(digit) = bytes.get_mut(at + 5 + open + 1) {
        *digit = if *digit == b'0' { b'1' } else { b'0' };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::check_parses;
    use posfleet_bundle::tuf::{self, Timestamp};

    #[test]
    fn the_tamper_hook_keeps_the_file_parsable() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let timestamp = Timestamp {
            type_: "timestamp".into(),
            spec_version: tuf::SPEC_VERSION.into(),
            version: 3,
            expires: "2030-01-01T00:00:00Z".into(),
            meta: Default::default(),
        };
        let mut bytes = tuf::sign(&timestamp, &[&key]);
        let before = bytes.clone();
        check_parses("timestamp.json", &bytes).unwrap();
        tamper(&mut bytes);
        assert_ne!(bytes, before);
        assert_eq!(bytes.len(), before.len());
        check_parses("timestamp.json", &bytes).unwrap();
        assert!(check_parses("snapshot.json", &bytes).is_err(), "wrong role");
        assert!(check_parses("timestamp.json", b"{\"signed\":").is_err());
    }

    #[test]
    fn an_honest_till_serves_what_it_holds() {
        let honest = Config::default();
        let data = vec![7u8; 10];
        assert_eq!(piece(&honest, data.clone()), data);
        assert_eq!(chunk_list(&honest, data.clone()), data);
        assert_eq!(metadata(&honest, data.clone()), data);
        assert_eq!(metadata_limit(&honest, 10), 10);
        let liar = Config {
            corrupt_served_data: true,
            ..Config::default()
        };
        assert_ne!(piece(&liar, data.clone()), data);
        assert_ne!(chunk_list(&liar, data.clone()), data);
        assert_eq!(metadata_limit(&liar, 10), liar.limits.max_metadata_bytes);
    }
}
