//! Which pieces of a bundle a peer holds, one bit per piece.

/// One bit per piece, lowest index in the lowest bit of the first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    len: usize,
    bits: Vec<u8>,
    ones: usize,
}

impl Bitmap {
    pub fn empty(len: usize) -> Bitmap {
        Bitmap {
            len,
            bits: vec![0; len.div_ceil(8)],
            ones: 0,
        }
    }

    pub fn full(len: usize) -> Bitmap {
        let mut map = Bitmap::empty(len);
        for index in 0..len {
            map.set(index);
        }
        map
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
            bits: bits.to_vec(),
            ones,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
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
        index < self.len && self.bits[index / 8] & (1 << (index % 8)) != 0
    }

    /// Sets a bit; returns whether it was newly set.
    pub fn set(&mut self, index: usize) -> bool {
        if index >= self.len || self.get(index) {
            return false;
        }
        self.bits[index / 8] |= 1 << (index % 8);
        self.ones += 1;
        true
    }

    pub fn clear(&mut self, index: usize) {
        if self.get(index) {
            self.bits[index / 8] &= !(1 << (index % 8));
            self.ones -= 1;
        }
    }

    pub fn missing(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|&i| !self.get(i))
    }
}

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
        let back = Bitmap::decode(11, map.as_bytes()).unwrap();
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
}
