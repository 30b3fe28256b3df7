//! Starting the processes `run` and `up` own: spawning (each in its own process group, with an optional
//! socket handed over as fd 3), prefixing their output, signalling and stopping them.
//!
//! A started process gets SIGTERM if the `portmesh` that started it dies (Linux
//! `PR_SET_PDEATHSIG`), so a `kill -9` of the wrapper leaves no server behind: the lease runs out
//! and the ports come back.

use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};

/// What to run.
#[derive(Debug, Clone)]
pub enum Program {
    /// A program and its arguments.
    Argv(Vec<String>),
    /// A command line, run with `sh -c` unless it is a plain list of words.
    Shell(String),
}

/// Where a process's output goes.
#[derive(Debug, Clone)]
pub enum Output {
    /// Straight to ours.
    Inherit,
    /// Line by line to our stdout, each line prefixed with `label | `.
    Prefixed { label: String, color: Option<u8> },
}

/// How to start one process.
#[derive(Debug)]
pub struct Spec<'a> {
    pub program: Program,
    pub vars: Vec<(String, String)>,
    pub dir: Option<&'a Path>,
    /// A bound socket handed over as fd 3, announced by `LISTEN_FDS=1`, `LISTEN_PID` and
    /// `LISTEN_FDNAMES` (the systemd protocol) unless the command names fd 3 itself.
    pub socket: Option<(std::net::TcpListener, String)>,
    pub output: Output,
}

/// A started process. It runs in its own process group, which signals go to.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    done: watch::Receiver<Option<ExitStatus>>,
}

/// Characters that make a command line need a shell.
const SHELL_CHARS: &[char] = &[
    '|', '&', ';', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', '*', '?', '[', ']', '#', '~', '!', '{',
    '}', '\n',
];

/// Shell builtins and keywords: a line starting with one needs the shell.
const SHELL_WORDS: &[&str] = &[
    ".", ":", "alias", "cd", "command", "eval", "exec", "exit", "export", "for", "if", "read", "set",
    "source", "trap", "ulimit", "umask", "unset", "until", "wait", "while",
];

/// The words of a command line that needs no shell (no quoting, expansion, operators or
/// builtins, no leading `VAR=value`), so it can be started directly and its pid is the server's.
pub fn plain_words(line: &str) -> Option<Vec<String>> {
    if line.contains(SHELL_CHARS) {
        return None;
    }
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    match words.first() {
        Some(first) if !first.contains('=') && !SHELL_WORDS.contains(&first.as_str()) => Some(words),
        _ => None,
    }
}

/// Whether a command takes fd 3 from its own arguments (`--bind fd://3` for gunicorn, `--fd 3`
/// for uvicorn). Such a program is not also told by `LISTEN_FDS`: gunicorn would take the same
/// descriptor twice (once from `--bind`, once from the activation variables) and fail on the
/// second with EBADF.
pub fn names_fd3(program: &Program) -> bool {
    let words: Vec<&str> = match program {
        Program::Argv(v) => v.iter().map(String::as_str).collect(),
        Program::Shell(line) => line.split_whitespace().collect(),
    };
    let fd3 = |w: &str| w.trim_matches(['\'', '"']).ends_with("fd://3") || w == "--fd=3";
    words.iter().any(|w| fd3(w)) || words.windows(2).any(|p| p[0] == "--fd" && p[1] == "3")
}

fn argv(program: &Program, socket: bool) -> Vec<String> {
    let words = match program {
        Program::Argv(v) => v.clone(),
        Program::Shell(line) => {
            plain_words(line).unwrap_or_else(|| vec!["sh".into(), "-c".into(), line.clone()])
        }
    };
    if !socket {
        return words;
    }
    // LISTEN_PID must be the pid of the process that uses the socket, known only once it runs:
    // a shell sets it to its own pid and then becomes the program (exec keeps the pid).
    let mut out: Vec<String> =
        ["sh", "-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh"].map(String::from).to_vec();
    out.extend(words);
    out
}

/// Starts a process. `exits` hears `(name, status)` when it ends.
pub fn spawn(
    name: &str,
    spec: Spec<'_>,
    exits: Option<mpsc::UnboundedSender<(String, ExitStatus)>>,
) -> std::io::Result<Proc> {
    // Socket activation variables, unless the program names fd 3 itself.
    let activation = spec.socket.is_some() && !names_fd3(&spec.program);
    let words = argv(&spec.program, activation);
    let Some((program, args)) = words.split_first() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).envs(spec.vars.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).process_group(0);
    if let Some(dir) = spec.dir {
        cmd.current_dir(dir);
    }
    if let Output::Prefixed { .. } = spec.output {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let socket_fd = spec.socket.as_ref().map(|(l, _)| l.as_raw_fd());
    if let (true, Some((_, port_name))) = (activation, &spec.socket) {
        cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", port_name);
    }
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, fcntl, dup2); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = socket_fd {
                let ok = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
                if ok == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child =
        cmd.spawn().map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {program:?}: {e}")))?;
    drop(spec.socket);
    let pid = child.id().unwrap_or(0);
    let mut pumps = Vec::new();
    if let Output::Prefixed { label, color } = &spec.output {
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(out, label.clone(), *color)));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, label.clone(), *color)));
        }
    }
    let (tx, done) = watch::channel(None);
    let owner = name.to_string();
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(s) => s,
            Err(_) => std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
        };
        // Let the last lines out; a grandchild that kept the pipe open does not hold us up.
        for p in pumps {
            let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
        }
        let _ = tx.send(Some(status));
        if let Some(exits) = exits {
            let _ = exits.send((owner, status));
        }
    });
    Ok(Proc { pid, done })
}

async fn pump(from: impl AsyncRead + Unpin, label: String, color: Option<u8>) {
    let mut lines = BufReader::new(from);
    let mut buf = Vec::new();
    let prefix = match color {
        Some(c) => format!("\x1b[{c}m{label} |\x1b[0m "),
        None => format!("{label} | "),
    };
    loop {
        buf.clear();
        match lines.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{prefix}{}", text.trim_end_matches(['\n', '\r']));
                let _ = out.flush();
            }
        }
    }
}

/// The colour for the `i`-th service's prefix, if stdout is a terminal that wants colour.
pub fn color(i: usize) -> Option<u8> {
    let wanted = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    wanted.then(|| [36, 33, 32, 35, 34, 31][i % 6])
}

impl Proc {
    /// Sends `sig` to the process group.
    pub fn signal(&self, sig: Signal) {
        if self.exited().is_none() {
            super::signal_group(self.pid, sig);
        }
    }

    /// The exit status, if it has ended.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.done.borrow()
    }

    /// Waits until it has ended.
    pub async fn wait(&self) -> ExitStatus {
        let mut done = self.done.clone();
        match done.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(0)),
            // The waiting task is gone only if the runtime is shutting down.
            Err(_) => std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
        }
    }

    /// SIGTERM to the group, then SIGKILL if it has not ended within `grace`.
    pub async fn stop(&self, grace: Duration) -> ExitStatus {
        super::stop_with_grace(|sig| self.signal(sig), grace, || self.wait()).await.into_inner()
    }
}

/// Binds the socket handed over to a server: `addr:port`, listening.
pub fn bind(ip: std::net::IpAddr, port: u16) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind((ip, port)).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot bind {ip}:{port} to hand it over: {e}"))
    })?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{describe, exit_code};

    #[test]
    fn plain_command_lines_skip_the_shell() {
        assert_eq!(plain_words("flask --app api run --port 5000").unwrap()[0], "flask");
        assert_eq!(plain_words("gunicorn --bind=fd://3 app:app").unwrap().len(), 3);
        for needs_shell in
            ["a && b", "echo $PORT", "FOO=1 app", "app > log", "echo 'x y'", "a; b", "", "exit 3", "cd x"]
        {
            assert!(plain_words(needs_shell).is_none(), "{needs_shell}");
        }
        assert_eq!(argv(&Program::Shell("a | b".into()), false), ["sh", "-c", "a | b"]);
        assert!(names_fd3(&Program::Shell("gunicorn --bind fd://3 app:app".into())));
        assert!(names_fd3(&Program::Argv(vec!["uvicorn".into(), "--fd".into(), "3".into()])));
        assert!(names_fd3(&Program::Shell("gunicorn --bind=fd://3 app:app".into())));
        assert!(names_fd3(&Program::Shell("uvicorn --fd=3 app:app".into())));
        assert!(!names_fd3(&Program::Shell("gunicorn app:app".into())));
        assert!(!names_fd3(&Program::Shell("gunicorn --bind fd://30 app:app".into())), "fd 30 is not fd 3");
        assert!(!names_fd3(&Program::Argv(vec!["uvicorn".into(), "--fd".into(), "31".into()])));
        let wrapped = argv(&Program::Argv(vec!["gunicorn".into()]), true);
        assert_eq!(wrapped[0], "sh");
        assert_eq!(wrapped.last().unwrap(), "gunicorn");
    }

    #[tokio::test]
    async fn a_socket_reaches_the_child_as_fd_3_with_listen_pid_its_own() {
        let l = bind("127.0.0.1".parse().unwrap(), 0).unwrap();
        let port = l.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$LISTEN_FDS $LISTEN_PID $$ $LISTEN_FDNAMES\" > {0}; readlink /proc/$$/fd/3 >> {0}",
            out.display()
        );
        let p = spawn(
            "t",
            Spec {
                program: Program::Argv(vec!["sh".into(), "-c".into(), script]),
                vars: vec![],
                dir: None,
                socket: Some((l, "http".into())),
                output: Output::Inherit,
            },
            None,
        )
        .unwrap();
        assert!(p.wait().await.success());
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(first[0], "1");
        assert_eq!(first[1], first[2], "LISTEN_PID is the pid of the process holding fd 3");
        assert_eq!(first[3], "http");
        assert!(lines.next().unwrap().starts_with("socket:"), "fd 3 is a socket: {text}");
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "the parent let go of it");
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_and_reports_how_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let p = spawn(
            "stubborn",
            Spec {
                program: Program::Shell(format!(
                    "trap '' TERM; touch {}; while :; do sleep 0.05; done",
                    ready.display()
                )),
                vars: vec![],
                dir: None,
                socket: None,
                output: Output::Prefixed { label: "stubborn".into(), color: None },
            },
            None,
        )
        .unwrap();
        while !ready.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = p.stop(Duration::from_millis(300)).await;
        assert_eq!(describe(status), "killed by SIGKILL");
        assert_eq!(exit_code(status), 137);
        let q = spawn(
            "quick",
            Spec {
                program: Program::Shell("exit 3".into()),
                vars: vec![],
                dir: None,
                socket: None,
                output: Output::Inherit,
            },
            None,
        )
        .unwrap();
        assert_eq!(describe(q.wait().await), "exited with status 3");
    }
}
