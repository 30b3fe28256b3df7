//! Byte layout of state-machine keys in the `sm` tree of data versions up to 5 (read once, when
//! such a directory is folded into a snapshot). Values are postcard-encoded
//! [`portmesh_core::Record`]s, which name their own key, so loading needs only the values.
//!
//! | prefix | key                         |
//! |--------|-----------------------------|
//! | `m`    | meta                        |
//! | `p`    | pool: team `\0` name        |
//! | `a`    | allocation: port (BE u16)   |
//! | `r`    | reservation: port           |
//! | `l`    | lease: id (BE u64)          |
//! | `s`    | sticky key: team `\0` key   |
//! | `c`    | cool-down: port             |
//! | `e`    | event: revision, seq (BE)   |
//! | `v`    | service: team `\0` id       |
//! | `t`    | token: id                   |
//! | `!`    | Raft bookkeeping (`!applied`, `!membership`) |

pub(crate) const APPLIED: &[u8] = b"!applied";
pub(crate) const MEMBERSHIP: &[u8] = b"!membership";

/// The key of a record (what data versions up to 5 wrote; the store's tests write such trees).
#[cfg(test)]
pub(crate) fn encode(key: &portmesh_core::Key) -> Vec<u8> {
    use portmesh_core::Key;
    let two = |p: u8, a: &str, b: &str| {
        let mut v = Vec::with_capacity(2 + a.len() + b.len());
        v.push(p);
        v.extend_from_slice(a.as_bytes());
        v.push(0);
        v.extend_from_slice(b.as_bytes());
        v
    };
    let num = |p: u8, n: &[u8]| {
        let mut v = vec![p];
        v.extend_from_slice(n);
        v
    };
    match key {
        Key::Meta => vec![b'm'],
        Key::Pool(t, n) => two(b'p', t, n),
        Key::Alloc(p) => num(b'a', &p.to_be_bytes()),
        Key::Reservation(p) => num(b'r', &p.to_be_bytes()),
        Key::Lease(id) => num(b'l', &id.to_be_bytes()),
        Key::Sticky(t, k) => two(b's', t, k),
        Key::Cooldown(p) => num(b'c', &p.to_be_bytes()),
        Key::Event(rev, seq) => {
            let mut v = num(b'e', &rev.to_be_bytes());
            v.extend_from_slice(&seq.to_be_bytes());
            v
        }
        Key::Service(t, id) => two(b'v', t, id),
        Key::Token(id) => {
            let mut v = vec![b't'];
            v.extend_from_slice(id.as_bytes());
            v
        }
    }
}

/// Whether a key of the `sm` tree holds a record (not Raft bookkeeping).
pub(crate) fn is_record(key: &[u8]) -> bool {
    key.first() != Some(&b'!')
}

#[cfg(test)]
mod tests {
    use portmesh_core::Key;

    use super::*;

    #[test]
    fn keys_are_distinct_and_ordered_by_number() {
        assert!(encode(&Key::Alloc(8000)) < encode(&Key::Alloc(8001)));
        assert!(encode(&Key::Alloc(255)) < encode(&Key::Alloc(256)));
        assert!(encode(&Key::Event(1, 9)) < encode(&Key::Event(2, 0)));
        assert_ne!(encode(&Key::Pool("a".into(), "bc".into())), encode(&Key::Pool("ab".into(), "c".into())));
        assert!(is_record(&encode(&Key::Meta)) && !is_record(APPLIED) && !is_record(MEMBERSHIP));
    }
}
