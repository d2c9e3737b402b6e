//! Which pieces of a bundle a peer holds, one bit per piece.

/// One bit per piece, lowest index in the lowest bit of the first byte.
///
/// A whole bitmap holds no bits at all: a peer's claim to have a bundle
/// whole costs a flag on the wire and nothing to receive, whatever piece
/// count it names. Bits are made only when a piece of a whole map is
/// cleared (a piece that failed to verify, of a bundle this till fetches and
/// so knows the size of).
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    len: usize,
    /// `None` while every piece is there.
    bits: Option<Vec<u8>>,
    ones: usize,
}

impl Bitmap {
    pub fn empty(len: usize) -> Bitmap {
        Bitmap {
            len,
            bits: Some(vec![0; len.div_ceil(8)]),
            ones: 0,
        }
    }

    pub fn full(len: usize) -> Bitmap {
        Bitmap {
            len,
            bits: None,
            ones: len,
        }
    }

    /// Parses `bits` for `len` pieces; `None` if the size is wrong or a bit
    /// past the end is set.
    pub fn decode(len: usize, bits: &[u8]) -> Option<Bitmap> {
        if bits.len() != len.div_ceil(8) {
            return None;
        }
        if !len.is_multiple_of(8) && bits.last().is_some_and(|b| b >> (len % 8) != 0) {
            return None;
        }
        let ones = bits.iter().map(|b| b.count_ones() as usize).sum();
        Some(Bitmap {
            len,
            bits: Some(bits.to_vec()),
            ones,
        })
    }

    /// The bits, `None` for a whole bitmap (which is sent as a flag).
    pub fn partial_bytes(&self) -> Option<&[u8]> {
        self.bits.as_deref()
    }

    /// Heap bytes this bitmap holds.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.bits.as_ref().map_or(0, Vec::capacity)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn count(&self) -> usize {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    pub fn get(&self, index: usize) -> bool {
        index < self.len
            && self
                .bits
                .as_ref()
                .is_none_or(|bits| bits[index / 8] & (1 << (index % 8)) != 0)
    }

    /// Sets a bit; returns whether it was newly set.
    pub fn set(&mut self, index: usize) -> bool {
        if index >= self.len || self.get(index) {
            return false;
        }
        if let Some(bits) = self.bits.as_mut() {
            bits[index / 8] |= 1 << (index % 8);
        }
        self.ones += 1;
        true
    }

    pub fn clear(&mut self, index: usize) {
        if !self.get(index) {
            return;
        }
        let len = self.len;
        let bits = self.bits.get_or_insert_with(|| {
            let mut bits = vec![0xff; len.div_ceil(8)];
            if !len.is_multiple_of(8)
                && let Some(last) = bits.last_mut()
            {
                *last = (1u8 << (len % 8)) - 1;
            }
            bits
        });
        bits[index / 8] &= !(1 << (index % 8));
        self.ones -= 1;
    }

    pub fn missing(&self) -> impl Iterator<Item = usize> + '_ {
        let end = if self.bits.is_some() { self.len } else { 0 };
        (0..end).filter(|&i| !self.get(i))
    }
}

/// Two maps are equal when they hold the same pieces, whether or not a whole
/// one keeps its bits.
impl PartialEq for Bitmap {
    fn eq(&self, other: &Bitmap) -> bool {
        self.len == other.len
            && self.ones == other.ones
            && (self.is_full() || self.bits == other.bits)
    }
}

impl Eq for Bitmap {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_and_bad_encodings_are_refused() {
        let mut map = Bitmap::empty(11);
        assert!(map.set(0));
        assert!(map.set(10));
        assert!(!map.set(10));
        assert!(!map.set(11));
        assert_eq!(map.count(), 2);
        assert_eq!(map.missing().count(), 9);
        let back = Bitmap::decode(11, map.partial_bytes().unwrap()).unwrap();
        assert_eq!(back, map);
        map.clear(0);
        assert_eq!((map.count(), map.get(0), map.get(10)), (1, false, true));

        assert!(Bitmap::decode(11, &[0]).is_none(), "too short");
        assert!(
            Bitmap::decode(11, &[0, 0b1000]).is_none(),
            "bit past the end"
        );
        assert!(Bitmap::full(11).is_full());
        assert!(Bitmap::full(0).is_full());
    }

    #[test]
    fn a_whole_map_holds_no_bits_until_a_piece_is_cleared() {
        let mut whole = Bitmap::full(1 << 20);
        assert_eq!(whole.heap_bytes(), 0);
        assert!(whole.get(0) && whole.get((1 << 20) - 1) && !whole.get(1 << 20));
        assert!(!whole.set(5));
        assert_eq!(whole.missing().count(), 0);

        let mut map = Bitmap::full(11);
        map.clear(10);
        assert_eq!((map.count(), map.get(9), map.get(10)), (10, true, false));
        assert_eq!(map.missing().collect::<Vec<_>>(), [10]);
        // The bits it made have nothing set past the end.
        assert!(Bitmap::decode(11, map.partial_bytes().unwrap()).is_some());
        assert!(map.set(10));
        assert_eq!(map, Bitmap::full(11));
        assert_ne!(map, Bitmap::empty(11));
    }
}
