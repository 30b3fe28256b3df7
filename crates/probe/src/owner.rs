//! Who holds a port. Linux asks the kernel's socket diagnostics (falling back to
//! `/proc/net/tcp`) and reads `/proc`; other systems report nothing (yet).

use serde::Serialize;

/// A process listening on a port, as far as the OS tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// Local address of the listening socket, e.g. `127.0.0.1:8000` or `[::]:8000`.
    pub addr: String,
    /// Owning user id.
    pub uid: Option<u32>,
    /// Process id; `None` when the process belongs to another user and we may not look.
    pub pid: Option<u32>,
    /// Command line of the process.
    pub command: Option<String>,
}

/// "pid N (command)", "pid N", or "a process of another user" when the OS did not tell.
impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.command) {
            (Some(pid), Some(cmd)) => write!(f, "pid {pid} ({cmd})"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            (None, _) => write!(f, "a process of another user"),
        }
    }
}

/// Listeners on `port` and their processes.
pub fn owners(port: u16) -> Vec<Owner> {
    owners_of(&[port]).into_iter().map(|(_, o)| o).collect()
}

/// A listening TCP socket on one of the ports asked about.
#[cfg(target_os = "linux")]
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listener {
    inode: u64,
    port: u16,
    addr: String,
    uid: Option<u32>,
}

/// Listeners on any of `ports` and their processes, by port. Asks the kernel for its listening
/// sockets once, and reads the process table only when some port has a listener: cheap when the
/// ports are busy for another reason (a connection's local port).
#[cfg(target_os = "linux")]
pub fn owners_of(ports: &[u16]) -> Vec<(u16, Owner)> {
    // Where sock_diag is not allowed (a seccomp profile, an old kernel), the same from /proc.
    let sockets: Vec<Listener> = diag::listeners()
        .unwrap_or_else(|_| proc_listeners())
        .into_iter()
        .filter(|l| ports.contains(&l.port))
        .collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<(u16, Owner)> = Vec::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
            for fd in fds.flatten() {
                let Ok(link) = std::fs::read_link(fd.path()) else { continue };
                let link = link.to_string_lossy();
                let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                if let Some(l) = sockets.iter().find(|l| l.inode == inode)
                    && !found.iter().any(|(_, o)| o.pid == Some(pid) && o.addr == l.addr)
                {
                    let owner =
                        Owner { addr: l.addr.clone(), uid: l.uid, pid: Some(pid), command: command_of(pid) };
                    found.push((l.port, owner));
                }
            }
        }
    }
    // Sockets whose process we could not see (another user's, without privileges).
    for l in &sockets {
        if !found.iter().any(|(_, o)| o.addr == l.addr) {
            found.push((l.port, Owner { addr: l.addr.clone(), uid: l.uid, pid: None, command: None }));
        }
    }
    found
}

/// The listening TCP sockets from `/proc/net/tcp{,6}`: the fallback where sock_diag is not
/// allowed. Reading these files walks every socket bucket of the host (established ones
/// included): ~9 ms per read on a host with a large connection table, whatever the number of
/// sockets (docs/benchmarks.md, issue 19).
#[cfg(target_os = "linux")]
fn proc_listeners() -> Vec<Listener> {
    let mut sockets = Vec::new();
    proc_sockets(LISTEN, |f| {
        let Some((ip_hex, port_hex)) = f[1].split_once(':') else { return };
        let (Ok(port), Ok(inode), Some(ip)) =
            (u16::from_str_radix(port_hex, 16), f[9].parse::<u64>(), decode_ip(ip_hex))
        else {
            return;
        };
        let addr = std::net::SocketAddr::new(ip, port).to_string();
        sockets.push(Listener { inode, port, addr, uid: f[7].parse::<u32>().ok() });
    });
    // The kernel may list a socket twice when the table changes between two reads of the file.
    sockets.sort_by_key(|l| l.inode);
    sockets.dedup();
    sockets
}

/// TCP states as `/proc/net/tcp` writes them (hex).
#[cfg(target_os = "linux")]
const LISTEN: &str = "0A";
#[cfg(target_os = "linux")]
const TIME_WAIT: &str = "06";

/// The fields of each line of `/proc/net/tcp` and `/proc/net/tcp6` whose socket is in `state`.
#[cfg(target_os = "linux")]
fn proc_sockets(state: &str, mut each: impl FnMut(&[&str])) {
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 10 && f[3] == state {
                each(&f);
            }
        }
    }
}

/// The local port of every connection in `TIME_WAIT` on this host, sorted (a port once per
/// connection). The side that closes a connection first keeps its local port for up to a
/// minute, and a server cannot bind that port meanwhile unless the connection had set
/// `SO_REUSEADDR` (clients' connections seldom do): the port is busy with no listener to name.
/// Reads the whole connection table (`/proc/net/tcp`): ask only about a busy port.
#[cfg(target_os = "linux")]
pub fn time_wait_ports() -> Vec<u16> {
    let mut ports = Vec::new();
    proc_sockets(TIME_WAIT, |f| {
        if let Some(port) = f[1].split_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) {
            ports.push(port);
        }
    });
    ports.sort_unstable();
    ports
}

/// Test support: a port of this host held only by a closed loopback connection in `TIME_WAIT`
/// (its client closed first), returned once the kernel lists it in that state. The client's
/// socket reaches `TIME_WAIT` only when the server's close arrives (`FIN_WAIT_2` before that,
/// busy too but not `TIME_WAIT`), so this waits for it, for at most 5 s.
#[doc(hidden)]
#[cfg(target_os = "linux")]
pub fn port_in_time_wait() -> std::io::Result<u16> {
    use std::io::Read;
    let server = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(server.local_addr()?)?;
    let port = client.local_addr()?.port();
    let (accepted, _) = server.accept()?;
    drop(client);
    // The server reads the client's close, then closes its side.
    if (&accepted).read(&mut [0u8; 1])? != 0 {
        return Err(std::io::Error::other("the closed connection sent data"));
    }
    drop(accepted);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !time_wait_ports().contains(&port) {
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::other(format!("port {port} was not in TIME_WAIT within 5 s")));
        }
        // The kernel has no notification of a socket's state: look again shortly.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(port)
}

/// Connections in `TIME_WAIT`, where the OS tells (not here).
#[cfg(not(target_os = "linux"))]
pub fn time_wait_ports() -> Vec<u16> {
    Vec::new()
}

/// The kernel's socket diagnostics (netlink `NETLINK_SOCK_DIAG`, `inet_diag`), asked for
/// listening TCP sockets only: the kernel then walks its listening table alone, not the
/// connection table that `/proc/net/tcp` walks.
#[cfg(target_os = "linux")]
mod diag {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::Listener;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_LISTEN: u32 = 10;
    /// `struct nlmsghdr`.
    const HEADER: usize = 16;
    /// `struct inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
    const SOCKID: usize = 48;
    /// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
    const REQUEST: usize = 8 + SOCKID;
    /// `struct inet_diag_msg`: family, state, timer, retrans, sockid, expires, rqueue, wqueue,
    /// uid, inode.
    const MESSAGE: usize = 4 + SOCKID + 20;

    /// Every listening TCP socket of this network namespace (IPv4 and IPv6).
    pub(super) fn listeners() -> io::Result<Vec<Listener>> {
        // SAFETY: plain socket(2); the descriptor is owned (and closed) by `fd` at once.
        let raw = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
        // SAFETY: setsockopt with a pointer to a live timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let mut found = Vec::new();
        send(&fd, 1, libc::AF_INET as u8)?;
        receive(&fd, 1, &mut found)?;
        // A host without IPv6 answers the second dump with an error: it has no IPv6 listeners.
        if send(&fd, 2, libc::AF_INET6 as u8).is_ok() {
            let _ = receive(&fd, 2, &mut found);
        }
        Ok(found)
    }

    fn send(fd: &OwnedFd, seq: u32, family: u8) -> io::Result<()> {
        let mut msg = Vec::with_capacity(HEADER + REQUEST);
        msg.extend_from_slice(&((HEADER + REQUEST) as u32).to_ne_bytes());
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
        msg.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        msg.resize(HEADER + REQUEST, 0); // any address, any port, any interface
        // SAFETY: a zeroed sockaddr_nl is valid; nl_family names the kernel as the peer.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sendto with a live buffer and address of the sizes passed.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn receive(fd: &OwnedFd, seq: u32, found: &mut Vec<Listener>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv into a live buffer of the length passed.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if parse(&buf[..n as usize], seq, found)? {
                return Ok(());
            }
        }
    }

    /// Reads one datagram of the dump into `found`; `true` once the dump is done.
    pub(super) fn parse(mut data: &[u8], seq: u32, found: &mut Vec<Listener>) -> io::Result<bool> {
        let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "a truncated sock_diag message");
        while data.len() >= HEADER {
            let len = u32_at(data, 0) as usize;
            if len < HEADER || len > data.len() {
                return Err(bad());
            }
            let (kind, msg_seq, body) = (u16_at(data, 4), u32_at(data, 8), &data[HEADER..len]);
            data = &data[len.next_multiple_of(4).min(data.len())..];
            if msg_seq != seq {
                continue;
            }
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let code = if body.len() >= 4 { u32_at(body, 0) as i32 } else { 0 };
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= MESSAGE => {
                    let id = &body[4..4 + SOCKID];
                    let port = u16::from_be_bytes([id[0], id[1]]);
                    let src = &id[4..20];
                    let ip: std::net::IpAddr = match body[0] as i32 {
                        libc::AF_INET => std::net::Ipv4Addr::new(src[0], src[1], src[2], src[3]).into(),
                        _ => <[u8; 16]>::try_from(src).map_err(|_| bad())?.into(),
                    };
                    let addr = std::net::SocketAddr::new(ip, port).to_string();
                    let tail = 4 + SOCKID;
                    let (uid, inode) = (u32_at(body, tail + 12), u32_at(body, tail + 16));
                    found.push(Listener { inode: u64::from(inode), port, addr, uid: Some(uid) });
                }
                _ => return Err(bad()),
            }
        }
        Ok(false)
    }
}

#[cfg(not(target_os = "linux"))]
pub fn owners_of(_ports: &[u16]) -> Vec<(u16, Owner)> {
    // macOS (libproc) and Windows (GetExtendedTcpTable) lookups are not implemented yet.
    Vec::new()
}

/// The command line of process `pid`, where the OS tells.
#[cfg(target_os = "linux")]
pub fn command_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let parts: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    if parts.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| format!("[{}]", s.trim()))
    } else {
        Some(parts.join(" "))
    }
}

/// The command line of process `pid`, where the OS tells.
#[cfg(not(target_os = "linux"))]
pub fn command_of(_pid: u32) -> Option<String> {
    None
}

/// Decodes the hex address of `/proc/net/tcp` (8 digits) or `/proc/net/tcp6` (32): 32-bit words
/// in host byte order.
#[cfg(target_os = "linux")]
fn decode_ip(hex: &str) -> Option<std::net::IpAddr> {
    let bytes = (0..hex.len() / 8)
        .map(|i| {
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok().map(|w| u32::from_be(w).to_be_bytes())
        })
        .collect::<Option<Vec<[u8; 4]>>>()?
        .concat();
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(Into::into),
        16 => <[u8; 16]>::try_from(bytes).ok().map(Into::into),
        _ => None,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// sock_diag and /proc/net/tcp name the same listeners the same way (address, uid, inode):
    /// the fallback and the fast path are interchangeable.
    #[test]
    fn sock_diag_and_proc_agree_on_listeners() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok(); // where the host has IPv6
        let ports: Vec<u16> =
            std::iter::once(&v4).chain(v6.as_ref()).map(|l| l.local_addr().unwrap().port()).collect();
        let ours = |all: Vec<Listener>| {
            let mut v: Vec<Listener> = all.into_iter().filter(|l| ports.contains(&l.port)).collect();
            v.sort_by_key(|l| l.inode);
            v
        };
        let diag = ours(diag::listeners().unwrap());
        assert_eq!(diag.len(), ports.len(), "{diag:?}");
        // /proc/net/tcp is read in pages while other tests open and close sockets, and the kernel
        // may skip a socket between two pages: read it again until it shows ours (bounded).
        let proc = (0..5).map(|_| ours(proc_listeners())).find(|p| p.len() == ports.len());
        assert_eq!(Some(diag.clone()), proc);
        let port = ports[0];
        assert!(diag.iter().any(|l| l.addr == format!("127.0.0.1:{port}")), "{diag:?}");
    }

    /// The listener's own process is found; a connection's local port is busy but has no
    /// listener, so nobody is named for it.
    #[test]
    fn owners_are_listeners_not_connections() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let local = client.local_addr().unwrap().port();
        let found = owners_of(&[port, local]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, port);
        assert_eq!(found[0].1.pid, Some(std::process::id()));
        assert_eq!(found[0].1.addr, format!("127.0.0.1:{port}"));
    }

    #[test]
    fn a_truncated_diag_message_is_an_error_not_a_panic() {
        let mut found = Vec::new();
        // A header that claims more bytes than the datagram holds.
        let mut msg = 200u32.to_ne_bytes().to_vec();
        msg.extend_from_slice(&[20, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(diag::parse(&msg, 1, &mut found).is_err());
        // Done for another request is not our end; done for ours is.
        let done = |seq: u32| {
            let mut m = 16u32.to_ne_bytes().to_vec();
            m.extend_from_slice(&3u16.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m
        };
        assert!(!diag::parse(&done(2), 1, &mut found).unwrap());
        assert!(diag::parse(&done(1), 1, &mut found).unwrap());
        assert!(found.is_empty());
    }

    #[test]
    fn decodes_proc_addresses() {
        let addr = |hex: &str| decode_ip(hex).map(|ip| std::net::SocketAddr::new(ip, 80).to_string());
        assert_eq!(addr("0100007F").as_deref(), Some("127.0.0.1:80"));
        assert_eq!(addr("00000000").as_deref(), Some("0.0.0.0:80"));
        assert_eq!(addr("00000000000000000000000001000000").as_deref(), Some("[::1]:80"));
        assert_eq!(addr("00000000000000000000000000000000").as_deref(), Some("[::]:80"));
        // Not an address: the line is skipped rather than named wrongly.
        assert_eq!(decode_ip("0100007"), None);
        assert_eq!(decode_ip("ZZ00007F"), None);
    }
}
