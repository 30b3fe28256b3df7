//! Local bind probes: is a TCP port really free on this host, and who holds it if not.
//!
//! Owns: the probe (as cheap as the raw syscalls allow: `socket` + `bind` + `close`, no
//! `listen`), the owner lookup (Linux: `/proc/net/tcp{,6}` and `/proc/*/fd`; other systems behind
//! `cfg`, reporting no owner), the host's ephemeral port range and host name, and facts about
//! processes (`process`: running, started when, reached from where).
//! Does not own: deciding what to do about a busy port (that is `portmesh-core`'s `apply`).
//!
//! What counts as busy: a listener on the IPv4 or IPv6 wildcard or loopback address. On Linux a
//! bind to the wildcard address conflicts with a listener on any address of the same family, so
//! two binds (`0.0.0.0` and `[::]` with `IPV6_V6ONLY`) cover all four cases; elsewhere the
//! loopback addresses are probed too. The probe sets `SO_REUSEADDR` like servers do, so
//! connections lingering in `TIME_WAIT` do not make a port look busy.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

mod owner;
pub mod private;
pub mod process;

#[cfg(target_os = "linux")]
#[doc(hidden)]
pub use owner::port_in_time_wait;
pub use owner::{Owner, command_of, owners, owners_of, time_wait_ports};

/// One probe address and whether it is IPv6-only.
fn probe_addrs(port: u16) -> Vec<(SocketAddr, bool)> {
    let mut v = vec![
        (SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false),
        (SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true),
    ];
    if !cfg!(target_os = "linux") {
        v.push((SocketAddr::from((Ipv4Addr::LOCALHOST, port)), false));
        v.push((SocketAddr::from((Ipv6Addr::LOCALHOST, port)), true));
    }
    v
}

/// Tries to bind `addr`; `Ok(false)` when something else holds it.
fn bind_free(addr: SocketAddr, v6only: bool) -> io::Result<bool> {
    let socket = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        // No IPv6 on this host: nothing can listen there either.
        Err(e) if addr.is_ipv6() && e.raw_os_error() == Some(libc_eafnosupport()) => return Ok(true),
        Err(e) => return Err(e),
    };
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6only)?;
    }
    match socket.bind(&addr.into()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(false),
        // IPv6 loopback missing (disabled in a container): nothing listens there.
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(unix)]
fn libc_eafnosupport() -> i32 {
    libc::EAFNOSUPPORT
}

#[cfg(not(unix))]
fn libc_eafnosupport() -> i32 {
    10047 // WSAEAFNOSUPPORT
}

/// Whether `port` is free on this host (no listener on the IPv4/IPv6 wildcard or loopback).
pub fn is_free(port: u16) -> io::Result<bool> {
    for (addr, v6only) in probe_addrs(port) {
        if !bind_free(addr, v6only)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Probes each port; returns the busy ones. A port whose probe fails for an unexpected reason
/// counts as busy: better to skip a free port than to hand out a taken one.
pub fn busy_ports(ports: &[u16]) -> Vec<u16> {
    ports.iter().copied().filter(|p| !is_free(*p).unwrap_or(false)).collect()
}

/// The result of `portmesh check` for one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortCheck {
    pub port: u16,
    pub free: bool,
    /// Who holds it, where the OS tells.
    pub owners: Vec<Owner>,
    /// When busy with no listener: how many closed connections in `TIME_WAIT` hold it as their
    /// local port (the kernel lets it go within a minute); 0 otherwise.
    pub time_wait: usize,
}

/// Probes a port and, when busy, looks up who holds it: a listener's process, else connections
/// lingering in `TIME_WAIT`.
pub fn check(port: u16) -> io::Result<PortCheck> {
    let free = is_free(port)?;
    let owners = if free { Vec::new() } else { owners(port) };
    let time_wait =
        if free || !owners.is_empty() { 0 } else { time_wait_ports().iter().filter(|p| **p == port).count() };
    Ok(PortCheck { port, free, owners, time_wait })
}

/// The host's ephemeral (outgoing connection) port range, inclusive.
pub fn ephemeral_range() -> (u16, u16) {
    #[cfg(target_os = "linux")]
    {
        if let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
            let mut it = text.split_whitespace().filter_map(|t| t.parse::<u16>().ok());
            if let (Some(a), Some(b)) = (it.next(), it.next()) {
                return (a, b);
            }
        }
        (32768, 60999)
    }
    #[cfg(not(target_os = "linux"))]
    {
        (49152, 65535)
    }
}

/// This host's name, as allocations record it.
pub fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: buf is valid for writes of buf.len() bytes; gethostname NUL-terminates within it
        // on success (and we bound the read by the first NUL or the buffer length).
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc == 0 {
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            if let Ok(s) = std::str::from_utf8(&buf[..end])
                && !s.is_empty()
            {
                return s.to_string();
            }
        }
    }
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn free_port() -> u16 {
        // Ask the kernel for a port, then let it go.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[test]
    fn a_listener_on_any_family_or_address_makes_the_port_busy() {
        for addr in ["127.0.0.1", "0.0.0.0", "[::1]", "[::]"] {
            let l = match TcpListener::bind(format!("{addr}:0")) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("skipping {addr}: {e} (no IPv6 here?)");
                    continue;
                }
            };
            let port = l.local_addr().unwrap().port();
            assert!(!is_free(port).unwrap(), "listener on {addr}:{port} not seen");
            assert_eq!(busy_ports(&[port]), [port]);
            drop(l);
            assert!(is_free(port).unwrap(), "{addr}:{port} still busy after close");
        }
    }

    #[test]
    fn a_closed_connection_in_time_wait_does_not_count() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = l.accept().unwrap();
        drop(l);
        drop(s); // server side closes first: its socket enters TIME_WAIT
        drop(c);
        assert!(is_free(port).unwrap());
    }

    /// The other side of the case above: the side that closes first keeps its local port in
    /// `TIME_WAIT`, and a client's connection (no `SO_REUSEADDR`) keeps servers off that port.
    /// `check` says so instead of "owner not visible".
    #[test]
    fn a_port_held_by_a_client_connection_in_time_wait_is_busy_and_says_so() {
        #[cfg(target_os = "linux")]
        {
            let port = port_in_time_wait().unwrap();
            let c = check(port).unwrap();
            assert!(!c.free, "a server cannot bind {port}: {c:?}");
            assert!(c.owners.is_empty(), "no listener holds it: {c:?}");
            assert!(c.time_wait >= 1, "a connection in TIME_WAIT holds {port}: {c:?}");
        }
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c2 = check(l2.local_addr().unwrap().port()).unwrap();
        assert_eq!(c2.time_wait, 0, "a listener's port is not counted: {c2:?}");
    }

    #[test]
    fn check_reports_owner_pid_on_linux() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = check(port).unwrap();
        assert!(!c.free);
        if cfg!(target_os = "linux") {
            assert!(c.owners.iter().any(|o| o.pid == Some(std::process::id())), "{c:?}");
            assert!(c.owners.iter().all(|o| o.command.is_some()));
        }
        let p = free_port();
        let c = check(p).unwrap();
        assert!(c.free && c.owners.is_empty());
    }

    #[test]
    fn ephemeral_range_and_hostname() {
        let (a, b) = ephemeral_range();
        assert!(a >= 1024 && a < b);
        assert!(!hostname().is_empty());
    }
}
