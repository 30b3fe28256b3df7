//! Upgrades, with both versions' real binaries: a node of the newest release listed in
//! `deploy/releases` (built from its commit by `deploy/build-release`, in an image made by
//! `deploy/build-image` from today's Dockerfile) writes a data directory in a Docker volume;
//! the image under test then serves that same volume and must hold everything the old node
//! acknowledged, and write on. Going back is refused with a message naming both versions.
//!
//! Each version is driven by its own CLI inside its own container (`docker exec`), so the test
//! speaks to every node in the words of its release.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::docker::{docker, image};

const RELEASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/releases");

/// The newest release listed: (version, commit).
fn newest_release() -> (String, String) {
    let list = std::fs::read_to_string(RELEASES).unwrap();
    let line = list.lines().rfind(|l| !l.starts_with('#') && !l.trim().is_empty()).unwrap();
    let (version, commit) = line.split_once(' ').unwrap();
    (version.to_string(), commit.trim().to_string())
}

/// The image of release `version`, its binary built from its own commit.
fn release_image(version: &str, commit: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/build-release");
    let out = Command::new(script).arg(version).output().unwrap();
    assert!(out.status.success(), "building release {version}: {}", String::from_utf8_lossy(&out.stderr));
    let bin = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
    let tag = format!("portmesh-release:{version}-{}", &commit[..12]);
    let build = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/build-image");
    let out = Command::new(build).args([&bin, &tag]).output().unwrap();
    assert!(out.status.success(), "image of {version}: {}", String::from_utf8_lossy(&out.stderr));
    tag
}

/// A volume and the containers that used it; all go when dropped.
struct Upgrade {
    volume: String,
    containers: Vec<String>,
}

impl Drop for Upgrade {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["volume", "rm", "-f", &self.volume]);
    }
}

impl Upgrade {
    /// Starts a node of `image` on the volume, as `name`, in the background.
    fn start(&mut self, name: &str, image: &str) {
        let mount = format!("{}:/data", self.volume);
        let args = ["run", "-d", "--name", name, "-v", &mount, image, "serve", "--data", "/data"];
        docker(&[&args[..], &["--listen", "127.0.0.1:7400", "--bootstrap"]].concat()).unwrap();
        self.containers.push(name.to_string());
    }

    /// Runs the container's own CLI against its node.
    fn pm(&self, name: &str, args: &[&str]) -> Result<String, String> {
        docker(&[&["exec", name, "portmesh", "--node", "127.0.0.1:7400"][..], args].concat())
    }

    fn wait_serving(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = self.pm(name, &["status"]) {
            if Instant::now() > deadline {
                panic!("{name} does not serve within 60 s ({e}); its log:\n{}", logs(name));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What a container wrote, both streams.
fn logs(name: &str) -> String {
    let out = Command::new("docker").args(["logs", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Every `"port"` number in a JSON document, sorted: what `ls --json` lists, in any version's
/// shape.
fn ports_in(json: &str) -> Vec<u64> {
    fn walk(v: &Value, out: &mut Vec<u64>) {
        match v {
            Value::Object(m) => {
                if let Some(p) = m.get("port").and_then(Value::as_u64) {
                    out.push(p);
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&serde_json::from_str(json).unwrap(), &mut out);
    out.sort_unstable();
    out
}

/// The lease ids in a JSON document (`"lease_id"`, non-zero).
fn leases_in(json: &str) -> Vec<u64> {
    let v: Value = serde_json::from_str(json).unwrap();
    let mut out: Vec<u64> = v["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["lease_id"].as_u64().filter(|l| *l != 0))
        .collect();
    out.dedup();
    out
}

#[test]
#[ignore = "needs a Docker engine: scripts/test runs it when one answers"]
fn docker_a_data_directory_written_by_the_previous_release_is_read_after_an_upgrade() {
    let (version, commit) = newest_release();
    let old_image = release_image(&version, &commit);
    let new_image = image();
    let name = format!("portmesh-upgrade-{}", std::process::id());
    let mut u = Upgrade { volume: format!("{name}-data"), containers: Vec::new() };
    docker(&["volume", "create", &u.volume]).unwrap();

    // The release writes: a sticky key, a port under a lease, a reservation, a pool of its own
    // and a port from it.
    let old = format!("{name}-old");
    u.start(&old, &old_image);
    u.wait_serving(&old);
    let sticky = u.pm(&old, &["alloc", "web", "--key", "shop/web"]).unwrap();
    let leased = u.pm(&old, &["alloc", "ci", "--ttl", "10m"]).unwrap();
    u.pm(&old, &["reserve", "8500", "--reason", "kept across the upgrade"]).unwrap();
    u.pm(&old, &["pools", "add", "upg", "30000-30009"]).unwrap();
    assert_eq!(u.pm(&old, &["alloc", "x", "--pool", "upg"]).unwrap(), "30000");
    let before = u.pm(&old, &["ls", "--json"]).unwrap();
    let lease = leases_in(&before);
    assert_eq!(lease.len(), 1, "one lease before: {before}");
    let listed = ports_in(&before);
    for p in [&sticky, &leased, "8500", "30000"] {
        assert!(listed.contains(&p.parse().unwrap()), "{p} listed by {version}: {before}");
    }
    docker(&["stop", "-t", "20", &old]).unwrap();

    // The build under test opens the same directory.
    let new = format!("{name}-new");
    u.start(&new, &new_image);
    u.wait_serving(&new);
    let after = u.pm(&new, &["ls", "--json"]).unwrap();
    assert_eq!(ports_in(&after), listed, "the same ports after the upgrade: {after}");
    assert_eq!(leases_in(&after), lease, "the same lease: {after}");
    assert_eq!(u.pm(&new, &["alloc", "web", "--key", "shop/web"]).unwrap(), sticky, "the key keeps its port");
    u.pm(&new, &["renew", "--lease", &lease[0].to_string()]).unwrap();
    let pools = u.pm(&new, &["pools", "ls", "--json"]).unwrap();
    assert!(pools.contains("\"upg\""), "{pools}");
    assert_eq!(u.pm(&new, &["alloc", "y", "--pool", "upg"]).unwrap(), "30001", "and it writes on");
    let log = logs(&new);
    assert!(log.contains("upgrading the data directory"), "the upgrade is logged: {log}");
    docker(&["stop", "-t", "20", &new]).unwrap();

    // Back to the release: it refuses the newer directory, naming the versions, and changes
    // nothing.
    let back = format!("{name}-back");
    u.start(&back, &old_image);
    let status = docker(&["wait", &back]).unwrap();
    assert_ne!(status, "0", "the release must not serve a newer data directory");
    let said = logs(&back);
    assert!(said.contains("holds portmesh data version") && said.contains("reads version 1"), "{said}");
    let again = format!("{name}-again");
    u.start(&again, &new_image);
    u.wait_serving(&again);
    let last = u.pm(&again, &["ls", "--json"]).unwrap();
    assert_eq!(ports_in(&last).len(), listed.len() + 1, "nothing lost by the refused start: {last}");
}
