//! Group commit above Raft.
//!
//! openraft 0.9 writes and fsyncs each `client_write` on its own before taking the next (its core
//! awaits the log flush inside `append_to_log`), so a log entry per command would cost an fsync per
//! command. The batcher keeps at most one `client_write` in flight; commands proposed meanwhile
//! wait in a queue and go out together as one entry (`Request::commands`) when it returns. With one
//! client nothing changes; under load, an entry carries as many commands as arrived during the
//! previous write.
//!
//! Each command is still applied on its own (its own revision, its own rejection), in order.

use openraft::Raft;
use portmesh_core::{Command, Request, Response};
use portmesh_store::TypeConfig;
use tokio::sync::{mpsc, oneshot};

use crate::{ProposeError, now_ms};

/// Most commands one entry carries.
pub const MAX_COMMANDS_PER_ENTRY: usize = 512;

pub(crate) type Reply = oneshot::Sender<Result<Response, ProposeError>>;

/// Handle to the batcher task.
#[derive(Debug, Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<(Command, Reply)>,
}

impl Batcher {
    pub(crate) fn start(raft: Raft<TypeConfig>) -> Batcher {
        let (tx, rx) = mpsc::channel(4 * MAX_COMMANDS_PER_ENTRY);
        tokio::spawn(run(raft, rx));
        Batcher { tx }
    }

    pub(crate) async fn propose(&self, command: Command) -> Result<Response, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || ProposeError::Unavailable("the node is shutting down".into());
        self.tx.send((command, reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run(raft: Raft<TypeConfig>, mut rx: mpsc::Receiver<(Command, Reply)>) {
    let mut commands = Vec::new();
    let mut replies = Vec::new();
    while let Some((cmd, reply)) = rx.recv().await {
        commands.push(cmd);
        replies.push(reply);
        while commands.len() < MAX_COMMANDS_PER_ENTRY {
            match rx.try_recv() {
                Ok((cmd, reply)) => {
                    commands.push(cmd);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        // The leader's clock, stamped once per entry: the only time `apply` sees.
        let req = Request { time_ms: now_ms(), commands: std::mem::take(&mut commands) };
        match raft.client_write(req.into()).await {
            Ok(resp) => {
                let mut results = resp.data.into_iter();
                for reply in replies.drain(..) {
                    let r = results.next().ok_or_else(|| {
                        ProposeError::Unavailable(
                            "internal error: the entry returned fewer responses than commands".into(),
                        )
                    });
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                let err = crate::write_error(e);
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}
