//! A set of TCP ports as a bitmap (65,536 bits, 8 KiB): the allocated ports and the cooling
//! ones, so that finding the lowest free port of a pool skips runs of them 64 ports a step
//! instead of one.

use std::fmt;

const WORDS: usize = 65_536 / 64;

/// Ports, one bit each.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PortSet(Box<[u64; WORDS]>);

impl Default for PortSet {
    fn default() -> Self {
        Self(Box::new([0; WORDS]))
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n: u32 = self.0.iter().map(|w| w.count_ones()).sum();
        write!(f, "PortSet({n} ports)")
    }
}

impl PortSet {
    pub(crate) fn insert(&mut self, port: u16) {
        self.0[usize::from(port) / 64] |= 1 << (port % 64);
    }

    pub(crate) fn remove(&mut self, port: u16) {
        self.0[usize::from(port) / 64] &= !(1 << (port % 64));
    }

    /// How many ports the set holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub(crate) fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// The ports in `start..=end` not in the set, ascending (none if `start > end`).
    pub(crate) fn absent(&self, start: u16, end: u16) -> impl Iterator<Item = u16> + '_ {
        free_ports(start, end, move |i| self.0[i])
    }

    /// The ports in `start..=end` in neither this set nor `other`, ascending (none if
    /// `start > end`).
    pub(crate) fn absent_from_both<'a>(
        &'a self,
        other: &'a PortSet,
        start: u16,
        end: u16,
    ) -> impl Iterator<Item = u16> + 'a {
        free_ports(start, end, move |i| self.0[i] | other.0[i])
    }
}

/// The ports in `start..=end` whose bit is clear in `word(i)`, the i-th word of 64 ports.
fn free_ports(start: u16, end: u16, word: impl Fn(usize) -> u64) -> impl Iterator<Item = u16> {
    let (first, last) = (usize::from(start) / 64, usize::from(end) / 64);
    let words = if start <= end { first..last + 1 } else { 0..0 };
    words.flat_map(move |i| {
        let mut free = !word(i);
        if i == first {
            free &= u64::MAX << (start % 64);
        }
        if i == last {
            free &= u64::MAX >> (63 - end % 64);
        }
        std::iter::from_fn(move || {
            if free == 0 {
                return None;
            }
            let bit = free.trailing_zeros();
            free &= free - 1;
            // i < 1024 and bit < 64: the port fits in u16.
            Some((i * 64) as u16 + bit as u16)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The ports in `start..=end` not in `s`.
    fn absent(s: &PortSet, start: u16, end: u16) -> Vec<u16> {
        s.absent_from_both(&PortSet::default(), start, end).collect()
    }

    proptest! {
        #[test]
        fn absent_from_both_is_the_complement_of_the_union(
            ports in proptest::collection::btree_set(any::<u16>(), 0..300),
            others in proptest::collection::btree_set(any::<u16>(), 0..300),
            a in any::<u16>(),
            b in any::<u16>(),
        ) {
            let (mut s, mut o) = (PortSet::default(), PortSet::default());
            ports.iter().for_each(|p| s.insert(*p));
            others.iter().for_each(|p| o.insert(*p));
            let (start, end) = (a.min(b), a.max(b));
            let got: Vec<u16> = s.absent_from_both(&o, start, end).collect();
            let want: Vec<u16> =
                (start..=end).filter(|p| !ports.contains(p) && !others.contains(p)).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn edges_and_removal() {
        let mut s = PortSet::default();
        for p in [0, 63, 64, 65_535] {
            s.insert(p);
            assert!(s.contains(p));
        }
        assert_eq!(absent(&s, 0, 0).len(), 0);
        assert_eq!(absent(&s, 63, 65), [65]);
        assert_eq!(absent(&s, 65_534, 65_535), [65_534]);
        s.remove(65_535);
        assert_eq!(absent(&s, 65_535, 65_535), [65_535]);
        assert_eq!(absent(&s, 1, 62).len(), 62);
    }
}
