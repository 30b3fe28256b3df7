//! Who holds a port. Linux reads `/proc`; other systems report nothing (yet).

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

/// Listeners on any of `ports` and their processes, by port. Reads the socket tables once,
/// and the process table only when some port has a listener: cheap when the ports are busy for
/// another reason (a connection's local port).
#[cfg(target_os = "linux")]
pub fn owners_of(ports: &[u16]) -> Vec<(u16, Owner)> {
    let mut sockets = Vec::new(); // (inode, port, addr, uid)
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue; // not LISTEN
            }
            let Some((ip_hex, port_hex)) = f[1].split_once(':') else { continue };
            let Some(port) = u16::from_str_radix(port_hex, 16).ok().filter(|p| ports.contains(p)) else {
                continue;
            };
            let addr = format!("{}:{port}", decode_ip(ip_hex, v6));
            sockets.push((f[9].to_string(), port, addr, f[7].parse::<u32>().ok()));
        }
    }
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
                let Some(inode) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) else {
                    continue;
                };
                if let Some((_, port, addr, uid)) = sockets.iter().find(|(i, ..)| i == inode)
                    && !found.iter().any(|(_, o)| o.pid == Some(pid) && &o.addr == addr)
                {
                    let owner =
                        Owner { addr: addr.clone(), uid: *uid, pid: Some(pid), command: command_of(pid) };
                    found.push((*port, owner));
                }
            }
        }
    }
    // Sockets whose process we could not see (another user's, without privileges).
    for (_, port, addr, uid) in &sockets {
        if !found.iter().any(|(_, o)| &o.addr == addr) {
            found.push((*port, Owner { addr: addr.clone(), uid: *uid, pid: None, command: None }));
        }
    }
    found
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

/// Decodes the hex address of `/proc/net/tcp{,6}` (32-bit words in host byte order).
#[cfg(target_os = "linux")]
fn decode_ip(hex: &str, v6: bool) -> String {
    let words: Vec<u32> = (0..hex.len() / 8)
        .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .map(u32::from_be)
        .collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    if v6 {
        match <[u8; 16]>::try_from(bytes.as_slice()) {
            Ok(b) => format!("[{}]", std::net::Ipv6Addr::from(b)),
            Err(_) => format!("[{hex}]"),
        }
    } else {
        match <[u8; 4]>::try_from(bytes.as_slice()) {
            Ok(b) => std::net::Ipv4Addr::from(b).to_string(),
            Err(_) => hex.to_string(),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn decodes_proc_addresses() {
        assert_eq!(decode_ip("0100007F", false), "127.0.0.1");
        assert_eq!(decode_ip("00000000", false), "0.0.0.0");
        assert_eq!(decode_ip("00000000000000000000000001000000", true), "[::1]");
        assert_eq!(decode_ip("00000000000000000000000000000000", true), "[::]");
    }
}
