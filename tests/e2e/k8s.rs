//! The Kubernetes manifests (`k8s/`): strict schema validation against a pinned Kubernetes
//! version (kubernetes-validate from PyPI, in a venv `scripts/k8s-manifests` makes), and, in the
//! container tier, the StatefulSet's start logic run for real: containers named and addressed as
//! its pods (`portmesh-N.portmesh.default.svc.cluster.local` as network aliases), each started
//! with the args and environment the manifest gives that pod, the Secrets' keys where the
//! manifest mounts them or in the variables it fills from them (certificates from `tls init`,
//! tokens from `token mint`), and its data in a volume of its own.

use std::process::Command;
use std::time::Duration;

use portmesh_client::{Client, ClientOptions, pb};

use crate::docker::{docker, image};
use crate::support::BIN;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn manifests(args: &[&str]) -> std::process::Output {
    Command::new(format!("{ROOT}/scripts/k8s-manifests")).args(args).current_dir(ROOT).output().unwrap()
}

#[test]
fn the_kubernetes_manifests_pass_strict_schema_validation_and_a_broken_one_does_not() {
    let out = manifests(&["validate"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "k8s/ is invalid: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
    for kind in [
        "StatefulSet/portmesh",
        "Service/portmesh",
        "Service/portmesh-client",
        "PodDisruptionBudget/portmesh",
    ] {
        assert!(
            stdout.contains(&format!(": {kind} (Kubernetes 1.31.0, strict)")),
            "{kind} checked: {stdout}"
        );
    }

    // The validation can fail: a misspelt field, and a manifest the kustomization leaves out.
    let copy = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(format!("{ROOT}/k8s")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
    }
    let sts = copy.path().join("statefulset.yaml");
    let text = std::fs::read_to_string(&sts).unwrap();
    std::fs::write(&sts, text.replace("  podManagementPolicy: Parallel", "  podManagementPolcy: Parallel"))
        .unwrap();
    std::fs::write(copy.path().join("extra.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
        .unwrap();
    let out = manifests(&["validate", copy.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("statefulset.yaml: StatefulSet") && stderr.contains("podManagementPolcy"),
        "{stderr}"
    );
    assert!(stderr.contains("extra.yaml: not listed in kustomization.yaml"), "{stderr}");
}

/// Secrets by name: key -> value.
type Secrets = std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>;

/// What the StatefulSet gives pod `name`: its args, its environment (with the Secrets' values
/// where it refers to them) and the Secrets it mounts (directory -> file name -> content).
struct PodSpec {
    args: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<(String, Vec<(String, String)>)>,
    grace: u64,
}

fn pod_spec(name: &str, secrets: &Secrets) -> PodSpec {
    let out = manifests(&["pod", name, "default"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let strings = |v: &serde_json::Value| v.as_str().unwrap().to_string();
    let secret = |name: &serde_json::Value| &secrets[name.as_str().unwrap()];
    let mut env: Vec<(String, String)> =
        v["env"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), strings(v))).collect();
    for (k, r) in v["secret_env"].as_object().unwrap() {
        env.push((k.clone(), secret(&r["secret"])[r["key"].as_str().unwrap()].clone()));
    }
    let mut mounts = Vec::new();
    for (dir, m) in v["secret_mounts"].as_object().unwrap() {
        let items = m["items"].as_object().unwrap();
        let mut files = Vec::new();
        for (key, value) in secret(&m["secret"]) {
            let path = if items.is_empty() { Some(key.clone()) } else { items.get(key).map(strings) };
            if let Some(path) = path {
                files.push((path, value.clone()));
            }
        }
        mounts.push((dir.clone(), files));
    }
    PodSpec {
        args: v["args"].as_array().unwrap().iter().map(strings).collect(),
        env,
        mounts,
        grace: v["grace_seconds"].as_u64().unwrap(),
    }
}

/// The pods of one StatefulSet on a Docker network of this test; containers, volumes and the
/// network go when it is dropped.
struct Pods {
    net: String,
    prefix: String,
    image: String,
    secrets: Secrets,
    options: ClientOptions,
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Pods {
    fn create() -> Pods {
        let image = image();
        let net = format!("portmesh-k8s-{}", std::process::id());
        let _ = docker(&["network", "rm", &net]);
        for attempt in 0..40u32 {
            let prefix = format!("172.28.{}", 30 + (std::process::id() + attempt * 7) % 200);
            if docker(&["network", "create", "--subnet", &format!("{prefix}.0/24"), &net]).is_err() {
                continue;
            }
            // What `tls init` makes for a StatefulSet, named as the Secret's keys, and the
            // tokens `token mint` makes.
            let made = tempfile::tempdir().unwrap();
            let mut init = Command::new(BIN);
            init.args(["tls", "init"])
                .arg(made.path())
                .args(["--host", "*.portmesh.default.svc.cluster.local"]);
            for i in 0..5 {
                init.args(["--ip", &format!("{prefix}.{}", 10 + i)]);
            }
            let out = init.output().unwrap();
            assert!(out.status.success(), "tls init: {}", String::from_utf8_lossy(&out.stderr));
            let read = |f: &str| std::fs::read_to_string(made.path().join(f)).unwrap();
            let tls =
                [("tls.crt", read("node.pem")), ("tls.key", read("node.key")), ("ca.crt", read("ca.pem"))];
            let mint = || {
                let out = Command::new(BIN).args(["token", "mint"]).output().unwrap();
                assert!(out.status.success());
                String::from_utf8(out.stdout).unwrap().trim().to_string()
            };
            let tokens = [("admin", mint()), ("join", mint())];
            let admin = tokens[0].1.clone();
            let secret = |kv: &[(&str, String)]| kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            let secrets: Secrets = [
                ("portmesh-tls".to_string(), secret(&tls)),
                ("portmesh-tokens".to_string(), secret(&tokens)),
            ]
            .into();
            let ca = made.path().join("ca.pem");
            let tls = portmesh_tls::ClientTls::load(&ca, None, None).unwrap();
            return Pods {
                net,
                prefix,
                image,
                secrets,
                options: ClientOptions { tls: Some(tls), token: Some(admin) },
                containers: Vec::new(),
                volumes: Vec::new(),
            };
        }
        panic!("cannot create a Docker network for the pods");
    }

    fn name(&self, i: usize) -> String {
        format!("{}-portmesh-{i}", self.net)
    }

    fn volume(&self, i: usize) -> String {
        format!("{}-data-portmesh-{i}", self.net)
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{}:7400", self.prefix, 10 + i)
    }

    /// Creates pod `i` as the StatefulSet would: the manifest's args and environment, its
    /// volume (kept from an earlier pod of the same ordinal, if any), the certificates where the
    /// Secret is mounted, and its DNS name on the network.
    fn start(&mut self, i: usize) {
        let spec = pod_spec(&format!("portmesh-{i}"), &self.secrets);
        let (name, volume) = (self.name(i), self.volume(i));
        let alias = format!("portmesh-{i}.portmesh.default.svc.cluster.local");
        let ip = format!("{}.{}", self.prefix, 10 + i);
        let mount = format!("{volume}:/data");
        // Restarted when it fails, as a pod's container is.
        let mut args: Vec<String> =
            ["create", "--name", &name, "--hostname", &format!("portmesh-{i}"), "--restart", "on-failure"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        // The root file system is read-only, as the manifest's securityContext says.
        args.push("--read-only".into());
        for (k, v) in [("--network", &self.net), ("--ip", &ip), ("--network-alias", &alias), ("-v", &mount)] {
            args.extend([k.to_string(), v.clone()]);
        }
        // Each mounted Secret is a volume of its own (written below, before the start).
        for (n, (dir, _)) in spec.mounts.iter().enumerate() {
            let secret = format!("{name}-secret-{n}");
            let _ = docker(&["volume", "rm", "-f", &secret]);
            args.extend(["-v".to_string(), format!("{secret}:{dir}")]);
            self.volumes.push(secret);
        }
        for (k, v) in &spec.env {
            args.extend(["-e".to_string(), format!("{k}={v}")]);
        }
        args.push(self.image.clone());
        args.extend(spec.args.iter().cloned());
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        if !self.volumes.contains(&volume) {
            self.volumes.push(volume);
        }
        self.containers.push(name.clone());
        // The Secrets' files, readable by the node's uid 65532 (fsGroup does that for a pod).
        for (dir, files) in &spec.mounts {
            let local = tempfile::tempdir().unwrap();
            for (file, content) in files {
                std::fs::write(local.path().join(file), content).unwrap();
            }
            let chmod = Command::new("chmod").args(["-R", "a+rX"]).arg(local.path()).status().unwrap();
            assert!(chmod.success());
            docker(&["cp", &format!("{}/.", local.path().display()), &format!("{name}:{dir}")]).unwrap();
        }
        docker(&["start", &name]).unwrap();
    }

    /// Deletes pod `i` as Kubernetes does: SIGTERM, then the grace period.
    fn delete(&mut self, i: usize) {
        let name = self.name(i);
        let grace = pod_spec(&format!("portmesh-{i}"), &self.secrets).grace.to_string();
        docker(&["stop", "--time", &grace, &name]).unwrap();
        docker(&["rm", &name]).unwrap();
        self.containers.retain(|c| *c != name);
    }

    /// A client of pod `i` alone.
    async fn client(&self, i: usize) -> Result<Client, portmesh_client::ClientError> {
        Client::connect_with(&[self.addr(i).as_str()], self.options.clone()).await
    }

    /// A client that starts at pod `i` and knows the first three pods' addresses too: the leader
    /// a follower names goes by its DNS name, which resolves only inside the network.
    async fn writer(&self, i: usize) -> Client {
        let addrs: Vec<String> = std::iter::once(i).chain(0..3).map(|j| self.addr(j)).collect();
        Client::connect_with(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), self.options.clone())
            .await
            .unwrap()
    }

    /// Waits until pod `i` is ready (gRPC health `portmesh`, the readiness probe's) and answers
    /// its status.
    async fn ready(&self, i: usize) -> pb::StatusResponse {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(c) = self.client(i).await
                && c.health("portmesh").await.unwrap_or(false)
                && let Ok(s) = c.status().await
            {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                let logs = docker(&["logs", "--tail", "30", &self.name(i)]).unwrap_or_else(|e| e);
                panic!("pod {i} was not ready within 90 s; its log:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until pod `i` sees `n` members.
    async fn members(&self, i: usize, n: usize) -> pb::StatusResponse {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.ready(i).await;
            if s.members.len() == n {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {n} members: {:?}", s.members);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine: scripts/test runs it when one answers"]
async fn docker_the_statefulset_pods_form_one_cluster_rejoin_scale_and_never_make_a_second() {
    let mut pods = Pods::create();
    // podManagementPolicy Parallel: the three pods start together.
    for i in 0..3 {
        pods.start(i);
    }
    let first = pods.members(0, 3).await;
    let cluster = first.cluster_id.clone();
    for i in 1..3 {
        assert_eq!(pods.members(i, 3).await.cluster_id, cluster, "one cluster");
    }
    let item = |s: &str| pb::AllocItem { service: s.into(), ..Default::default() };
    let c1 = pods.writer(1).await;
    let kept =
        c1.allocate(pb::AllocateRequest { items: vec![item("kept")], ..Default::default() }).await.unwrap();
    let kept = kept.allocations[0].port;

    eprintln!("statefulset: pod 1 recreated with its volume");
    // Pod 1 deleted and recreated with its volume: the same member again.
    let id1 = pods.ready(1).await.node_id;
    pods.delete(1);
    pods.start(1);
    let back = pods.members(1, 3).await;
    assert_eq!((back.node_id, &back.cluster_id), (id1, &cluster), "rejoined with its volume");

    eprintln!("statefulset: scaled to 5 and back");
    // Scaled to 5: two more members; back to 3: they leave, and the cluster is three again.
    pods.start(3);
    pods.start(4);
    let five = pods.members(0, 5).await;
    let learners = five.members.iter().filter(|m| m.role == "learner").count();
    assert_eq!(learners, 2, "beyond --voters 3 they are learners: {:?}", five.members);
    pods.delete(4);
    pods.delete(3);
    let three = pods.members(0, 3).await;
    assert!(three.members.iter().all(|m| m.role != "learner"), "{:?}", three.members);

    eprintln!("statefulset: pod 0 recreated without its volume");
    // Pod 0 recreated without its volume: it must not create a second cluster. It joins the
    // running one in its old place.
    let old0 = pods.ready(0).await.node_id;
    pods.delete(0);
    docker(&["volume", "rm", &pods.volume(0)]).unwrap();
    pods.start(0);
    let again = pods.ready(0).await;
    assert_eq!(again.cluster_id, cluster, "joined the running cluster, not a new one");
    assert_ne!(again.node_id, old0);
    let view = pods.members(1, 3).await;
    assert!(!view.members.iter().any(|m| m.id == old0), "the old member is gone: {:?}", view.members);
    assert!(view.members.iter().any(|m| m.id == again.node_id && m.role != "learner"), "{:?}", view.members);
    let c0 = pods.writer(0).await;
    let listed = c0.list(pb::ListRequest::default()).await.unwrap();
    assert!(listed.allocations.iter().any(|a| a.port == kept), "what was acknowledged is there");
    c0.allocate(pb::AllocateRequest { items: vec![item("after")], ..Default::default() }).await.unwrap();
}
