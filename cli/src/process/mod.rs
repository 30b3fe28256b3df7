//! Process control: the one home for whether a process runs, signalling it, and stopping it with
//! grace (SIGTERM, a wait, then SIGKILL). Starting and supervising the processes `run` and `up`
//! own is in [`spawn`]; the read-only facts (running, started when) come from `portmesh-probe`.

pub mod spawn;

use std::future::Future;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
pub use portmesh_probe::process::{alive, start_ticks, still_runs};

/// Interval between looks at a process that should end.
const POLL: Duration = Duration::from_millis(20);
/// How long a process may take to go once sent SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How a stop ended: the process went on SIGTERM, or needed SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped<T> {
    Terminated(T),
    Killed(T),
}

impl<T> Stopped<T> {
    pub fn into_inner(self) -> T {
        match self {
            Stopped::Terminated(v) | Stopped::Killed(v) => v,
        }
    }
}

/// Sends SIGTERM through `send` and waits up to `grace` for `ended`; if it has not ended, sends
/// SIGKILL and waits for `ended` again. The one escalation every stop goes through.
pub async fn stop_with_grace<T, F>(
    send: impl Fn(Signal),
    grace: Duration,
    mut ended: impl FnMut() -> F,
) -> Stopped<T>
where
    F: Future<Output = T>,
{
    send(Signal::SIGTERM);
    if let Ok(v) = tokio::time::timeout(grace, ended()).await {
        return Stopped::Terminated(v);
    }
    send(Signal::SIGKILL);
    Stopped::Killed(ended().await)
}

/// Signals process `pid` (not a child of ours: it is polled, not waited for).
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid)
        && raw > 0
    {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// Signals the process group `pgid` (a process `run` or `up` started leads its own group).
pub fn signal_group(pgid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pgid)
        && raw > 0
    {
        let _ = nix::sys::signal::killpg(Pid::from_raw(raw), sig);
    }
}

/// Stops process `pid` with grace; fails if it still runs a while after SIGKILL.
pub async fn terminate(pid: u32, grace: Duration) -> Result<Stopped<()>> {
    let stop = stop_with_grace(|s| signal(pid, s), grace, || gone(pid));
    match tokio::time::timeout(grace + KILL_WAIT, stop).await {
        Ok(stopped) => Ok(stopped),
        Err(_) => bail!("process {pid} still runs {KILL_WAIT:?} after SIGKILL"),
    }
}

/// Ends when process `pid` is gone (a zombie waiting for its parent counts as gone).
async fn gone(pid: u32) {
    while alive(pid) {
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until process `pid` is gone, for at most `timeout`.
pub async fn wait_exit(pid: u32, timeout: Duration) -> Result<()> {
    match tokio::time::timeout(timeout, gone(pid)).await {
        Ok(()) => Ok(()),
        Err(_) => bail!("process {pid} still runs after {timeout:?}"),
    }
}

/// How a process ended, for a person.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("killed by {sig}"),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => "ended".to_string(),
    }
}

/// The exit code a wrapper passes on: the child's, or 128 + the signal that ended it.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn terminate_escalates_for_a_process_that_ignores_sigterm() {
        use std::io::BufRead;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Once it said "ready", its trap is set.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        let reaper = std::thread::spawn(move || child.wait());
        assert_eq!(terminate(pid, Duration::from_millis(300)).await.unwrap(), Stopped::Killed(()));
        // Reaped first: until its parent waits, a killed child is a zombie, which `alive` counts.
        assert_eq!(describe(reaper.join().unwrap().unwrap()), "killed by SIGKILL");
        assert!(!alive(pid));
    }

    #[tokio::test]
    async fn a_process_that_ends_on_sigterm_is_not_killed() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let reaper = std::thread::spawn(move || child.wait());
        assert_eq!(terminate(pid, Duration::from_secs(10)).await.unwrap(), Stopped::Terminated(()));
        let status = reaper.join().unwrap().unwrap();
        assert_eq!(describe(status), "killed by SIGTERM");
        assert_eq!(exit_code(status), 128 + 15);
    }
}
