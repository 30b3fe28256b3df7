//! `up --detach`: a supervisor in the background that reports to the `up` that started it
//! through a pipe.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};

use anyhow::{Context, Result, bail};
use portmesh_client::Client;
use portmesh_project::Stack;

use super::record;
use crate::args::{Cli, UpArgs};
use crate::process;
use crate::render::named_ports;

/// `up --detach`: starts a supervisor in the background and waits until the stack is healthy
/// (or says why not).
pub async fn detach(cli: &Cli, c: &Client, a: &UpArgs, stack: &Stack) -> Result<i32> {
    let path = record::path(stack)?;
    let log = path.with_extension("log");
    if let Some(dir) = log.parent() {
        portmesh_probe::private::create_dir(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A fresh log for this run, readable by its owner only.
    let out =
        portmesh_probe::private::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let exe = std::env::current_exe().context("cannot find the portmesh binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("up").arg("--supervise").arg("-f").arg(&stack.file).arg("--env").arg(&stack.env);
    if let Some(i) = &stack.instance {
        cmd.arg("--instance").arg(i);
    }
    if let Some(n) = &cli.node {
        cmd.arg("--node").arg(n);
    } else {
        cmd.env("PORTMESH_NODE", c.addr());
    }
    if let Some(t) = &cli.team {
        cmd.arg("--team").arg(t);
    }
    if a.kill_existing {
        cmd.arg("--kill-existing");
    }
    // The supervisor reports through a pipe: "up" once healthy, or "failed" and why; an end
    // without a word means it died.
    let (from_supervisor, to_parent) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let fd = to_parent.as_raw_fd();
    cmd.arg("--report-fd").arg(fd.to_string());
    cmd.stdin(std::process::Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: setsid and fcntl are async-signal-safe. The supervisor leaves our session so a
    // Ctrl-C or a closed terminal does not reach it, and keeps its end of the pipe across exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 || libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the stack's supervisor")?;
    drop(to_parent);
    let said = tokio::task::spawn_blocking(move || {
        let mut said = String::new();
        std::fs::File::from(from_supervisor).read_to_string(&mut said).map(|_| said)
    })
    .await??;
    match said.split_once('\n') {
        Some(("up", _)) => {
            let st = record::read(&path)?
                .context("the supervisor said the stack is up, but left no state file")?;
            println!(
                "portmesh: {} is up (supervisor pid {}; output in {})",
                st.scope,
                st.supervisor,
                log.display()
            );
            // The supervisor said it in its log; the user of `up -d` sees only this terminal:
            // every port that differs from the wanted or last one.
            for line in &st.notes {
                eprintln!("portmesh: {line}");
            }
            for s in &st.services {
                println!("portmesh:   {}  {}  pid {}", s.name, named_ports(Some(&s.ports)), s.pid);
            }
            Ok(0)
        }
        Some(("failed", why)) => {
            let _ = child.wait().await;
            // The services' output only helps if some service got to write any.
            let wrote = std::fs::metadata(&log).is_ok_and(|m| m.len() > 0);
            if wrote {
                bail!("{why} (output in {})", log.display())
            }
            bail!("{why}")
        }
        _ => {
            let status = child.wait().await?;
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            bail!(
                "the stack's supervisor {} before the stack was up; its last output ({}):\n{}",
                process::describe(status),
                log.display(),
                tail.join("\n")
            )
        }
    }
}

/// Takes over the pipe `up --detach` passed as fd `fd`, closed on exec so the services do not
/// hold it open (the parent waits for its end).
pub fn adopt_report_pipe(fd: i32) -> Result<std::fs::File> {
    // SAFETY: fcntl on an fd number only reads or sets its flags; it fails with EBADF if no such
    // descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        bail!("--report-fd {fd}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in this process owns it:
    // it was inherited for this purpose alone.
    Ok(std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
}
