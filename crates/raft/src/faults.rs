//! Faults injected into the node-to-node links of in-process test clusters: cut links
//! (partitions), dropped messages and delays. One [`LinkFaults`] is shared by every node of a
//! test cluster and stands for the network between them; production nodes have none.
//!
//! A dropped message is dropped either before it reaches the peer (the request is lost) or
//! after the peer handled it (the reply is lost), so both halves of an RPC can fail.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use portmesh_core::SplitMix64;

/// What happens to one message from `from` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    /// The request never arrives.
    DropRequest,
    /// The request arrives and is handled; the reply is lost.
    DropReply,
}

#[derive(Debug, Default)]
struct Inner {
    /// Directed links that carry nothing.
    cut: BTreeSet<(u64, u64)>,
    /// Chance in 1000 that a message is dropped (half of them requests, half replies).
    drop_per_mille: u64,
    /// Added before every message.
    delay: Duration,
    /// The generator that decides which messages drop.
    rng: Option<SplitMix64>,
}

/// The faults of one test network. Cheap to consult: one uncontended lock per message.
#[derive(Debug, Default)]
pub struct LinkFaults {
    inner: Mutex<Inner>,
}

impl LinkFaults {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Cuts every link between a node of `a` and a node of `b`, both ways.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        self.with(|i| {
            for x in a {
                for y in b {
                    i.cut.insert((*x, *y));
                    i.cut.insert((*y, *x));
                }
            }
        });
    }

    /// Cuts the one directed link `from` → `to` (its replies still flow the other way).
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.with(|i| {
            i.cut.insert((from, to));
        });
    }

    /// Drops this many messages in 1000, at random (seeded, so a run can be repeated).
    pub fn set_drop(&self, per_mille: u64, seed: u64) {
        self.with(|i| {
            i.drop_per_mille = per_mille.min(1000);
            i.rng = Some(SplitMix64::new(seed));
        });
    }

    /// Delays every message by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.with(|i| i.delay = d);
    }

    /// Restores every link: no cuts, drops or delays.
    pub fn heal(&self) {
        self.with(|i| {
            i.cut.clear();
            i.drop_per_mille = 0;
            i.delay = Duration::ZERO;
        });
    }

    /// Decides the fate of one message, and how long to hold it first.
    pub fn verdict(&self, from: u64, to: u64) -> (Verdict, Duration) {
        self.with(|i| {
            if i.cut.contains(&(from, to)) {
                return (Verdict::DropRequest, i.delay);
            }
            let Some(rng) = i.rng.as_mut().filter(|_| i.drop_per_mille > 0) else {
                return (Verdict::Deliver, i.delay);
            };
            let roll = rng.next_u64() % 2000;
            let verdict = if roll < i.drop_per_mille {
                Verdict::DropRequest
            } else if roll < 2 * i.drop_per_mille {
                Verdict::DropReply
            } else {
                Verdict::Deliver
            };
            (verdict, i.delay)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cut_both_ways_and_heal_restores() {
        let f = LinkFaults::new();
        f.partition(&[1], &[2, 3]);
        assert_eq!(f.verdict(1, 2).0, Verdict::DropRequest);
        assert_eq!(f.verdict(3, 1).0, Verdict::DropRequest);
        assert_eq!(f.verdict(2, 3).0, Verdict::Deliver);
        f.heal();
        assert_eq!(f.verdict(1, 2).0, Verdict::Deliver);
        f.cut_one_way(2, 3);
        assert_eq!(f.verdict(2, 3).0, Verdict::DropRequest);
        assert_eq!(f.verdict(3, 2).0, Verdict::Deliver);
    }

    #[test]
    fn drops_both_halves_at_about_the_rate_asked() {
        let f = LinkFaults::new();
        f.set_drop(100, 7);
        let (mut req, mut rep) = (0, 0);
        for _ in 0..10_000 {
            match f.verdict(1, 2).0 {
                Verdict::DropRequest => req += 1,
                Verdict::DropReply => rep += 1,
                Verdict::Deliver => {}
            }
        }
        assert!((300..700).contains(&req), "{req}");
        assert!((300..700).contains(&rep), "{rep}");
        f.set_delay(Duration::from_millis(3));
        assert_eq!(f.verdict(1, 2).1, Duration::from_millis(3));
    }
}
