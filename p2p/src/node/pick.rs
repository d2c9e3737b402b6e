//! Which pieces to ask whom for: a pure decision, no swarm and no I/O.
//!
//! Rarest first: the pieces the fewest peers hold are asked for first, so
//! a piece only one peer has spreads before that peer leaves, and tills of
//! a store pulling at once start on different pieces. Ties go in an order
//! of this till's own. Each piece goes to the least busy peer that holds
//! it, and no peer gets more than its share of requests at once.

use libp2p::PeerId;

use crate::bitmap::Bitmap;

/// A peer that announces pieces of the bundle being fetched.
pub(super) struct Holder<'a, P> {
    pub peer: P,
    /// Its own order among equally busy holders of a piece (`salt_of` its
    /// PeerId).
    pub salt: u64,
    /// The pieces it holds.
    pub have: &'a Bitmap,
    /// Requests to it in flight now, for any bundle.
    pub load: usize,
}

/// How many requests may go out.
#[derive(Debug, Clone, Copy)]
pub(super) struct Capacity {
    /// Requests in flight to one peer at most.
    pub per_peer: usize,
    /// Requests this decision may add, over all peers.
    pub budget: usize,
}

/// The requests to send for one bundle, `(piece, peer)`, in the order
/// chosen.
///
/// A piece is a candidate if `have` lacks it, it is not `in_flight` and
/// some holder has it. Candidates go rarest first (fewest holders), ties in
/// the order `salt` (this till's) gives them. Each goes to the holder with
/// the fewest requests in flight (the picks made here included) that is
/// below `capacity.per_peer`, ties in the holders' own order; a piece whose
/// holders are all at capacity is passed over. At most `capacity.budget`
/// picks.
pub(super) fn rarest_first<P: Copy>(
    have: &Bitmap,
    in_flight: impl Fn(usize) -> bool,
    holders: &[Holder<'_, P>],
    salt: u64,
    capacity: Capacity,
) -> Vec<(usize, P)> {
    if holders.is_empty() || capacity.budget == 0 {
        return Vec::new();
    }
    let mut wanted: Vec<(usize, u64, usize)> = have
        .missing()
        .filter(|&i| !in_flight(i))
        .filter_map(|i| {
            let n = holders.iter().filter(|h| h.have.get(i)).count();
            (n > 0).then(|| (n, mix(salt, i as u64), i))
        })
        .collect();
    wanted.sort_unstable();
    let mut load: Vec<usize> = holders.iter().map(|h| h.load).collect();
    let mut picks = Vec::new();
    for (_, _, index) in wanted {
        if picks.len() == capacity.budget {
            break;
        }
        let best = holders
            .iter()
            .enumerate()
            .filter(|(k, h)| h.have.get(index) && load[*k] < capacity.per_peer)
            .min_by_key(|(k, h)| (load[*k], mix(h.salt, index as u64)));
        if let Some((k, h)) = best {
            load[k] += 1;
            picks.push((index, h.peer));
        }
    }
    picks
}

/// A cheap, per-till scramble so tills pick pieces in different orders.
fn mix(salt: u64, value: u64) -> u64 {
    let mut z = salt ^ value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A till's salt: the last 8 bytes of its PeerId.
pub(super) fn salt_of(peer: &PeerId) -> u64 {
    let bytes = peer.to_bytes();
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Capacity = Capacity {
        per_peer: 100,
        budget: 100,
    };

    fn bits(len: usize, set: &[usize]) -> Bitmap {
        let mut b = Bitmap::empty(len);
        for &i in set {
            b.set(i);
        }
        b
    }

    fn holder<'a>(peer: &'static str, have: &'a Bitmap, load: usize) -> Holder<'a, &'static str> {
        Holder {
            peer,
            salt: peer
                .bytes()
                .fold(7, |acc: u64, b| acc.wrapping_mul(31) + u64::from(b)),
            have,
            load,
        }
    }

    fn pick(
        have: &Bitmap,
        in_flight: &[usize],
        holders: &[Holder<'_, &'static str>],
        capacity: Capacity,
    ) -> Vec<(usize, &'static str)> {
        rarest_first(have, |i| in_flight.contains(&i), holders, 1, capacity)
    }

    #[test]
    fn the_rarest_piece_goes_first_and_each_to_the_least_busy_holder() {
        // Piece 0 has one holder, piece 1 two, piece 2 three.
        let (a, b, c) = (bits(3, &[0, 1, 2]), bits(3, &[1, 2]), bits(3, &[2]));
        let holders = [holder("a", &a, 0), holder("b", &b, 0), holder("c", &c, 0)];
        assert_eq!(
            pick(&Bitmap::empty(3), &[], &holders, ROOMY),
            vec![(0, "a"), (1, "b"), (2, "c")]
        );
        // Whatever this till's own order.
        for salt in 0..64 {
            let picks = rarest_first(&Bitmap::empty(3), |_| false, &holders, salt, ROOMY);
            let order: Vec<usize> = picks.iter().map(|(i, _)| *i).collect();
            assert_eq!(order, vec![0, 1, 2], "salt {salt}");
        }
    }

    #[test]
    fn ties_go_in_an_order_of_the_tills_own_the_same_every_time() {
        let all = Bitmap::full(16);
        let holders = [holder("a", &all, 0)];
        let order = |salt| -> Vec<usize> {
            rarest_first(&Bitmap::empty(16), |_| false, &holders, salt, ROOMY)
                .into_iter()
                .map(|(i, _)| i)
                .collect()
        };
        assert_eq!(order(1), order(1));
        assert_ne!(order(1), order(2), "two tills start on different pieces");
        let mut sorted = order(1);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn equally_busy_holders_share_the_requests() {
        let all = Bitmap::full(8);
        let holders = [holder("a", &all, 0), holder("b", &all, 0)];
        let picks = pick(&Bitmap::empty(8), &[], &holders, ROOMY);
        assert_eq!(picks.len(), 8);
        for peer in ["a", "b"] {
            assert_eq!(
                picks.iter().filter(|(_, p)| *p == peer).count(),
                4,
                "{peer}"
            );
        }
    }

    #[test]
    fn pieces_held_or_in_flight_are_not_asked_for() {
        let all = Bitmap::full(5);
        let holders = [holder("a", &all, 0)];
        let mut picked: Vec<usize> = pick(&bits(5, &[0, 3]), &[1], &holders, ROOMY)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        picked.sort_unstable();
        assert_eq!(picked, vec![2, 4]);
    }

    #[test]
    fn a_peer_is_asked_only_for_pieces_it_holds() {
        let (a, b) = (bits(6, &[0, 1]), bits(6, &[4]));
        let holders = [holder("a", &a, 0), holder("b", &b, 0)];
        let mut picks = pick(&Bitmap::empty(6), &[], &holders, ROOMY);
        picks.sort_unstable();
        assert_eq!(picks, vec![(0, "a"), (1, "a"), (4, "b")]);
    }

    #[test]
    fn a_peer_at_capacity_is_not_asked() {
        let capacity = Capacity {
            per_peer: 2,
            budget: 100,
        };
        let (a, b) = (bits(4, &[0]), bits(4, &[1, 2, 3]));
        let lacking = Bitmap::empty(4);
        // `a` is free: it is asked for the piece only it holds.
        let holders = [holder("a", &a, 1), holder("b", &b, 0)];
        assert!(pick(&lacking, &[], &holders, capacity).contains(&(0, "a")));
        // `a` is busy: that piece waits. Picks count towards capacity:
        // `b` holds three pieces and is asked for two.
        let holders = [holder("a", &a, 2), holder("b", &b, 0)];
        let picks = pick(&lacking, &[], &holders, capacity);
        assert_eq!(picks.len(), 2, "{picks:?}");
        assert!(picks.iter().all(|(_, p)| *p == "b"), "{picks:?}");
    }

    #[test]
    fn no_more_picks_than_the_budget() {
        let all = Bitmap::full(10);
        let holders = [holder("a", &all, 0), holder("b", &all, 0)];
        let capacity = Capacity {
            per_peer: 100,
            budget: 3,
        };
        assert_eq!(pick(&Bitmap::empty(10), &[], &holders, capacity).len(), 3);
    }

    #[test]
    fn nothing_when_nothing_is_obtainable() {
        let all = Bitmap::full(4);
        let none = Bitmap::empty(4);
        let lacking = Bitmap::empty(4);
        // No holder, or holders of nothing.
        assert!(pick(&lacking, &[], &[], ROOMY).is_empty());
        assert!(pick(&lacking, &[], &[holder("a", &none, 0)], ROOMY).is_empty());
        // Everything in flight already.
        let a = [holder("a", &all, 0)];
        assert!(pick(&lacking, &[0, 1, 2, 3], &a, ROOMY).is_empty());
        // The whole bundle here.
        assert!(pick(&all, &[], &a, ROOMY).is_empty());
        // No budget left.
        let no_budget = Capacity {
            per_peer: 4,
            budget: 0,
        };
        assert!(pick(&lacking, &[], &a, no_budget).is_empty());
        // Every holder at capacity.
        let busy = [holder("a", &all, 4), holder("b", &all, 5)];
        let per_peer_4 = Capacity {
            per_peer: 4,
            budget: 100,
        };
        assert!(pick(&lacking, &[], &busy, per_peer_4).is_empty());
    }
}
