//! Which peers hear first of a piece fresh from the origin.
//!
//! Every till pulls the rarest piece first, and a piece that just came
//! from the origin is the rarest of all: if the till fetching from the
//! origin announced it to everyone, every other till would ask that one
//! till for it, and that till would upload each piece once per peer while
//! the others idle. So a fresh piece is announced at first only to the
//! [`FIRST_HOLDERS`] peers that need it with the highest score for that
//! piece (a hash of peer and index, so the choice rotates over the peers);
//! they pass it on. Everyone hears of it once any connected member has it,
//! or [`SHOW_ALL_AFTER`] after it arrived, whichever comes first: a slow
//! first holder delays the others by at most that.
//!
//! Only announcements are shaped: a till serves any piece it has to any
//! member that asks.

use libp2p::PeerId;
use std::time::Duration;

pub(crate) const FIRST_HOLDERS: usize = 2;
pub(crate) const SHOW_ALL_AFTER: Duration = Duration::from_millis(500);

/// Whether `peer` hears now of fresh piece `index`, given the connected
/// peers that need the bundle and lack the piece (`wanting`).
pub(crate) fn shown_to(peer: &PeerId, index: usize, wanting: &[PeerId]) -> bool {
    let mine = score(peer, index);
    wanting
        .iter()
        .filter(|other| *other != peer && score(other, index) > mine)
        .count()
        < FIRST_HOLDERS
}

fn score(peer: &PeerId, index: usize) -> u64 {
    // FNV-1a over the PeerId bytes and the index, then a finalizer: cheap,
    // the same on every till, and different per piece.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in peer.to_bytes().iter().chain(&(index as u64).to_be_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fresh_piece_goes_first_to_two_peers_and_the_choice_rotates() {
        let peers: Vec<PeerId> = (0..19).map(|_| PeerId::random()).collect();
        let mut first_of = vec![0usize; peers.len()];
        for index in 0..400 {
            let shown: Vec<usize> = (0..peers.len())
                .filter(|&i| shown_to(&peers[i], index, &peers))
                .collect();
            assert_eq!(shown.len(), FIRST_HOLDERS, "piece {index}");
            for i in shown {
                first_of[i] += 1;
            }
        }
        // 800 first showings over 19 peers: about 42 each.
        for (i, n) in first_of.iter().enumerate() {
            assert!((15..=80).contains(n), "peer {i} was first {n} times");
        }
    }

    #[test]
    fn with_few_peers_wanting_every_one_is_shown() {
        let peers: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
        assert!(peers.iter().all(|p| shown_to(p, 7, &peers)));
        // A peer that no longer lacks it is not counted against the others.
        let extra = PeerId::random();
        assert!(shown_to(&extra, 7, &peers[..1]));
    }
}
