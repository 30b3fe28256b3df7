//! Keeping a lease alive in the background: [`Client::keep_lease`] and its [`LeaseKeeper`].

use std::time::Duration;

use crate::{Client, pb};

/// Why a kept lease was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    #[error("lease {id} no longer exists (it expired or was revoked): its ports are gone")]
    Gone { id: u64 },
    #[error(
        "lease {id} was not renewed for a whole TTL ({ttl:?}): no node answered ({last_error}); assume it expired"
    )]
    Unrenewed { id: u64, ttl: Duration, last_error: String },
}

/// Renews a lease in the background (see [`Client::keep_lease`]). Dropping it stops renewing.
#[derive(Debug)]
pub struct LeaseKeeper {
    id: u64,
    lost: tokio::sync::watch::Receiver<Option<LeaseLost>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Waits until the lease is lost.
    pub async fn lost(&mut self) -> LeaseLost {
        loop {
            if let Some(l) = self.lost.borrow_and_update().clone() {
                return l;
            }
            if self.lost.changed().await.is_err() {
                // The renewing task ended without a report (it cannot, short of a panic).
                return LeaseLost::Gone { id: self.id };
            }
        }
    }

    /// The loss, if the lease was lost already.
    pub fn lost_now(&self) -> Option<LeaseLost> {
        self.lost.borrow().clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Keeps a lease alive in the background: renews it every `ttl / 3` until the returned
    /// handle is dropped, and reports through the handle when the lease is lost (gone, or not
    /// renewed for a whole TTL because no node answered).
    ///
    /// ```no_run
    /// # async fn demo(client: portmesh_client::Client) -> Result<(), portmesh_client::ClientError> {
    /// use std::time::Duration;
    /// let lease = client
    ///     .grant_lease(portmesh_client::pb::LeaseGrantRequest { team: "default".into(), ttl_ms: 30_000 })
    ///     .await?;
    /// let mut kept = client.keep_lease("default", lease.id, Duration::from_secs(30));
    /// // ... run the work that needs the ports ...
    /// if let Some(lost) = kept.lost_now() {
    ///     eprintln!("lost the lease: {lost}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn keep_lease(&self, team: &str, id: u64, ttl: Duration) -> LeaseKeeper {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let client = self.clone();
        let team = team.to_string();
        let every = (ttl / 3).max(Duration::from_millis(100));
        let task = tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(every).await;
                match client
                    .keep_alive_once(pb::LeaseKeepAliveRequest { team: team.clone(), lease_id: id })
                    .await
                {
                    Ok(Some(_)) => renewed = tokio::time::Instant::now(),
                    Ok(None) => {
                        tx.send_replace(Some(LeaseLost::Gone { id }));
                        return;
                    }
                    Err(e) if renewed.elapsed() >= ttl => {
                        tx.send_replace(Some(LeaseLost::Unrenewed { id, ttl, last_error: e.to_string() }));
                        return;
                    }
                    // A failed renewal with time left: try again at the next turn.
                    Err(_) => {}
                }
            }
        });
        LeaseKeeper { id, lost: rx, task }
    }
}
