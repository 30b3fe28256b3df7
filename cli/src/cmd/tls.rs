//! `tls init`: a CA, a node certificate and a client certificate in one command.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use portmesh_tls::generate::{Authority, Spec};
use serde_json::json;

fn write(path: &Path, text: &str) -> Result<()> {
    portmesh_probe::private::write(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn init(
    dir: &Path,
    hosts: &[String],
    ips: &[IpAddr],
    name: &str,
    valid_for: Duration,
    json: bool,
) -> Result<()> {
    portmesh_probe::private::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let reused = ca_pem.exists() && ca_key.exists();
    let ca = if reused {
        let read =
            |p: &Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
        Authority::from_pem(&read(&ca_pem)?, &read(&ca_key)?).with_context(|| {
            format!("{} and {} are not a CA certificate and its key", ca_pem.display(), ca_key.display())
        })?
    } else {
        // A name of its own, so that two teams' CAs are never mistaken for each other by name.
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let ca =
            Authority::new(&format!("portmesh CA {:08x}", (tag ^ u64::from(std::process::id())) as u32))?;
        write(&ca_pem, ca.cert_pem())?;
        write(&ca_key, ca.key_pem())?;
        ca
    };

    let mut names: Vec<String> = hosts.to_vec();
    if !names.iter().any(|h| h == "localhost") {
        names.push("localhost".into());
    }
    let mut addrs: Vec<IpAddr> = ips.to_vec();
    for ip in [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    let node = ca.issue(&Spec { valid_for, ..Spec::node(names.clone(), addrs.clone()) })?;
    let (node_pem, node_key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    // The key first: a node re-reading the files on change sees the pair complete at the
    // certificate's rename.
    write(&node_key, &node.key_pem)?;
    write(&node_pem, &node.cert_pem)?;
    let (client_pem, client_key) = (dir.join("client.pem"), dir.join("client.key"));
    let new_client = !client_pem.exists();
    if new_client {
        let client = ca.issue(&Spec { valid_for, ..Spec::client("portmesh client") })?;
        write(&client_key, &client.key_pem)?;
        write(&client_pem, &client.cert_pem)?;
    }

    let valid: Vec<String> = names.iter().cloned().chain(addrs.iter().map(IpAddr::to_string)).collect();
    if json {
        println!(
            "{}",
            json!({
                "ca": ca_pem, "ca_key": ca_key, "ca_reused": reused,
                "node_cert": node_pem, "node_key": node_key, "valid_for": valid,
                "client_cert": client_pem, "client_key": client_key, "client_new": new_client,
            })
        );
        return Ok(());
    }
    let d = dir.display();
    if reused {
        println!("used the CA in {d}/ca.pem");
    } else {
        println!("wrote {d}/ca.pem   the CA: every node and client trusts it (--tls-ca)");
        println!("wrote {d}/ca.key   the CA's key: keep it off the nodes; `tls init` issues more with it");
    }
    println!(
        "wrote {}, {}   node certificate for {}",
        node_pem.display(),
        node_key.display(),
        valid.join(", ")
    );
    if new_client {
        println!("wrote {d}/client.pem, {d}/client.key   client certificate (for nodes run with --mtls)");
    }
    println!("next:");
    println!(
        "  portmesh serve --tls-cert {} --tls-key {} --tls-ca {d}/ca.pem --listen ADDR:7400 --advertise NAME:7400 ...",
        node_pem.display(),
        node_key.display()
    );
    println!("  PORTMESH_TLS_CA={d}/ca.pem portmesh --node NAME:7400 status");
    Ok(())
}
