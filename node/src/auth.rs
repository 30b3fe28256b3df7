//! The first admin token of a cluster started with `serve --bootstrap --auth`.

use std::path::Path;
use std::time::Duration;

use portmesh_api::Api;
use portmesh_core::{Command, Rejection, Response, Role};

use crate::NodeError;

/// Where the bootstrapping node writes the first admin token (0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Makes the cluster's first admin token, once: unless the state already holds an admin token,
/// the token in `DATA/admin.token` (written now if absent, before it is proposed, so a crash in
/// between leaves the file and the next start proposes the same token) is added.
pub(crate) async fn first_admin_token(
    api: &Api,
    data_dir: &Path,
    timeout: Duration,
) -> Result<(), NodeError> {
    if api.node().state().read().state.auth_on() {
        return Ok(());
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
    let id = record.id.clone();
    let proposed = tokio::time::timeout(timeout, api.node().propose(Command::AddToken(Box::new(record))))
        .await
        .map_err(|_| NodeError::Auth(format!("the admin token was not committed within {timeout:?}")))?
        .map_err(|e| NodeError::Auth(format!("the admin token was not committed: {e}")))?;
    match proposed {
        Response::TokenAdded(_) | Response::Rejected(Rejection::TokenExists { .. }) => {
            tracing::info!(%id, file = %path.display(), "authentication on: the first admin token is in the file");
            Ok(())
        }
        other => Err(NodeError::Auth(format!("the admin token was refused: {other:?}"))),
    }
}
