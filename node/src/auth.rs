//! The first tokens of a cluster started with `serve --bootstrap --auth` (or by the first seed):
//! its first admin token, and a standing join token when one is given.

use std::path::Path;
use std::time::Duration;

use portmesh_api::Api;
use portmesh_core::{Command, Rejection, Response, Role};

use crate::NodeError;

/// A fresh token string (`portmesh token mint`), known to no cluster until one registers it:
/// its role is decided there.
pub fn new_token() -> Result<String, NodeError> {
    portmesh_api::auth::mint(Role::Join, String::new(), None, None)
        .map(|m| m.secret)
        .map_err(|e| NodeError::Auth(e.to_string()))
}

/// Where the bootstrapping node writes the first admin token (0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Makes the cluster's first admin token, once: unless the state already holds an admin token,
/// `given` (`serve --admin-token-file`, a token made beforehand with `portmesh token mint` and
/// kept in a Secret), else the token in `DATA/admin.token` (written now if absent, before it is
/// proposed, so a crash in between leaves the file and the next start proposes the same token)
/// is added.
pub(crate) async fn first_admin_token(
    api: &Api,
    data_dir: &Path,
    given: Option<&str>,
    timeout: Duration,
) -> Result<(), NodeError> {
    if api.node().state().read().state.auth_on() {
        return Ok(());
    }
    if let Some(token) = given {
        let record = portmesh_api::auth::record_of(token, Role::Admin).ok_or_else(|| {
            NodeError::Auth(
                "--admin-token-file holds no portmesh token (make one with `portmesh token mint`)".into(),
            )
        })?;
        return add(api, record, "the first admin token is the one --admin-token-file gave", timeout).await;
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let failed =
        |what: &str, e: &dyn std::fmt::Display| NodeError::Auth(format!("{what} {}: {e}", path.display()));
    let record = match std::fs::read_to_string(&path) {
        Ok(text) => portmesh_api::auth::record_of(&text, Role::Admin).ok_or_else(|| {
            NodeError::Auth(format!(
                "{} holds no portmesh token: move it aside and start again to make a new one",
                path.display()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let minted = portmesh_api::auth::mint(Role::Admin, String::new(), None, None)
                .map_err(|e| NodeError::Auth(e.to_string()))?;
            portmesh_probe::private::write(&path, format!("{}\n", minted.secret).as_bytes())
                .map_err(|e| failed("cannot write", &e))?;
            minted.token
        }
        Err(e) => return Err(failed("cannot read", &e)),
    };
    let said = format!("authentication on: the first admin token is in {}", path.display());
    add(api, record, &said, timeout).await
}

/// Registers `given` (`--join-token` on the node that creates the cluster) as a standing join
/// token: no expiry, no use limit, for members that come and go (a StatefulSet's pods), until an
/// admin revokes it.
pub(crate) async fn standing_join_token(api: &Api, given: &str, timeout: Duration) -> Result<(), NodeError> {
    let record = portmesh_api::auth::record_of(given, Role::Join).ok_or_else(|| {
        NodeError::Auth("--join-token holds no portmesh token (make one with `portmesh token mint`)".into())
    })?;
    add(api, record, "the join token given is registered (no expiry, no use limit)", timeout).await
}

/// Proposes a token, once: one already there is fine.
async fn add(
    api: &Api,
    record: portmesh_core::Token,
    said: &str,
    timeout: Duration,
) -> Result<(), NodeError> {
    let id = record.id.clone();
    let role = record.role;
    let proposed = tokio::time::timeout(timeout, api.node().propose(Command::AddToken(Box::new(record))))
        .await
        .map_err(|_| NodeError::Auth(format!("the {role:?} token was not committed within {timeout:?}")))?
        .map_err(|e| NodeError::Auth(format!("the {role:?} token was not committed: {e}")))?;
    match proposed {
        Response::TokenAdded(_) | Response::Rejected(Rejection::TokenExists { .. }) => {
            tracing::info!(%id, "{said}");
            Ok(())
        }
        other => Err(NodeError::Auth(format!("the {role:?} token was refused: {other:?}"))),
    }
}
