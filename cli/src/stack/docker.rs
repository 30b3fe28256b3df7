//! Docker, as far as a stack meets it: the container that publishes a port, and stopping it.

use anyhow::{Result, bail};

/// The container that publishes `port`, if its holder is Docker's proxy.
pub async fn container_publishing(port: u16, owner: &portmesh_probe::Owner) -> Option<String> {
    if !owner.command.as_deref().is_some_and(|c| c.contains("docker-proxy")) {
        return None;
    }
    let out = tokio::process::Command::new("docker")
        .args(["ps", "--format", "{{.Names}}\t{{.Ports}}"])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.split('\t').nth(1).is_some_and(|ports| ports.contains(&format!(":{port}->"))))
        .and_then(|l| l.split('\t').next())
        .map(str::to_string)
}

/// Stops container `name` (`docker stop`, which gives it Docker's own grace period).
pub async fn stop(name: &str) -> Result<()> {
    let out = tokio::process::Command::new("docker").args(["stop", name]).output().await?;
    if !out.status.success() {
        bail!("docker stop {name} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
