//! Facts about processes on this host: whether one runs, when it started, and the address this
//! host reaches another from. Signalling and waiting live with the callers that own the process
//! (the CLI's `process` module); this module only reads.

/// Whether process `pid` runs: it exists and is not a zombie waiting for its parent.
#[cfg(target_os = "linux")]
pub fn alive(pid: u32) -> bool {
    may_signal(pid) && stat(pid).is_none_or(|s| !s.zombie)
}

/// Whether process `pid` runs (other systems: it exists and may be signalled).
#[cfg(all(unix, not(target_os = "linux")))]
pub fn alive(pid: u32) -> bool {
    may_signal(pid)
}

/// Whether process `pid` exists and may be signalled.
#[cfg(unix)]
fn may_signal(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists and may
    // be signalled.
    raw > 0 && unsafe { libc::kill(raw, 0) } == 0
}

/// What `/proc/PID/stat` says about a process, read once.
#[cfg(target_os = "linux")]
struct Stat {
    zombie: bool,
    /// Field 22: when it started, in clock ticks after boot.
    start_ticks: Option<u64>,
}

#[cfg(target_os = "linux")]
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S …": the fields after the command (which may hold spaces and parentheses)
    // start with the state; the start time is the 20th after it.
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let zombie = fields.next() == Some("Z");
    Some(Stat { zombie, start_ticks: fields.nth(18).and_then(|t| t.parse().ok()) })
}

/// When process `pid` started, in clock ticks after boot (`/proc/PID/stat`, field 22). With the
/// pid it names one process for good: pids are reused, start times are not.
#[cfg(target_os = "linux")]
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid)?.start_ticks
}

/// When process `pid` started, where the OS tells (not here).
#[cfg(not(target_os = "linux"))]
pub fn start_ticks(_pid: u32) -> Option<u64> {
    None
}

/// Whether `pid` is still the process that was recorded with start time `since`. Unknown start
/// times never match: a stale record must never make anyone signal a stranger. One read of
/// `/proc/PID/stat` (a one-shot command asks this before it talks to its local node).
#[cfg(target_os = "linux")]
pub fn still_runs(pid: u32, since: Option<u64>) -> bool {
    since.is_some() && may_signal(pid) && stat(pid).is_some_and(|s| !s.zombie && s.start_ticks == since)
}

/// Whether `pid` is still the process recorded with start time `since`: never where start times
/// are unknown.
#[cfg(not(target_os = "linux"))]
pub fn still_runs(_pid: u32, _since: Option<u64>) -> bool {
    false
}

/// The address of this machine that `target` (`host:port`, optionally with a scheme) is reached
/// from: the source address the kernel picks for it. No packet is sent.
pub fn local_ip_towards(target: &str) -> std::io::Result<std::net::IpAddr> {
    use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
    let hostport = target.split("://").last().unwrap_or(target);
    let to = hostport.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("{target} resolves to no address"))
    })?;
    let any: SocketAddr =
        if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = UdpSocket::bind(any)?;
    sock.connect(to)?;
    Ok(sock.local_addr()?.ip())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_process_is_recognised_by_its_start_time() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(!alive(0));
        let since = start_ticks(me);
        assert!(since.is_some());
        assert!(still_runs(me, since));
        assert!(!still_runs(me, since.map(|s| s + 1)), "same pid, another start: a stranger");
        assert!(!still_runs(me, None), "unknown start: never signalled");
    }

    #[test]
    fn a_zombie_counts_as_gone() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // A zombie keeps its /proc entry, start time included, until it is reaped.
        let since = start_ticks(pid);
        assert!(since.is_some());
        // Not reaped yet: once it has exited it is a zombie, which is not running.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while alive(pid) {
            assert!(std::time::Instant::now() < deadline, "pid {pid} still runs");
            std::thread::yield_now();
        }
        assert!(!still_runs(pid, since), "the recorded process, now a zombie, no longer runs");
        drop(child);
    }

    #[test]
    fn loopback_is_reached_from_loopback() {
        assert_eq!(local_ip_towards("127.0.0.1:9").unwrap(), std::net::IpAddr::from([127, 0, 0, 1]));
        assert_eq!(local_ip_towards("http://127.0.0.1:9").unwrap(), std::net::IpAddr::from([127, 0, 0, 1]));
        assert!(local_ip_towards("no-such-host.invalid:1").is_err());
    }
}
